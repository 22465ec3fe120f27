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

use crate::options::Framing;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::c_void;

/// A destination as a trigger or function names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp {
        host: String,
        port: u16,
        framing: Framing,
    },
    Http {
        url: String,
        headers: Vec<(String, String)>,
    },
}

impl Target {
    /// For messages: `host:port` or the URL.
    pub fn name(&self) -> String {
        match self {
            Target::Tcp { host, port, .. } => sync::dest_name(host, *port),
            Target::Http { url, .. } => url.clone(),
        }
    }

    /// Whether messages can share a write (kept-open ndjson connections).
    pub fn coalesces(&self) -> bool {
        matches!(
            self,
            Target::Tcp {
                framing: Framing::Ndjson,
                ..
            }
        )
    }

    /// The destination key of `emit.outbox` and `emit.stats`. Headers are
    /// not shown (they may hold credentials), only told apart by a hash.
    pub fn key(&self) -> String {
        match self {
            Target::Tcp {
                framing: Framing::Close,
                ..
            } => format!("tcp://{}", self.name()),
            Target::Tcp {
                framing: Framing::Ndjson,
                ..
            } => format!("tcp://{}?framing=ndjson", self.name()),
            Target::Http { url, headers } if headers.is_empty() => url.clone(),
            Target::Http { url, headers } => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                headers.hash(&mut h);
                format!("{url} (headers {:08x})", h.finish() as u32)
            }
        }
    }
}

impl Target {
    /// `host`, `port`, `framing`, `url` and `headers` of `emit.outbox`:
    /// how the worker reaches the destination. Headers are one
    /// "Name: value" per line.
    pub fn outbox_columns(&self) -> (String, i32, String, Option<&str>, Option<String>) {
        match self {
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
                let lines: String = headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
                (
                    u.as_ref().map(|u| u.host.clone()).unwrap_or_default(),
                    u.map_or(0, |u| i32::from(u.port)),
                    "http".to_string(),
                    Some(url.as_str()),
                    (!lines.is_empty()).then_some(lines),
                )
            }
        }
    }
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
            outbox::pre_commit(false);
        }
        XACT_EVENT_PRE_PREPARE => {
            sync::flush_all();
            commit::refuse_prepare();
            outbox::pre_commit(true);
        }
        XACT_EVENT_COMMIT => outbox::on_commit(),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            sync::discard_all();
            commit::forget();
            outbox::forget();
        }
        XACT_EVENT_PREPARE => {
            commit::forget();
            outbox::forget();
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
