//! One subscriber's connection, on its own thread: read the request,
//! have the main thread check its token and subscribe it, replay what it
//! missed, then write live events as the hub hands them over. Nothing
//! here touches the database: the main thread answers [`Request`]s.

use super::hub::{write_slices, Close, Event, Sub};
use super::{Opened, Refusal, Request, Shared};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// Longest request head, and how long a client may take to send it.
const HEAD_BYTES: usize = 16 << 10;
const HEAD_TIME: Duration = Duration::from_secs(10);
/// A subscriber whose socket takes no bytes for this long is gone.
const WRITE_TIME: Duration = Duration::from_secs(30);
/// Comment lines (SSE) or pings (WebSocket) this often, so that proxies
/// keep the connection and a vanished client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest wait for the rest of a client's WebSocket frame at a time.
const INCOMING_TIME: Duration = Duration::from_millis(50);
/// How long a request waits for the main thread (busy in a long claim).
pub(super) const ANSWER_TIME: Duration = Duration::from_secs(30);

/// What a subscription request asked for.
struct Ask {
    channel: String,
    token: [u8; 32],
    after: Option<i64>,
    websocket: Option<String>,
}

/// Serves connection number `n`, which [`Shared::admit`] registered as
/// not authenticated: it leaves that list once its token is accepted, and
/// in any case before its socket closes.
pub(super) fn serve(mut stream: TcpStream, n: u64, shared: &Shared) {
    // Dropped before `stream`, a parameter, is.
    let _settled = Settled(shared, n);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIME));
    let ask = match read_request(&mut stream) {
        Ok(Some(ask)) => ask,
        Ok(None) => return,
        Err(r) => {
            let _ = refuse(&mut stream, &r);
            return;
        }
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let open = Request::Open {
        channel: ask.channel.clone(),
        token: ask.token,
        reply: tx,
    };
    let Some(opened) = shared.ask(open, &rx) else {
        let _ = refuse(
            &mut stream,
            &Refusal::Unavailable("the listener is busy".into()),
        );
        return;
    };
    let (sub, head) = match opened {
        Opened::Subscribed { sub, head } => {
            shared.settled(n);
            (sub, head)
        }
        Opened::Refused(r) => {
            let _ = refuse(&mut stream, &r);
            return;
        }
    };
    let mut session = Session {
        shared,
        sub: &sub,
        last: ask.after.unwrap_or(head),
    };
    let _ = match ask.websocket {
        Some(key) => session.websocket(stream, &key, head),
        None => session.sse(stream, head),
    };
    shared.hub.unsubscribe(&sub);
}

struct Settled<'a>(&'a Shared, u64);

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        self.0.settled(self.1);
    }
}

/// Reads and checks the request head. `Ok(None)`: nothing to answer (the
/// client went away, or a CORS preflight was answered).
fn read_request(stream: &mut TcpStream) -> Result<Option<Ask>, Refusal> {
    let started = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if i + 4 > HEAD_BYTES {
                return Err(Refusal::BadRequest("request head too large".into()));
            }
            break i + 4;
        }
        if buf.len() > HEAD_BYTES {
            return Err(Refusal::BadRequest("request head too large".into()));
        }
        let left = HEAD_TIME.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::BadRequest("malformed request".into())),
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let channel = match path.strip_prefix("/channels/") {
        Some(c) if crate::destination::check_channel(c).is_ok() => c.to_string(),
        _ => return Err(Refusal::NotFound),
    };
    match req.method {
        Some("GET") => {}
        Some("OPTIONS") => {
            let _ = stream.write_all(PREFLIGHT.as_bytes());
            return Ok(None);
        }
        _ => return Err(Refusal::Method),
    }
    let mut token = None;
    let mut after = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "token" => token = Some(v.into_owned()),
            "last_event_id" => after = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(bearer) = header("authorization") {
        match bearer.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => {
                token = Some(t.trim().to_string())
            }
            _ => {
                return Err(Refusal::Unauthorized(
                    "Authorization must be Bearer <token>",
                ))
            }
        }
    }
    // EventSource sends the last id it saw when it reconnects on its own.
    if let Some(id) = header("last-event-id").filter(|v| !v.is_empty()) {
        after = Some(id.to_string());
    }
    let token = match token {
        Some(t) if super::token_shaped(&t) => super::token_hash(&t),
        Some(_) => return Err(Refusal::Unauthorized("unknown or revoked token")),
        _ => {
            return Err(Refusal::Unauthorized(
                "a token is required (Authorization: Bearer <token> or ?token=)",
            ))
        }
    };
    let after = match after.map(|a| a.parse::<i64>()) {
        None => None,
        Some(Ok(n)) if n >= 0 => Some(n),
        Some(_) => {
            return Err(Refusal::BadRequest(
                "last_event_id must be a non-negative integer".into(),
            ))
        }
    };
    let upgrade = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let websocket = if upgrade {
        if header("sec-websocket-version") != Some("13") {
            return Err(Refusal::BadRequest(
                "Sec-WebSocket-Version must be 13".into(),
            ));
        }
        match header("sec-websocket-key") {
            Some(k) => Some(k.to_string()),
            None => return Err(Refusal::BadRequest("Sec-WebSocket-Key is missing".into())),
        }
    } else if header("accept").is_some_and(|a| a.contains("text/event-stream")) {
        None
    } else {
        return Err(Refusal::NotAcceptable);
    };
    Ok(Some(Ask {
        channel,
        token,
        after,
        websocket,
    }))
}

/// Browsers send a preflight before a cross-origin request with an
/// Authorization header. Tokens, not cookies, authenticate, so any origin
/// may ask.
const PREFLIGHT: &str = "HTTP/1.1 204 No Content\r\n\
    Access-Control-Allow-Origin: *\r\n\
    Access-Control-Allow-Methods: GET\r\n\
    Access-Control-Allow-Headers: Authorization, Last-Event-ID\r\n\
    Access-Control-Max-Age: 600\r\n\
    Content-Length: 0\r\n\
    Connection: close\r\n\r\n";

pub(super) fn refuse(stream: &mut TcpStream, r: &Refusal) -> io::Result<()> {
    let (status, extra) = match r {
        Refusal::Unauthorized(_) => ("401 Unauthorized", "WWW-Authenticate: Bearer\r\n"),
        Refusal::Forbidden(_) => ("403 Forbidden", ""),
        Refusal::NotFound => ("404 Not Found", ""),
        Refusal::Method => ("405 Method Not Allowed", "Allow: GET, OPTIONS\r\n"),
        Refusal::NotAcceptable => ("406 Not Acceptable", ""),
        Refusal::BadRequest(_) => ("400 Bad Request", ""),
        Refusal::Unavailable(_) => ("503 Service Unavailable", "Retry-After: 1\r\n"),
    };
    let body = format!("{r}\n");
    let head = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\
         Access-Control-Allow-Origin: *\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Something a protocol writes events to.
trait Out {
    fn events(&mut self, events: &[&Event]) -> io::Result<()>;
    fn keepalive(&mut self) -> io::Result<()>;
    /// Readable socket: false when the client has gone.
    fn incoming(&mut self) -> io::Result<bool>;
    fn close(&mut self, why: &Close, resume: i64) -> io::Result<()>;
    fn fd(&self) -> i32;
}

struct Session<'a> {
    shared: &'a Shared,
    sub: &'a Arc<Sub>,
    /// The last id written (or the one the client said it has).
    last: i64,
}

impl Session<'_> {
    fn sse(&mut self, mut stream: TcpStream, head: i64) -> io::Result<()> {
        // retry: reconnect after a second rather than browsers' three.
        stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
              Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\n\
              X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 1000\n\n",
        )?;
        self.run(&mut Sse(stream), head)
    }

    fn websocket(&mut self, mut stream: TcpStream, key: &str, head: i64) -> io::Result<()> {
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        stream.write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        )?;
        // Clients send nothing but control frames: a small limit keeps a
        // hostile one from making the listener buffer megabytes.
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 10))
            .max_frame_size(Some(64 << 10));
        let ws = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
        self.run(&mut Ws(ws), head)
    }

    /// Replays (last, head] page by page, then writes live events until
    /// the hub closes the subscription or the client leaves.
    fn run(&mut self, out: &mut dyn Out, head: i64) -> io::Result<()> {
        // An id past the channel's last is from another history (a
        // restored or copied database numbers again): not a reason to
        // skip what comes next.
        if self.last > head {
            self.last = head;
        }
        while self.last < head {
            // Revoked, or stopping, while replaying: no further pages.
            if self.sub.is_closed() {
                break;
            }
            // What another subscriber holds is shared from memory, on
            // this thread; the rest is read by the main thread.
            let channel = &self.sub.channel;
            let recent = self.shared.hub.recent(
                channel,
                self.last,
                head,
                super::PAGE as usize,
                super::PAGE_BYTES,
            );
            let events = match recent {
                Some(events) => events,
                None => {
                    let (tx, rx) = mpsc::sync_channel(1);
                    let page = Request::Page {
                        channel: channel.clone(),
                        after: self.last,
                        upto: head,
                        reply: tx,
                    };
                    match self.shared.ask(page, &rx) {
                        Some(Ok(events)) => events,
                        Some(Err(why)) => return out.close(&Close::Failed(why), self.last),
                        None => return out.close(&Close::Stopping, self.last),
                    }
                }
            };
            if events.is_empty() {
                break;
            }
            self.last = events.last().map_or(head, |e| e.id);
            out.events(&events.iter().map(|e| &**e).collect::<Vec<_>>())?;
        }
        self.last = self.last.max(head);
        let fd = self.sub.wake_fd();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: out.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds we own, for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, KEEPALIVE.as_millis() as i32) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                out.keepalive()?;
                continue;
            }
            if fds[1].revents != 0 && !out.incoming()? {
                return Ok(());
            }
            if fds[0].revents != 0 {
                let (events, closed) = self.sub.take();
                let fresh: Vec<&Event> = events
                    .iter()
                    .map(|e| &**e)
                    .filter(|e| e.id > self.last)
                    .collect();
                if let Some(e) = fresh.last() {
                    self.last = e.id;
                    out.events(&fresh)?;
                }
                if let Some(why) = closed {
                    return out.close(&why, self.last);
                }
            }
        }
    }
}

struct Sse(TcpStream);

impl Out for Sse {
    fn events(&mut self, events: &[&Event]) -> io::Result<()> {
        let mut slices = Vec::new();
        for e in events {
            e.sse(&mut slices);
        }
        write_slices(&mut self.0, &mut slices)
    }

    fn keepalive(&mut self) -> io::Result<()> {
        self.0.write_all(b":\n\n")
    }

    fn incoming(&mut self) -> io::Result<bool> {
        let mut sink = [0u8; 1024];
        // SSE clients send nothing after the request: drain what comes.
        Ok(self.0.read(&mut sink)? > 0)
    }

    fn close(&mut self, why: &Close, resume: i64) -> io::Result<()> {
        let data = serde_json::json!({"reason": why.reason(resume), "last_event_id": resume});
        self.0
            .write_all(format!("event: close\ndata: {data}\n\n").as_bytes())?;
        self.0.shutdown(std::net::Shutdown::Both)
    }

    fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

struct Ws(WebSocket<TcpStream>);

fn ws_err(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl Out for Ws {
    /// Frames go straight to the socket, written around the shared
    /// events, once what tungstenite has buffered (a pong) is out.
    fn events(&mut self, events: &[&Event]) -> io::Result<()> {
        self.0.flush().map_err(ws_err)?;
        let mut slices = Vec::new();
        for e in events {
            e.ws(&mut slices);
        }
        write_slices(self.0.get_mut(), &mut slices)
    }

    fn keepalive(&mut self) -> io::Result<()> {
        self.0
            .send(Message::Ping(Default::default()))
            .map_err(ws_err)
    }

    fn incoming(&mut self) -> io::Result<bool> {
        // A frame sent in pieces is kept by tungstenite and finished on a
        // later call: a short wait here keeps a client that stops halfway
        // from holding up its own close (a revoked token, say).
        let _ = self.0.get_ref().set_read_timeout(Some(INCOMING_TIME));
        match self.0.read() {
            // Pings are answered by tungstenite on the next write or flush.
            Ok(Message::Close(_)) => {
                let _ = self.0.flush();
                Ok(false)
            }
            Ok(_) => self.0.flush().map_err(ws_err).map(|()| true),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Ok(false)
            }
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(ws_err(e)),
        }
    }

    fn close(&mut self, why: &Close, resume: i64) -> io::Result<()> {
        let code = match why {
            Close::Lagging => CloseCode::Library(4000),
            Close::TokenGone => CloseCode::Library(4001),
            Close::Stopping => CloseCode::Away,
            Close::Failed(_) => CloseCode::Error,
        };
        let mut reason = why.reason(resume);
        // A close frame's reason is at most 123 bytes.
        while reason.len() > 123 {
            reason.pop();
        }
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        self.0.close(Some(frame)).map_err(ws_err)?;
        // Wait (two seconds at most) for the client's close frame, as
        // RFC 6455 asks.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let _ = self.0.get_ref().set_read_timeout(Some(left));
            if self.0.read().is_err() {
                return Ok(());
            }
        }
    }

    fn fd(&self) -> i32 {
        self.0.get_ref().as_raw_fd()
    }
}
