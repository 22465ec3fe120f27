//! Where, when and in which transaction an event is made: what Debezium's
//! `source` and CloudEvents' `time`, `source` and `id` say. Read only for
//! the formats that say it, so `json` events cost nothing more.

use crate::encoding;
use pg_emit_core::event::Context;
use pg_emit_core::options::{Delivery, Format};
use pgrx::pg_sys;
use std::cell::OnceCell;
use std::rc::Rc;

thread_local! {
    /// The database's name: a database cannot be renamed while a session
    /// is connected to it, so it is read once per backend.
    static DATABASE: OnceCell<Rc<str>> = const { OnceCell::new() };
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The facts behind a [`Context`], owned.
#[derive(Default)]
pub struct Made {
    database: Rc<str>,
    txid: u64,
    lsn: u64,
    micros: i64,
    id: Option<String>,
}

impl Made {
    /// The facts of an event being made now in `format`, to be delivered
    /// by `mode`: async events get their CloudEvents id from the worker,
    /// which numbers them; sync and commit events get a fresh one here.
    pub fn now(format: Format, mode: Delivery) -> Made {
        if !format.needs_context() {
            return Made::default();
        }
        // Only Debezium's `source` says the transaction and WAL position.
        // The id is assigned if need be: a BEFORE trigger can fire before
        // the transaction's first write has given it one.
        // SAFETY: backend and shared state read inside a transaction.
        let (txid, lsn) = match format {
            Format::Debezium => unsafe {
                (
                    pg_sys::GetTopTransactionId().into_inner(),
                    pg_sys::GetXLogInsertRecPtr(),
                )
            },
            _ => (0, 0),
        };
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        Made {
            database: database(),
            txid: u64::from(txid),
            lsn,
            micros: now + PG_EPOCH_MICROS,
            id: (format.is_cloudevents() && mode != Delivery::Async).then(fresh_id),
        }
    }

    /// The facts of a change capture decoded: its transaction, where its
    /// commit is in the WAL and when it committed (microseconds since
    /// 2000-01-01, PostgreSQL's epoch).
    pub fn captured(format: Format, txid: u64, lsn: u64, commit_time: i64) -> Made {
        if !format.needs_context() {
            return Made::default();
        }
        Made {
            database: database(),
            txid,
            lsn,
            micros: commit_time + PG_EPOCH_MICROS,
            id: None,
        }
    }

    /// As [`Made::now`], for a `send_message` message: a CloudEvent that
    /// wraps it gets a message's id (see [`fresh_message_id`]).
    pub fn message(format: Format, mode: Delivery) -> Made {
        let mut made = Made::now(format, mode);
        if made.id.is_some() {
            made.id = Some(fresh_message_id());
        }
        made
    }

    pub fn ctx(&self) -> Context<'_> {
        Context {
            database: &self.database,
            txid: self.txid,
            lsn: self.lsn,
            micros: self.micros,
            id: self.id.as_deref(),
        }
    }
}

fn database() -> Rc<str> {
    DATABASE.with(|d| {
        d.get_or_init(|| {
            // SAFETY: the connected database's oid; the name is palloc'd
            // and NUL-terminated.
            unsafe {
                let ptr = pg_sys::get_database_name(pg_sys::MyDatabaseId);
                if ptr.is_null() {
                    return "".into();
                }
                encoding::name(ptr, &|| "the database's name".into()).into()
            }
        })
        .clone()
    })
}

/// An id for an event or request that is sent once (sync and commit
/// delivery are never retried): unique per backend and time, and across
/// backends by the pid.
pub fn fresh_id() -> String {
    fresh("msg")
}

/// A [`fresh_id`] for a `send_message` message: `message_…`, so that a
/// signed id tells a receiver that a caller wrote the body.
pub fn fresh_message_id() -> String {
    fresh("message")
}

fn fresh(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}_{nanos:x}_{:x}_{n:x}", std::process::id())
}
