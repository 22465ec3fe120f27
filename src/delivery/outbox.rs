//! `delivery=async`, the writer's side: events go into `emit.outbox` in the
//! writing transaction, and the worker is woken when it commits.
//!
//! The trigger does not insert a row per event. Events are appended to a
//! per-transaction buffer (with savepoint marks, like `delivery=commit`)
//! and written at `PRE_COMMIT` as one row per destination: the rows are
//! part of the transaction, so a rollback removes them, and a 20,000-row
//! INSERT costs one outbox insert instead of 20,000. Buffers past
//! [`FLUSH_BYTES`] are written early so memory stays bounded.

use super::pending::Pending;
use super::Target;
use crate::error::EmitError;
use crate::privileged::as_emit_owner;
use crate::settings;
use crate::worker;
use pgrx::bgworkers::DynamicBackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// Payload size of one outbox row; also the point at which a transaction's
/// buffer is written out early.
pub const FLUSH_BYTES: usize = 8 << 20;

/// Outbox rows to write for one destination: (event count, payload).
type Chunks = Vec<(i32, Vec<u8>)>;

thread_local! {
    static QUEUED: RefCell<Pending<Target>> = RefCell::default();
    /// This transaction wrote outbox rows: wake the worker at commit.
    static WROTE: Cell<bool> = const { Cell::new(false) };
    /// The worker's latch, found at PRE_COMMIT, set at COMMIT.
    static LATCH: Cell<*mut pg_sys::Latch> = const { Cell::new(std::ptr::null_mut()) };
    /// A worker this transaction started; its pid is known only later.
    static STARTED: RefCell<Option<DynamicBackgroundWorker>> = const { RefCell::new(None) };
    /// When this backend last started a worker, to avoid a storm of
    /// registrations while one is starting up.
    static LAST_START: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Queues one event (a JSON object, no newline).
pub fn queue(context: &dyn Fn() -> String, target: &Target, event: &[u8]) {
    let limit = settings::commit_buffer_bytes().max(2 * FLUSH_BYTES);
    let pushed = QUEUED.with_borrow_mut(|p| {
        p.push(target, event, limit)
            .map(|()| p.bytes_len() >= FLUSH_BYTES && p.all_in_current_level())
    });
    match pushed {
        Ok(true) => flush(),
        Ok(false) => {}
        Err(full) => EmitError::BufferFull {
            context: context(),
            limit: full.limit,
        }
        .raise(),
    }
}

pub fn start_sub(sub: u32) {
    QUEUED.with_borrow_mut(|p| p.start_sub(sub));
}

pub fn commit_sub(sub: u32) {
    QUEUED.with_borrow_mut(|p| p.commit_sub(sub));
}

pub fn abort_sub(sub: u32) {
    QUEUED.with_borrow_mut(|p| p.abort_sub(sub));
}

/// Marks the transaction as having written outbox rows by other means
/// (re-queued dead letters), so the worker is woken at commit.
pub fn note_written() {
    WROTE.set(true);
}

/// Writes what is buffered before the transaction ends (memory stays
/// bounded for huge transactions).
fn flush() {
    as_emit_owner(write_queued);
}

/// Writes everything buffered as outbox rows, one per destination (split
/// at [`FLUSH_BYTES`]), preserving each destination's event order. Runs as
/// the owner of `emit` (see [`as_emit_owner`]).
fn write_queued() {
    let rows = QUEUED.with_borrow_mut(|p| {
        let mut by_dest: Vec<(Target, Chunks)> = Vec::new();
        for (target, event) in p.iter() {
            let i = match by_dest.iter().position(|(t, _)| t == target) {
                Some(i) => i,
                None => {
                    by_dest.push((target.clone(), vec![(0, Vec::new())]));
                    by_dest.len() - 1
                }
            };
            let chunks = &mut by_dest[i].1;
            let last = chunks.last_mut().expect("one chunk at least");
            if !last.1.is_empty() && last.1.len() + event.len() >= FLUSH_BYTES {
                chunks.push((0, Vec::new()));
            }
            let last = chunks.last_mut().expect("one chunk at least");
            if !last.1.is_empty() {
                last.1.push(b'\n');
            }
            last.1.extend_from_slice(event);
            last.0 += 1;
        }
        p.drain_keep_marks();
        by_dest
    });
    if rows.is_empty() {
        return;
    }
    let events: usize = rows
        .iter()
        .flat_map(|(_, chunks)| chunks.iter().map(|c| c.0 as usize))
        .sum();
    let limit = settings::max_outbox_bytes();
    if limit > 0 {
        // Cheap: relation sizes come from the storage manager, no scan.
        // Heap and TOAST, where events live; not the indexes, which do not
        // shrink when a backlog has drained. Vacuum gives the heap's empty
        // tail back, so the limit releases once the backlog is delivered.
        let size = Spi::get_one::<i64>(
            "SELECT pg_catalog.pg_table_size('emit.outbox'::pg_catalog.regclass)",
        )
        .ok()
        .flatten()
        .unwrap_or(0);
        if size > limit {
            let e = EmitError::OutboxFull {
                size,
                limit,
                events,
            };
            if settings::ON_ERROR.get() == settings::OnError::Error {
                e.raise();
            }
            e.warn();
            return;
        }
    }
    let utf8_db = crate::encoding::database_is_utf8();
    let insert = if utf8_db {
        "INSERT INTO emit.outbox (destination, host, port, framing, url, headers, events, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    } else {
        "INSERT INTO emit.outbox (destination, host, port, framing, url, headers, events, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, pg_catalog.convert_from($8, 'UTF8'))"
    };
    Spi::connect_mut(|client| {
        for (target, chunks) in &rows {
            let dest = target.key();
            let (host, port, framing, url, headers) = match target {
                Target::Tcp {
                    host,
                    port,
                    framing,
                } => (
                    host.clone(),
                    i32::from(*port),
                    framing.to_string(),
                    None,
                    None,
                ),
                Target::Http { url, headers } => {
                    let u = crate::transport::http::parse_url(url).ok();
                    let lines: String =
                        headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
                    (
                        u.as_ref().map(|u| u.host.clone()).unwrap_or_default(),
                        u.map_or(0, |u| i32::from(u.port)),
                        "http".to_string(),
                        Some(url.as_str()),
                        (!lines.is_empty()).then_some(lines),
                    )
                }
            };
            for (events, payload) in chunks {
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
                client.update(
                    insert,
                    None,
                    &[
                        dest.as_str().into(),
                        host.as_str().into(),
                        port.into(),
                        framing.as_str().into(),
                        url.into(),
                        headers.as_deref().into(),
                        (*events).into(),
                        payload,
                    ],
                )?;
            }
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .unwrap_or_else(|e| pgrx::error!("pg_emit: could not write to emit.outbox: {e}"));
    WROTE.set(true);
}

/// `XACT_EVENT_PRE_COMMIT`: write what is still buffered and find the
/// worker to wake, starting one if none runs. Errors here still abort the
/// transaction cleanly.
pub fn pre_commit() {
    let queued = !QUEUED.with_borrow(|p| p.is_empty());
    if !queued && !WROTE.get() {
        return;
    }
    // One switch to the owner for the whole commit: the rows and the
    // worker's pid.
    let pid = as_emit_owner(|| {
        if queued {
            write_queued();
        }
        if !WROTE.get() {
            return None;
        }
        Spi::get_one::<i32>("SELECT w.pid FROM emit.worker w")
            .ok()
            .flatten()
    });
    if !WROTE.get() {
        return;
    }
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns a PGPROC in
    // shared memory (never freed) or NULL.
    let latch = pid
        .map(|pid| unsafe { pg_sys::BackendPidGetProc(pid) })
        .filter(|p| !p.is_null() && unsafe { (**p).databaseId == pg_sys::MyDatabaseId })
        .map(|p| unsafe { &raw mut (*p).procLatch });
    match latch {
        Some(l) => LATCH.set(l),
        None => start_worker(),
    }
}

fn start_worker() {
    let recent = LAST_START
        .get()
        .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
    if recent {
        return;
    }
    LAST_START.set(Some(Instant::now()));
    // SAFETY: reading the backend's database oid.
    let db = unsafe { pg_sys::MyDatabaseId };
    match worker::start(db) {
        Ok(handle) => STARTED.set(Some(handle)),
        Err(_) => pgrx::warning!(
            "pg_emit: could not start the delivery worker (are max_worker_processes slots free?); \
             events stay queued in emit.outbox"
        ),
    }
}

/// `XACT_EVENT_COMMIT`: the rows are visible now; wake the worker. Only
/// non-failing calls here: SetLatch and a lookup of a started worker's pid.
pub fn on_commit() {
    if let Some(handle) = STARTED.take() {
        // Not started yet means it will start after this commit and see
        // the rows on its first scan; started means it may have scanned
        // already, so wake it.
        if let Ok(pid) = handle.pid() {
            // SAFETY: as in pre_commit.
            let p = unsafe { pg_sys::BackendPidGetProc(pid) };
            if !p.is_null() {
                LATCH.set(unsafe { &raw mut (*p).procLatch });
            }
        }
    }
    let latch = LATCH.replace(std::ptr::null_mut());
    if !latch.is_null() {
        // SAFETY: a latch in shared memory; SetLatch never fails.
        unsafe { pg_sys::SetLatch(latch) };
    }
    WROTE.set(false);
}

/// Abort (or PREPARE, whose rows the worker will see if it commits).
pub fn forget() {
    QUEUED.with_borrow_mut(|p| p.clear());
    WROTE.set(false);
    LATCH.set(std::ptr::null_mut());
    STARTED.set(None);
}
