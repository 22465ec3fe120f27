//! The backend's side of [`Interrupt`]: honour cancel and terminate
//! requests while pg_emit waits on the network.

use crate::transport::{Cancelled, Interrupt};
use pgrx::pg_sys;
use std::time::{Duration, Instant};

/// Inside a statement: a pending cancel, `statement_timeout` or shutdown
/// is raised right here as PostgreSQL's own ERROR/FATAL, exactly as if the
/// backend had been waiting in PostgreSQL code. Rust frames unwind, so the
/// half-used socket is closed on the way out.
pub struct Statement;

impl Interrupt for Statement {
    fn check(&self) -> Result<(), Cancelled> {
        pg_sys::check_for_interrupts!();
        Ok(())
    }
}

/// After commit: PostgreSQL holds interrupts while it finishes the commit,
/// and raising there would be a PANIC. A pending cancel or shutdown makes
/// the send stop instead; the caller reports what was not sent.
///
/// `statement_timeout` is switched off before a COMMIT runs, so it is
/// enforced here: sending ends when the statement that committed has run
/// for that long.
pub struct AfterCommit {
    deadline: Option<Instant>,
}

impl AfterCommit {
    /// For the statement that is committing (its `statement_timeout`).
    pub fn for_current_statement() -> Self {
        // SAFETY: reads of backend globals: the setting and when the
        // current statement started.
        let (timeout_ms, started) = unsafe {
            (
                pg_sys::StatementTimeout,
                pg_sys::GetCurrentStatementStartTimestamp(),
            )
        };
        let deadline = (timeout_ms > 0).then(|| {
            // SAFETY: as above.
            let now = unsafe { pg_sys::GetCurrentTimestamp() };
            let ran = Duration::from_micros((now - started).max(0) as u64);
            Instant::now() + Duration::from_millis(timeout_ms as u64).saturating_sub(ran)
        });
        AfterCommit { deadline }
    }

    /// Whether `statement_timeout` has run out.
    pub fn timed_out(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

impl Interrupt for AfterCommit {
    fn check(&self) -> Result<(), Cancelled> {
        // SAFETY: plain reads of flags that signal handlers set.
        let (cancel, die) = unsafe {
            (
                std::ptr::addr_of!(pg_sys::QueryCancelPending).read_volatile(),
                std::ptr::addr_of!(pg_sys::ProcDiePending).read_volatile(),
            )
        };
        if cancel != 0 || die != 0 || self.timed_out() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}
