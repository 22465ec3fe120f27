//! SPI plans kept for the life of the process, one per SQL text.
//!
//! pg_emit runs the same few statements over and over: the outbox INSERT
//! at every async commit, the worker's claim and acknowledgement at every
//! wakeup. Parsing and planning them each time was most of their cost
//! (a quarter of all CPU at 7,000 small commits/s). A kept plan is
//! re-analysed by PostgreSQL itself when what it refers to changes (DDL,
//! `ALTER EXTENSION ... UPDATE`, a dropped and re-created extension), so it
//! never goes stale. Every statement kept here is schema-qualified, and it
//! runs under the pinned search_path of its callers.

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

thread_local! {
    /// Keyed by the address of the statement's `&'static str`.
    static PLANS: RefCell<HashMap<usize, OwnedPreparedStatement>> = RefCell::default();
}

/// Runs `sql`, planned once with the types of `args` as its parameter
/// types (every call site passes the same types).
fn run<'conn>(
    c: &mut SpiClient<'conn>,
    sql: &'static str,
    limit: Option<i64>,
    args: &[DatumWithOid],
    mutating: bool,
) -> SpiResult<SpiTupleTable<'conn>> {
    PLANS.with_borrow_mut(|plans| {
        let plan = match plans.entry(sql.as_ptr() as usize) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
                let plan = if mutating {
                    c.prepare_mut(sql, &types)?
                } else {
                    c.prepare(sql, &types)?
                };
                e.insert(plan.keep())
            }
        };
        let plan = &*plan;
        if mutating {
            c.update(plan, limit.map(|l| l as _), args)
        } else {
            c.select(plan, limit.map(|l| l as _), args)
        }
    })
}

/// A statement that reads.
pub fn select<'conn>(
    c: &mut SpiClient<'conn>,
    sql: &'static str,
    limit: Option<i64>,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    run(c, sql, limit, args, false)
}

/// A statement that writes.
pub fn update<'conn>(
    c: &mut SpiClient<'conn>,
    sql: &'static str,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    run(c, sql, None, args, true)
}
