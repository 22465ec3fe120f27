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
use pg_emit_core::options::{Columns, Format, Shape};
use pg_emit_core::pgoutput::{self, Message, Relation, Value};
use pg_emit_core::schedule::Key;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
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
/// A capture that failed waits this long before it tries again, doubled
/// for each failure in a row.
const FAILED_WAIT: Duration = Duration::from_secs(5);
/// Longest wait after failures in a row.
const FAILED_WAIT_MAX: Duration = Duration::from_secs(300);
/// WAL without published changes that is decoded again and again rather
/// than recorded as passed (which writes WAL of its own, see [`capture`]).
const RECORD_GAP: u64 = 256 << 10;
/// Longest time without recording how far decoding went while WAL is
/// written (see [`capture`]).
const RECORD_EVERY: Duration = Duration::from_secs(10);
/// WARNINGs remembered as logged, at most.
const LOGGED_KEPT: usize = 10_000;
/// How often slots left without a capture are looked for.
const ORPHAN_CHECK: Duration = Duration::from_secs(60);

thread_local! {
    /// This pass makes each change in a subtransaction, so that one that
    /// fails (a value its type no longer takes, a type dropped since) is
    /// sent as text instead of failing the pass for ever. Taken after a
    /// pass failed; the next pass that succeeds ends it.
    static CAREFUL: Cell<bool> = const { Cell::new(false) };
    /// WARNINGs of the pass, logged after its transaction (which holds
    /// back everything under FATAL, see [`quiet`]); each once.
    static NOTES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// The event being made (see [`emit`]).
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The pass got past its checks of the capture's slot and publication
    /// (a failure before is the definition's, which reading the changes
    /// one by one would not mend).
    static CHECKED: Cell<bool> = const { Cell::new(false) };
}

fn note(message: String) {
    NOTES.with_borrow_mut(|n| {
        if !n.contains(&message) {
            n.push(message);
        }
    });
}

/// A capture as `emit.capture_definitions` has it.
struct Definition {
    name: String,
    dest: String,
    publication: String,
    slot: String,
    format: Option<Format>,
    /// What the events of some tables carry and what keys them (its
    /// option `tables`, by table oid), with the numbers of the columns
    /// named there.
    shapes: HashMap<u32, (Shape, HashMap<String, i64>)>,
    /// The role that created it (see [`readable`]).
    created_by: pg_sys::Oid,
    /// Its failed passes in a row.
    failures: i32,
    /// Whether it waits after a failure (its `retry_at` is to come).
    waiting: bool,
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
    /// Captures whose last pass failed: the next is careful (see
    /// [`CAREFUL`]).
    careful: HashSet<String>,
    /// WARNINGs logged already (see [`note`]).
    logged: HashSet<String>,
    /// After an ERROR inside logical decoding in this process (see
    /// [`Captures::let_go`]): no capture decodes here again, and the
    /// worker restarts at this time (see [`Captures::wants_fresh_process`]).
    restart_at: Option<Instant>,
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
            careful: HashSet::new(),
            logged: HashSet::new(),
            restart_at: None,
        }
    }

    pub(super) fn next_timeout(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    pub(super) fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// Whether a capture is due to decode again after an ERROR inside
    /// decoding in this process: the worker then restarts (in a second),
    /// and a fresh process decodes. pgoutput keeps per-table state across
    /// the SQL decoding calls of a process, and after an ERROR inside one
    /// it can be left pointing at freed memory (fixed in recent minor
    /// releases of 15 and later, never in 14): decoding again could crash the
    /// worker, and with it every session of the server. The restart waits
    /// as a failed capture does, so a decoding ERROR that persists costs a
    /// restart every few seconds, with its WARNING each time.
    pub(super) fn wants_fresh_process(&self) -> bool {
        self.restart_at.is_some_and(|at| Instant::now() >= at)
    }

    /// After a failed transaction that may have been inside decoding (or
    /// moving a slot): PostgreSQL releases a slot only when its SQL
    /// function returns, and a backend's error recovery releases it, a
    /// background worker's does not. Left acquired, the slot would show as
    /// active and `drop_capture` could not drop it. Returns whether one was.
    fn let_go(&mut self) -> bool {
        // SAFETY: outside any transaction (it was aborted), as a backend's
        // error recovery releases the slot.
        let held = unsafe { !pg_sys::MyReplicationSlot.is_null() };
        if held {
            // SAFETY: as above.
            unsafe { pg_sys::ReplicationSlotRelease() };
            self.restart_at = Some(Instant::now() + FAILED_WAIT);
        }
        held
    }

    /// One pass over every capture. Returns whether events were queued,
    /// or the failure that should stop the worker (the extension dropped,
    /// a lost deadlock).
    pub(super) fn run(&mut self) -> Result<bool, Failed> {
        if let Some(at) = self.restart_at {
            self.next = at;
            return Ok(false);
        }
        let defs = transaction(c"pg_emit: reading captures", definitions)?;
        if self.orphans_checked.elapsed() >= ORPHAN_CHECK {
            self.orphans_checked = Instant::now();
            let seen = std::mem::take(&mut self.orphans);
            match transaction(c"pg_emit: dropping orphaned capture slots", || {
                drop_orphans(&seen)
            }) {
                Ok(now) => self.orphans = now,
                Err(e) => {
                    self.let_go();
                    pgrx::warning!("pg_emit worker: capture slots: {e}")
                }
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
            if self.restart_at.is_some() {
                break;
            }
            if def.waiting || self.failed.contains_key(&def.name) {
                continue;
            }
            let (seen, recorded_at) = self
                .seen
                .get(&def.name)
                .copied()
                .unwrap_or((0, Instant::now()));
            let stale = recorded_at.elapsed() >= RECORD_EVERY;
            let careful = self.careful.contains(&def.name);
            outbox::set_capturing(true);
            CAREFUL.set(careful);
            CHECKED.set(false);
            let r = transaction(c"pg_emit: capturing changes", || capture(&def, seen, stale));
            CAREFUL.set(false);
            outbox::set_capturing(false);
            // Relation messages come again with every decoding call: a
            // table left out says so once, not every 200 ms.
            for n in NOTES.take() {
                if self.logged.len() >= LOGGED_KEPT {
                    self.logged.clear();
                }
                if self.logged.insert(n.clone()) {
                    pgrx::warning!("pg_emit worker: {n}");
                }
            }
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
                    self.careful.remove(&def.name);
                    let moved = transaction(c"pg_emit: moving a capture slot", || advance(&def));
                    match moved {
                        Err(e) => {
                            self.let_go();
                            self.fail(&def, &e.to_string());
                        }
                        Ok(()) if def.failures > 0 => recovered(&def),
                        Ok(()) => {}
                    }
                }
                // The process is leaving: that releases the slot too.
                Err(e) if e.deadlock => return Err(e),
                Err(e) if self.let_go() || !CHECKED.get() => self.fail(&def, &e.to_string()),
                // Once more at once, change by change (what failed was
                // making events, not decoding).
                Err(e) if !careful => {
                    pgrx::log!(
                        "pg_emit worker: capture {:?}: {e}; reading its changes again one by one",
                        def.name
                    );
                    self.careful.insert(def.name.clone());
                    more = true;
                }
                Err(e) => self.fail(&def, &e.to_string()),
            }
        }
        self.next = match more {
            true => Instant::now(),
            false => Instant::now() + POLL,
        };
        Ok(queued)
    }

    /// Logs the failure and makes the capture wait: 5 s, doubling with
    /// each failure in a row up to 5 minutes, recorded in its definition
    /// (`last_error`, `retry_at`) so that a restarted worker waits too,
    /// and decodes the other captures first.
    fn fail(&mut self, def: &Definition, why: &str) {
        let wait = FAILED_WAIT
            .saturating_mul(1 << def.failures.clamp(0, 6))
            .min(FAILED_WAIT_MAX);
        pgrx::warning!(
            "pg_emit worker: capture {:?} (slot {:?}, publication {:?}): {why}; trying again in {} s",
            def.name,
            def.slot,
            def.publication,
            wait.as_secs()
        );
        self.failed.insert(def.name.clone(), Instant::now() + wait);
        let recorded = transaction(c"pg_emit: recording a capture's failure", || {
            Spi::run_with_args(
                "UPDATE emit.capture_definitions \
                    SET failures = failures + 1, last_error = $2, \
                        retry_at = pg_catalog.now() + pg_catalog.make_interval(secs => $3) \
                  WHERE name = $1",
                &[
                    def.name.as_str().into(),
                    why.into(),
                    (wait.as_secs() as f64).into(),
                ],
            )
        });
        if let Err(e) = recorded {
            pgrx::log!("pg_emit worker: capture {:?}: {e}", def.name);
        }
    }
}

/// A pass of a capture that had failed went through: its failure is over.
fn recovered(def: &Definition) {
    let r = transaction(c"pg_emit: recording a capture's recovery", || {
        Spi::run_with_args(
            "UPDATE emit.capture_definitions \
                SET failures = 0, last_error = NULL, retry_at = NULL WHERE name = $1",
            &[def.name.as_str().into()],
        )
    });
    if let Err(e) = r {
        pgrx::log!("pg_emit worker: capture {:?}: {e}", def.name);
    }
}

fn definitions() -> Result<Vec<Definition>, pgrx::spi::Error> {
    Spi::connect(|c| {
        c.select(
            "SELECT c.name, c.dest, c.publication, c.slot, c.options->>'format', c.created_by, \
                    c.failures, c.retry_at IS NOT NULL AND c.retry_at > pg_catalog.now(), \
                    (c.options->'tables')::pg_catalog.text \
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
                failures: r.get::<i32>(7)?.unwrap_or(0),
                waiting: r.get::<bool>(8)?.unwrap_or(false),
                shapes: shapes(r.get::<String>(9)?.as_deref()),
            })
        })
        .collect()
    })
}

/// The shapes create_capture stored (`[{"relid": …, "attnums": {…},
/// "key": …, …}]`).
fn shapes(tables: Option<&str>) -> HashMap<u32, (Shape, HashMap<String, i64>)> {
    let Some(Ok(serde_json::Value::Array(list))) = tables.map(serde_json::from_str) else {
        return HashMap::new();
    };
    list.iter()
        .filter_map(|t| {
            let t = t.as_object()?;
            let relid = u32::try_from(t.get("relid")?.as_u64()?).ok()?;
            let attnums = t
                .get("attnums")
                .and_then(|a| a.as_object())
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
                        .collect()
                })
                .unwrap_or_default();
            Some((relid, (Shape::from_json(t).ok()?, attnums)))
        })
        .collect()
}

/// Drops this database's capture slots that have no capture now and had
/// none at the last check (`seen`); returns those without one now. While
/// a transaction older than the last check runs (a `create_capture`
/// still backfilling, say), none is taken for an orphan.
fn drop_orphans(seen: &[String]) -> Result<Vec<String>, pgrx::spi::Error> {
    let now: Vec<String> = Spi::connect(|c| {
        c.select(
            "SELECT s.slot_name::pg_catalog.text FROM pg_catalog.pg_replication_slots s \
              WHERE s.database = pg_catalog.current_database() AND s.slot_name LIKE $1 \
                AND NOT s.active \
                AND NOT EXISTS (SELECT FROM emit.capture_definitions c WHERE c.slot = s.slot_name) \
                AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a \
                                 WHERE a.datname = pg_catalog.current_database() \
                                   AND a.xact_start < pg_catalog.now() - interval '60 s' \
                                   AND a.pid <> pg_catalog.pg_backend_pid())",
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
    let prefix = crate::capture::slot_name("");
    for slot in now {
        // Not while a create_capture of its name runs: it may have just
        // dropped this slot and made one of the same name, its own.
        let free = || crate::capture::lock_name(slot.strip_prefix(&prefix).unwrap_or(&slot), false);
        if !seen.contains(&slot) || !free() {
            left.push(slot);
            continue;
        }
        // Looked at again now that no create_capture of it runs (a
        // read-write statement takes a new snapshot).
        let dropped = Spi::connect_mut(|c| {
            let rows = c.update(
                crate::capture::DROP_LEFT_SLOT,
                None,
                &[slot.as_str().into()],
            )?;
            Ok::<_, pgrx::spi::Error>(!rows.is_empty())
        })?;
        if dropped {
            pgrx::log!("pg_emit worker: dropped replication slot {slot:?}: no capture uses it");
        }
    }
    Ok(left)
}

/// Moves the slot to what is queued (see the module's comment).
fn advance(def: &Definition) -> Result<(), pgrx::spi::Error> {
    // As in capture(): the next pass moves it.
    if !crate::capture::lock_name(&def.name, false) {
        return Ok(());
    }
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
    /// As whom its values are made (see [`convert`]).
    owner: pg_sys::Oid,
    /// `None`: its types could not be looked up (values go as text).
    typed: Option<Typed>,
    target: Rc<Resolved>,
    format: Format,
    /// The columns its events carry, in their order (indexes into
    /// `rel.columns`): `tables`' `columns`/`exclude`, else every one; and
    /// those of them an old row with only the replica identity's has.
    carried: Vec<usize>,
    carried_key_only: Vec<usize>,
    /// Its key's columns in the key's order (`tables`' `key`), else those
    /// the relation marks as its replica identity's.
    key: Vec<usize>,
}

/// How values of a relation are made.
struct Typed {
    /// The relation's row type with every column (blessed), and each
    /// column's input function.
    desc: pg_sys::TupleDesc,
    inputs: Vec<(pg_sys::Oid, pg_sys::Oid)>,
    /// Row types of column subsets (an old row's key, a new row without
    /// unchanged TOASTed values), by which columns they hold, in order.
    subsets: HashMap<Vec<usize>, pg_sys::TupleDesc>,
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
    let skipped = Pass {
        events: 0,
        full: false,
        flushed: seen,
        recorded: false,
    };
    // A drop_capture of it is under way: leave its slot alone.
    if !crate::capture::lock_name(&def.name, false) {
        return Ok(skipped);
    }
    Spi::connect(|c| {
        quiet(c)?;
        let row = c
            .select(
                "SELECT c.queued_lsn::pg_catalog.text, pg_catalog.pg_current_wal_flush_lsn()::pg_catalog.text, \
                        EXISTS (SELECT FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = c.slot), \
                        EXISTS (SELECT FROM pg_catalog.pg_publication p WHERE p.pubname = c.publication) \
                   FROM emit.capture_definitions c WHERE c.name = $1",
                None,
                &[def.name.as_str().into()],
            )?
            .first();
        if row.is_empty() {
            return Ok(skipped);
        }
        let (queued, flushed, slot_exists) = row.get_three::<String, String, bool>()?;
        if slot_exists != Some(true) {
            pgrx::error!(
                "its replication slot is gone (dropped by hand?); drop the capture and create it again"
            );
        }
        // Checked here rather than left to decoding, whose ERROR would
        // cost the worker a restart (see `Captures::wants_fresh_process`).
        if row.get::<bool>(4)? != Some(true) {
            pgrx::error!(
                "its publication {:?} does not exist (dropped?): changes made without it cannot \
                 be decoded; drop the capture and create it again",
                def.publication
            );
        }
        CHECKED.set(true);
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
        // A transaction of millions of rows is read a batch at a time:
        // values, rows and JSON of a batch are freed after it.
        crate::batches::each(&mut cursor, FETCH, |batch| {
            for i in 0..batch.len() {
                rows += 1;
                let Some(data) = batch.bytes(i, 2) else {
                    continue;
                };
                let at = batch
                    .bytes(i, 1)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .and_then(pgoutput::parse_lsn)
                    .unwrap_or(0);
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
                    Message::Relation(rel) => {
                        let relid = rel.relid;
                        let t = readable(def, &rel).and_then(|owner| table(def, &dest, rel, owner));
                        match t {
                            Some(t) => tables.insert(relid, t),
                            None => tables.remove(&relid),
                        };
                    }
                    Message::Other(_) => {}
                    change if !txn.skip => {
                        txn.at = at;
                        events += queue_change(def, &mut tables, &txn, change);
                    }
                    _ => {}
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })?;
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
        let recorded =
            upto > queued && (events > 0 || full || upto - queued >= RECORD_GAP || stale);
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

/// Whether the capture's creator may read `rel` now, and if so the
/// table's owner (as whom its values are made, see [`convert`]). It may
/// when it may SELECT the table or a partitioned table it is a partition
/// of (changes arrive under the partition's name), and no row security
/// applies to it there. Tables it may not read are left out, with a
/// WARNING; so is a table dropped since (its name and owner are gone).
fn readable(def: &Definition, rel: &Relation) -> Option<pg_sys::Oid> {
    let row = Spi::connect(|c| {
        c.select(
            "SELECT c.relowner, \
                    pg_catalog.bool_or(pg_catalog.has_table_privilege($2, a.relid, 'SELECT')), \
                    pg_catalog.array_agg(a.relid) \
               FROM pg_catalog.pg_class c, \
                    LATERAL (SELECT p.relid::pg_catalog.oid \
                               FROM pg_catalog.pg_partition_ancestors(c.oid) p \
                              UNION SELECT c.oid) a(relid) \
              WHERE c.oid = $1 GROUP BY c.relowner",
            None,
            &[pg_sys::Oid::from(rel.relid).into(), def.created_by.into()],
        )?
        .first()
        .get_three::<pg_sys::Oid, bool, Vec<pg_sys::Oid>>()
    });
    let name = || format!("{}.{}", rel.schema, rel.table);
    let (owner, may, tables) = match row {
        Ok((Some(owner), Some(may), Some(tables))) => (owner, may, tables),
        _ => {
            note(format!(
                "capture {:?} leaves out changes of {}: the table is gone",
                def.name,
                name()
            ));
            return None;
        }
    };
    // SAFETY: catalog checks inside the transaction.
    let rls = tables.iter().any(|t| unsafe {
        pg_sys::check_enable_rls(*t, def.created_by, true)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
    });
    if !may || rls {
        let why = if may {
            "row security applies to the role that created it there"
        } else {
            "the role that created it may not SELECT from it"
        };
        note(format!(
            "capture {:?} leaves out the changes of {}: {why}",
            def.name,
            name()
        ));
        return None;
    }
    Some(owner)
}

/// `name` quoted for pgoutput's `publication_names`, a list of identifiers.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Makes a relation ready: where its events go (a destination that routes
/// by table, filled in), its row type and input functions. `None` when it
/// cannot be sent anywhere (a table name a broker refuses), with a
/// WARNING in a careful pass.
fn table(
    def: &Definition,
    dest: &Rc<Resolved>,
    rel: Relation,
    owner: pg_sys::Oid,
) -> Option<Table> {
    let target = match dest.target.routed(&rel.schema, &rel.table) {
        Ok(Some(t)) => Rc::new(Resolved::new(t, dest.format)),
        Ok(None) => dest.clone(),
        Err(e) if CAREFUL.get() => {
            note(format!(
                "capture {:?} leaves out the changes of {}.{}: {e}",
                def.name, rel.schema, rel.table
            ));
            return None;
        }
        Err(e) => pgrx::error!("table {}.{}: {e}", rel.schema, rel.table),
    };
    let http = matches!(target.target.endpoint(), Destination::Http { .. });
    let format = Format::combine(def.format, None, target.format, http)
        .unwrap_or_else(|e| pgrx::error!("{e}"));
    let all: Vec<usize> = (0..rel.columns.len()).collect();
    let (carried, key) = shaped(def, &rel);
    // SAFETY: catalog lookups and a descriptor in the transaction's
    // memory, which outlives the pass.
    let typed = guarded(|| unsafe {
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
            Typed {
                desc: row_type(&rel, &all),
                inputs,
                subsets: HashMap::new(),
            }
        })
    });
    let typed = match typed {
        Ok(t) => Some(t),
        Err(e) => {
            note(format!(
                "capture {:?}: the types of {}.{} cannot be looked up ({e}); its values are sent as text",
                def.name, rel.schema, rel.table
            ));
            None
        }
    };
    let carried = carried.unwrap_or(all);
    let carried_key_only = carried
        .iter()
        .copied()
        .filter(|&i| rel.columns[i].key)
        .collect();
    Some(Table {
        schema: rel.schema.as_str().into(),
        table: rel.table.as_str().into(),
        rel,
        owner,
        typed,
        target,
        format,
        carried,
        carried_key_only,
        key,
    })
}

/// What the capture's `tables` option says of `rel`, as indexes into its
/// columns: the carried ones (`None`: all) and the key's. A column named
/// there that is gone now (dropped since) is left out, and said so; a key
/// that lost a column is no key (its events are ordered against every
/// other), rather than a key that no longer tells rows apart.
fn shaped(def: &Definition, rel: &Relation) -> (Option<Vec<usize>>, Vec<usize>) {
    // REPLICA IDENTITY FULL marks every column: each version of a row
    // would get a key of its own. A trigger has no key there either.
    let identity = || match rel.identity {
        b'f' => Vec::new(),
        _ => rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect(),
    };
    let Some((shape, attnums)) = def.shapes.get(&rel.relid) else {
        return (None, identity());
    };
    // A column is found by the name it had when the capture was made, else
    // by its number: renamed since, it is still the column meant (an
    // excluded one stays excluded).
    let renamed = |name: &str| -> Option<String> {
        let attnum = *attnums.get(name)?;
        Spi::connect(|c| {
            c.select(
                "SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid = $1 AND a.attnum = $2 AND NOT a.attisdropped",
                None,
                &[pg_sys::Oid::from(rel.relid).into(), (attnum as i16).into()],
            )?
            .first()
            .get_one::<String>()
        })
        .ok()
        .flatten()
    };
    let find = |option: &str, names: &[String]| -> Vec<usize> {
        names
            .iter()
            .filter_map(|n| {
                let at = |n: &str| rel.columns.iter().position(|c| c.name == n);
                let i = at(n).or_else(|| renamed(n).and_then(|now| at(&now)));
                if i.is_none() {
                    note(format!(
                        "capture {:?}: {}.{} has no column {n:?} ({option} in its option tables) any more",
                        def.name, rel.schema, rel.table
                    ));
                }
                i
            })
            .collect()
    };
    let carried = match &shape.columns {
        Columns::All => None,
        Columns::Only(names) => Some(find("columns", names)),
        Columns::Except(names) => {
            let out = find("exclude", names);
            Some(
                (0..rel.columns.len())
                    .filter(|i| !out.contains(i))
                    .collect(),
            )
        }
    };
    let key = match &shape.key {
        None => identity(),
        Some(names) => {
            let key = find("key", names);
            if key.len() == names.len() {
                key
            } else {
                Vec::new()
            }
        }
    };
    (carried, key)
}

/// A blessed row type of the columns of `rel` that `which` lists, in
/// that order.
///
/// # Safety
/// In a transaction; allocates in the current memory context.
unsafe fn row_type(rel: &Relation, which: &[usize]) -> pg_sys::TupleDesc {
    let d = pg_sys::CreateTemplateTupleDesc(which.len() as std::ffi::c_int);
    for (i, col) in which.iter().map(|&w| &rel.columns[w]).enumerate() {
        let i = i + 1;
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
                    emit(def, t, txn, Op::Truncate, None, None, Key::default());
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
    let made = convert(t, new.as_deref(), old.as_deref(), key_only);
    let (new_json, old_json, key, text) = match made {
        Ok(made) => made,
        Err(e) => {
            // Sent all the same, in order: as text, and ordered against
            // every other event (no key), rather than holding up the
            // capture for ever.
            note(format!(
                "capture {:?}: a change of {}.{} could not be made into values ({e}); \
                 its values are sent as text",
                def.name, t.schema, t.table
            ));
            (
                new.as_deref().map(|v| text_row(t, v, carried(t, false))),
                old.as_deref().map(|v| text_row(t, v, carried(t, key_only))),
                None,
                None,
            )
        }
    };
    emit(
        def,
        t,
        txn,
        op,
        new_json.as_deref(),
        old_json.as_deref(),
        Key {
            order: key,
            text: text.as_deref(),
        },
    );
    1
}

/// The rows of a change as JSON, its ordering key and, for a destination
/// that carries it, its key columns as JSON (Kafka's `record_key`): made as the
/// table's owner in a security-restricted operation, since input
/// functions (a domain's CHECK) and casts to JSON may run code the owner
/// wrote, which must not run as the worker. In a careful pass, in a
/// subtransaction: an error is the change's, not the pass's.
type Converted = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<String>,
);

fn convert(
    t: &mut Table,
    new: Option<&[Value<'_>]>,
    old: Option<&[Value<'_>]>,
    key_only: bool,
) -> Result<Converted, String> {
    let owner = t.owner;
    let texts = t.target.target.record_keys();
    let what = format!("a row of {}.{}", t.schema, t.table);
    let Some(typed) = t.typed.as_mut() else {
        return Err("its types could not be looked up".into());
    };
    let (rel, key_cols, new_cols) = (&t.rel, &t.key, &t.carried);
    let old_cols = match key_only {
        true => &t.carried_key_only,
        false => &t.carried,
    };
    guarded(|| {
        crate::privileged::as_role(owner, false, || {
            let what = || what.clone();
            let new_json =
                new.map(|v| encoding::to_utf8(row(rel, typed, v, new_cols), &what).into_owned());
            let old_json =
                old.map(|v| encoding::to_utf8(row(rel, typed, v, old_cols), &what).into_owned());
            // The ordering key: the key columns' values, before the change
            // when the WAL has them, as a trigger's key is.
            let (keyed, keyed_only) = match old {
                Some(v) => (Some(v), key_only),
                None => (new, false),
            };
            let key = keyed.and_then(|v| key_of(rel, typed, v, key_cols, keyed_only));
            let text = match keyed {
                Some(v) if texts && key.is_some() => {
                    let json = crate::privileged::with_key_output(|| {
                        encoding::to_utf8(row(rel, typed, v, key_cols), &what).into_owned()
                    });
                    Some(String::from_utf8_lossy(&json).into_owned())
                }
                _ => None,
            };
            (new_json, old_json, key, text)
        })
    })
}

/// The columns an event of `t` carries, in order (indexes into its
/// columns); of an old row that has only the replica identity's
/// (`key_only`), those of them it has.
fn carried(t: &Table, key_only: bool) -> &[usize] {
    match key_only {
        true => &t.carried_key_only,
        false => &t.carried,
    }
}

/// In a careful pass, runs `f` in a subtransaction and returns its ERROR
/// as a message; otherwise just runs it.
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    if !CAREFUL.get() {
        return Ok(f());
    }
    // SAFETY: the subtransaction bracket PL/pgSQL's exception blocks use,
    // keeping the caller's memory context and resource owner.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        match r {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(ctx);
        pg_sys::CurrentResourceOwner = owner;
        r.map_err(|panic| {
            use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
            use pgrx::PgSqlErrorCode::*;
            let (code, message) = if let Some(e) = panic.downcast_ref::<CaughtError>() {
                match e {
                    CaughtError::PostgresError(r)
                    | CaughtError::ErrorReport(r)
                    | CaughtError::RustPanic { ereport: r, .. } => {
                        (Some(r.sql_error_code()), r.message().to_string())
                    }
                }
            } else if let Some(e) = panic.downcast_ref::<ErrorReportWithLevel>() {
                (Some(e.sql_error_code()), e.message().to_string())
            } else {
                (None, String::new())
            };
            // A cancel, shutdown, lack of memory or a lock conflict is the
            // pass's, not the change's: it fails as a whole and is retried.
            let passing = matches!(
                code,
                Some(
                    ERRCODE_QUERY_CANCELED
                        | ERRCODE_ADMIN_SHUTDOWN
                        | ERRCODE_OUT_OF_MEMORY
                        | ERRCODE_T_R_DEADLOCK_DETECTED
                        | ERRCODE_T_R_SERIALIZATION_FAILURE
                        | ERRCODE_LOCK_NOT_AVAILABLE
                        | ERRCODE_DISK_FULL
                )
            );
            if code.is_none() || passing {
                std::panic::resume_unwind(panic);
            }
            message
        })
    }
}

/// A row's columns `cols` as their values' text: what a change that
/// cannot be made into values is sent as.
fn text_row(t: &Table, values: &[Value<'_>], cols: &[usize]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    for (v, c) in cols
        .iter()
        .filter_map(|&i| Some((values.get(i)?, &t.rel.columns[i])))
    {
        let what = || format!("a value of {}.{}", t.schema, t.table);
        match v {
            Value::Text(b) => {
                let text = String::from_utf8_lossy(&encoding::to_utf8(b, &what)).into_owned();
                map.insert(c.name.clone(), serde_json::Value::String(text));
            }
            Value::Null => {
                map.insert(c.name.clone(), serde_json::Value::Null);
            }
            Value::Unchanged => {}
        }
    }
    serde_json::Value::Object(map).to_string().into_bytes()
}

/// `values`' columns `cols` as `row_to_json` JSON, in that order, but
/// those the WAL does not have (unchanged TOASTed values).
fn row<'a>(rel: &Relation, typed: &mut Typed, values: &[Value<'_>], cols: &[usize]) -> &'a [u8] {
    let which: Vec<usize> = cols
        .iter()
        .copied()
        .filter(|&i| values.get(i).is_some_and(|v| *v != Value::Unchanged))
        .collect();
    let desc = if which.len() == rel.columns.len() && which.iter().enumerate().all(|(n, &i)| n == i)
    {
        typed.desc
    } else {
        *typed.subsets.entry(which.clone()).or_insert_with(|| {
            // SAFETY: as in table(): kept for the transaction.
            unsafe { PgMemoryContexts::TopTransactionContext.switch_to(|_| row_type(rel, &which)) }
        })
    };
    let (mut datums, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = which
        .iter()
        .map(|&i| {
            let ((func, ioparam), col) = (typed.inputs[i], &rel.columns[i]);
            match &values[i] {
                Value::Text(text) => (input(text, func, ioparam, col.typmod), false),
                _ => (pg_sys::Datum::from(0), true),
            }
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

/// The ordering key of a row of `rel` (see `trigger::row_key`, which this
/// matches for the same row): the values of its key columns `key`, in
/// that order, hashed with the table's oid. `None` for a table without
/// key columns, and when the WAL does not have a key column's value (an
/// old row that has only the replica identity's, `key_only`; an
/// unchanged TOASTed value): no key rather than one that would differ
/// from the row's other events'.
fn key_of(
    rel: &Relation,
    typed: &Typed,
    values: &[Value<'_>],
    key: &[usize],
    key_only: bool,
) -> Option<i64> {
    if key.is_empty() {
        return None;
    }
    // SAFETY: the descriptor made for this relation.
    let atts = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(typed.desc) };
    let mut parts: Vec<Option<Vec<u8>>> = vec![Some(rel.relid.to_le_bytes().to_vec())];
    for &i in key {
        let col = &rel.columns[i];
        if key_only && !col.key {
            return None;
        }
        parts.push(match values.get(i)? {
            Value::Text(text) => {
                let (func, ioparam) = typed.inputs[i];
                let datum = input(text, func, ioparam, col.typmod);
                let att = atts.get(i).expect("one attribute per column");
                // SAFETY: a value of the attribute's type.
                Some(unsafe { crate::trigger::datum_bytes(datum, att) }.into_owned())
            }
            Value::Null => None,
            Value::Unchanged => return None,
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
    key: Key<'_>,
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
    // One buffer for every event, not an allocation per change.
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        event::write_event(buf, t.format, &ev, new, old, true);
        outbox::queue(&t.target.target, Kind::event(t.format), buf, key);
        // A huge row must not pin its size for the worker's life.
        buf.shrink_to(1 << 20);
    });
}
