//! When an event leaves the database.
//!
//! - `sync`: inside the statement ([`sync`]).
//! - `commit`: held in backend memory, sent once the transaction has
//!   committed and released its locks ([`commit`]).
//! - `async`: written to `emit.outbox` in the transaction and delivered by
//!   the background worker ([`outbox`], [`crate::worker`]).
//!
//! The transaction callbacks registered here route transaction and
//! savepoint boundaries to the modes that hold events.

pub(crate) mod commit;
pub(crate) mod outbox;
use pg_emit_core::pending;
pub(crate) mod sync;

use crate::error::EmitError;
use crate::settings;
use crate::worker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::c_void;

/// A destination as a trigger or function names it (see the core crate).
pub(crate) use pg_emit_core::destination::Destination;

/// Refuses, naming `context`, a destination the allowlist cannot allow.
/// Destinations that send later (commit, async) are checked when the
/// event is made, without DNS, so that a refused one fails the statement
/// rather than being discovered after commit; the check at connect time
/// stays the authoritative one.
pub(crate) fn refuse_unless_allowed(context: &dyn Fn() -> String, target: &Destination) {
    if let Some(why) = not_allowed(target) {
        EmitError::NotAllowed {
            context: context(),
            why,
        }
        .raise();
    }
}

/// Why the allowlist cannot allow `target` (see [`refuse_unless_allowed`]),
/// if it cannot.
pub(crate) fn not_allowed(target: &Destination) -> Option<String> {
    let allowed = match target.endpoint() {
        Destination::Tcp { host, port, .. } => settings::allowlist().may_allow(host, *port, None),
        Destination::Http { url, .. } => pg_emit_core::http_target::parse_url(url)
            .is_ok_and(|u| settings::allowlist().may_allow(&u.host, u.port, Some(url))),
        Destination::Broker(b) => {
            let (host, port) = b.address();
            settings::allowlist().may_allow(host, port, None)
        }
        // Its server is fixed; only the path is filled in.
        Destination::Routed { template, .. } => {
            let sample = pg_emit_core::route::fill(template, "schema", "table");
            match pg_emit_core::destination::parse_url(&sample, Vec::new()) {
                Ok(Destination::Broker(b)) => {
                    let (host, port) = b.address();
                    settings::allowlist().may_allow(host, port, None)
                }
                _ => false,
            }
        }
        // Stored in this database; the listener serves it.
        Destination::Channel(_) => true,
        Destination::Stored { .. } => unreachable!("endpoint() is never a stored destination"),
    };
    (!allowed).then(|| {
        format!(
            "{} is not allowed by pg_emit.allowed_destinations",
            target.name()
        )
    })
}

/// The mode a channel's events take: the worker stores them in the
/// database, so they are queued (`async`) whether `commit` or `async` was
/// asked; `sync`, which promises a send inside the statement, is refused.
/// Other destinations keep `mode`.
pub(crate) fn for_target(
    context: &dyn Fn() -> String,
    target: &Destination,
    mode: crate::options::Delivery,
) -> crate::options::Delivery {
    use crate::options::Delivery;
    if let Destination::Routed { .. } = target.endpoint() {
        EmitError::Routed {
            context: context(),
            dest: target.name(),
        }
        .raise();
    }
    if !matches!(target.endpoint(), Destination::Channel(_)) {
        return mode;
    }
    if mode == Delivery::Sync {
        EmitError::ChannelSync {
            context: context(),
            channel: target.endpoint().name(),
        }
        .raise();
    }
    Delivery::Async
}

pub fn init() {
    // SAFETY: registering static callbacks once, from _PG_init.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        pg_sys::RegisterResourceReleaseCallback(Some(on_release), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // Still inside the transaction: an ERROR here aborts it cleanly.
        // Deferred triggers have fired by now; their ndjson events go out
        // before the commit like any statement's.
        XACT_EVENT_PRE_COMMIT => {
            sync::flush_all();
            if outbox::pre_commit(false) {
                worker::wake::before_commit();
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            sync::flush_all();
            commit::refuse_prepare();
            if outbox::pre_commit(true) {
                worker::wake::before_commit();
            }
        }
        XACT_EVENT_COMMIT => {
            outbox::on_commit();
            worker::wake::on_commit();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            sync::discard_all();
            commit::forget();
            outbox::forget();
            worker::wake::forget();
        }
        XACT_EVENT_PREPARE => {
            commit::forget();
            outbox::forget();
            worker::wake::forget();
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    sub: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_START_SUB => {
            sync::start_sub(sub);
            commit::start_sub(sub);
            outbox::start_sub(sub);
        }
        SUBXACT_EVENT_PRE_COMMIT_SUB => outbox::pre_commit_sub(),
        SUBXACT_EVENT_COMMIT_SUB => {
            sync::commit_sub(sub);
            commit::commit_sub(sub);
            outbox::commit_sub(sub);
        }
        SUBXACT_EVENT_ABORT_SUB => {
            sync::abort_sub(sub);
            commit::abort_sub(sub);
            outbox::abort_sub(sub);
        }
        _ => {}
    }
}

/// Runs three times per resource owner; the one that matters is the top
/// transaction's `AFTER_LOCKS` phase on commit: the commit record is
/// durable, the changes are visible and every lock is released, so a slow
/// receiver delays only the COMMIT reply, never another session.
#[pg_guard]
unsafe extern "C-unwind" fn on_release(
    phase: pg_sys::ResourceReleasePhase::Type,
    is_commit: bool,
    is_top: bool,
    _arg: *mut c_void,
) {
    if is_top && is_commit && phase == pg_sys::ResourceReleasePhase::RESOURCE_RELEASE_AFTER_LOCKS {
        commit::send_after_commit();
    }
}
