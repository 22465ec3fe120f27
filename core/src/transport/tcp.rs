//! TCP: resolve, connect, write, each bounded by a deadline.
//!
//! Sockets are non-blocking and every wait is a `poll(2)` of at most
//! [`SLICE`], so a receiver that hangs costs at most the timeout and a
//! cancel request is honoured within milliseconds. The blocking
//! `std::net` calls cannot offer either: `connect_timeout` cannot be
//! interrupted and DNS has no timeout at all.

use super::{Cancelled, Interrupt, Timeouts, WaitOn, SLICE};
use crate::security::Allowlist;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why a send failed. Messages say what happened, never where: the caller
/// names the destination, which for a stored destination is its name, so
/// its address (and a URL's path and query, which may hold a token) stays
/// out of WARNINGs that writers read.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("host not found: {detail}")]
    HostNotFound { detail: String },
    #[error("name lookup timed out after {ms} ms (pg_emit.connect_timeout)")]
    ResolveTimeout { ms: u128 },
    #[error("connection refused")]
    Refused,
    #[error("connect timed out after {ms} ms (pg_emit.connect_timeout)")]
    ConnectTimeout { ms: u128 },
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error(
        "write timed out after {ms} ms with {left} of {len} bytes unsent (pg_emit.write_timeout)"
    )]
    WriteTimeout { ms: u128, left: usize, len: usize },
    #[error("no reply within {ms} ms (pg_emit.write_timeout)")]
    ReadTimeout { ms: u128 },
    #[error("connection closed by the receiver")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("cancelled")]
    Cancelled,
    /// The TLS handshake or session failed (see [`super::tls::reason`]).
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    NotAllowed(String),
}

impl From<Cancelled> for SendError {
    fn from(_: Cancelled) -> Self {
        SendError::Cancelled
    }
}

pub(super) enum Wait {
    TimedOut,
    Cancelled,
}

/// Waits until `fd` is ready for `events` (or has an error to report).
pub(super) fn wait(
    fd: i32,
    events: i16,
    on: WaitOn,
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<(), Wait> {
    loop {
        intr.check().map_err(|_| Wait::Cancelled)?;
        let now = Instant::now();
        if now >= deadline {
            return Err(Wait::TimedOut);
        }
        let slice = (deadline - now).min(SLICE);
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // Round up so a 0.4 ms remainder does not spin with timeout 0.
        let ms = slice.as_micros().div_ceil(1000) as i32;
        intr.waiting(Some(on));
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        intr.waiting(None);
        if n > 0 {
            return Ok(());
        }
        // n == 0: slice elapsed; n < 0: EINTR from a signal (e.g. a cancel
        // request): both loop back to the interrupt check.
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// Resolves `host`. IP literals (also `[::1]`) never touch DNS; names are
/// looked up on a helper thread so the lookup obeys the deadline and
/// cancellation, which `getaddrinfo` alone does not.
pub fn resolve(
    host: &str,
    port: u16,
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<Vec<SocketAddr>, SendError> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    let name = host.to_string();
    super::spawn_without_signals("pg_emit-resolve", move || {
        let _ = tx.send(
            (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>()),
        );
    })?;
    loop {
        intr.check()?;
        let now = Instant::now();
        if now >= deadline {
            return Err(SendError::ResolveTimeout {
                ms: millis(now - started),
            });
        }
        intr.waiting(Some(WaitOn::Resolve));
        let got = rx.recv_timeout((deadline - now).min(SLICE));
        intr.waiting(None);
        match got {
            Ok(Ok(addrs)) if !addrs.is_empty() => return Ok(addrs),
            Ok(Ok(_)) => {
                return Err(SendError::HostNotFound {
                    detail: "no addresses".into(),
                })
            }
            Ok(Err(e)) => {
                return Err(SendError::HostNotFound {
                    detail: e.to_string(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(SendError::HostNotFound {
                    detail: "lookup thread failed".into(),
                })
            }
        }
    }
}

/// Connects to the first address that accepts, all within one deadline.
pub fn connect(
    addrs: &[SocketAddr],
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<Socket, SendError> {
    let started = Instant::now();
    let mut last = None;
    for addr in addrs {
        match connect_one(*addr, started, deadline, intr) {
            Ok(s) => return Ok(s),
            Err(e @ (SendError::Cancelled | SendError::ConnectTimeout { .. })) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(SendError::HostNotFound {
        detail: "no addresses".into(),
    }))
}

fn connect_one(
    addr: SocketAddr,
    started: Instant,
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<Socket, SendError> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // Events are small and already complete: waiting for Nagle's timer
    // would add up to 40 ms per message on a kept-open connection.
    sock.set_tcp_nodelay(true)?;
    let refused = |err: io::Error| match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => SendError::Refused,
        _ => SendError::Connect(err),
    };
    match sock.connect(&SockAddr::from(addr)) {
        Ok(()) => return Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(refused(e)),
    }
    match wait(
        sock.as_raw_fd(),
        libc::POLLOUT,
        WaitOn::Connect,
        deadline,
        intr,
    ) {
        Ok(()) => {}
        Err(Wait::Cancelled) => return Err(SendError::Cancelled),
        Err(Wait::TimedOut) => {
            return Err(SendError::ConnectTimeout {
                ms: millis(started.elapsed()),
            })
        }
    }
    match sock.take_error()? {
        Some(e) => Err(refused(e)),
        None => Ok(sock),
    }
}

/// Writes all of `buf` or fails, within `timeouts.write`: for the whole
/// write, or (with `timeouts.stall`) for each wait without progress.
///
/// `acked` tells a caller that resumes how much of `buf` is safe to count
/// as delivered when the write did not finish: after a timeout or cancel,
/// the bytes the receiving host has acknowledged (the kernel's count of
/// what is still queued is subtracted); after a broken connection,
/// nothing, since what was queued may be lost with it.
pub fn write_all(
    sock: &Socket,
    buf: &[u8],
    timeouts: &Timeouts,
    acked: &mut usize,
    intr: &dyn Interrupt,
) -> Result<(), SendError> {
    let started = Instant::now();
    let mut deadline = started + timeouts.write;
    let mut sent = 0;
    *acked = 0;
    let stalled = |sent: usize, acked: &mut usize| {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int: the bytes not yet acknowledged.
        let ok = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } == 0;
        *acked = if ok {
            sent.saturating_sub(queued.max(0) as usize)
        } else {
            0
        };
    };
    while sent < buf.len() {
        let rest = &buf[sent..];
        // MSG_NOSIGNAL: a receiver that went away must give EPIPE, not
        // kill the backend with SIGPIPE.
        match sock.send_with_flags(rest, libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(SendError::Closed),
            Ok(n) => {
                sent += n;
                if timeouts.stall {
                    deadline = Instant::now() + timeouts.write;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match wait(
                    sock.as_raw_fd(),
                    libc::POLLOUT,
                    WaitOn::Send,
                    deadline,
                    intr,
                ) {
                    Ok(()) => {}
                    Err(Wait::Cancelled) => {
                        stalled(sent, acked);
                        return Err(SendError::Cancelled);
                    }
                    Err(Wait::TimedOut) => {
                        stalled(sent, acked);
                        return Err(SendError::WriteTimeout {
                            ms: millis(started.elapsed()),
                            left: rest.len(),
                            len: buf.len(),
                        });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) => {
                return Err(SendError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
    }
    *acked = buf.len();
    Ok(())
}

/// Resolves, checks the addresses against the allowlist and connects to
/// one that passed, within one connect deadline: a slow DNS server and a
/// slow handshake together still cost at most the timeout, and the address
/// connected to is always one that was checked.
pub fn open(
    host: &str,
    port: u16,
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<Socket, SendError> {
    allow
        .check_name(host, port)
        .map_err(|r| SendError::NotAllowed(r.0))?;
    let deadline = timeouts.connect_deadline();
    let addrs = resolve(host, port, deadline, intr)?;
    let addrs = allow
        .filter(host, port, None, &addrs)
        .map_err(|r| SendError::NotAllowed(r.0))?;
    connect(&addrs, deadline, intr)
}

/// One message on its own connection: connect, write, close. The close
/// (end of stream) is the message boundary receivers of the plpython
/// recipe read until.
pub fn send_once(
    host: &str,
    port: u16,
    msg: &[u8],
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<(), SendError> {
    let sock = open(host, port, timeouts, allow, intr)?;
    write_all(&sock, msg, timeouts, &mut 0, intr)?;
    // An orderly FIN after the data; the kernel still delivers what is
    // queued after close, so there is nothing more to wait for.
    let _ = sock.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Writes `msg` on the kept-open connection in `slot`, opening (or
/// re-opening, once) as needed. The connection is only put back after a
/// complete write, so a timeout or cancel mid-message never leaves half a
/// line in front of the next message. Its peer is checked against `allow`
/// again: a superuser who narrows the allowlist means it for connections
/// already open too. `acked` is [`write_all`]'s, for the connection used
/// last (nothing when reconnecting failed).
#[allow(clippy::too_many_arguments)]
pub fn write_kept(
    slot: &mut Option<Kept>,
    host: &str,
    port: u16,
    msg: &[u8],
    timeouts: &Timeouts,
    allow: &Allowlist,
    acked: &mut usize,
    intr: &dyn Interrupt,
) -> Result<(), SendError> {
    *acked = 0;
    if let Some(kept) = slot.take() {
        let sock = &kept.sock;
        let peer_allowed = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| allow.filter(host, port, None, &[a]).is_ok());
        let same = kept.host == host && kept.port == port;
        if same && peer_allowed && !peer_closed(sock) {
            match write_all(sock, msg, timeouts, acked, intr) {
                Ok(()) => {
                    *slot = Some(kept);
                    return Ok(());
                }
                // The receiver went away between messages: reconnect.
                Err(SendError::Closed) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let sock = open(host, port, timeouts, allow, intr)?;
    write_all(&sock, msg, timeouts, acked, intr)?;
    *slot = Some(Kept {
        host: host.to_string(),
        port,
        sock,
    });
    Ok(())
}

/// A kept-open connection and the address it was opened for: one kept for
/// another address (a stored destination that was altered) is replaced,
/// not written to.
pub struct Kept {
    host: String,
    port: u16,
    sock: Socket,
}

/// Reads what has arrived on `sock` into `buf` (appending), waiting until
/// something has, `deadline` passes or `intr` says stop. A peer that
/// closed the connection is [`SendError::Closed`].
pub fn read_some(
    sock: &Socket,
    buf: &mut Vec<u8>,
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<usize, SendError> {
    let started = Instant::now();
    let mut scratch = [MaybeUninit::<u8>::uninit(); 16 * 1024];
    loop {
        match sock.recv_with_flags(&mut scratch, libc::MSG_DONTWAIT) {
            Ok(0) => return Err(SendError::Closed),
            Ok(n) => {
                // SAFETY: recv initialised the first n bytes.
                buf.extend(scratch[..n].iter().map(|b| unsafe { b.assume_init() }));
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match wait(
                    sock.as_raw_fd(),
                    libc::POLLIN,
                    WaitOn::Reply,
                    deadline,
                    intr,
                ) {
                    Ok(()) => {}
                    Err(Wait::Cancelled) => return Err(SendError::Cancelled),
                    Err(Wait::TimedOut) => {
                        return Err(SendError::ReadTimeout {
                            ms: millis(started.elapsed()),
                        })
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return Err(SendError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether the receiver has closed a kept-open connection. A write to such
/// a socket would "succeed" into the kernel buffer and the message would be
/// lost, so the ndjson path asks before every write: one non-blocking
/// `recv`. Anything the receiver sent us is read and discarded so its
/// replies can never fill our receive buffer.
pub fn peer_closed(sock: &Socket) -> bool {
    let mut scratch = [MaybeUninit::<u8>::uninit(); 512];
    loop {
        match sock.recv_with_flags(&mut scratch, libc::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Uninterruptible;
    use std::io::Read;
    use std::net::TcpListener;

    fn timeouts(ms: u64) -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(ms),
            write: Duration::from_millis(ms),
            stall: false,
        }
    }

    #[test]
    fn literal_addresses_skip_dns() {
        let far = Instant::now(); // already expired: any lookup would time out
        let v4 = resolve("127.0.0.1", 80, far, &Uninterruptible).unwrap();
        assert_eq!(v4, vec!["127.0.0.1:80".parse().unwrap()]);
        let v6 = resolve("[::1]", 81, far, &Uninterruptible).unwrap();
        assert_eq!(v6, vec!["[::1]:81".parse().unwrap()]);
    }

    #[test]
    fn names_resolve() {
        let addrs = resolve(
            "localhost",
            5,
            Instant::now() + Duration::from_secs(5),
            &Uninterruptible,
        )
        .unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 5));
    }

    #[test]
    fn unknown_name_is_reported() {
        let e = resolve(
            "no-such-host.invalid",
            5,
            Instant::now() + Duration::from_secs(5),
            &Uninterruptible,
        )
        .unwrap_err();
        assert!(matches!(e, SendError::HostNotFound { .. }), "{e}");
    }

    #[test]
    fn names_no_entry_allows_are_not_looked_up() {
        let open_with = |list: &str| {
            let allow = Allowlist::parse(list).unwrap();
            open(
                "no-such-host.invalid",
                9092,
                &timeouts(2000),
                &allow,
                &Uninterruptible,
            )
            .unwrap_err()
        };
        let e = open_with("broker-1.example:9092");
        assert!(
            matches!(&e, SendError::NotAllowed(m) if m == "no-such-host.invalid:9092 is not allowed by pg_emit.allowed_destinations"),
            "{e}"
        );
        // An address or network entry may hold what any name resolves to:
        // looked up.
        let e = open_with("127.0.0.1");
        assert!(matches!(e, SendError::HostNotFound { .. }), "{e}");
    }

    #[test]
    fn message_then_eof() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = l.accept().unwrap().0;
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let (host, port) = (addr.ip().to_string(), addr.port());
        send_once(
            &host,
            port,
            b"{\"a\":1}",
            &timeouts(2000),
            &Allowlist::default(),
            &Uninterruptible,
        )
        .unwrap();
        assert_eq!(reader.join().unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn refused_says_so_without_the_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = send_once(
            "127.0.0.1",
            addr.port(),
            b"x",
            &timeouts(2000),
            &Allowlist::default(),
            &Uninterruptible,
        )
        .unwrap_err();
        assert!(matches!(e, SendError::Refused), "{e}");
        assert_eq!(e.to_string(), "connection refused");
    }

    #[test]
    fn disallowed_destination_is_never_connected() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let allow = Allowlist::parse("10.0.0.0/8").unwrap();
        let e = send_once(
            "localhost",
            port,
            b"x",
            &timeouts(2000),
            &allow,
            &Uninterruptible,
        )
        .unwrap_err();
        assert!(matches!(e, SendError::NotAllowed(ref m) if m.contains("allowed_destinations")));
        assert!(l.accept().is_err(), "no connection was made");
    }

    #[test]
    fn falls_through_to_the_next_address() {
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = connect(
            &[dead_addr, addr],
            Instant::now() + Duration::from_secs(2),
            &Uninterruptible,
        )
        .unwrap();
        assert_eq!(s.peer_addr().unwrap().as_socket(), Some(addr));
    }

    #[test]
    fn stalled_receiver_hits_write_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sock = connect(
            &[addr],
            Instant::now() + Duration::from_secs(2),
            &Uninterruptible,
        )
        .unwrap();
        let _held = l.accept().unwrap(); // accepted, never read
        let big = vec![b'x'; 64 << 20];
        let t = Instant::now();
        let e = write_all(&sock, &big, &timeouts(300), &mut 0, &Uninterruptible).unwrap_err();
        assert!(matches!(e, SendError::WriteTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn cancel_stops_a_wait() {
        struct CancelAfter(Instant);
        impl Interrupt for CancelAfter {
            fn check(&self) -> Result<(), Cancelled> {
                if Instant::now() >= self.0 {
                    Err(Cancelled)
                } else {
                    Ok(())
                }
            }
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = connect(
            &[l.local_addr().unwrap()],
            Instant::now() + Duration::from_secs(2),
            &Uninterruptible,
        )
        .unwrap();
        let _held = l.accept().unwrap();
        let big = vec![b'x'; 64 << 20];
        let t = Instant::now();
        let e = write_all(
            &sock,
            &big,
            &timeouts(30_000),
            &mut 0,
            &CancelAfter(Instant::now() + Duration::from_millis(100)),
        )
        .unwrap_err();
        assert!(matches!(e, SendError::Cancelled), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn closed_peer_is_detected() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = connect(
            &[l.local_addr().unwrap()],
            Instant::now() + Duration::from_secs(2),
            &Uninterruptible,
        )
        .unwrap();
        let (peer, _) = l.accept().unwrap();
        assert!(!peer_closed(&sock));
        drop(peer);
        std::thread::sleep(Duration::from_millis(20));
        assert!(peer_closed(&sock));
    }
}
