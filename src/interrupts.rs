//! The backend's side of [`Interrupt`]: honour cancel and terminate
//! requests while pg_emit waits on the network, and show the wait in
//! `pg_stat_activity` as PostgreSQL shows its own.

use crate::transport::{Cancelled, Interrupt, WaitOn};
use pgrx::pg_sys;
use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    /// This backend's wait event ids, by [`WaitOn::ALL`] order (0: not
    /// made yet).
    static WAIT_EVENTS: Cell<[u32; 5]> = const { Cell::new([0; 5]) };
}

/// Makes the named wait events (PostgreSQL 17 and later; elsewhere all
/// are `Extension`). Inside a statement only: making one can raise.
pub fn make_wait_events() {
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    if WAIT_EVENTS.get()[0] == 0 {
        // SAFETY: registers (or finds) a custom wait event by name in
        // shared memory; called in a backend, inside a statement.
        let ids =
            WaitOn::ALL.map(|on| unsafe { pg_sys::WaitEventExtensionNew(on.name().as_ptr()) });
        WAIT_EVENTS.set(ids);
    }
}

/// Shows `on` as this backend's wait event (`None`: not waiting).
fn report_wait(on: Option<WaitOn>) {
    let info = on.map_or(0, |on| {
        let i = WaitOn::ALL.iter().position(|w| *w == on).unwrap_or(0);
        match WAIT_EVENTS.get()[i] {
            0 => pg_sys::PG_WAIT_EXTENSION,
            id => id,
        }
    });
    // SAFETY: what pgstat_report_wait_start and _end do: my_wait_event_info
    // points at this backend's slot in shared memory (or a local one).
    unsafe { std::ptr::write_volatile(pg_sys::my_wait_event_info, info) };
}

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

    fn waiting(&self, on: Option<WaitOn>) {
        if on.is_some() {
            make_wait_events();
        }
        report_wait(on);
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

    /// Never makes a wait event (that can raise, and this is after the
    /// commit): those made in the transaction ([`make_wait_events`]) are
    /// shown, else the generic `Extension`.
    fn waiting(&self, on: Option<WaitOn>) {
        report_wait(on);
    }
}
