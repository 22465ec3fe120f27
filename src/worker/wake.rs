//! Waking the worker when a transaction's outbox rows become visible, and
//! starting one when none runs: what backends do for the worker, apart
//! from how they write the outbox ([`crate::delivery::outbox`]), which
//! only says whether it wrote rows.

use crate::privileged::as_emit_owner;
use pgrx::bgworkers::DynamicBackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::cell::{Cell, RefCell};

thread_local! {
    /// This transaction created the extension: start its worker once the
    /// commit is visible (see [`start_at_commit`]).
    static CREATED: Cell<bool> = const { Cell::new(false) };
    /// The worker's latch, found at PRE_COMMIT, set at COMMIT.
    static LATCH: Cell<*mut pg_sys::Latch> = const { Cell::new(std::ptr::null_mut()) };
    /// The worker this backend started last (its handle lives in
    /// TopMemoryContext): while it is starting or running, a commit that
    /// finds no registered worker does not start another.
    static STARTED: RefCell<Option<DynamicBackgroundWorker>> = const { RefCell::new(None) };
    /// This transaction started that worker: wake it at commit.
    static STARTED_NOW: Cell<bool> = const { Cell::new(false) };
    /// The worker's pid as last read from emit.worker; checked against the
    /// process table at every commit instead of read again.
    static WORKER_PID: Cell<i32> = const { Cell::new(0) };
}

/// At PRE_COMMIT of a transaction that wrote outbox rows: finds the
/// worker to wake at commit, or starts one if none runs. Errors here still
/// abort the transaction cleanly.
pub fn before_commit() {
    match worker_latch(worker_pid()) {
        Some(l) => LATCH.set(l),
        None => start(),
    }
}

/// After `COMMIT PREPARED` (from the utility hook): the prepared
/// transaction's rows are visible now; wake the worker when this command
/// commits, so that it gives them their place in the commit order at once.
/// Only a read: nothing here may fail a COMMIT PREPARED that has happened.
pub fn after_commit_prepared() {
    if crate::privileged::emit_owner().is_none() {
        return;
    }
    if let Some(latch) = worker_latch(worker_pid()) {
        LATCH.set(latch);
    }
}

/// The worker's pid: the one read last, while that process is still a
/// pg_emit worker of this database (checked in the process table, which
/// costs no SQL), else read again from emit.worker.
fn worker_pid() -> Option<i32> {
    let cached = WORKER_PID.get();
    if cached != 0 && is_worker(cached) {
        return Some(cached);
    }
    let pid = as_emit_owner(|| Spi::get_one::<i32>("SELECT w.pid FROM emit.worker w"))
        .ok()
        .flatten();
    WORKER_PID.set(pid.unwrap_or(0));
    pid
}

/// Whether `pid` is a pg_emit worker connected to this database.
fn is_worker(pid: i32) -> bool {
    // SAFETY: GetBackgroundWorkerTypeByPid takes BackgroundWorkerLock and
    // copies the type into a static buffer; BackendPidGetProc as in
    // worker_latch.
    unsafe {
        let kind = pg_sys::GetBackgroundWorkerTypeByPid(pid);
        !kind.is_null()
            && std::ffi::CStr::from_ptr(kind) == super::TYPE
            && worker_latch(Some(pid)).is_some()
    }
}

/// The latch of the worker with `pid` if that is a process of this
/// database (the pid in emit.worker may be stale).
fn worker_latch(pid: Option<i32>) -> Option<*mut pg_sys::Latch> {
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns a PGPROC in
    // shared memory (never freed) or NULL.
    pid.map(|pid| unsafe { pg_sys::BackendPidGetProc(pid) })
        .filter(|p| !p.is_null() && unsafe { (**p).databaseId == pg_sys::MyDatabaseId })
        .map(|p| unsafe { &raw mut (*p).procLatch })
}

/// After `CREATE EXTENSION pg_emit` (seen by the utility hook: with
/// preloading, or once the session has loaded the library): the database's
/// worker starts when the transaction commits, as the launcher starts one
/// at server start, so that `pg_emit.listen` serves and channel retention
/// runs before the first async event. Not before the commit: a worker that
/// does not see the extension exits for good. A rollback forgets it.
pub fn start_at_commit() {
    CREATED.set(true);
}

/// At `XACT_EVENT_COMMIT`, where nothing may raise: registering a worker
/// reports a full table of workers by its result, and anything else is
/// caught and reported as a WARNING.
fn start_after_commit() {
    // SAFETY: reading the backend's database oid.
    let db = unsafe { pg_sys::MyDatabaseId };
    let started = PgTryBuilder::new(|| {
        // SAFETY: as in start_worker.
        unsafe { PgMemoryContexts::TopMemoryContext.switch_to(|_| super::start(db)) }.is_ok()
    })
    .catch_others(|_| false)
    .execute();
    if !started {
        pgrx::warning!(
            "pg_emit: could not start the delivery worker after CREATE EXTENSION (are \
             max_worker_processes slots free?); it starts with the first async event"
        );
    }
}

fn start() {
    use pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted;
    match STARTED.with_borrow(|h| h.as_ref().map(|h| h.pid())) {
        // The worker this backend started is still starting: it will scan.
        Some(Err(NotYetStarted)) => return,
        // It runs but is not the one emit.worker names (it may serve an
        // installation dropped since): wake it, it knows what to do.
        Some(Ok(pid)) => {
            if let Some(latch) = worker_latch(Some(pid)) {
                LATCH.set(latch);
            }
            return;
        }
        _ => {}
    }
    // SAFETY: reading the backend's database oid.
    let db = unsafe { pg_sys::MyDatabaseId };
    // SAFETY: the handle is allocated in TopMemoryContext so it outlives
    // this transaction (a few bytes per start); nothing else is allocated
    // there.
    let started = unsafe { PgMemoryContexts::TopMemoryContext.switch_to(|_| super::start(db)) };
    match started {
        Ok(handle) => {
            STARTED.set(Some(handle));
            STARTED_NOW.set(true);
        }
        Err(_) => pgrx::warning!(
            "pg_emit: could not start the delivery worker (are max_worker_processes slots free?); \
             events stay queued in emit.outbox"
        ),
    }
}

/// `XACT_EVENT_COMMIT`: the rows are visible now; wake the worker. Only
/// non-failing calls here: SetLatch, a lookup of a started worker's pid,
/// and after CREATE EXTENSION a worker's registration, errors caught.
pub fn on_commit() {
    if CREATED.replace(false) {
        start_after_commit();
    }
    if STARTED_NOW.replace(false) {
        // Not started yet means it will start after this commit and see
        // the rows on its first scan; started means it may have scanned
        // already, so wake it.
        if let Some(Ok(pid)) = STARTED.with_borrow(|h| h.as_ref().map(|h| h.pid())) {
            // SAFETY: as in worker_latch.
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
}

/// Abort (or PREPARE): nothing to wake, nothing to start.
pub fn forget() {
    CREATED.set(false);
    LATCH.set(std::ptr::null_mut());
    STARTED_NOW.set(false);
}
