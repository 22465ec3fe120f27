//! `delivery=commit`: hold events until the transaction commits.
//!
//! Nothing is sent for a rolled-back transaction or for work undone by
//! `ROLLBACK TO SAVEPOINT`. Sending happens after the commit, where an
//! ERROR would be promoted to PANIC, so this path only ever warns: one
//! WARNING per destination that missed events, with counts, rather than
//! one per event.

use super::pending::Pending;
use super::sync;
use super::Destination;
use crate::error::EmitError;
use crate::interrupts;
use crate::settings;
use pg_emit_core::event::Kind;
use pg_emit_core::schedule::Key;
use std::cell::RefCell;

thread_local! {
    /// Events by destination and format.
    static HELD: RefCell<Pending<(Destination, Kind)>> = RefCell::default();
}

/// Holds one event of `format` (newline-terminated for ndjson), with its
/// key (for Kafka's records and partitions), until commit.
pub fn hold(
    context: &dyn Fn() -> String,
    target: &Destination,
    kind: Kind,
    msg: &[u8],
    key: Key<'_>,
) {
    if let Err(e) = try_hold(context, target, kind, msg, key) {
        e.raise()
    }
}

/// [`hold`], or why the event could not be held (the buffer is full).
pub fn try_hold(
    context: &dyn Fn() -> String,
    target: &Destination,
    kind: Kind,
    msg: &[u8],
    key: Key<'_>,
) -> Result<(), EmitError> {
    // Sent after the commit, where no wait event can be made.
    crate::interrupts::make_wait_events();
    let limit = settings::commit_buffer_bytes();
    let held = HELD.with_borrow_mut(|p| {
        p.push_to(
            |(t, k)| *k == kind && t == target,
            || (target.clone(), kind),
            msg,
            key,
            limit,
        )
    });
    held.map_err(|full| EmitError::BufferFull {
        context: context(),
        limit: full.limit,
    })
}

pub fn start_sub(sub: u32) {
    HELD.with_borrow_mut(|p| p.start_sub(sub));
}

pub fn commit_sub(sub: u32) {
    HELD.with_borrow_mut(|p| p.commit_sub(sub));
}

pub fn abort_sub(sub: u32) {
    HELD.with_borrow_mut(|p| p.abort_sub(sub));
}

pub fn forget() {
    HELD.with_borrow_mut(|p| p.clear());
}

/// A prepared transaction may be committed by another session, long after
/// this backend is gone; held events could not follow it.
pub fn refuse_prepare() {
    let n = HELD.with_borrow(|p| p.len());
    if n > 0 {
        EmitError::PrepareWithHeldEvents { events: n }.raise();
    }
}

/// Sends what the committed transaction held. Never raises.
pub fn send_after_commit() {
    let held = HELD.with_borrow_mut(std::mem::take);
    if held.is_empty() {
        return;
    }
    // Per destination: (total, failed, first failure).
    let mut tally: Vec<(&Destination, usize, usize, Option<String>)> = Vec::new();
    let mut cancelled = false;
    let intr = interrupts::AfterCommit::for_current_statement();
    // Consecutive ndjson events for one destination go out in one write of
    // up to COALESCE_BYTES, as in sync mode.
    let mut batch: Vec<u8> = Vec::new();
    let mut events = held.iter().peekable();
    while let Some((route, msg, key)) = events.next() {
        let (target, kind) = (&route.0, route.1);
        let mut count = 1;
        let payload: &[u8] = if target.coalesces() {
            batch.clear();
            batch.extend_from_slice(msg);
            while let Some((next, m, _)) = events.peek() {
                if *next != route || batch.len() + m.len() > sync::COALESCE_BYTES {
                    break;
                }
                batch.extend_from_slice(m);
                count += 1;
                events.next();
            }
            &batch
        } else {
            msg
        };
        let i = match tally.iter().position(|t| t.0 == target) {
            Some(i) => i,
            None => {
                tally.push((target, 0, 0, None));
                tally.len() - 1
            }
        };
        let entry = &mut tally[i];
        entry.1 += count;
        if cancelled {
            entry.2 += count;
            continue;
        }
        if let Err(f) = sync::try_send(target, kind, payload, key, &intr) {
            cancelled = f.cancelled();
            entry.2 += count;
            if entry.3.is_none() {
                entry.3 = Some(if cancelled && intr.timed_out() {
                    "statement_timeout ran out while sending after the commit".to_string()
                } else {
                    f.reason(&target.name())
                });
            }
        }
    }
    for (target, total, failed, first) in tally {
        if failed > 0 {
            crate::failures::count(crate::failures::Mode::Commit, failed as u64);
            EmitError::CommitDeliveryIncomplete {
                dest: target.name(),
                failed,
                total,
                first: first.unwrap_or_default(),
            }
            .warn();
        }
    }
}
