//! `delivery=async`, the writer's side: events go into `emit.outbox` in the
//! writing transaction, and the worker is woken when it commits.
//!
//! The trigger does not insert a row per event. Events are appended to a
//! per-transaction buffer (with savepoint marks, like `delivery=commit`)
//! and written at `PRE_COMMIT` as one row per destination: the rows are
//! part of the transaction, so a rollback removes them, and a 20,000-row
//! INSERT costs one outbox insert instead of 20,000. Buffers past
//! [`FLUSH_BYTES`] are written early so memory stays bounded; every row
//! carries the transaction's commit-order number and its events' place in
//! the transaction, so the worker sends transactions whole and in commit
//! order however their rows were written.

use super::pending::Pending;
use super::Destination;
use crate::error::EmitError;
use crate::privileged::{as_emit_owner, schema, Schema};
use crate::settings;
use pg_emit_core::event::Kind;
use pg_emit_core::options::Format;
use pg_emit_core::schedule::Key;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// Payload size of one outbox row; also the point at which a transaction's
/// buffer is written out early.
pub const FLUSH_BYTES: usize = 8 << 20;

/// One outbox row to write.
struct Chunk {
    target: Destination,
    kind: Kind,
    events: i32,
    /// Ordinals of its first and last event (see [`Pending`]).
    first: u64,
    last: u64,
    payload: Vec<u8>,
    /// Each event's ordering key (see pg_emit_core::schedule).
    keys: Vec<Option<i64>>,
    /// Each event's key as text (see [`Key::text`]).
    texts: Vec<Option<String>>,
}

thread_local! {
    /// Events by destination and kind (one outbox row holds one of each).
    static QUEUED: RefCell<Pending<(Destination, Kind)>> = RefCell::default();
    /// Outbox rows this transaction wrote before committing; they get its
    /// commit-order number at PRE_COMMIT.
    static EARLY: RefCell<Vec<i64>> = const { RefCell::new(Vec::new()) };
    /// Ordinal ranges of those rows: events still buffered around them
    /// must not share a row across them (see [`chunks`]).
    static EARLY_RANGES: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
    /// This transaction wrote outbox rows: wake the worker at commit.
    static WROTE: Cell<bool> = const { Cell::new(false) };
    /// The worker is queueing captured changes, which `pg_emit.max_outbox_size`
    /// must not refuse: they are committed already (capture checks the
    /// limit before it decodes, and stops decoding while it is reached).
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// This transaction queued a backfill, in this subtransaction (or one
    /// it has since been released into): the outbox limit refuses with an
    /// ERROR, whatever `pg_emit.on_error` says. A rollback to before it
    /// ends that (see [`abort_sub`]).
    static STRICT: Cell<Option<u32>> = const { Cell::new(None) };
    /// emit.outbox's size and when it was measured (see [`outbox_size`]).
    static SIZE: Cell<Option<(Instant, i64)>> = const { Cell::new(None) };
}

/// How long a measured outbox size is trusted while under half the limit.
const SIZE_TTL: Duration = Duration::from_secs(1);

/// The commit-order number of the rows being written.
#[derive(Clone, Copy)]
enum Seq {
    /// Not known yet (rows written early, or by a prepared transaction).
    Unknown,
    /// Known at PRE_COMMIT: the first row draws it from emit.tx_seq.
    Draw,
    Known(i64),
}

/// Queues one event of `kind` (one line of JSON). The transaction (or the
/// savepoint or exception block it is in) writes its events out once they
/// pass [`FLUSH_BYTES`]: rows written inside a subtransaction are rolled
/// back with it, so memory stays bounded however much a transaction queues,
/// at any nesting (see also [`pre_commit_sub`]).
pub fn queue(target: &Destination, kind: Kind, event: &[u8], key: Key<'_>) {
    let full = QUEUED.with_borrow_mut(|p| {
        p.push_to(
            |(t, k)| *k == kind && t == target,
            || (target.clone(), kind),
            event,
            key,
            usize::MAX,
        )
        .expect("no limit on the async buffer");
        p.current_level_bytes() >= FLUSH_BYTES
    });
    if full {
        as_emit_owner(|| write_level(Seq::Unknown));
    }
}

pub fn start_sub(sub: u32) {
    QUEUED.with_borrow_mut(|p| p.start_sub(sub));
}

/// `SUBXACT_EVENT_PRE_COMMIT_SUB`: a savepoint or exception block is about
/// to be released into its parent. When that would leave the parent
/// holding more than [`FLUSH_BYTES`], the level writes its events out now,
/// still inside itself: a loop with an exception block per row can queue
/// any amount without the parent's buffer growing past that.
pub fn pre_commit_sub() {
    if QUEUED.with_borrow(|p| p.enclosing_level_bytes() >= FLUSH_BYTES) {
        as_emit_owner(|| write_level(Seq::Unknown));
    }
}

pub fn commit_sub(sub: u32) {
    QUEUED.with_borrow_mut(|p| p.commit_sub(sub));
}

pub fn abort_sub(sub: u32) {
    QUEUED.with_borrow_mut(|p| p.abort_sub(sub));
    // Subtransaction ids grow within a transaction: one set in `sub` or
    // in a child of it is at least `sub`.
    if STRICT.get().is_some_and(|at| at >= sub) {
        STRICT.set(None);
    }
}

/// For the rest of the transaction (unless rolled back to before now),
/// `pg_emit.max_outbox_size` refuses with an ERROR (see [`STRICT`]).
pub fn refusal_is_error() {
    if STRICT.get().is_none() {
        // SAFETY: reads the transaction's state.
        STRICT.set(Some(unsafe { pg_sys::GetCurrentSubTransactionId() }));
    }
}

/// Sets whether this process's transactions queue captured changes (see
/// [`CAPTURING`]); only the worker does.
pub fn set_capturing(on: bool) {
    CAPTURING.set(on);
}

/// Marks the transaction as having written outbox rows by other means
/// (re-queued dead letters), so the worker is woken at commit.
pub fn note_written() {
    WROTE.set(true);
}

/// Splits the current level's events into outbox rows: per destination
/// and format, in order, at most [`FLUSH_BYTES`] of payload each. The
/// worker orders a transaction's rows by their first event's ordinal, so a
/// row never spans the ordinals of a row written earlier (a savepoint's
/// events written out while its enclosing level's were still buffered),
/// nor those of the destination's events in another format (two triggers
/// choosing their own): its events would overtake them.
fn chunks(p: &Pending<(Destination, Kind)>, early: &[(u64, u64)]) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    // Index in `out` of each destination's (and format's) open row.
    let mut open: Vec<(&(Destination, Kind), usize)> = Vec::new();
    for (route, event, ordinal, key) in p.current_level() {
        open.retain(|(r, _)| r.1 == route.1 || r.0 != route.0);
        let slot = open.iter().position(|(r, _)| *r == route);
        let fits = |c: &Chunk| {
            // `early` is sorted: the first range starting after the row's
            // last event must not start before this one.
            let next = early.partition_point(|&(a, _)| a <= c.last);
            c.payload.len() + event.len() < FLUSH_BYTES
                && early.get(next).is_none_or(|&(a, _)| a > ordinal)
        };
        let row = match slot {
            Some(i) if fits(&out[open[i].1]) => open[i].1,
            _ => {
                out.push(Chunk {
                    target: route.0.clone(),
                    kind: route.1,
                    events: 0,
                    first: ordinal,
                    last: ordinal,
                    payload: Vec::new(),
                    keys: Vec::new(),
                    texts: Vec::new(),
                });
                match slot {
                    Some(i) => open[i].1 = out.len() - 1,
                    None => open.push((route, out.len() - 1)),
                }
                out.len() - 1
            }
        };
        let c = &mut out[row];
        if !c.payload.is_empty() {
            c.payload.push(b'\n');
        }
        c.payload.extend_from_slice(event);
        c.keys.push(key.order);
        c.texts.push(key.text.map(str::to_string));
        c.events += 1;
        c.last = ordinal;
    }
    out
}

/// Writes the current level's events as outbox rows and drops them from
/// the buffer. Runs as the owner of `emit` (see [`as_emit_owner`]).
/// Returns the rows' commit-order number (drawn by the first row when
/// `seq` is [`Seq::Draw`]); `None` when `pg_emit.max_outbox_size` refused
/// them (with a WARNING).
fn write_level(seq: Seq) -> Option<Seq> {
    let (rows, held_below) = QUEUED.with_borrow_mut(|p| {
        let rows = EARLY_RANGES.with_borrow(|early| chunks(p, early));
        let held_below = p.held_below_current_level();
        p.drain_current_level();
        (rows, held_below)
    });
    if rows.is_empty() {
        return Some(seq);
    }
    let limit = match CAPTURING.get() {
        true => 0,
        false => settings::max_outbox_bytes(),
    };
    let mut rows = rows;
    if limit > 0 {
        let size = outbox_size(limit);
        if size > limit {
            // Refused: every destination past twice the limit (the worker,
            // which marks shares, may not be running), else only those
            // the worker found over their share, so that a receiver that
            // is down costs only itself its events.
            // (0.2's objects, before ALTER EXTENSION UPDATE, have no
            // shares: the worker waits for the update meanwhile.)
            let fair = size <= limit.saturating_mul(2) && schema() == Schema::Current;
            let over: Vec<Option<String>> = match fair {
                false => vec![None],
                true => over_share(&rows).into_iter().map(Some).collect(),
            };
            for dest in over {
                let (refused, kept): (Vec<Chunk>, Vec<Chunk>) = rows
                    .into_iter()
                    .partition(|c| dest.as_ref().is_none_or(|d| *d == c.target.key()));
                rows = kept;
                let e = EmitError::OutboxFull {
                    dest,
                    size,
                    limit,
                    events: refused.iter().map(|r| r.events as usize).sum(),
                };
                if STRICT.get().is_some() || settings::ON_ERROR.get() == settings::OnError::Error {
                    e.raise();
                }
                e.warn();
            }
            if rows.is_empty() {
                return None;
            }
        }
    }
    // SAFETY: the transaction is writing, so it has (or now gets) an xid.
    let tx = unsafe { pg_sys::GetTopFullTransactionId() }.value as i64;
    let utf8_db = crate::encoding::database_is_utf8();
    let numbered = schema() >= Schema::V0_2;
    let mut seq = seq;
    let ids = Spi::connect_mut(|client| {
        let mut ids = Vec::with_capacity(rows.len());
        for Chunk {
            target,
            kind,
            events,
            first,
            payload,
            keys,
            texts,
            ..
        } in &rows
        {
            let (host, port, framing, url, headers) = target.outbox_columns();
            // Events are UTF-8 (see crate::encoding). A UTF-8 database
            // stores them as they are; any other stores them converted
            // to its own encoding, like any text, and the worker
            // converts them back when it reads them.
            let payload: DatumWithOid = if utf8_db {
                std::str::from_utf8(payload)
                    .unwrap_or_else(|e| pgrx::error!("pg_emit: an event is not UTF-8: {e}"))
                    .into()
            } else {
                payload.as_slice().into()
            };
            let mut args: Vec<DatumWithOid> = vec![
                target.key().as_str().into(),
                host.as_str().into(),
                port.into(),
                framing.as_str().into(),
                url.into(),
                headers.as_deref().into(),
                (*events).into(),
                payload,
            ];
            if !numbered {
                // 0.1.0's outbox, until ALTER EXTENSION UPDATE: its rows
                // are in commit order by id, which the update keeps. It
                // has no place to say a format other than its own two,
                // nor that an event is a message (the worker then puts
                // its id into it, as 0.1.0 did).
                if !matches!(kind.format, Format::Json | Format::Td) {
                    EmitError::NeedsUpdate(format!("format={}", kind.format.name())).raise();
                }
                let id = client
                    .update(legacy_insert_sql(utf8_db), None, &args)?
                    .first()
                    .get_one::<i64>()?;
                ids.extend(id);
                continue;
            }
            let known = match seq {
                Seq::Known(n) => Some(n),
                _ => None,
            };
            // No keys at all (every event a barrier) is stored as NULL,
            // as are no texts.
            let keys = keys.iter().any(Option::is_some).then(|| keys.clone());
            let texts = texts.iter().any(Option::is_some).then(|| texts.clone());
            if texts.is_some() && schema() != Schema::Current {
                EmitError::NeedsUpdate("record_key".into()).raise();
            }
            args.extend([
                known.into(),
                matches!(seq, Seq::Draw).into(),
                (*first as i64).into(),
                tx.into(),
                keys.into(),
                kind.name().into(),
            ]);
            let with_texts = texts.is_some();
            match (texts, utf8_db) {
                (None, _) => {}
                (Some(t), true) => args.push(t.into()),
                // As the payload: UTF-8 bytes (in hex: pgrx passes text
                // as it is), converted by the server.
                (Some(t), false) => {
                    let hex: Vec<Option<String>> =
                        t.iter().map(|k| k.as_deref().map(hex)).collect();
                    args.push(hex.into());
                }
            }
            let sql = insert_sql(utf8_db, with_texts);
            let (id, drawn) = crate::plans::update(client, sql, &args)?
                .first()
                .get_two::<i64, i64>()?;
            ids.extend(id);
            if let (Seq::Draw, Some(n)) = (seq, drawn) {
                seq = Seq::Known(n);
            }
        }
        Ok::<_, pgrx::spi::Error>(ids)
    })
    .unwrap_or_else(|e| pgrx::error!("pg_emit: could not write to emit.outbox: {e}"));
    if matches!(seq, Seq::Unknown) {
        EARLY.with_borrow_mut(|early| early.extend(ids));
        // Only events still held below this level can be split by these
        // rows; kept sorted for the search in chunks().
        if held_below {
            EARLY_RANGES.with_borrow_mut(|r| {
                r.extend(rows.iter().map(|c| (c.first, c.last)));
                r.sort_unstable();
            });
        }
    }
    WROTE.set(true);
    Some(seq)
}

/// One outbox row; `$10` draws the commit-order number instead of taking
/// `$9`, so a one-row commit is one statement, planned once per backend
/// (see [`crate::plans`]).
/// (`texts`: with the events' keys as text, `$15`, which 0.2's outbox has
/// no column for.)
fn insert_sql(utf8_db: bool, texts: bool) -> &'static str {
    macro_rules! insert {
        ($payload:literal, $texts:literal, $value:literal) => {
            concat!(
                "INSERT INTO emit.outbox (destination, host, port, framing, url, headers, events, \
                                          payload, tx_seq, part, tx, keys, format",
                $texts,
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, ",
                $payload,
                ", CASE WHEN $10 THEN pg_catalog.nextval('emit.tx_seq'::pg_catalog.regclass) \
                        ELSE $9 END, $11, $12, $13, $14",
                $value,
                ") RETURNING id, tx_seq"
            )
        };
    }
    match (utf8_db, texts) {
        (true, false) => insert!("$8", "", ""),
        (true, true) => insert!("$8", ", record_keys", ", $15"),
        (false, false) => insert!(
            "pg_catalog.convert_from($8::pg_catalog.bytea, 'UTF8')",
            "",
            ""
        ),
        (false, true) => insert!(
            "pg_catalog.convert_from($8::pg_catalog.bytea, 'UTF8')",
            ", record_keys",
            ", ARRAY(SELECT pg_catalog.convert_from(pg_catalog.decode(u.k, 'hex'), 'UTF8') \
                       FROM pg_catalog.unnest($15::pg_catalog.text[]) WITH ORDINALITY u(k, n) \
                      ORDER BY u.n)"
        ),
    }
}

/// `s`'s bytes in hex.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn legacy_insert_sql(utf8_db: bool) -> &'static str {
    if utf8_db {
        "INSERT INTO emit.outbox (destination, host, port, framing, url, headers, events, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id"
    } else {
        "INSERT INTO emit.outbox (destination, host, port, framing, url, headers, events, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, pg_catalog.convert_from($8, 'UTF8')) RETURNING id"
    }
}

/// Which of the destinations of `rows` the worker found over their share
/// of `pg_emit.max_outbox_size` (emit.destinations.over_share).
fn over_share(rows: &[Chunk]) -> Vec<String> {
    let keys: Vec<String> = rows.iter().map(|c| c.target.key()).collect();
    Spi::connect(|c| {
        c.select(
            "SELECT d.destination FROM emit.destinations d
              WHERE d.over_share AND d.destination OPERATOR(pg_catalog.=) ANY ($1)",
            None,
            &[keys.into()],
        )?
        .map(|r| r.get::<String>(1).map(Option::unwrap_or_default))
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_default()
}

/// emit.outbox's size in bytes, heap and TOAST (where events live; not the
/// indexes, which do not shrink when a backlog has drained; vacuum gives
/// the heap's empty tail back, so the limit releases once the backlog is
/// delivered). Measuring stats the relation's files, so while the outbox
/// is under half the limit (a backlog drains in seconds, normally) the
/// size is trusted for [`SIZE_TTL`]; past that, a receiver is down and
/// every commit measures, so the limit holds exactly.
fn outbox_size(limit: i64) -> i64 {
    if let Some((at, size)) = SIZE.get() {
        if size <= limit / 2 && at.elapsed() < SIZE_TTL {
            return size;
        }
    }
    let size =
        Spi::get_one::<i64>("SELECT pg_catalog.pg_table_size('emit.outbox'::pg_catalog.regclass)")
            .ok()
            .flatten()
            .unwrap_or(0);
    SIZE.set(Some((Instant::now(), size)));
    size
}

/// Before `DROP EXTENSION pg_emit` (from the utility hook): the outbox and
/// the dead letters go with the extension, so say how many events that
/// discards.
pub fn warn_before_drop() {
    // Only to whoever may drop it (the check that refuses the others comes
    // later): the counts are the owner's business.
    let Some(owner) = crate::privileged::emit_owner() else {
        return;
    };
    // SAFETY: reads of the current user and its rights.
    let may_drop =
        unsafe { pg_sys::superuser() || pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) };
    if !may_drop {
        return;
    }
    // Events past `sent` already delivered are in `acked` (0.3 on).
    let acked = match schema() {
        Schema::Current => "coalesce(pg_catalog.cardinality(o.acked), 0)",
        _ => "0",
    };
    let counts = as_emit_owner(|| {
        Spi::get_three::<i64, i64, i64>(&format!(
            "SELECT (SELECT coalesce(pg_catalog.sum(o.events - o.sent - {acked}), 0)::pg_catalog.int8
                       FROM emit.outbox o),
                    (SELECT pg_catalog.count(DISTINCT o.destination) FROM emit.outbox o),
                    (SELECT coalesce(pg_catalog.sum(d.events), 0)::pg_catalog.int8
                       FROM emit.dead_letter d)",
        ))
    });
    if let Ok((Some(queued), Some(dests), Some(dead))) = counts {
        if queued + dead > 0 {
            EmitError::DropDiscards {
                queued,
                dests,
                dead,
            }
            .warn();
        }
    }
}

/// `XACT_EVENT_PRE_COMMIT` (and `PRE_PREPARE`): write what is still
/// buffered and give the transaction its place in the commit order. True
/// when it wrote outbox rows, for the worker to be woken
/// ([`crate::worker::wake`]). Errors here still abort the transaction
/// cleanly.
///
/// A prepared transaction commits later, in whatever session runs COMMIT
/// PREPARED: its rows keep no commit-order number, and the worker gives
/// them one when they become visible.
pub fn pre_commit(prepare: bool) -> bool {
    let queued = !QUEUED.with_borrow(|p| p.is_empty());
    let early = !EARLY.with_borrow(|e| e.is_empty());
    if !queued && !early && !WROTE.get() {
        return false;
    }
    // DROP EXTENSION pg_emit later in this transaction: the outbox is gone
    // with it, and so are these events, which must not fail the commit.
    if crate::privileged::emit_owner().is_none() {
        let n = QUEUED.with_borrow(|p| p.len());
        forget();
        if n > 0 {
            pgrx::warning!(
                "pg_emit: {n} async event(s) of this transaction discarded: the extension was \
                 dropped in it"
            );
        }
        return false;
    }
    // One switch to the owner for the rows and their number.
    as_emit_owner(|| {
        let mut seq = if prepare || schema() < Schema::V0_2 {
            Seq::Unknown
        } else {
            Seq::Draw
        };
        if queued {
            seq = write_level(seq).unwrap_or(seq);
        }
        if early && !matches!(seq, Seq::Unknown) {
            let n = match seq {
                Seq::Known(n) => n,
                _ => Spi::get_one::<i64>(
                    "SELECT pg_catalog.nextval('emit.tx_seq'::pg_catalog.regclass)",
                )
                .ok()
                .flatten()
                .unwrap_or_else(|| pgrx::error!("pg_emit: could not read emit.tx_seq")),
            };
            let ids = EARLY.with_borrow(|e| e.clone());
            Spi::run_with_args(
                "UPDATE emit.outbox SET tx_seq = $1 WHERE id = ANY($2)",
                &[n.into(), ids.into()],
            )
            .unwrap_or_else(|e| pgrx::error!("pg_emit: could not write to emit.outbox: {e}"));
        }
    });
    WROTE.get()
}

/// `XACT_EVENT_COMMIT`: the rows are visible (the worker is woken by
/// [`crate::worker::wake::on_commit`]).
pub fn on_commit() {
    WROTE.set(false);
    STRICT.set(None);
    EARLY.with_borrow_mut(|e| e.clear());
    EARLY_RANGES.with_borrow_mut(|r| r.clear());
}

/// Abort (or PREPARE, whose rows the worker will see if it commits).
pub fn forget() {
    STRICT.set(None);
    QUEUED.with_borrow_mut(|p| p.clear());
    EARLY.with_borrow_mut(|e| e.clear());
    EARLY_RANGES.with_borrow_mut(|r| r.clear());
    WROTE.set(false);
}
