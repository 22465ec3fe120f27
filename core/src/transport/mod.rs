//! Getting bytes to a receiver: sockets (connect through the allowlist,
//! bounded writes and reads) and HTTP requests. The brokers' protocols are
//! spoken over these in [`crate::sink`]. Free of pgrx: the backend supplies
//! an [`Interrupt`] that knows how to honour cancel requests, tests supply
//! none.

pub mod http;
pub mod tcp;
pub mod tls;

use std::time::{Duration, Instant};

/// `host:port`, with brackets around IPv6 addresses.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Lets a wait give way to `pg_cancel_backend`, `statement_timeout` and
/// shutdown. Waits are sliced (see [`SLICE`]) and call this between slices
/// and after every signal, so a cancel takes effect within milliseconds.
pub trait Interrupt {
    /// `Err` means "stop now". Inside a statement the backend's
    /// implementation raises the pending ERROR itself and never returns.
    fn check(&self) -> Result<(), Cancelled>;

    /// Called with what a wait is for as it starts blocking, and with
    /// `None` when it stops: a backend shows it in `pg_stat_activity`.
    fn waiting(&self, _on: Option<WaitOn>) {}
}

/// What a wait on the network is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOn {
    /// A host name's lookup.
    Resolve,
    /// A TCP handshake.
    Connect,
    /// A write the receiver is not reading fast enough for.
    Send,
    /// A reply (brokers' acknowledgements).
    Reply,
    /// An HTTP request, connect to last response byte.
    Http,
}

impl WaitOn {
    pub const ALL: [WaitOn; 5] = [
        WaitOn::Resolve,
        WaitOn::Connect,
        WaitOn::Send,
        WaitOn::Reply,
        WaitOn::Http,
    ];

    /// Its name in `pg_stat_activity.wait_event` (PostgreSQL 17 and later).
    pub fn name(self) -> &'static std::ffi::CStr {
        match self {
            WaitOn::Resolve => c"PgEmitResolve",
            WaitOn::Connect => c"PgEmitConnect",
            WaitOn::Send => c"PgEmitSend",
            WaitOn::Reply => c"PgEmitReply",
            WaitOn::Http => c"PgEmitHttp",
        }
    }
}

/// The wait was abandoned because the backend was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// For callers with nothing to honour (unit tests).
pub struct Uninterruptible;

impl Interrupt for Uninterruptible {
    fn check(&self) -> Result<(), Cancelled> {
        Ok(())
    }
}

/// Longest single sleep inside a wait. Signals interrupt `poll(2)` at once,
/// so this only bounds how late a cancel is noticed if a signal was missed.
pub const SLICE: Duration = Duration::from_millis(50);

/// The two timeouts every network operation is bounded by.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Name resolution plus TCP handshake.
    pub connect: Duration,
    /// Writing one whole message, or, with `stall`, going without progress.
    pub write: Duration,
    /// `write` bounds time without progress rather than the whole write:
    /// the worker may take as long as a slow but reading receiver needs,
    /// while a backend's writer must never wait longer than the timeout.
    pub stall: bool,
}

impl Timeouts {
    pub fn connect_deadline(&self) -> Instant {
        Instant::now() + self.connect
    }
}

/// The stack of a sender thread: enough for rustls and the Kafka codecs
/// (a test compresses a whole chunk on one; gzip overflowed 256 kB in a
/// debug build), twice what that needs. Only the pages a thread touches
/// take memory, so hundreds of threads still cost little.
pub const SENDER_STACK: usize = 1024 * 1024;

/// Spawns a detached thread with every signal blocked. PostgreSQL's signal
/// handlers must run on the backend's own thread; a helper thread that
/// could receive SIGINT or SIGALRM would swallow a cancel request.
pub fn spawn_without_signals(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; pthread_sigmask only reads/writes the
    // sets we pass and the calling thread's mask, which we restore.
    unsafe {
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .stack_size(SENDER_STACK)
            .spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
        spawned.map(drop)
    }
}
