//! Capture from the WAL, the worker's side: each capture's slot is read
//! with `pg_logical_slot_peek_binary_changes` (PostgreSQL's `pgoutput`,
//! protocol 1), every change of a committed transaction becomes an event
//! made as a row trigger makes it, and the events are queued in
//! `emit.outbox`, from where the worker delivers them like any async
//! event: retried, in order per key, dead-lettered, at least once.
//!
//! Nothing is lost and the slot holds no WAL for a receiver that is down:
//! one transaction queues the events of what it decoded and records how
//! far they go (`emit.capture_definitions.queued_lsn`); the slot is moved
//! there only after that commits. A crash in between decodes those
//! transactions again, and they are skipped: a transaction is queued when
//! its commit record starts before `queued_lsn`. When decoding found
//! nothing more to do, `queued_lsn` is the WAL flushed before it began,
//! so the slot follows the WAL however little of it is published.
//!
//! Values arrive as the text of their types' output functions; they go
//! back through the input functions into a row that `row_to_json` turns
//! into JSON, so that arrays, timestamps, numbers and JSON columns read
//! exactly as in a trigger's event. A TOASTed value an UPDATE left alone
//! is not in the WAL: it is left out of `new`.

use super::txn::{transaction, Failed};
use crate::capture::slot_pattern;
use crate::delivery::outbox;
use crate::delivery::Destination;
use crate::encoding;
use crate::event::{self, Event, Kind, Op};
use crate::made::Made;
use crate::settings;
use crate::stored::{self, Resolved};
use pg_emit_core::options::Format;
use pg_emit_core::pgoutput::{self, Message, Relation, Value};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::collections::HashMap;
use std::ffi::CString;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often captures look for new changes while all is quiet.
const POLL: Duration = Duration::from_millis(200);
/// How often the list of captures is read when there are none.
const IDLE_POLL: Duration = Duration::from_secs(2);
/// Changes one decoding call returns at most (whole transactions: one
/// larger than this is returned whole, read through a cursor).
const CHANGES_PER_PASS: i64 = 20_000;
/// Rows fetched from the cursor at a time; their values are freed after.
const FETCH: i64 = 500;
/// A capture that failed waits this long before it tries again.
const FAILED_WAIT: Duration = Duration::from_secs(5);
/// WAL without published changes that is decoded again and again rather
/// than recorded as passed (which writes WAL of its own, see [`capture`]).
const RECORD_GAP: u64 = 256 << 10;
/// Longest time without recording how far decoding went while WAL is
/// written (see [`capture`]).
const RECORD_EVERY: Duration = Duration::from_secs(10);
/// How often slots left without a capture are looked for.
const ORPHAN_CHECK: Duration = Duration::from_secs(60);

/// A capture as `emit.capture_definitions` has it.
struct Definition {
    name: String,
    dest: String,
    publication: String,
    slot: String,
    format: Option<Format>,
    /// The role that created it (see [`readable`]).
    created_by: pg_sys::Oid,
}

pub(super) struct Captures {
    next: Instant,
    /// Captures that failed, with when they may try again and whether
    /// the failure was logged.
    failed: HashMap<String, Instant>,
    /// Slots found without a capture at the last check: dropped when
    /// found so again (a `create_capture` still committing has its row by
    /// then).
    orphans: Vec<String>,
    orphans_checked: Instant,
    /// The outbox was full at the last pass (logged once).
    paused: bool,
    /// The WAL flushed when each capture last looked, and when it last
    /// recorded how far it queued.
    seen: HashMap<String, (u64, Instant)>,
}

impl Captures {
    pub(super) fn new() -> Self {
        Captures {
            next: Instant::now(),
            failed: HashMap::new(),
            orphans: Vec::new(),
            orphans_checked: Instant::now(),
            paused: false,
            seen: HashMap::new(),
        }
    }

    pub(super) fn next_timeout(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    pub(super) fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// One pass over every capture. Returns whether events were queued,
    /// or the failure that should stop the worker (the extension dropped,
    /// a lost deadlock).
    pub(super) fn run(&mut self) -> Result<bool, Failed> {
        let defs = transaction(c"pg_emit: reading captures", definitions)?;
        if self.orphans_checked.elapsed() >= ORPHAN_CHECK {
            self.orphans_checked = Instant::now();
            let seen = std::mem::take(&mut self.orphans);
            match transaction(c"pg_emit: dropping orphaned capture slots", || {
                drop_orphans(&seen)
            }) {
                Ok(now) => self.orphans = now,
                Err(e) => pgrx::warning!("pg_emit worker: capture slots: {e}"),
            }
        }
        if defs.is_empty() {
            self.next = Instant::now() + IDLE_POLL;
            return Ok(false);
        }
        let limit = settings::max_outbox_bytes();
        let full = limit > 0
            && transaction(c"pg_emit: measuring the outbox", || {
                Spi::connect(|c| {
                    c.select(
                        "SELECT pg_catalog.pg_table_size('emit.outbox'::pg_catalog.regclass)",
                        None,
                        &[],
                    )?
                    .first()
                    .get_one::<i64>()
                })
            })?
            .is_some_and(|size| size > limit);
        if full {
            if !self.paused {
                pgrx::log!(
                    "pg_emit worker: capture paused: emit.outbox is past pg_emit.max_outbox_size \
                     (the slots keep WAL until it is back under)"
                );
            }
            self.paused = true;
            self.next = Instant::now() + POLL;
            return Ok(false);
        }
        self.paused = false;
        let mut queued = false;
        let mut more = false;
        let now = Instant::now();
        self.failed.retain(|_, until| *until > now);
        for def in defs {
            if self.failed.contains_key(&def.name) {
                continue;
            }
            let (seen, recorded_at) = self
                .seen
                .get(&def.name)
                .copied()
                .unwrap_or((0, Instant::now()));
            let stale = recorded_at.elapsed() >= RECORD_EVERY;
            outbox::set_capturing(true);
            let r = transaction(c"pg_emit: capturing changes", || capture(&def, seen, stale));
            outbox::set_capturing(false);
            match r {
                Ok(Pass {
                    events,
                    full,
                    flushed,
                    recorded,
                }) => {
                    queued |= events > 0;
                    more |= full;
                    // After a full call, the same WAL holds more.
                    let seen = if full { seen } else { flushed };
                    let at = if recorded {
                        Instant::now()
                    } else {
                        recorded_at
                    };
                    self.seen.insert(def.name.clone(), (seen, at));
                    let moved = transaction(c"pg_emit: moving a capture slot", || advance(&def));
                    if let Err(e) = moved {
                        self.fail(&def, &e.to_string());
                    }
                }
                Err(e) if e.deadlock => return Err(e),
                Err(e) => self.fail(&def, &e.to_string()),
            }
        }
        self.next = match more {
            true => Instant::now(),
            false => Instant::now() + POLL,
        };
        Ok(queued)
    }

    fn fail(&mut self, def: &Definition, why: &str) {
        pgrx::warning!(
            "pg_emit worker: capture {:?} (slot {:?}, publication {:?}): {why}; trying again in {} s",
            def.name,
            def.slot,
            def.publication,
            FAILED_WAIT.as_secs()
        );
        self.failed
            .insert(def.name.clone(), Instant::now() + FAILED_WAIT);
    }
}

fn definitions() -> Result<Vec<Definition>, pgrx::spi::Error> {
    Spi::connect(|c| {
        c.select(
            "SELECT c.name, c.dest, c.publication, c.slot, c.options->>'format', c.created_by \
               FROM emit.capture_definitions c ORDER BY c.name",
            None,
            &[],
        )?
        .map(|r| {
            Ok(Definition {
                name: r.get::<String>(1)?.unwrap_or_default(),
                dest: r.get::<String>(2)?.unwrap_or_default(),
                publication: r.get::<String>(3)?.unwrap_or_default(),
                slot: r.get::<String>(4)?.unwrap_or_default(),
                format: r.get::<String>(5)?.as_deref().and_then(Format::from_name),
                created_by: r.get::<pg_sys::Oid>(6)?.unwrap_or(pg_sys::InvalidOid),
            })
        })
        .collect()
    })
}

/// Drops this database's capture slots that have no capture now and had
/// none at the last check (`seen`); returns those without one now.
fn drop_orphans(seen: &[String]) -> Result<Vec<String>, pgrx::spi::Error> {
    let now: Vec<String> = Spi::connect(|c| {
        c.select(
            "SELECT s.slot_name::pg_catalog.text FROM pg_catalog.pg_replication_slots s \
              WHERE s.database = pg_catalog.current_database() AND s.slot_name LIKE $1 \
                AND NOT s.active \
                AND NOT EXISTS (SELECT FROM emit.capture_definitions c WHERE c.slot = s.slot_name)",
            None,
            &[slot_pattern().as_str().into()],
        )?
        .map(|r| r.get::<String>(1))
        .collect::<Result<Vec<_>, _>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let mut left = Vec::new();
    for slot in now {
        if seen.contains(&slot) {
            pgrx::log!("pg_emit worker: dropping replication slot {slot:?}: no capture uses it");
            Spi::run_with_args(
                "SELECT pg_catalog.pg_drop_replication_slot($1)",
                &[slot.as_str().into()],
            )?;
        } else {
            left.push(slot);
        }
    }
    Ok(left)
}

/// Moves the slot to what is queued (see the module's comment).
fn advance(def: &Definition) -> Result<(), pgrx::spi::Error> {
    Spi::connect(|c| {
        quiet(c)?;
        c.select(
            "SELECT pg_catalog.pg_replication_slot_advance(s.slot_name, c.queued_lsn) \
               FROM emit.capture_definitions c \
               JOIN pg_catalog.pg_replication_slots s ON s.slot_name = c.slot \
              WHERE c.name = $1 AND s.confirmed_flush_lsn < c.queued_lsn AND NOT s.active",
            None,
            &[def.name.as_str().into()],
        )
        .map(|_| ())
    })
}

/// Every decoding call logs (at LOG, which only `fatal` holds back) where
/// it starts and its consistent point: not in the server log several
/// times a second. For the transaction only; an error in it is logged
/// by the worker after the abort.
fn quiet(c: &pgrx::spi::SpiClient<'_>) -> Result<(), pgrx::spi::Error> {
    c.select(
        "SELECT pg_catalog.set_config('log_min_messages', 'fatal', true)",
        None,
        &[],
    )
    .map(|_| ())
}

/// What one capture's pass did.
struct Pass {
    events: usize,
    /// Decoding stopped at [`CHANGES_PER_PASS`]: there may be more.
    full: bool,
    /// The WAL flushed when it began.
    flushed: u64,
    /// It recorded a new `queued_lsn`.
    recorded: bool,
}

/// A relation of the stream, ready to make events.
struct Table {
    rel: Relation,
    schema: Rc<str>,
    table: Rc<str>,
    /// The relation's row type with every column (blessed), and each
    /// column's input function.
    desc: pg_sys::TupleDesc,
    inputs: Vec<(pg_sys::Oid, pg_sys::Oid)>,
    /// Row types of column subsets (an old row's key, a new row without
    /// unchanged TOASTed values), by which columns they hold.
    subsets: HashMap<Vec<bool>, pg_sys::TupleDesc>,
    target: Rc<Resolved>,
    format: Format,
}

/// The current transaction of the stream.
#[derive(Default)]
struct Txn {
    skip: bool,
    xid: u32,
    commit_time: i64,
    /// Where the change being queued is in the WAL.
    at: u64,
}

fn capture(def: &Definition, seen: u64, stale: bool) -> Result<Pass, pgrx::spi::Error> {
    let dest = stored::resolve("capture", &def.dest);
    // Read-only until there is something to queue: a look that writes
    // nothing writes no WAL, which the next look would decode again.
    // (pgrx's read-write SPI gives the transaction an xid at once.)
    Spi::connect(|c| {
        quiet(c)?;
        let row = c
            .select(
                "SELECT c.queued_lsn::pg_catalog.text, pg_catalog.pg_current_wal_flush_lsn()::pg_catalog.text, \
                        EXISTS (SELECT FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = c.slot) \
                   FROM emit.capture_definitions c WHERE c.name = $1",
                None,
                &[def.name.as_str().into()],
            )?
            .first();
        if row.is_empty() {
            return Ok(Pass {
                events: 0,
                full: false,
                flushed: seen,
                recorded: false,
            });
        }
        let (queued, flushed, slot_exists) = row.get_three::<String, String, bool>()?;
        if slot_exists != Some(true) {
            pgrx::error!(
                "its replication slot is gone (dropped by hand?); drop the capture and create it again"
            );
        }
        let lsn = |s: Option<String>| s.as_deref().and_then(pgoutput::parse_lsn).unwrap_or(0);
        let (queued, flushed) = (lsn(queued), lsn(flushed));
        // No WAL since the last look: nothing to decode.
        if flushed == seen {
            return Ok(Pass {
                events: 0,
                full: false,
                flushed,
                recorded: false,
            });
        }
        let publications = quote_ident(&def.publication);
        let mut cursor = c.open_cursor(
            "SELECT d.lsn::pg_catalog.text, d.data FROM pg_catalog.pg_logical_slot_peek_binary_changes(\
                 $1::pg_catalog.name, $2::pg_catalog.pg_lsn, $3::pg_catalog.int4, \
                 VARIADIC ARRAY['proto_version', '1', 'publication_names', $4]::pg_catalog.text[]) d",
            &[
                def.slot.as_str().into(),
                pgoutput::lsn_text(flushed).into(),
                (CHANGES_PER_PASS as i32).into(),
                publications.as_str().into(),
            ],
        );
        let mut tables: HashMap<u32, Table> = HashMap::new();
        let mut txn = Txn::default();
        let mut rows: i64 = 0;
        let mut last_end = 0u64;
        let mut events = 0usize;
        let mut batch = PgMemoryContexts::new("pg_emit capture rows");
        loop {
            let fetched = cursor.fetch(FETCH)?;
            if fetched.is_empty() {
                break;
            }
            for r in fetched {
                rows += 1;
                let Some(data) = r.get::<&[u8]>(2)? else {
                    continue;
                };
                let at = lsn(r.get::<String>(1)?);
                let msg = pgoutput::parse(data).unwrap_or_else(|e| pgrx::error!("{e}"));
                match msg {
                    Message::Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    } => {
                        txn = Txn {
                            skip: final_lsn < queued,
                            xid,
                            commit_time,
                            at: final_lsn,
                        }
                    }
                    Message::Commit { end_lsn } => last_end = end_lsn,
                    // pg_emit's own tables (a publication FOR ALL TABLES
                    // has them) would capture the capture's own queue.
                    Message::Relation(rel) if rel.schema == "emit" => {}
                    Message::Relation(rel) if !readable(def, &rel) => {
                        tables.remove(&rel.relid);
                    }
                    Message::Relation(rel) => {
                        let t = table(def, &dest, rel);
                        tables.insert(t.rel.relid, t);
                    }
                    Message::Other(_) => {}
                    change if !txn.skip => {
                        txn.at = at;
                        // SAFETY: values, rows and JSON of this batch live
                        // in its context, reset after the batch.
                        events += unsafe {
                            batch.switch_to(|_| queue_change(def, &mut tables, &txn, change))
                        };
                    }
                    _ => {}
                }
            }
            // SAFETY: nothing allocated in it is used after the batch (the
            // events were copied into the outbox buffer).
            unsafe { batch.reset() };
        }
        drop(cursor);
        let full = rows >= CHANGES_PER_PASS;
        // Everything up to the flushed WAL was decoded, unless the call
        // stopped at its limit (after a whole transaction).
        let upto = if full {
            last_end
        } else {
            flushed.max(last_end)
        };
        // Recording how far is itself WAL, which the next look decodes:
        // without events, only once it is worth a slot's move, or after a
        // while (the slot's restart point moves only past the snapshots of
        // running transactions the server logs now and then).
        let recorded = upto > queued && (events > 0 || upto - queued >= RECORD_GAP || stale);
        if recorded {
            Spi::run_with_args(
                "UPDATE emit.capture_definitions SET queued_lsn = $2::pg_catalog.pg_lsn WHERE name = $1",
                &[def.name.as_str().into(), pgoutput::lsn_text(upto).into()],
            )?;
        }
        Ok(Pass {
            events,
            full,
            flushed,
            recorded,
        })
    })
}

/// Whether the capture's creator may SELECT `rel` now; a WARNING when not
/// (its changes are then left out, as if it were not published).
fn readable(def: &Definition, rel: &Relation) -> bool {
    // SAFETY: a catalog check inside the transaction.
    let ok = unsafe {
        pg_sys::pg_class_aclcheck(rel.relid.into(), def.created_by, pg_sys::ACL_SELECT as _)
    } == pg_sys::AclResult::ACLCHECK_OK;
    if !ok {
        pgrx::warning!(
            "pg_emit worker: capture {:?} leaves out the changes of {}.{}: the role that \
             created it may not SELECT from it",
            def.name,
            rel.schema,
            rel.table
        );
    }
    ok
}

/// `name` quoted for pgoutput's `publication_names`, a list of identifiers.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Makes a relation ready: its row type, input functions, and where its
/// events go (a destination that routes by table, filled in).
fn table(def: &Definition, dest: &Rc<Resolved>, rel: Relation) -> Table {
    let target = match dest.target.routed(&rel.schema, &rel.table) {
        Ok(Some(t)) => Rc::new(Resolved::new(t, dest.format)),
        Ok(None) => dest.clone(),
        Err(e) => pgrx::error!("table {}.{}: {e}", rel.schema, rel.table),
    };
    let http = matches!(target.target.endpoint(), Destination::Http { .. });
    let format = Format::combine(def.format, None, target.format, http)
        .unwrap_or_else(|e| pgrx::error!("{e}"));
    let all = vec![true; rel.columns.len()];
    // SAFETY: catalog lookups and a descriptor in the transaction's
    // memory, which outlives the pass.
    let (desc, inputs) = unsafe {
        PgMemoryContexts::TopTransactionContext.switch_to(|_| {
            let inputs = rel
                .columns
                .iter()
                .map(|col| {
                    let (mut func, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
                    pg_sys::getTypeInputInfo(col.type_oid.into(), &mut func, &mut ioparam);
                    (func, ioparam)
                })
                .collect();
            (row_type(&rel, &all), inputs)
        })
    };
    Table {
        schema: rel.schema.as_str().into(),
        table: rel.table.as_str().into(),
        rel,
        desc,
        inputs,
        subsets: HashMap::new(),
        target,
        format,
    }
}

/// A blessed row type of the columns of `rel` that `which` marks.
///
/// # Safety
/// In a transaction; allocates in the current memory context.
unsafe fn row_type(rel: &Relation, which: &[bool]) -> pg_sys::TupleDesc {
    let n = which.iter().filter(|w| **w).count();
    let d = pg_sys::CreateTemplateTupleDesc(n as std::ffi::c_int);
    let mut i = 0;
    for (col, _) in rel.columns.iter().zip(which).filter(|(_, w)| **w) {
        i += 1;
        let name = CString::new(col.name.as_str()).unwrap_or_default();
        pg_sys::TupleDescInitEntry(
            d,
            i as pg_sys::AttrNumber,
            name.as_ptr(),
            col.type_oid.into(),
            col.typmod,
            0,
        );
    }
    pg_sys::BlessTupleDesc(d)
}

/// Queues the events of one change; returns how many.
fn queue_change(
    def: &Definition,
    tables: &mut HashMap<u32, Table>,
    txn: &Txn,
    change: Message<'_>,
) -> usize {
    let (op, relid, new, old) = match change {
        Message::Insert { relid, new } => (Op::Insert, relid, Some(new), None),
        Message::Update { relid, old, new } => (Op::Update, relid, Some(new), old),
        Message::Delete { relid, old } => (Op::Delete, relid, None, Some(old)),
        Message::Truncate { relids } => {
            let mut n = 0;
            for relid in relids {
                if let Some(t) = tables.get(&relid) {
                    emit(def, t, txn, Op::Truncate, None, None, None);
                    n += 1;
                }
            }
            return n;
        }
        _ => return 0,
    };
    // Left out (pg_emit's own, or not readable by the capture's creator).
    let Some(t) = tables.get_mut(&relid) else {
        return 0;
    };
    // An old row of the replica identity only has its key columns.
    let key_only = matches!(op, Op::Update | Op::Delete)
        && old.as_ref().is_some_and(|o| {
            o.iter()
                .zip(&t.rel.columns)
                .all(|(v, c)| c.key || *v == Value::Null)
        })
        && t.rel.columns.iter().any(|c| !c.key);
    let new_row = new.as_ref().map(|v| row(t, v, false));
    let old_row = old.as_ref().map(|v| row(t, v, key_only));
    // The ordering key: the replica identity's values, before the change
    // when the WAL has them, as a trigger's key is.
    let key_values = old.as_ref().or(new.as_ref());
    let key = key_values.and_then(|v| key_of(t, v));
    let what = || format!("a row of {}.{}", t.schema, t.table);
    let new_json = new_row.map(|b| encoding::to_utf8(b, &what).into_owned());
    let old_json = old_row.map(|b| encoding::to_utf8(b, &what).into_owned());
    emit(
        def,
        t,
        txn,
        op,
        new_json.as_deref(),
        old_json.as_deref(),
        key,
    );
    1
}

/// `values` as `row_to_json` JSON: every column the WAL has (`key_only`:
/// the replica identity's), in the relation's order.
fn row<'a>(t: &mut Table, values: &[Value<'_>], key_only: bool) -> &'a [u8] {
    let which: Vec<bool> = values
        .iter()
        .zip(&t.rel.columns)
        .map(|(v, c)| *v != Value::Unchanged && (!key_only || c.key))
        .collect();
    let desc = if which.iter().all(|w| *w) {
        t.desc
    } else {
        let rel = &t.rel;
        *t.subsets.entry(which.clone()).or_insert_with(|| {
            // SAFETY: as in table(): kept for the transaction.
            unsafe { PgMemoryContexts::TopTransactionContext.switch_to(|_| row_type(rel, &which)) }
        })
    };
    let (mut datums, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = values
        .iter()
        .zip(&t.rel.columns)
        .zip(&t.inputs)
        .zip(&which)
        .filter(|(_, w)| **w)
        .map(|(((v, col), (func, ioparam)), _)| match v {
            Value::Text(text) => (input(text, *func, *ioparam, col.typmod), false),
            _ => (pg_sys::Datum::from(0), true),
        })
        .unzip();
    // SAFETY: one value (or NULL) per attribute of `desc`, of its types.
    unsafe { crate::trigger::values_json(desc, &mut datums, &mut nulls) }
}

/// The value of `text` through its type's input function.
fn input(text: &[u8], func: pg_sys::Oid, ioparam: pg_sys::Oid, typmod: i32) -> pg_sys::Datum {
    let s = CString::new(text).unwrap_or_else(|_| pgrx::error!("a value holds a NUL byte"));
    // SAFETY: the type's own input function, given a C string.
    unsafe { pg_sys::OidInputFunctionCall(func, s.as_ptr().cast_mut(), ioparam, typmod) }
}

/// The ordering key of a row of `t` (see `trigger::row_key`, which this
/// matches for the same row): the replica identity's values hashed with
/// the table's oid; `None` for a table without one.
fn key_of(t: &Table, values: &[Value<'_>]) -> Option<i64> {
    if !t.rel.columns.iter().any(|c| c.key) {
        return None;
    }
    let atts = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(t.desc) };
    let mut parts: Vec<Option<Vec<u8>>> = vec![Some(t.rel.relid.to_le_bytes().to_vec())];
    for (i, ((v, col), (func, ioparam))) in
        values.iter().zip(&t.rel.columns).zip(&t.inputs).enumerate()
    {
        if !col.key {
            continue;
        }
        parts.push(match v {
            Value::Text(text) => {
                let datum = input(text, *func, *ioparam, col.typmod);
                let att = atts.get(i).expect("one attribute per column");
                // SAFETY: a value of the attribute's type.
                Some(unsafe { crate::trigger::datum_bytes(datum, att) }.into_owned())
            }
            _ => None,
        });
    }
    Some(pg_emit_core::schedule::key_hash(
        parts.iter().map(|p| p.as_deref()),
    ))
}

/// Makes one event and queues it.
fn emit(
    def: &Definition,
    t: &Table,
    txn: &Txn,
    op: Op,
    new: Option<&[u8]>,
    old: Option<&[u8]>,
    key: Option<i64>,
) {
    let made = Made::captured(t.format, u64::from(txn.xid), txn.at, txn.commit_time);
    let ev = Event {
        op,
        schema: &t.schema,
        table: &t.table,
        when: "AFTER",
        level: if op == Op::Truncate {
            "STATEMENT"
        } else {
            "ROW"
        },
        trigger_name: &def.name,
        relid: t.rel.relid,
        args: &[],
        ctx: made.ctx(),
    };
    let mut buf = Vec::new();
    event::write_event(&mut buf, t.format, &ev, new, old, true);
    outbox::queue(&t.target.target, Kind::event(t.format), &buf, key);
}
