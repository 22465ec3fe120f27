//! Sync delivery: the message is written before the statement goes on.
//!
//! Per-backend state lives here: the kept-open ndjson connections, the
//! HTTP client (keep-alive), and the failure cooldowns. Both are short lists scanned linearly; a backend
//! talks to a handful of destinations, and a scan of three entries costs
//! less than hashing a key.

use super::Destination;
use crate::cooldown::Cooldowns;
use crate::error::EmitError;
use crate::failures;
use crate::interrupts;
use crate::made::{fresh_id, fresh_message_id};
use crate::options::Framing;
use crate::settings::{self, OnError};
use crate::transport::http::{self, HttpError, Request, Response, Signing};
use crate::transport::tcp::{self, SendError};
use crate::transport::tls;
use crate::transport::Interrupt;
use pg_emit_core::cloudevents;
use pg_emit_core::destination::SignWith;
use pg_emit_core::event::Kind;
use pg_emit_core::options::Format;
use pg_emit_core::schedule::Key;
use pg_emit_core::sink::{self, Item};
use std::cell::RefCell;
use std::time::Instant;

#[derive(Default)]
struct State {
    cooldowns: Cooldowns,
    /// Kept-open ndjson connections per destination.
    conns: Vec<(String, u16, Option<tcp::Kept>)>,
    /// Kept-open broker connections, by destination key (credentials
    /// differ per stored destination, so not by host and port), in order
    /// of last use.
    brokers: Vec<(String, sink::Connection)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
    static HTTP: RefCell<Vec<http::Client>> = const { RefCell::new(Vec::new()) };
    static OUTGOING: RefCell<Vec<Outgoing>> = const { RefCell::new(Vec::new()) };
    static SKIPPED: RefCell<Vec<Skipped>> = const { RefCell::new(Vec::new()) };
    static MARKS: RefCell<Vec<Mark>> = const { RefCell::new(Vec::new()) };
}

/// How much of each destination's coalesced events was buffered when a
/// subtransaction started. A statement that fails inside an exception
/// block never reaches its end, so its buffered events would otherwise go
/// out with the enclosing statement's: phantoms of rows that never existed.
struct Mark {
    sub: u32,
    /// (host, port, buffered bytes, buffered events).
    kept: Vec<(String, u16, usize, usize)>,
}

/// `host:port`, with IPv6 literals bracketed so the port stays readable.
pub fn dest_name(host: &str, port: u16) -> String {
    if host.starts_with('[') {
        format!("{host}:{port}")
    } else {
        crate::transport::host_port(host, port)
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
    Http(HttpError),
    /// A response outside 2xx (from a trigger's point of view).
    Status(Response),
    /// A server that refused the event (a Redis error reply).
    Refused(String),
}

impl Failure {
    fn not_allowed(&self) -> Option<&str> {
        match self {
            Failure::Send(SendError::NotAllowed(m)) | Failure::Http(HttpError::NotAllowed(m)) => {
                Some(m)
            }
            _ => None,
        }
    }

    pub fn cancelled(&self) -> bool {
        matches!(
            self,
            Failure::Send(SendError::Cancelled) | Failure::Http(HttpError::Cancelled)
        )
    }

    /// No connection could be made (for SQLSTATE 08001 vs 08006).
    fn before_connect(&self) -> bool {
        matches!(
            self,
            Failure::CoolingDown { .. }
                | Failure::Send(
                    SendError::HostNotFound { .. }
                        | SendError::ResolveTimeout { .. }
                        | SendError::Refused
                        | SendError::ConnectTimeout { .. }
                        | SendError::Connect(_)
                )
        )
    }

    /// Why the message was not sent, naming `dest` (a stored
    /// destination's name, never its address: see [`Failure::cause`]).
    pub fn reason(&self, dest: &str) -> String {
        let dest = &pg_emit_core::http_target::quote(dest);
        match self {
            Failure::CoolingDown { .. } => format!("not sending to {dest}: {}", self.cause()),
            Failure::Status(r) => r.describe(dest),
            _ => format!("could not send to {dest}: {}", self.cause()),
        }
    }

    /// What happened, without where: the transports' errors never say
    /// where, so this is what a cooldown keeps. It is shared by every
    /// destination with the same address, and shown under each one's name.
    fn cause(&self) -> String {
        match self {
            Failure::CoolingDown {
                reason,
                ago_ms,
                left_ms,
            } => format!(
                "it failed {ago_ms} ms ago ({reason}); \
                 next attempt in {left_ms} ms (pg_emit.failure_cooldown)"
            ),
            Failure::Send(e) => e.to_string(),
            Failure::Http(e) => e.to_string(),
            Failure::Status(r) => r.cause(),
            Failure::Refused(why) => why.clone(),
        }
    }

    pub fn into_error(self, context: String, dest: &str) -> EmitError {
        if let Some(why) = self.not_allowed() {
            return EmitError::NotAllowed {
                context,
                why: why.to_string(),
            };
        }
        EmitError::Delivery {
            context,
            reason: self.reason(dest),
            connect: self.before_connect(),
        }
    }
}

/// Sends `msg` (newline-terminated for ndjson, a whole body for HTTP), an
/// event of `format` with key `key` (Kafka keys and partitions by it),
/// through this backend's connections and cooldowns, without reporting. A
/// response outside 2xx counts as a failure.
pub fn try_send(
    target: &Destination,
    kind: Kind,
    msg: &[u8],
    key: Key<'_>,
    intr: &dyn Interrupt,
) -> Result<(), Failure> {
    match target.endpoint() {
        Destination::Tcp {
            host,
            port,
            framing,
        } => try_send_tcp(host, *port, msg, *framing, intr),
        Destination::Http { url, headers } => {
            // A message is signed only by its stored destination's own
            // secret (see pg_emit_core::event::Kind).
            let signing = match (target, kind.message) {
                (Destination::Stored { signing, .. }, false) => signing,
                (
                    Destination::Stored {
                        signing: s @ SignWith::Standard(_),
                        ..
                    },
                    true,
                ) => s,
                (_, true) => &SignWith::Nothing,
                (_, false) => &SignWith::FileKey,
            };
            let tls = match target {
                Destination::Stored { tls, .. } => tls,
                _ => &NO_TLS_OPTIONS,
            };
            let id = Some(event_id(kind, msg));
            let r = match kind.format {
                Format::CloudEventsBinary => {
                    let b = cloudevents::to_binary(headers, msg)
                        .map_err(|detail| Failure::Http(HttpError::Failed { detail }))?;
                    let ct = &b.content_type;
                    let sent = (&b.headers[..], &b.body[..]);
                    http_request(url, "POST", ct, sent, id, signing, tls, intr)?
                }
                f => {
                    let ct = cloudevents::content_type(f, false);
                    http_request(url, "POST", ct, (headers, msg), id, signing, tls, intr)?
                }
            };
            if r.success() {
                Ok(())
            } else {
                Err(Failure::Status(r))
            }
        }
        // Brokers: one event on this backend's kept connection for the
        // destination, acknowledged by the broker.
        Destination::Broker(b) => {
            let id = event_id(kind, msg);
            let item = [Item {
                id: &id,
                key: key.order,
                record_key: key.text,
                body: msg,
                content_type: cloudevents::content_type(kind.format, false),
            }];
            let (host, port) = b.address();
            guarded(
                host,
                port,
                || {
                    let timeouts = settings::timeouts();
                    let allow = settings::allowlist();
                    STATE.with_borrow_mut(|st| {
                        let conn = kept(&mut st.brokers, &target.key());
                        let (_, r) = b.send(conn, &item, &timeouts, &allow, intr);
                        r.map_err(|e| match e {
                            sink::Stopped::Network(s) => Failure::Send(s),
                            sink::Stopped::Broker(why) => Failure::Refused(why),
                        })
                    })
                },
                receiver_failed,
            )
        }
        Destination::Stored { .. } => unreachable!("endpoint() is never a stored destination"),
        Destination::Channel(_) => unreachable!("channels are queued (delivery::for_target)"),
        Destination::Routed { .. } => {
            unreachable!("filled in by row triggers, refused to others (delivery::for_target)")
        }
    }
}

/// Broker connections a backend keeps open at most; past that the one
/// used longest ago is closed (a session sending to many streams must
/// not hold a socket per stream for its whole life).
const KEPT_BROKER_CONNECTIONS: usize = 8;

/// The kept connection of the destination `key` (empty the first time),
/// moved to the end of `conns`, which is ordered by last use.
fn kept<'a>(conns: &'a mut Vec<(String, sink::Connection)>, key: &str) -> &'a mut sink::Connection {
    let entry = match conns.iter().position(|(k, _)| k == key) {
        Some(i) => conns.remove(i),
        None => (key.to_string(), sink::Connection::default()),
    };
    if conns.len() >= KEPT_BROKER_CONNECTIONS {
        conns.remove(0);
    }
    conns.push(entry);
    &mut conns.last_mut().expect("just pushed").1
}

/// The id a sync or commit event goes out with (never retried, so fresh):
/// a CloudEvent's own, else a new one (`message_…` for a message).
fn event_id(kind: Kind, msg: &[u8]) -> String {
    match kind.format.is_cloudevents() {
        true => cloudevents::made_id(msg).map(str::to_string),
        false => None,
    }
    .unwrap_or_else(|| match kind.message {
        true => fresh_message_id(),
        false => fresh_id(),
    })
}

/// What a failed send says about the receiver, for its cooldown: a
/// cancel or a refusal by policy says nothing.
fn receiver_failed(r: &Result<(), Failure>) -> Option<String> {
    match r {
        Err(f) if f.cancelled() || f.not_allowed().is_some() => None,
        Err(f) => Some(f.cause()),
        Ok(()) => None,
    }
}

/// Runs `f` unless `key` is cooling down, and records its outcome.
/// `failed` tells which errors say something about the receiver.
fn guarded<T>(
    key: &str,
    port: u16,
    f: impl FnOnce() -> Result<T, Failure>,
    failed: impl Fn(&Result<T, Failure>) -> Option<String>,
) -> Result<T, Failure> {
    let now = Instant::now();
    let blocked = STATE.with_borrow(|st| {
        st.cooldowns
            .blocked(key, port, now)
            .map(|down| Failure::CoolingDown {
                reason: down.reason.clone(),
                ago_ms: (now - down.since).as_millis(),
                left_ms: (down.until - now).as_millis(),
            })
    });
    if let Some(f) = blocked {
        return Err(f);
    }
    let r = f();
    let window = settings::failure_cooldown();
    STATE.with_borrow_mut(|st| match failed(&r) {
        Some(reason) => st
            .cooldowns
            .failed(key, port, Instant::now(), window, reason),
        None if r.is_ok() => st.cooldowns.succeeded(key, port),
        None => {}
    });
    r
}

fn try_send_tcp(
    host: &str,
    port: u16,
    msg: &[u8],
    framing: Framing,
    intr: &dyn Interrupt,
) -> Result<(), Failure> {
    guarded(
        host,
        port,
        || {
            let timeouts = settings::timeouts();
            let allow = settings::allowlist();
            match framing {
                Framing::Close => tcp::send_once(host, port, msg, &timeouts, &allow, intr),
                Framing::Ndjson => STATE.with_borrow_mut(|st| {
                    let i = match st
                        .conns
                        .iter()
                        .position(|(h, p, _)| *p == port && h == host)
                    {
                        Some(i) => i,
                        None => {
                            st.conns.push((host.to_string(), port, None));
                            st.conns.len() - 1
                        }
                    };
                    tcp::write_kept(
                        &mut st.conns[i].2,
                        host,
                        port,
                        msg,
                        &timeouts,
                        &allow,
                        &mut 0,
                        intr,
                    )
                }),
            }
            .map_err(Failure::Send)
        },
        receiver_failed,
    )
}

/// One HTTP request with this backend's client; any status is a response.
/// Network failures and 5xx put the URL in cooldown.
///
/// `id` goes out as `webhook-id` (what Standard Webhooks signs, else
/// unsigned). `sign`: only events pg_emit wrote itself are signed. A
/// signature tells a receiver that pg_emit produced the body; a body chosen
/// by a caller of `send_http` (which could forge an event id) must not
/// carry one.
/// `tls`: a stored destination's own CA and client certificate.
#[allow(clippy::too_many_arguments)]
pub fn http_request(
    url: &str,
    method: &str,
    content_type: &str,
    (headers, body): (&[(String, String)], &[u8]),
    id: Option<String>,
    sign: &SignWith,
    tls: &tls::Options,
    intr: &dyn Interrupt,
) -> Result<Response, Failure> {
    guarded(
        url,
        0,
        || {
            let setup = |detail: String| Failure::Http(HttpError::Failed { detail });
            let client = http_client(tls).map_err(setup)?;
            let signing = match sign {
                SignWith::FileKey => match settings::signing_secret().map_err(setup)? {
                    Some(key) => Signing::Emit(key),
                    None => Signing::None,
                },
                SignWith::Standard(secrets) => Signing::Standard {
                    id: id.clone().unwrap_or_else(fresh_id),
                    secrets: secrets.clone(),
                },
                SignWith::Nothing => Signing::None,
            };
            let req = Request {
                method: method.to_string(),
                url: url.to_string(),
                content_type: content_type.to_string(),
                headers: headers.to_vec(),
                body: body.to_vec(),
                id,
                signing,
            };
            http::request_interruptible(&client, req, intr).map_err(Failure::Http)
        },
        |r| match r {
            Ok(resp) if resp.status >= 500 => Some(resp.cause()),
            Ok(_) => None,
            Err(f) if f.cancelled() || f.not_allowed().is_some() => None,
            Err(f) => Some(f.cause()),
        },
    )
}

/// This backend's HTTP client for destinations with TLS options `tls`,
/// rebuilt when a setting it depends on changes (keep-alive connections
/// live in it). A few are kept, the most recently used first.
fn http_client(tls: &tls::Options) -> Result<http::Client, String> {
    let mut config = settings::http_client_config()?;
    config.tls = tls.clone();
    HTTP.with_borrow_mut(|kept| {
        let c = match kept.iter().position(|c| c.config == config) {
            Some(i) => kept.remove(i),
            None => http::Client::new(config)?,
        };
        kept.insert(0, c.clone());
        kept.truncate(HTTP_CLIENTS);
        Ok(c)
    })
}

/// HTTP clients a backend keeps: one per set of TLS options in use.
const HTTP_CLIENTS: usize = 4;

/// The TLS options of a destination that has none.
static NO_TLS_OPTIONS: tls::Options = tls::Options {
    ca_file: None,
    cert_file: None,
    key_file: None,
    server_name: None,
};

/// Sends `msg` inside a statement. A failure is a WARNING, or an ERROR
/// under `pg_emit.on_error = error`. A destination the allowlist refuses
/// is always an ERROR: that is a permission problem, not a delivery
/// failure.
///
/// ndjson messages are coalesced: a statement's events for one destination
/// are written together when the statement ends ([`flush_all`], from the
/// executor and utility hooks) or every [`COALESCE_BYTES`]. At 20,000 rows
/// that is a few dozen `send(2)` calls instead of 20,000, which is most of
/// the cost of sync delivery (see the README's Performance section).
pub fn deliver(
    context: &dyn Fn() -> String,
    target: &Destination,
    format: Format,
    msg: &[u8],
    key: Key<'_>,
) {
    if let Destination::Tcp {
        host,
        port,
        framing: Framing::Ndjson,
    } = target.endpoint()
    {
        let full = OUTGOING.with_borrow_mut(|out| {
            let i = match out.iter().position(|o| o.port == *port && o.host == *host) {
                Some(i) => i,
                None => {
                    out.push(Outgoing {
                        host: host.clone(),
                        port: *port,
                        buf: Vec::new(),
                        events: 0,
                        context: context(),
                    });
                    out.len() - 1
                }
            };
            out[i].buf.extend_from_slice(msg);
            out[i].events += 1;
            (out[i].buf.len() >= COALESCE_BYTES).then_some(i)
        });
        if let Some(i) = full {
            flush_one(i);
        }
        return;
    }
    if let Err(f) = try_send(
        target,
        Kind::event(format),
        msg,
        key,
        &interrupts::Statement,
    ) {
        report(f, 1, context, &target.name());
    }
}

/// Events of the running statement skipped because their destination is
/// cooling down: one WARNING per destination at the end of the statement
/// ("49 event(s) not sent: ...") instead of one per row.
struct Skipped {
    dest: String,
    context: String,
    events: usize,
    reason: String,
}

/// Coalesced ndjson events of the running statement for one destination.
struct Outgoing {
    host: String,
    port: u16,
    buf: Vec<u8>,
    events: usize,
    /// The trigger that queued the first of them, for messages.
    context: String,
}

/// Flush threshold of coalesced ndjson events.
pub const COALESCE_BYTES: usize = 64 * 1024;

pub fn start_sub(sub: u32) {
    let kept = OUTGOING.with_borrow(|out| {
        out.iter()
            .map(|o| (o.host.clone(), o.port, o.buf.len(), o.events))
            .collect()
    });
    MARKS.with_borrow_mut(|m| m.push(Mark { sub, kept }));
}

pub fn commit_sub(sub: u32) {
    MARKS.with_borrow_mut(|m| {
        if let Some(i) = m.iter().rposition(|k| k.sub == sub) {
            m.truncate(i);
        }
    });
}

/// Drops the coalesced events buffered since subtransaction `sub` began.
/// What a 64 kB flush already wrote cannot be taken back.
pub fn abort_sub(sub: u32) {
    let Some(mark) = MARKS.with_borrow_mut(|m| {
        let i = m.iter().rposition(|k| k.sub == sub)?;
        m.truncate(i + 1);
        m.pop()
    }) else {
        return;
    };
    OUTGOING.with_borrow_mut(|out| {
        for o in out.iter_mut() {
            let (len, events) = mark
                .kept
                .iter()
                .find(|k| k.1 == o.port && k.0 == o.host)
                .map_or((0, 0), |k| (k.2, k.3));
            o.buf.truncate(len);
            o.events = events;
        }
        out.retain(|o| !o.buf.is_empty());
    });
}

/// Writes the coalesced events of one destination and reports a failure.
fn flush_one(i: usize) {
    let Some(o) = OUTGOING.with_borrow_mut(|out| (i < out.len()).then(|| out.swap_remove(i)))
    else {
        return;
    };
    // Whatever was buffered before any open subtransaction is written now:
    // from here on, all of this destination's buffer is theirs.
    MARKS.with_borrow_mut(|marks| {
        for m in marks.iter_mut() {
            for k in m.kept.iter_mut().filter(|k| k.1 == o.port && k.0 == o.host) {
                (k.2, k.3) = (0, 0);
            }
        }
    });
    let sent = try_send_tcp(
        &o.host,
        o.port,
        &o.buf,
        Framing::Ndjson,
        &interrupts::Statement,
    );
    if let Err(f) = sent {
        let dest = dest_name(&o.host, o.port);
        let what = format!("{} ({} event(s))", o.context, o.events);
        report(f, o.events as u64, &|| what.clone(), &dest);
    }
}

/// Writes every destination's coalesced events: the end of a statement.
pub fn flush_all() {
    while OUTGOING.with_borrow(|out| !out.is_empty()) {
        flush_one(0);
    }
    for s in SKIPPED.with_borrow_mut(std::mem::take) {
        EmitError::Delivery {
            context: s.context,
            reason: format!("{} event(s) not sent: {}", s.events, s.reason),
            connect: true,
        }
        .warn();
    }
}

/// Forgets coalesced events of a statement that failed: they were never
/// written, like everything the statement did.
pub fn discard_all() {
    OUTGOING.with_borrow_mut(|out| out.clear());
    SKIPPED.with_borrow_mut(|s| s.clear());
    MARKS.with_borrow_mut(|m| m.clear());
}

/// Reports a failure to send `events` inside a statement (see
/// [`deliver`]), and counts them for `emit.metrics()`.
pub fn report(f: Failure, events: u64, context: &dyn Fn() -> String, dest: &str) {
    failures::count(failures::Mode::Sync, events);
    let policy = f.not_allowed().is_some();
    let raise = policy || settings::ON_ERROR.get() == OnError::Error;
    if !raise {
        if let Failure::CoolingDown { .. } = f {
            let reason = f.reason(dest);
            SKIPPED.with_borrow_mut(
                |skipped| match skipped.iter_mut().find(|s| s.dest == dest) {
                    Some(s) => s.events += 1,
                    None => skipped.push(Skipped {
                        dest: dest.to_string(),
                        context: context(),
                        events: 1,
                        reason,
                    }),
                },
            );
            return;
        }
    }
    let e = f.into_error(context(), dest);
    if raise {
        e.raise()
    }
    e.warn();
}
