//! The worker's transactions: each claim and each acknowledgement is one
//! short transaction, never held while a receiver is waited on.

use super::Stop;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// The running transaction's commit need not wait for its WAL (see
    /// [`commit_without_waiting`]).
    static NO_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Lets the running worker transaction commit without waiting for its WAL
/// to reach disk or a synchronous standby (`synchronous_commit = off` for
/// that one commit; the worker's own setting stays `on`). Only for records
/// whose loss in a crash or a failover costs repeats, never an event or
/// its order: a job's deliveries and progress (those events are sent
/// again under the same ids, which receivers drop), its failed attempts,
/// counters and response-log rows. The next transaction that waits (a
/// claim that numbers events) flushes it too. The worker then makes one
/// WAL flush per job instead of two, and writers' commits share theirs
/// with fewer others (see docs/performance.md for what it measured).
pub(super) fn commit_without_waiting() {
    NO_WAIT.set(true);
}

/// Puts the worker's `synchronous_commit` back when dropped, also when a
/// commit raises.
struct Restore(std::ffi::c_int);

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: the GUC's variable, in this process's only thread that
        // touches PostgreSQL.
        unsafe { pg_sys::synchronous_commit = self.0 };
    }
}

/// Runs `f` in a transaction with a snapshot. pgrx's own helper demands
/// unwind-safe closures; an ERROR here ends the worker anyway (it restarts).
///
/// An ERROR inside `f` (pgrx turns it into an unwinding panic) aborts the
/// transaction and comes back as `Err`, so the caller can tell a dropped
/// extension or a lost deadlock from a real fault.
///
/// `what` shows in `pg_stat_activity.query` while it runs; afterwards the
/// worker reports itself idle, so a DBA sees it never sits in a
/// transaction while it waits on a receiver.
pub(super) fn transaction<R, E: std::fmt::Display>(
    what: &std::ffi::CStr,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<R, Failed> {
    NO_WAIT.set(false);
    // SAFETY: reporting activity and the standard bgworker transaction
    // bracket.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, what.as_ptr());
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let r = match r {
        Ok(Ok(v)) => {
            // SAFETY: closes what was opened above.
            unsafe {
                pg_sys::PopActiveSnapshot();
                // Set on the variable for this commit only: a SET at the
                // worker's override priority would become its default.
                let _restore = Restore(pg_sys::synchronous_commit);
                if NO_WAIT.replace(false) {
                    pg_sys::synchronous_commit =
                        pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as std::ffi::c_int;
                }
                pg_sys::CommitTransactionCommand();
                // Report this transaction's deletes and updates now: without
                // it a bgworker reports nothing until it exits, autovacuum
                // never learns that the outbox is full of dead rows, and the
                // table grows for ever.
                pg_sys::pgstat_report_stat(true);
            }
            Ok(v)
        }
        Ok(Err(e)) => {
            // SAFETY: abort releases locks, snapshots and SPI state.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(Failed {
                message: e.to_string(),
                deadlock: false,
            })
        }
        Err(panic) => {
            // SAFETY: as above; pgrx already flushed PostgreSQL's error
            // state when it turned the ERROR into this panic.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(failure(panic))
        }
    };
    // SAFETY: as above.
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
    r
}

/// What a panic out of a worker transaction says: an ERROR PostgreSQL
/// raised (which pgrx carries as `CaughtError`), one of pg_emit's own
/// (`pgrx::error!`, which unwinds as `ErrorReportWithLevel` when no
/// PostgreSQL frame is crossed, or a bare `ErrorReport`), or a Rust
/// panic's text.
fn failure(panic: Box<dyn std::any::Any + Send>) -> Failed {
    use pgrx::pg_sys::panic::{CaughtError, ErrorReport, ErrorReportWithLevel};
    let failed = |message: &str, code| Failed {
        message: message.to_string(),
        deadlock: code == pgrx::PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED,
    };
    let panic = match panic.downcast::<CaughtError>() {
        Ok(e) => {
            return match *e {
                CaughtError::PostgresError(r)
                | CaughtError::ErrorReport(r)
                | CaughtError::RustPanic { ereport: r, .. } => {
                    failed(r.message(), r.sql_error_code())
                }
            }
        }
        Err(other) => other,
    };
    let panic = match panic.downcast::<ErrorReportWithLevel>() {
        Ok(r) => return failed(r.message(), r.sql_error_code()),
        Err(other) => other,
    };
    let panic = match panic.downcast::<ErrorReport>() {
        // (Its code is private to pgrx; a lost deadlock never comes so.)
        Ok(r) => return failed(r.message(), pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR),
        Err(other) => other,
    };
    let text = match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
        (Some(s), _) => s.as_str(),
        (None, Some(s)) => s,
        (None, None) => "unexpected panic",
    };
    failed(text, pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR)
}

/// Why a worker transaction failed.
pub(super) struct Failed {
    message: String,
    /// The worker lost a deadlock. Its `deadlock_timeout` is shorter than
    /// any backend's (see `crate::privileged`), so in a deadlock with a
    /// user's transaction (DROP EXTENSION taking the extension's tables one
    /// by one, say) the worker is the one that gives way.
    pub(super) deadlock: bool,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// After a failed transaction: a missing extension means DROP EXTENSION
/// won the race with this worker, which then just stops; a lost deadlock
/// means a concurrent transaction (often that DROP EXTENSION, not yet
/// committed) is given the way, and the worker starts again a second
/// later; anything else is a real fault, raised (the worker restarts in a
/// second).
pub(super) fn stop_or_raise(what: &str, err: Failed) -> Stop {
    let installed = transaction(c"pg_emit: checking the extension", || {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_emit')",
        )
    });
    match installed {
        Ok(Some(false)) => Stop::ExtensionDropped,
        _ if err.deadlock => Stop::Yielded,
        _ => pgrx::error!("pg_emit worker: {what} failed: {err}"),
    }
}
