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

/// Sends `msg` (already newline-terminated for ndjson). Returns whether it
/// was written; a failure is reported as a WARNING, or raised as an ERROR
/// under `pg_emit.on_error = error`. `context` names the caller in those
/// messages and is only built when something failed.
pub fn deliver(
    context: &dyn Fn() -> String,
    host: &str,
    port: u16,
    msg: &[u8],
    framing: Framing,
) -> bool {
    let now = Instant::now();
    let failure = STATE.with_borrow_mut(|st| {
        if let Some(down) = st.cooldowns.blocked(host, port, now) {
            return Some(EmitError::CoolingDown {
                context: context(),
                dest: dest_name(host, port),
                reason: down.reason.clone(),
                ago_ms: (now - down.since).as_millis(),
                left_ms: (down.until - now).as_millis(),
            });
        }
        let timeouts = settings::timeouts();
        let sent = match framing {
            Framing::Close => tcp::send_once(host, port, msg, &timeouts, &interrupts::Statement),
            Framing::Ndjson => send_ndjson(
                &mut st.conns,
                host,
                port,
                msg,
                &timeouts,
                &interrupts::Statement,
            ),
        };
        match sent {
            Ok(()) => {
                st.cooldowns.succeeded(host, port);
                None
            }
            Err(source) => {
                let reason = source.to_string();
                let window = settings::failure_cooldown();
                st.cooldowns
                    .failed(host, port, Instant::now(), window, reason);
                Some(EmitError::Delivery {
                    context: context(),
                    dest: dest_name(host, port),
                    source,
                })
            }
        }
    });
    match failure {
        None => true,
        Some(e) if settings::ON_ERROR.get() == OnError::Error => e.raise(),
        Some(e) => {
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
    intr: &dyn Interrupt,
) -> Result<(), SendError> {
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
    let sock = tcp::open(host, port, timeouts, intr)?;
    tcp::write_all(&sock, msg, timeouts.write_deadline(), intr)?;
    conns.push((host.to_string(), port, sock));
    Ok(())
}
