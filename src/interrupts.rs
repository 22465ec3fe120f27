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
