//! Live subscribers: an HTTP listener that serves `GET /channels/<name>`
//! as Server-Sent Events or WebSocket (RFC 6455, through tungstenite).
//!
//! Threads here never touch the database. Each connection has a thread of
//! its own; it asks the worker's main thread (through [`Request`]s and a
//! wake-up callback that sets the worker's latch) to check a token and
//! subscribe it, and for pages of retained events to replay. The main
//! thread publishes each new event to the [`hub::Hub`] once, right after
//! the transaction that stored it committed; subscribing happens on that
//! same thread between two publishes, so replay up to the head it reports
//! and live events after it meet with no gap and no duplicate.

mod conn;
pub mod hub;

use hub::{Bounds, Hub, Sub};
use sha2::{Digest, Sha256};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Most events in one replay page ([`Request::Page`]).
pub const PAGE: i64 = 1000;
/// Most bytes of events in one replay page, past its first event: the
/// worker reads a page between two delivery turns, so a page must be
/// quick to read.
pub const PAGE_BYTES: usize = 1 << 20;

/// Most connections at once; past it new ones get 503. Fewer when the
/// process may open fewer files (see [`connection_cap`]).
const MAX_CONNECTIONS: usize = 1000;

/// How many connections fit beside `reserved` descriptors (what the
/// backend itself may open): each costs a socket and an eventfd. Raises
/// the soft limit to the hard one first, as far as 65,536.
fn connection_cap(reserved: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return MAX_CONNECTIONS;
        }
        let want = lim.rlim_max.min(65_536);
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = want;
            }
        }
    }
    let free = (lim.rlim_cur as usize).saturating_sub(reserved);
    (free / 2).clamp(1, MAX_CONNECTIONS)
}

/// Asked of the main thread by a connection thread.
pub enum Request {
    /// Check `token` (its SHA-256) for `channel` and subscribe.
    Open {
        channel: String,
        token: [u8; 32],
        reply: mpsc::SyncSender<Opened>,
    },
    /// Retained events of `channel` with `after < id <= upto`, in id
    /// order, at most [`PAGE`] of them and, past the first,
    /// [`PAGE_BYTES`].
    Page {
        channel: String,
        after: i64,
        upto: i64,
        reply: mpsc::SyncSender<Result<Vec<Arc<hub::Event>>, String>>,
    },
}

pub enum Opened {
    /// Subscribed; events after `head` will come through `sub`.
    Subscribed {
        sub: Arc<Sub>,
        head: i64,
    },
    Refused(Refusal),
}

/// Why a request gets no events, as an HTTP status.
#[derive(Debug)]
pub enum Refusal {
    Unauthorized(&'static str),
    Forbidden(String),
    NotFound,
    Method,
    NotAcceptable,
    BadRequest(String),
    Unavailable(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unauthorized(m) => f.write_str(m),
            Refusal::Forbidden(m) | Refusal::BadRequest(m) | Refusal::Unavailable(m) => {
                f.write_str(m)
            }
            Refusal::NotFound => f.write_str("not found: subscribe at /channels/<name>"),
            Refusal::Method => f.write_str("only GET"),
            Refusal::NotAcceptable => f.write_str(
                "ask for Server-Sent Events (Accept: text/event-stream) or a WebSocket upgrade",
            ),
        }
    }
}

/// What the listener's threads share.
struct Shared {
    hub: Arc<Hub>,
    requests: Mutex<mpsc::Sender<Request>>,
    wake: Box<dyn Fn() + Send + Sync>,
    stopping: AtomicBool,
    connections: AtomicUsize,
    max_connections: usize,
    /// Connections whose token has not been accepted yet, oldest first:
    /// (number, socket descriptor). See [`Shared::admit`].
    pending: Mutex<std::collections::VecDeque<(u64, i32)>>,
    next_pending: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Most connections that have not authenticated: a quarter of all.
    /// Past it the oldest of them is closed for a new one, so clients that
    /// open connections and never send a token keep only their share, and
    /// subscribers always have the rest.
    fn max_pending(&self) -> usize {
        (self.max_connections / 4).max(1)
    }

    /// Registers a new connection (socket `fd`) as not authenticated,
    /// closing the oldest such one if there are too many, or if every
    /// slot is taken. `None`: every slot is held by subscribers.
    fn admit(&self, fd: i32) -> Option<u64> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let full = self.connections.load(Ordering::Relaxed) >= self.max_connections;
        if full || pending.len() >= self.max_pending() {
            let (_, oldest) = pending.pop_front()?;
            // SAFETY: the descriptor is open: a connection leaves this list
            // (under the lock) before its socket is closed. Shutting it
            // down makes its thread's read end, and the thread closes it.
            unsafe { libc::shutdown(oldest, libc::SHUT_RDWR) };
        }
        let n = self.next_pending.fetch_add(1, Ordering::Relaxed);
        pending.push_back((n, fd));
        Some(n)
    }

    /// Connection `n` authenticated, or is about to close its socket.
    fn settled(&self, n: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|&(k, _)| k != n);
    }
}

impl Shared {
    /// Sends `req` to the main thread and waits for its answer; `None`
    /// when the listener stops or the main thread does not answer.
    fn ask<T>(&self, req: Request, rx: &mpsc::Receiver<T>) -> Option<T> {
        if self.stopping.load(Ordering::Relaxed) {
            return None;
        }
        self.requests.lock().ok()?.send(req).ok()?;
        (self.wake)();
        rx.recv_timeout(conn::ANSWER_TIME).ok()
    }
}

/// A bound listening socket and its accepting thread.
pub struct Listener {
    shared: Arc<Shared>,
    requests: mpsc::Receiver<Request>,
    socket: Arc<TcpListener>,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `addr` (`ip:port`; no name lookup) and starts accepting.
    /// `wake` is called from connection threads when a [`Request`] waits;
    /// `reserved_fds` descriptors are left to the process itself.
    pub fn bind(
        addr: &str,
        bounds: Bounds,
        wake: Box<dyn Fn() + Send + Sync>,
        reserved_fds: usize,
    ) -> std::io::Result<Listener> {
        let addr: SocketAddr = addr.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an IP address and port (such as 127.0.0.1:8090 or [::1]:8090)",
            )
        })?;
        let socket = Arc::new(TcpListener::bind(addr)?);
        let addr = socket.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            hub: Arc::new(Hub::new(bounds)),
            requests: Mutex::new(tx),
            wake,
            stopping: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            max_connections: connection_cap(reserved_fds),
            pending: Mutex::default(),
            next_pending: std::sync::atomic::AtomicU64::new(0),
        });
        let (s, l) = (shared.clone(), socket.clone());
        crate::transport::spawn_without_signals("pg_emit-listen", move || accept(&l, &s))?;
        Ok(Listener {
            shared,
            requests: rx,
            socket,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    /// Open connections (subscribed or not yet).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Requests waiting for the main thread.
    pub fn requests(&self) -> mpsc::TryIter<'_, Request> {
        self.requests.try_iter()
    }
}

impl Drop for Listener {
    /// Stops accepting and closes every subscription (they are told to
    /// reconnect with their last id).
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // SAFETY: shutting down our own listening socket makes the
        // accepting thread's accept() fail, so it returns.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        self.shared.hub.close_all();
    }
}

fn accept(socket: &TcpListener, shared: &Arc<Shared>) {
    for stream in socket.incoming() {
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut stream) = stream else {
            // EMFILE and the like: back off instead of spinning.
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        };
        let Some(n) = shared.admit(stream.as_raw_fd()) else {
            let max = shared.max_connections;
            let busy = Refusal::Unavailable(format!("{max} subscribers"));
            let _ = conn::refuse(&mut stream, &busy);
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let s = shared.clone();
        let spawned = crate::transport::spawn_without_signals("pg_emit-subscriber", move || {
            conn::serve(stream, n, &s);
            s.connections.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            shared.settled(n);
            shared.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether `token` looks like one `emit.create_token` makes (`pgemit_`
/// and 43 base64url characters): anything else is refused without
/// asking the database.
pub fn token_shaped(token: &str) -> bool {
    token.strip_prefix("pgemit_").is_some_and(|t| {
        t.len() == 43
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// A token as stored: its SHA-256. Tokens are random, so a plain hash is
/// enough (no salt or stretching: nothing to guess).
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
