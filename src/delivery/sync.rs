//! Sync delivery: the message is written before the statement goes on.
//!
//! Per-backend state lives here: the kept-open ndjson connections and the
//! failure cooldowns. Both are short lists scanned linearly; a backend
//! talks to a handful of destinations, and a scan of three entries costs
//! less than hashing a key.

use crate::cooldown::Cooldowns;
use crate::error::EmitError;
use crate::interrupts;
use crate::options::Framing;
use crate::security::Allowlist;
use crate::settings::{self, OnError};
use crate::transport::tcp::{self, SendError};
use crate::transport::{Interrupt, Timeouts};
use socket2::Socket;
use std::cell::RefCell;
use std::time::Instant;

#[derive(Default)]
struct State {
    cooldowns: Cooldowns,
    conns: Vec<(String, u16, Socket)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// `host:port`, with IPv6 literals bracketed so the port stays readable.
pub fn dest_name(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a message was not sent.
pub enum Failure {
    /// The destination failed moments ago; no attempt was made.
    CoolingDown {
        reason: String,
        ago_ms: u128,
        left_ms: u128,
    },
    Send(SendError),
}

/// Sends `msg` (already newline-terminated for ndjson) through this
/// backend's connections and cooldowns, without reporting anything.
pub fn try_send(
    host: &str,
    port: u16,
    msg: &[u8],
    framing: Framing,
    intr: &dyn Interrupt,
) -> Result<(), Failure> {
    let now = Instant::now();
    STATE.with_borrow_mut(|st| {
        if let Some(down) = st.cooldowns.blocked(host, port, now) {
            return Err(Failure::CoolingDown {
                reason: down.reason.clone(),
                ago_ms: (now - down.since).as_millis(),
                left_ms: (down.until - now).as_millis(),
            });
        }
        let timeouts = settings::timeouts();
        let allow = settings::allowlist();
        let sent = match framing {
            Framing::Close => tcp::send_once(host, port, msg, &timeouts, &allow, intr),
            Framing::Ndjson => send_ndjson(&mut st.conns, host, port, msg, &timeouts, &allow, intr),
        };
        match sent {
            Ok(()) => {
                st.cooldowns.succeeded(host, port);
                Ok(())
            }
            // A cancel or a refusal by policy says nothing about the receiver.
            Err(e @ (SendError::Cancelled | SendError::NotAllowed(_))) => Err(Failure::Send(e)),
            Err(e) => {
                let window = settings::failure_cooldown();
                st.cooldowns
                    .failed(host, port, Instant::now(), window, e.to_string());
                Err(Failure::Send(e))
            }
        }
    })
}

impl Failure {
    pub fn into_error(self, context: String, dest: String) -> EmitError {
        match self {
            Failure::CoolingDown {
                reason,
                ago_ms,
                left_ms,
            } => EmitError::CoolingDown {
                context,
                dest,
                reason,
                ago_ms,
                left_ms,
            },
            Failure::Send(source) => EmitError::Delivery {
                context,
                dest,
                source,
            },
        }
    }
}

/// Sends `msg` inside a statement. Returns whether it was written; a
/// failure is a WARNING, or an ERROR under `pg_emit.on_error = error`. A
/// destination the allowlist refuses is always an ERROR: that is a
/// permission problem, not a delivery failure.
/// `context` names the caller in those messages and is only built when
/// something failed.
pub fn deliver(
    context: &dyn Fn() -> String,
    host: &str,
    port: u16,
    msg: &[u8],
    framing: Framing,
) -> bool {
    match try_send(host, port, msg, framing, &interrupts::Statement) {
        Ok(()) => true,
        Err(Failure::Send(SendError::NotAllowed(why))) => EmitError::NotAllowed {
            context: context(),
            why,
        }
        .raise(),
        Err(f) => {
            let e = f.into_error(context(), dest_name(host, port));
            if settings::ON_ERROR.get() == OnError::Error {
                e.raise()
            }
            e.warn();
            false
        }
    }
}

/// Writes on the kept-open connection to `host:port`, opening (or
/// re-opening, once) as needed. A connection is only put back after a
/// complete write, so a timeout or cancel mid-message never leaves half a
/// line in front of the next message.
fn send_ndjson(
    conns: &mut Vec<(String, u16, Socket)>,
    host: &str,
    port: u16,
    msg: &[u8],
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<(), SendError> {
    // A kept-open connection was checked when it was opened; the allowlist
    // can only be changed by a superuser, who then also wants it to apply
    // to connections already open: re-check its peer.
    if let Some(i) = conns.iter().position(|(h, p, _)| *p == port && h == host) {
        let peer = conns[i].2.peer_addr().ok().and_then(|a| a.as_socket());
        if peer.is_none_or(|a| allow.filter(host, port, None, &[a]).is_err()) {
            conns.swap_remove(i);
        }
    }
    if let Some(i) = conns.iter().position(|(h, p, _)| *p == port && h == host) {
        let (h, p, sock) = conns.swap_remove(i);
        if !tcp::peer_closed(&sock) {
            match tcp::write_all(&sock, msg, timeouts.write_deadline(), intr) {
                Ok(()) => {
                    conns.push((h, p, sock));
                    return Ok(());
                }
                // The receiver went away between messages: reconnect.
                Err(SendError::Closed) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let sock = tcp::open(host, port, timeouts, allow, intr)?;
    tcp::write_all(&sock, msg, timeouts.write_deadline(), intr)?;
    conns.push((host.to_string(), port, sock));
    Ok(())
}
