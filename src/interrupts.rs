//! The backend's side of [`Interrupt`]: honour cancel and terminate
//! requests while pg_emit waits on the network.

use crate::transport::{Cancelled, Interrupt};
use pgrx::pg_sys;

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
pub struct AfterCommit;

impl Interrupt for AfterCommit {
    fn check(&self) -> Result<(), Cancelled> {
        // SAFETY: plain reads of flags that signal handlers set.
        let (cancel, die) = unsafe {
            (
                std::ptr::addr_of!(pg_sys::QueryCancelPending).read_volatile(),
                std::ptr::addr_of!(pg_sys::ProcDiePending).read_volatile(),
            )
        };
        if cancel != 0 || die != 0 {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}
