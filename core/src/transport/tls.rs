//! TLS over pg_emit's own sockets, for the brokers: the socket is opened
//! by [`tcp::open`] (through the allowlist, within the connect timeout),
//! then rustls runs over it with the same sliced, cancellable waits as
//! plain TCP. A [`Link`] is either, so a broker's protocol code does not
//! care which.
//!
//! Certificates are always verified: against a destination's `ca_file`,
//! else the operating system's trust store (as HTTPS does). There is no
//! option to turn verification off. Failures say what was wrong with the
//! certificate in words of their own: rustls' messages can carry the name
//! that was expected, and a WARNING never says where a stored destination
//! points.

use super::tcp::{self, SendError, Wait};
use super::{Interrupt, Timeouts, WaitOn};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore};
use socket2::Socket;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

/// A destination's TLS options (stored-destination options of the same
/// names). Files are read when a connection opens, by the server's
/// operating-system user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// PEM CA certificates trusted instead of the system's.
    pub ca_file: Option<String>,
    /// A PEM client certificate (chain) and its private key.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// The name the server's certificate must carry, when it is not the
    /// URL's host (an IP address, a tunnel).
    pub server_name: Option<String>,
}

impl Options {
    pub fn is_empty(&self) -> bool {
        *self == Options::default()
    }

    /// Checks what can be checked without reading files.
    pub fn check(&self) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file go together".into());
        }
        for (option, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if path.as_ref().is_some_and(|p| !p.starts_with('/')) {
                return Err(format!("{option} must be an absolute path"));
            }
        }
        if let Some(n) = &self.server_name {
            ServerName::try_from(n.as_str())
                .map_err(|_| format!("server_name {n:?} is not a host name or IP address"))?;
        }
        Ok(())
    }

    /// A client configuration: the files read and parsed now.
    pub fn config(&self) -> Result<Arc<ClientConfig>, String> {
        self.config_trusting(None)
    }

    /// [`Options::config`], trusting `fallback` (PEM CA certificates: for
    /// HTTPS, `pg_emit.ca_file`'s) when `ca_file` is not set, and the
    /// system's store when neither is.
    pub fn config_trusting(&self, fallback: Option<&[u8]>) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let own;
        let trusted = match (&self.ca_file, fallback) {
            (Some(path), _) => {
                own = read_file("ca_file", path)?;
                Some(("ca_file", own.as_slice()))
            }
            (None, Some(pem_bytes)) => Some(("pg_emit.ca_file", pem_bytes)),
            (None, None) => None,
        };
        let builder = match trusted {
            Some((option, pem_bytes)) => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_slice_iter(pem_bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem(option, e))?;
                // As the system's store is read: a certificate of a bundle
                // that webpki cannot use is skipped, not fatal.
                roots.add_parsable_certificates(certs);
                if roots.is_empty() {
                    return Err(format!("{option} holds no PEM certificate"));
                }
                builder.with_root_certificates(roots)
            }
            None => {
                use rustls_platform_verifier::BuilderVerifierExt;
                builder
                    .with_platform_verifier()
                    .map_err(|e| format!("the system's trust store: {e}"))?
            }
        };
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&read_file("cert_file", cert)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem("cert_file", e))?;
                if chain.is_empty() {
                    return Err("cert_file holds no PEM certificate".into());
                }
                let key = PrivateKeyDer::from_pem_slice(&read_file("key_file", key)?)
                    .map_err(|e| pem("key_file", e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("cert_file and key_file: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// The name the server's certificate is checked against.
    pub fn name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string())
            .map_err(|_| "the host is not a name a certificate can carry (server_name)".into())
    }
}

/// Largest certificate or key file read: a bundle of every public CA is
/// a few hundred kilobytes.
const MAX_FILE: u64 = 1 << 20;

/// A TLS file's bytes: a regular file of at most [`MAX_FILE`] (not a
/// FIFO or a device that would hang or never end), its problems said
/// without its path.
pub fn read_file(option: &str, path: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{option}: {}", e.kind()))?;
    if !meta.is_file() {
        return Err(format!("{option} is not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(format!("{option} is over {} kB", MAX_FILE / 1024));
    }
    std::fs::read(path).map_err(|e| format!("{option}: {}", e.kind()))
}

/// A PEM file's problem, without its path or contents.
fn pem(option: &str, e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(io) => format!("{option}: {}", io.kind()),
        E::NoItemsFound => format!("{option} holds nothing PEM"),
        _ => format!("{option} is not valid PEM"),
    }
}

/// A connection to a broker, plain or TLS.
pub enum Link {
    Plain(Socket),
    Tls(Box<Session>),
}

/// A TLS session over its socket. Dropped, it says goodbye (close_notify)
/// if the socket takes it at once, so servers do not log a truncated
/// stream for every connection pg_emit recycles.
pub struct Session(Socket, ClientConnection);

impl Drop for Session {
    fn drop(&mut self) {
        self.1.send_close_notify();
        let _ = self.1.write_tls(&mut Io(&self.0));
    }
}

/// The socket as rustls reads and writes it: non-blocking, and without
/// SIGPIPE on a peer that went away.
struct Io<'a>(&'a Socket);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: u8 and MaybeUninit<u8> have the same layout; recv only
        // writes into the buffer.
        let buf = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        self.0.recv_with_flags(buf, libc::MSG_DONTWAIT)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send_with_flags(buf, libc::MSG_NOSIGNAL)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn closed(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET))
        || e.kind() == io::ErrorKind::UnexpectedEof
}

impl Link {
    /// Opens a connection to `host:port` through the allowlist, with TLS
    /// when `tls` is given (handshake within the connect timeout).
    pub fn open(
        host: &str,
        port: u16,
        tls: Option<&Options>,
        timeouts: &Timeouts,
        allow: &crate::security::Allowlist,
        intr: &dyn Interrupt,
    ) -> Result<Link, SendError> {
        // One deadline for the lookup, the TCP handshake and TLS's.
        let deadline = timeouts.connect_deadline();
        let sock = tcp::open(host, port, timeouts, allow, intr)?;
        match tls {
            None => Ok(Link::Plain(sock)),
            Some(o) => Link::Plain(sock).start_tls(host, o, deadline, intr),
        }
    }

    /// TLS on a plain link (NATS upgrades after the server's `INFO`), the
    /// handshake done by `deadline`.
    pub fn start_tls(
        self,
        host: &str,
        o: &Options,
        deadline: Instant,
        intr: &dyn Interrupt,
    ) -> Result<Link, SendError> {
        let sock = match self {
            Link::Plain(s) => s,
            tls @ Link::Tls(_) => return Ok(tls),
        };
        let config = o.config().map_err(SendError::Tls)?;
        let name = o.name_for(host).map_err(SendError::Tls)?;
        let conn = ClientConnection::new(config, name).map_err(|e| SendError::Tls(reason(&e)))?;
        let mut link = Box::new(Session(sock, conn));
        handshake(&mut link, deadline, intr)?;
        Ok(Link::Tls(link))
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        let sock = match self {
            Link::Plain(s) => s,
            Link::Tls(t) => &t.0,
        };
        sock.peer_addr().ok().and_then(|a| a.as_socket())
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }

    /// Writes all of `buf` (see [`tcp::write_all`]).
    pub fn write_all(
        &mut self,
        buf: &[u8],
        timeouts: &Timeouts,
        intr: &dyn Interrupt,
    ) -> Result<(), SendError> {
        let t = match self {
            Link::Plain(sock) => return tcp::write_all(sock, buf, timeouts, &mut 0, intr),
            Link::Tls(t) => t,
        };
        let started = Instant::now();
        let mut deadline = started + timeouts.write;
        let restart = timeouts.stall.then_some(timeouts.write);
        let mut sent = 0;
        loop {
            flush(t, &mut deadline, restart, intr).map_err(|w| match w {
                Stop::Failed(e) => e,
                Stop::TimedOut => SendError::WriteTimeout {
                    ms: started.elapsed().as_millis(),
                    left: buf.len() - sent,
                    len: buf.len(),
                },
            })?;
            if sent == buf.len() {
                return Ok(());
            }
            match t.1.writer().write(&buf[sent..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => sent += n,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads what has arrived (see [`tcp::read_some`]).
    pub fn read_some(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Instant,
        intr: &dyn Interrupt,
    ) -> Result<usize, SendError> {
        let t = match self {
            Link::Plain(sock) => return tcp::read_some(sock, buf, deadline, intr),
            Link::Tls(t) => t,
        };
        let started = Instant::now();
        let mut scratch = [0u8; 16 * 1024];
        loop {
            // Not only when the socket would block: a peer that keeps it
            // readable with records carrying no data is held to both too.
            intr.check()?;
            if Instant::now() >= deadline {
                return Err(SendError::ReadTimeout {
                    ms: started.elapsed().as_millis(),
                });
            }
            match t.1.reader().read(&mut scratch) {
                Ok(0) => return Err(SendError::Closed),
                Ok(n) => {
                    buf.extend_from_slice(&scratch[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(SendError::Closed),
            }
            match t.1.read_tls(&mut Io(&t.0)) {
                Ok(0) => return Err(SendError::Closed),
                Ok(_) => {
                    process(t)?;
                    if t.1.wants_write() {
                        // A key update or the like: answered in passing.
                        let mut d = deadline;
                        flush(t, &mut d, None, intr).map_err(|w| match w {
                            Stop::Failed(e) => e,
                            Stop::TimedOut => SendError::ReadTimeout {
                                ms: started.elapsed().as_millis(),
                            },
                        })?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match tcp::wait(t.0.as_raw_fd(), libc::POLLIN, WaitOn::Reply, deadline, intr) {
                        Ok(()) => {}
                        Err(Wait::Cancelled) => return Err(SendError::Cancelled),
                        Err(Wait::TimedOut) => {
                            return Err(SendError::ReadTimeout {
                                ms: started.elapsed().as_millis(),
                            })
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if closed(&e) => return Err(SendError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the broker closed a kept connection (see
    /// [`tcp::peer_closed`]); anything it sent meanwhile is discarded.
    pub fn peer_closed(&mut self) -> bool {
        match self {
            Link::Plain(sock) => tcp::peer_closed(sock),
            Link::Tls(_) => !self.read_ready(&mut Vec::new()),
        }
    }

    /// Appends to `buf` what has arrived, without waiting; `false` when
    /// the broker has closed the connection.
    pub fn read_ready(&mut self, buf: &mut Vec<u8>) -> bool {
        let mut scratch = [0u8; 4096];
        let t = match self {
            Link::Plain(sock) => loop {
                match (&*sock).read(&mut scratch) {
                    Ok(0) => return false,
                    Ok(n) => buf.extend_from_slice(&scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            },
            Link::Tls(t) => t,
        };
        loop {
            match t.1.read_tls(&mut Io(&t.0)) {
                Ok(0) => return false,
                Ok(_) => {
                    if process(t).is_err() {
                        return false;
                    }
                    loop {
                        match t.1.reader().read(&mut scratch) {
                            Ok(0) => return false,
                            Ok(n) => buf.extend_from_slice(&scratch[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => return false,
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

/// Hands what was read to rustls; a TLS error ends the connection (its
/// alert is sent on the way out, if the socket takes it).
fn process(t: &mut Session) -> Result<(), SendError> {
    match t.1.process_new_packets() {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = t.1.write_tls(&mut Io(&t.0));
            Err(SendError::Tls(reason(&e)))
        }
    }
}

/// Why [`flush`] stopped.
enum Stop {
    TimedOut,
    Failed(SendError),
}

/// Writes out what rustls has to send by `deadline`, which moves on by
/// `restart` after each write that made progress (the worker's stall rule).
fn flush(
    t: &mut Session,
    deadline: &mut Instant,
    restart: Option<std::time::Duration>,
    intr: &dyn Interrupt,
) -> Result<(), Stop> {
    while t.1.wants_write() {
        match t.1.write_tls(&mut Io(&t.0)) {
            Ok(_) => {
                if let Some(r) = restart {
                    *deadline = Instant::now() + r;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tcp::wait(
                    t.0.as_raw_fd(),
                    libc::POLLOUT,
                    WaitOn::Send,
                    *deadline,
                    intr,
                ) {
                    Ok(()) => {}
                    Err(Wait::Cancelled) => return Err(Stop::Failed(SendError::Cancelled)),
                    Err(Wait::TimedOut) => return Err(Stop::TimedOut),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if closed(&e) => return Err(Stop::Failed(SendError::Closed)),
            Err(e) => return Err(Stop::Failed(e.into())),
        }
    }
    Ok(())
}

/// The handshake, within the connect timeout.
fn handshake(t: &mut Session, deadline: Instant, intr: &dyn Interrupt) -> Result<(), SendError> {
    let started = Instant::now();
    let timed_out = || {
        SendError::Tls(format!(
            "handshake timed out after {} ms (pg_emit.connect_timeout)",
            started.elapsed().as_millis()
        ))
    };
    while t.1.is_handshaking() || t.1.wants_write() {
        let (events, step) = if t.1.wants_write() {
            (libc::POLLOUT, t.1.write_tls(&mut Io(&t.0)))
        } else {
            match t.1.read_tls(&mut Io(&t.0)) {
                Ok(0) => {
                    return Err(SendError::Tls(
                        "the server closed the connection during the handshake (does it speak TLS on this port?)"
                            .into(),
                    ))
                }
                Ok(n) => {
                    process(t)?;
                    (libc::POLLIN, Ok(n))
                }
                Err(e) => (libc::POLLIN, Err(e)),
            }
        };
        match step {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tcp::wait(t.0.as_raw_fd(), events, WaitOn::Connect, deadline, intr) {
                    Ok(()) => {}
                    Err(Wait::Cancelled) => return Err(SendError::Cancelled),
                    Err(Wait::TimedOut) => return Err(timed_out()),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if closed(&e) => {
                return Err(SendError::Tls(
                    "the server closed the connection during the handshake".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What went wrong, said without names or addresses.
pub fn reason(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "the server's certificate is not signed by a trusted CA (ca_file)".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server's certificate is not valid for its name (server_name)".into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet".into()
            }
            CertificateError::Revoked => "the server's certificate is revoked".into(),
            other => format!("the server's certificate was refused ({})", variant(other)),
        },
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate (cert_file, key_file)".into()
        }
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied),
        ) => format!("the server refused our client certificate ({a:?})"),
        E::AlertReceived(a) => format!("the server ended the handshake ({a:?})"),
        E::PeerIncompatible(p) => format!("the server's TLS is incompatible ({})", variant(p)),
        other => format!("TLS: {}", variant(other)),
    }
}

/// The variant's name of an error's `Debug`, without its fields (which
/// may carry names).
fn variant(e: &dyn std::fmt::Debug) -> String {
    let d = format!("{e:?}");
    d.split(['(', '{', ' '])
        .next()
        .unwrap_or_default()
        .to_string()
}
