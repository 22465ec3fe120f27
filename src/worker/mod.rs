//! The async delivery worker: one background worker per database.
//!
//! The main thread owns every database interaction, in short transactions:
//! claim rows (number their events), then later acknowledge what was
//! delivered. Network I/O happens on one thread per destination (see
//! [`send`]), which signals the main thread's latch when a job is done, so
//! nothing waits on a timer: a commit that queued events sets the latch,
//! and so does every finished job. A destination that fails is retried
//! with exponential backoff, on its own, while the others keep flowing.
//!
//! Without `shared_preload_libraries` the first transaction that queues
//! events starts the worker; with it, [`launcher`] starts one per database
//! at server start, so a backlog left by a crash is delivered without
//! waiting for a new write.

pub(crate) mod launcher;
use pg_emit_core::job as send;

use crate::backoff::{self, Backoff};
use crate::encoding::message_text;
use crate::options::Framing;
use crate::plans;
use crate::security::Allowlist;
use crate::settings;
use crate::transport::http::ClientConfig;
use crate::transport::{self, Cancelled, Interrupt};
use pg_emit_core::destination::{self, Destination};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use send::{Dest as JobDest, Flow, Job, JobError, Outcome, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Tells pg_emit's worker lock apart from every advisory lock SQL can take:
/// `pg_advisory_lock` always puts 1 or 2 in the tag's last field.
const LOCK_TAG_KIND: u16 = 0x456d;
/// First key of the worker lock ("pgEm"); the second is the database oid.
const LOCK_KEY: u32 = 0x7067_456d;
/// Most payload bytes claimed for one destination at a time (and at most
/// 1,000 rows, the LIMIT of [`QUEUE_SQL`]).
const CLAIM_BYTES: usize = 8 << 20;
/// Least time between two claims (see [`Worker::run`]).
const CLAIM_GAP: Duration = Duration::from_millis(2);
/// Safety net for wakeups nobody sends (COMMIT PREPARED of an async
/// transaction, rows re-queued by hand with INSERT).
const IDLE_RESCAN: Duration = Duration::from_secs(10);

/// The worker's `backend_type`, by which backends recognise it.
pub(crate) const TYPE: &std::ffi::CStr = c"pg_emit worker";

/// Set when the worker is stopping: sender threads abandon their waits.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Set once the worker is connected to its database.
static CONNECTED: AtomicBool = AtomicBool::new(false);

/// A worker that cannot connect to its database (dropped, or no longer
/// accepting connections) exits with code 0, which tells the postmaster
/// not to restart it: otherwise it would try again every second for ever.
/// Runs last among the exit callbacks (it was registered first); exiting
/// here runs the rest through PostgreSQL's own atexit handler.
unsafe extern "C-unwind" fn not_restarted_unless_connected(code: i32, _arg: pg_sys::Datum) {
    if code != 0 && !CONNECTED.load(Ordering::Relaxed) {
        libc::exit(0);
    }
}

/// Whether `CREATE DATABASE ... TEMPLATE` or `DROP DATABASE` of this
/// worker's database waits for its sessions to leave: both hold a lock on
/// the database that conflicts with the one every new connection takes.
/// PostgreSQL waits five seconds for them; the worker leaves at once and,
/// restarted a second later, connects again once the command is done (or
/// not at all, when the database is gone).
fn database_wanted() -> bool {
    // SAFETY: reading the backend's database oid; a session lock taken
    // without waiting and released at once.
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: 0,
            locktag_field2: pg_sys::DatabaseRelationId.to_u32(),
            locktag_field3: pg_sys::MyDatabaseId.to_u32(),
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        if pg_sys::LockAcquire(&tag, mode, true, true)
            == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
        {
            return true;
        }
        pg_sys::LockRelease(&tag, mode, true);
        false
    }
}

/// How often the worker checks [`database_wanted`] while it waits.
const DATABASE_CHECK: Duration = Duration::from_secs(1);

struct Stopping;

impl Interrupt for Stopping {
    fn check(&self) -> Result<(), Cancelled> {
        if STOPPING.load(Ordering::Relaxed) {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

unsafe extern "C" {
    /// Declared here without pgrx's FFI guard, which only allows calls from
    /// the main thread: sender threads use it to wake the main thread.
    /// SetLatch is async-signal-safe, so it is safe from any thread.
    #[link_name = "SetLatch"]
    fn set_latch_from_any_thread(latch: *mut pg_sys::Latch);
}

/// Runs `f` in a transaction with a snapshot. pgrx's own helper demands
/// unwind-safe closures; an ERROR here ends the worker anyway (it restarts).
///
/// An ERROR inside `f` (pgrx turns it into an unwinding panic) aborts the
/// transaction and comes back as `Err` with its message, so the caller can
/// tell a dropped extension from a real fault.
///
/// `what` shows in `pg_stat_activity.query` while it runs; afterwards the
/// worker reports itself idle, so a DBA sees it never sits in a
/// transaction while it waits on a receiver.
fn transaction<R, E: std::fmt::Display>(
    what: &std::ffi::CStr,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<R, String> {
    // SAFETY: reporting activity and the standard bgworker transaction
    // bracket.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, what.as_ptr());
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let r = match r {
        Ok(Ok(v)) => {
            // SAFETY: closes what was opened above.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
                // Report this transaction's deletes and updates now: without
                // it a bgworker reports nothing until it exits, autovacuum
                // never learns that the outbox is full of dead rows, and the
                // table grows for ever.
                pg_sys::pgstat_report_stat(true);
            }
            Ok(v)
        }
        Ok(Err(e)) => {
            // SAFETY: abort releases locks, snapshots and SPI state.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(e.to_string())
        }
        Err(panic) => {
            // SAFETY: as above; pgrx already flushed PostgreSQL's error
            // state when it turned the ERROR into this panic.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(match panic.downcast::<pgrx::pg_sys::panic::CaughtError>() {
                Ok(e) => match *e {
                    pgrx::pg_sys::panic::CaughtError::PostgresError(r)
                    | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
                    | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                        r.message().to_string()
                    }
                },
                Err(_) => "unexpected panic".to_string(),
            })
        }
    };
    // SAFETY: as above.
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
    r
}

/// After a failed transaction: a missing extension means DROP EXTENSION
/// won the race with this worker, which then just stops; anything else is
/// a real fault, raised (the worker restarts in a second).
fn stop_or_raise(what: &str, err: String) -> Stop {
    let installed = transaction(c"pg_emit: checking the extension", || {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_emit')",
        )
    });
    match installed {
        Ok(Some(false)) => Stop::ExtensionDropped,
        _ => pgrx::error!("pg_emit worker: {what} failed: {err}"),
    }
}

/// Registers a worker for database `db`.
pub fn start(
    db: pg_sys::Oid,
) -> Result<DynamicBackgroundWorker, pgrx::bgworkers::DynamicBackgroundWorkerLoadError> {
    builder(db).load_dynamic()
}

fn builder(db: pg_sys::Oid) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(&format!("pg_emit worker for database {}", db.to_u32()))
        .set_type(TYPE.to_str().expect("ASCII"))
        .set_library("pg_emit")
        .set_function("pg_emit_worker_main")
        .set_argument(Some(pg_sys::Datum::from(db.to_u32())))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // pg_terminate_backend or a crash: back within a second.
        .set_restart_time(Some(Duration::from_secs(1)))
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_emit_worker_main(arg: pg_sys::Datum) {
    let db = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: registering a static callback before connecting.
    unsafe { pg_sys::on_proc_exit(Some(not_restarted_unless_connected), pg_sys::Datum::from(0)) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    CONNECTED.store(true, Ordering::Relaxed);
    crate::privileged::pin_worker_settings();
    // Nothing runs as the bootstrap superuser but these catalog lookups:
    // whether pg_emit is installed here (a schema merely named emit is not
    // enough) and the lock that makes this the only worker.
    let claimed = transaction(c"pg_emit: starting", || {
        let owner = crate::privileged::emit_owner();
        Ok::<_, String>(owner.filter(|_| take_worker_lock(db)))
    });
    let owner = match claimed {
        // The extension is not here, or another worker serves this
        // database: exit 0, which tells the postmaster not to restart us.
        Ok(None) => return,
        Err(e) => pgrx::error!("pg_emit worker: could not start: {e}"),
        Ok(Some(owner)) => owner,
    };
    // From here on the worker acts as the extension's owner. Set between
    // transactions, so every transaction starts (and aborts back to) this
    // user.
    // SAFETY: outside any transaction, as InitPostgres sets the user.
    unsafe { pg_sys::SetUserIdAndSecContext(owner, 0) };
    // Registered before anything else, so that committing backends find
    // this worker (and wake it) instead of starting others.
    let registered = transaction(c"pg_emit: starting", || {
        Spi::run(
            "UPDATE emit.worker SET pid = pg_catalog.pg_backend_pid(), started_at = pg_catalog.now()",
        )
    });
    // DROP EXTENSION may have won the race since the check above: then
    // this is a clean stop, not a fault to restart for.
    if let Err(e) = registered {
        stop_or_raise("starting", e);
        pgrx::log!("pg_emit worker: extension dropped, exiting");
        return;
    }
    if !wait_for_current_schema() {
        return;
    }
    let registered = transaction(c"pg_emit: starting", || {
        // SAFETY: a syscache lookup inside the transaction.
        let nsp = unsafe { pg_sys::get_namespace_oid(c"emit".as_ptr(), false) };
        let origin = origin()?;
        Spi::run_with_args(NEW_STREAMS_SQL, &[origin.as_str().into()])?;
        Ok::<_, pgrx::spi::Error>((origin, nsp))
    });
    let origin = match registered {
        Ok(origin) => origin,
        Err(e) => {
            stop_or_raise("starting", e);
            pgrx::log!("pg_emit worker: extension dropped, exiting");
            return;
        }
    };
    pgrx::log!("pg_emit worker started");
    let (origin, nsp) = origin;
    let stop = Worker::new(origin, nsp).run();
    STOPPING.store(true, Ordering::Relaxed);
    match stop {
        Stop::ExtensionDropped => pgrx::log!("pg_emit worker: extension dropped, exiting"),
        Stop::DatabaseWanted => {
            pgrx::log!(
                "pg_emit worker: leaving the database for CREATE DATABASE or DROP DATABASE; \
                 back once it is done"
            );
            // SAFETY: exit 1: restarted a second later.
            unsafe { pg_sys::proc_exit(1) }
        }
        // Terminated (pg_terminate_backend) or shutting down: exit 1 so a
        // terminated worker comes back; during shutdown no restart happens.
        Stop::Terminated => unsafe { pg_sys::proc_exit(1) },
        Stop::Reinstalled => {
            pgrx::log!("pg_emit worker: extension reinstalled, restarting");
            // SAFETY: exit 1: restarted a second later, for the new install.
            unsafe { pg_sys::proc_exit(1) }
        }
    }
}

/// Takes the session lock that makes this the only worker of database
/// `db`; false when another process holds it. The lock lives in the
/// advisory lock space but with a tag no SQL function can produce, so no
/// role can take it first and keep the worker from starting.
fn take_worker_lock(db: pg_sys::Oid) -> bool {
    let tag = pg_sys::LOCKTAG {
        locktag_field1: db.to_u32(),
        locktag_field2: LOCK_KEY,
        locktag_field3: db.to_u32(),
        locktag_field4: LOCK_TAG_KIND,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: a session lock, released when the process exits.
    let got =
        unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true, true) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// With a new library but 0.1.0's SQL objects (before `ALTER EXTENSION
/// pg_emit UPDATE`), waits, keeping the queue, until the update is done.
/// False when asked to stop meanwhile, or when the extension is gone.
fn wait_for_current_schema() -> bool {
    let mut said = false;
    loop {
        let state = transaction(c"pg_emit: checking the extension version", || {
            Ok::<_, String>((
                crate::privileged::emit_owner().is_some(),
                crate::privileged::schema_is_current(),
            ))
        });
        match state {
            Ok((true, true)) => return true,
            Ok((false, _)) => return false,
            Ok((true, false)) if !said => {
                pgrx::log!(
                    "pg_emit worker: the extension's SQL objects are older than its library; \
                     events stay queued until ALTER EXTENSION pg_emit UPDATE"
                );
                said = true;
            }
            Ok(_) => {}
            Err(e) => pgrx::error!("pg_emit worker: could not start: {e}"),
        }
        // SAFETY: waiting on our own latch, as in the main loop.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                1000,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        if BackgroundWorker::sigterm_received() || database_wanted() {
            return false;
        }
    }
}

enum Stop {
    Terminated,
    ExtensionDropped,
    Reinstalled,
    DatabaseWanted,
}

/// A destination as the worker tracks it.
struct Dest {
    jobs: mpsc::Sender<Job>,
    busy: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_job: Instant,
    /// When a failure was last logged, and how many failures there had
    /// been then.
    last_logged: Option<Instant>,
    logged_failures: u32,
}

/// Least time between two logged failures of one destination.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A destination with nothing to do for this long loses its thread and
/// its kept-open connection; the next event starts them again.
const IDLE_DEST: Duration = Duration::from_secs(300);

struct Worker {
    dests: HashMap<String, Dest>,
    done_tx: mpsc::Sender<(String, Job, Outcome)>,
    done_rx: mpsc::Receiver<(String, Job, Outcome)>,
    rng: u64,
    /// Where this worker runs (see [`origin`]), recorded with each
    /// destination's stream.
    origin: String,
    /// Schema `emit` of the installation this worker serves.
    emit_nsp: pg_sys::Oid,
}

struct WorkerSettings {
    backoff: Backoff,
    max_attempts: i32,
    max_age_s: i32,
}

fn worker_settings() -> WorkerSettings {
    WorkerSettings {
        backoff: Backoff {
            min: Duration::from_millis(settings::RETRY_MIN.get().max(1) as u64),
            max: Duration::from_millis(settings::RETRY_MAX.get().max(1) as u64),
        },
        max_attempts: settings::MAX_ATTEMPTS.get(),
        max_age_s: settings::MAX_AGE.get(),
    }
}

impl Worker {
    fn new(origin: String, emit_nsp: pg_sys::Oid) -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        // SAFETY: MyProcPid is set for the life of the process.
        let seed = unsafe { pg_sys::MyProcPid } as u64;
        Worker {
            dests: HashMap::new(),
            done_tx,
            done_rx,
            rng: 0x9e37_79b9_7f4a_7c15 ^ seed.rotate_left(32) ^ now_nanos(),
            origin,
            emit_nsp,
        }
    }

    fn run(&mut self) -> Stop {
        let mut scan = true;
        let mut last_scan = Instant::now();
        loop {
            if scan {
                scan = false;
                // Under a steady stream of commits every one of them sets
                // the latch: claiming at most every CLAIM_GAP lets each
                // claim take many transactions at once instead of one or
                // two, which costs the worker a fraction of the CPU the
                // writers need (and adds at most CLAIM_GAP of latency, only
                // under load).
                let since = last_scan.elapsed();
                if since < CLAIM_GAP {
                    std::thread::sleep(CLAIM_GAP - since);
                }
                last_scan = Instant::now();
                if let Err(stop) = self.claim_and_dispatch() {
                    return stop;
                }
            }
            let timeout = self.next_timeout().min(DATABASE_CHECK);
            // SAFETY: waiting on our own latch, as every bgworker does.
            let rc = unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    timeout.as_millis() as std::ffi::c_long,
                    pg_sys::PG_WAIT_EXTENSION,
                )
            };
            // SAFETY: as above.
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            if BackgroundWorker::sigterm_received() {
                return Stop::Terminated;
            }
            if BackgroundWorker::sighup_received() {
                // SAFETY: the documented way for a bgworker to reload.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            }
            let done: Vec<_> = self.done_rx.try_iter().collect();
            if !done.is_empty() {
                if let Err(stop) = self.acknowledge(done) {
                    return stop;
                }
                scan = true;
            }
            if database_wanted() {
                return Stop::DatabaseWanted;
            }
            // A latch set by a committing backend, a backoff that expired,
            // or the idle rescan: look for work.
            let now = Instant::now();
            let retry_due = self
                .dests
                .values()
                .any(|d| !d.busy && d.retry_at.is_some_and(|t| t <= now));
            if rc & pg_sys::WL_LATCH_SET as i32 != 0
                || retry_due
                || now.duration_since(last_scan) >= IDLE_RESCAN
            {
                scan = true;
            }
        }
    }

    /// How long to sleep: until the earliest retry, else the idle rescan.
    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        self.dests
            .values()
            .filter(|d| !d.busy)
            .filter_map(|d| d.retry_at)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(IDLE_RESCAN)
            .min(IDLE_RESCAN)
            .max(Duration::from_millis(1))
    }

    /// One transaction: find destinations with work, claim rows for the
    /// idle ones, then hand the jobs to their threads.
    fn claim_and_dispatch(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        // Dropping a destination's sender ends its thread, which closes
        // its connections: a worker that once served a thousand receivers
        // does not keep a thousand threads.
        self.dests
            .retain(|_, d| d.busy || d.failures > 0 || now.duration_since(d.last_job) < IDLE_DEST);
        // The worker waits as long as a receiver keeps reading: a large
        // transaction to a slow reader must arrive, not time out for ever.
        let timeouts = transport::Timeouts {
            stall: true,
            ..settings::timeouts()
        };
        let allow = settings::allowlist();
        // A broken pg_emit.ca_file or signing key file fails HTTP jobs
        // with its message (retried like a network error), not the worker.
        let http =
            settings::http_client_config().and_then(|c| settings::signing_secret().map(|s| (c, s)));
        let ready =
            |d: Option<&Dest>| d.is_none_or(|d| !d.busy && d.retry_at.is_none_or(|t| t <= now));
        let (dests, origin, installed) = (&self.dests, self.origin.as_str(), self.emit_nsp);
        let jobs = transaction(c"pg_emit: claiming events", || {
            Spi::connect_mut(
                |c| -> Result<Result<Vec<(String, Job)>, Stop>, pgrx::spi::Error> {
                    // SAFETY: a syscache lookup inside the transaction.
                    let nsp = unsafe { pg_sys::get_namespace_oid(c"emit".as_ptr(), true) };
                    if nsp == pg_sys::InvalidOid {
                        return Ok(Err(Stop::ExtensionDropped));
                    }
                    // DROP and CREATE EXTENSION since this worker started:
                    // its origin is the old installation's.
                    if nsp != installed {
                        return Ok(Err(Stop::Reinstalled));
                    }
                    plans::update(c, crate::delivery::outbox::SEQUENCE_PREPARED_SQL, &[])?;
                    let keys: Vec<String> = c
                        .select(DESTINATIONS_SQL, None, &[])?
                        .filter_map(|r| r.get::<String>(1).ok().flatten())
                        .collect();
                    let mut jobs = Vec::new();
                    for key in keys {
                        if !ready(dests.get(&key)) {
                            continue;
                        }
                        if let Some(job) = claim(c, &key, origin, timeouts, &allow, &http)? {
                            jobs.push((key, job));
                        }
                    }
                    Ok(Ok(jobs))
                },
            )
        });
        let jobs = match jobs {
            Ok(Ok(jobs)) => jobs,
            Ok(Err(stop)) => return Err(stop),
            Err(e) => return Err(stop_or_raise("claiming events", e)),
        };
        for (key, job) in jobs {
            let dest = self.dest(&key);
            dest.busy = true;
            dest.last_job = Instant::now();
            if dest.jobs.send(job).is_err() {
                pgrx::error!("pg_emit worker: sender thread for {key} is gone");
            }
        }
        Ok(())
    }

    fn dest(&mut self, key: &str) -> &mut Dest {
        if !self.dests.contains_key(key) {
            let (tx, rx) = mpsc::channel::<Job>();
            let done = self.done_tx.clone();
            let name = key.to_string();
            // SAFETY: MyLatch points at this process's latch for its life.
            let latch = unsafe { pg_sys::MyLatch } as usize;
            transport::spawn_without_signals("pg_emit-sender", move || {
                let mut conn = send::Conn::default();
                for job in rx {
                    let out = send::send_job(&mut conn, &job, &Stopping);
                    if done.send((name.clone(), job, out)).is_err() {
                        return;
                    }
                    // SAFETY: see set_latch_from_any_thread.
                    unsafe { set_latch_from_any_thread(latch as *mut pg_sys::Latch) };
                }
            })
            .unwrap_or_else(|e| pgrx::error!("pg_emit worker: cannot start a sender thread: {e}"));
            self.dests.insert(
                key.to_string(),
                Dest {
                    jobs: tx,
                    busy: false,
                    failures: 0,
                    retry_at: None,
                    last_job: Instant::now(),
                    last_logged: None,
                    logged_failures: 0,
                },
            );
        }
        self.dests.get_mut(key).expect("inserted above")
    }

    /// One transaction: record what finished jobs achieved.
    fn acknowledge(&mut self, done: Vec<(String, Job, Outcome)>) -> Result<(), Stop> {
        let ws = worker_settings();
        let mut logs = Vec::new();
        let result = transaction(c"pg_emit: recording deliveries", || {
            Spi::connect_mut(|c| -> Result<Vec<i64>, pgrx::spi::Error> {
                let mut dead = Vec::new();
                for (key, job, out) in &done {
                    dead.push(record(c, key, job, out, &ws)?);
                }
                Ok(dead)
            })
        });
        let dead = match result {
            Ok(d) => d,
            Err(e) => return Err(stop_or_raise("recording deliveries", e)),
        };
        for ((key, _, out), dead) in done.into_iter().zip(dead) {
            let rng = &mut self.rng;
            let dest = self.dests.get_mut(&key).expect("dispatched before");
            dest.busy = false;
            match out.error {
                None => {
                    if dest.failures > 0 {
                        logs.push(format!(
                            "pg_emit: delivery to {key} resumed after {} failed attempt(s)",
                            dest.failures
                        ));
                    }
                    dest.failures = 0;
                    dest.logged_failures = 0;
                    dest.last_logged = None;
                    dest.retry_at = None;
                }
                // One event refused for good: it is a dead letter now and
                // the destination carries on at once.
                Some(JobError::Reject { .. }) => dest.retry_at = None,
                Some(e) => {
                    dest.failures += 1;
                    let mut delay = ws.backoff.delay(dest.failures, backoff::jitter(rng));
                    if let JobError::Retry {
                        after: Some(after), ..
                    } = e
                    {
                        delay = delay.max(after);
                    }
                    let now = Instant::now();
                    dest.retry_at = Some(now + delay);
                    // The first failure, then one line a minute: a thousand
                    // dead receivers must not flood the server log.
                    if dest.failures == 1 || dest.last_logged.is_none_or(|t| now - t >= LOG_EVERY) {
                        let quiet = dest.failures - dest.logged_failures - 1;
                        let since = if quiet > 0 {
                            format!(" ({quiet} failed attempt(s) since the last message)")
                        } else {
                            String::new()
                        };
                        logs.push(format!(
                            "pg_emit: delivery to {key} failed (attempt {}): {e}; retrying in {} ms{since}",
                            dest.failures,
                            delay.as_millis()
                        ));
                        dest.last_logged = Some(now);
                        dest.logged_failures = dest.failures;
                    }
                }
            }
            if dead > 0 {
                logs.push(format!(
                    "pg_emit: moved {dead} event(s) for {key} to emit.dead_letter \
                     (see its last_error; pg_emit.max_attempts = {}, pg_emit.max_age = {} s)",
                    ws.max_attempts, ws.max_age_s
                ));
            }
        }
        for l in logs {
            pgrx::warning!("{l}");
        }
        Ok(())
    }
}

/// Where the worker runs, as the key of its streams: system identifier,
/// database oid, timeline and this installation of the extension. Any copy
/// of the database's contents that could go on sending differs in one of
/// them: a template copy (oid), a restore into another cluster (system),
/// a point-in-time recovery or a promoted standby (timeline), and
/// `pg_restore --clean` or a reinstall (installation, kept in emit.worker,
/// which pg_dump leaves out). The upgrade script computes the same text.
fn origin() -> Result<String, pgrx::spi::Error> {
    let install = Spi::get_one::<String>("SELECT w.install::pg_catalog.text FROM emit.worker w")?
        .unwrap_or_default();
    // SAFETY: reads of backend state in a connected worker.
    let (system, db, timeline) = unsafe {
        (
            pg_sys::GetSystemIdentifier() as i64,
            pg_sys::MyDatabaseId.to_u32(),
            pg_sys::GetWALInsertionTimeLine(),
        )
    };
    Ok(format!("{system}/{db}/{timeline}/{install}"))
}

/// In a copy or a restore of a database (see [`origin`]), the
/// destinations' streams and ids came along and may already have been
/// used from the original: every such destination starts a new stream at
/// id 1, and its claimed rows are numbered again.
const NEW_STREAMS_SQL: &str = "
WITH moved AS (
    UPDATE emit.destinations t
       SET stream = pg_catalog.gen_random_uuid(), next_event_id = 1, origin = $1
     WHERE t.origin IS DISTINCT FROM $1
    RETURNING t.destination
)
UPDATE emit.outbox o SET first_event_id = NULL
  FROM moved WHERE o.destination = moved.destination AND o.first_event_id IS NOT NULL";

/// Destinations with rows, by a loose index scan over (destination, id):
/// one index probe per destination however long the backlog is.
const DESTINATIONS_SQL: &str = "
WITH RECURSIVE d(destination) AS (
    (SELECT destination FROM emit.outbox ORDER BY destination LIMIT 1)
  UNION ALL
    SELECT (SELECT o.destination FROM emit.outbox o
             WHERE o.destination > d.destination ORDER BY o.destination LIMIT 1)
      FROM d WHERE d.destination IS NOT NULL
)
SELECT destination FROM d WHERE destination IS NOT NULL";

/// Claims the next rows of `key`: rows already numbered (a job that failed,
/// or was cut short by a restart) go first, with the same ids, so a
/// receiver can drop what it already has; otherwise the next rows in commit
/// order get the destination's next ids.
#[allow(clippy::too_many_arguments)]
fn claim(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    origin: &str,
    timeouts: transport::Timeouts,
    allow: &Allowlist,
    http: &Result<(ClientConfig, Option<Vec<u8>>), String>,
) -> Result<Option<Job>, pgrx::spi::Error> {
    let mut claimed = Vec::new();
    let mut fresh = Vec::new();
    let mut target: Option<(JobDest, Flow)> = None;
    let mut bytes = 0;
    let mut last_tx_seq = None;
    for r in plans::select(c, QUEUE_SQL, None, &[key.into()])? {
        // Read as UTF-8 whatever the database encoding (the outbox
        // holds text in the database's own).
        let payload = r.get::<Vec<u8>>(6)?.unwrap_or_default();
        let payload = String::from_utf8(payload)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        if bytes > 0 && bytes + payload.len() > CLAIM_BYTES {
            break;
        }
        bytes += payload.len();
        if target.is_none() {
            let host = r.get::<String>(2)?.unwrap_or_default();
            let port = r.get::<i32>(3)?.unwrap_or(0) as u16;
            target = Some(match r.get::<String>(4)?.as_deref() {
                Some("stored") => stored_dest(c, key, http)?,
                Some("http") => {
                    let headers: String = r.get(9)?.unwrap_or_default();
                    let dest = JobDest::Http {
                        url: r.get::<String>(8)?.unwrap_or_default(),
                        headers: headers
                            .lines()
                            .filter_map(|l| crate::transport::http::parse_header(l).ok())
                            .collect(),
                        setup: http.clone(),
                    };
                    (dest, Flow::HTTP)
                }
                Some("ndjson") => (
                    JobDest::Tcp {
                        host,
                        port,
                        framing: Framing::Ndjson,
                    },
                    Flow::SERIAL,
                ),
                _ => (
                    JobDest::Tcp {
                        host,
                        port,
                        framing: Framing::Close,
                    },
                    Flow::SERIAL,
                ),
            });
        }
        let first_event_id = r.get::<i64>(5)?;
        let row = Row {
            id: r.get(1)?.unwrap_or(0),
            first_event_id: first_event_id.unwrap_or(0),
            sent: r.get::<i32>(7)?.unwrap_or(0) as u32,
            payload,
            keys: r.get::<Vec<Option<i64>>>(11)?,
        };
        if first_event_id.is_some() {
            claimed.push(row);
        } else if claimed.is_empty() {
            last_tx_seq = r.get::<i64>(10)?;
            fresh.push(row);
        }
    }
    let Some((dest, flow)) = target else {
        return Ok(None);
    };
    let assign = claimed.is_empty();
    let mut rows = if assign {
        fresh
    } else {
        // Numbered rows come first in commit order, as they were numbered
        // in it, except for a transaction that drew its number before
        // one already numbered but became visible after it: ids decide.
        claimed.sort_by_key(|r| r.first_event_id);
        claimed
    };
    // A transaction is numbered whole, also its rows that did not fit in
    // this job: they are the next job's (numbered rows go first), so no
    // transaction that becomes visible meanwhile can come between its rows.
    let rest: Vec<(i64, i32)> = match (assign, last_tx_seq) {
        (true, Some(seq)) => {
            let taken: Vec<i64> = rows.iter().map(|r| r.id).collect();
            plans::select(
                c,
                REST_OF_TX_SQL,
                None,
                &[key.into(), seq.into(), taken.into()],
            )?
            .map(|r| Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<i32>(2)?.unwrap_or(0))))
            .collect::<Result<_, pgrx::spi::Error>>()?
        }
        _ => Vec::new(),
    };
    let stream = number_events(c, key, origin, &mut rows, &rest, assign)?;
    Ok(Some(Job {
        dest,
        rows,
        flow,
        stream,
        timeouts,
        allow: allow.clone(),
    }))
}

/// A stored destination as it is now: queued events follow a changed URL
/// or new credentials. One that was dropped (or no longer parses) fails
/// its jobs with a message that says so; they are retried like any
/// failure, so re-creating it lets them through.
fn stored_dest(
    c: &mut pgrx::spi::SpiClient<'_>,
    name: &str,
    http: &Result<(ClientConfig, Option<Vec<u8>>), String>,
) -> Result<(JobDest, Flow), pgrx::spi::Error> {
    let mut found = plans::select(c, STORED_SQL, None, &[name.into()])?;
    let row = match found.next() {
        Some(r) => (r.get::<String>(1)?, r.get::<String>(2)?),
        None => (None, None),
    };
    let unavailable = |why: String| (JobDest::Unavailable(why), Flow::SERIAL);
    let (Some(url), Some(options)) = row else {
        return Ok(unavailable(format!(
            "stored destination {name:?} does not exist (dropped?); \
             create it again and its events are delivered"
        )));
    };
    let stored = match destination::parse_stored(&url, &options) {
        Ok(s) => s,
        Err(e) => return Ok(unavailable(format!("stored destination {name:?}: {e}"))),
    };
    Ok(match stored.endpoint {
        Destination::Tcp {
            host,
            port,
            framing,
        } => (
            JobDest::Tcp {
                host,
                port,
                framing,
            },
            Flow::SERIAL,
        ),
        Destination::Http { url, headers } => (
            JobDest::Http {
                url,
                headers,
                setup: http.clone(),
            },
            stored.flow,
        ),
        Destination::Stored { .. } => {
            unavailable(format!("stored destination {name:?} names another"))
        }
    })
}

const STORED_SQL: &str = "
SELECT url, options::pg_catalog.text FROM emit.stored_destinations WHERE name = $1";

/// The head of a destination's queue, in commit order. LIMIT is in the SQL
/// so that the kept plan is an ordered index scan that stops early (and
/// marks the deleted rows it passes as dead for the next scan), not a scan
/// of every index entry of the destination, dead ones included. Rows
/// already numbered are at the head: numbering takes rows from the head.
const QUEUE_SQL: &str = "
SELECT id, host, port, framing, first_event_id, pg_catalog.convert_to(payload, 'UTF8'), sent, url,
       headers, tx_seq, keys
  FROM emit.outbox
 WHERE destination = $1 AND tx_seq IS NOT NULL
 ORDER BY tx_seq, part
 LIMIT 1000";
/// The rest of a transaction's rows for a destination, without payloads.
const REST_OF_TX_SQL: &str = "
SELECT id, events FROM emit.outbox
 WHERE destination = $1 AND tx_seq = $2 AND first_event_id IS NULL AND id <> ALL($3)
 ORDER BY part";

/// Gives freshly claimed rows (`assign`), then `rest` (id, events), the
/// destination's next consecutive event ids, in that order, and returns
/// the destination's stream.
fn number_events(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    origin: &str,
    rows: &mut [Row],
    rest: &[(i64, i32)],
    assign: bool,
) -> Result<String, pgrx::spi::Error> {
    let total: i64 = if assign {
        rows.iter().map(|r| i64::from(r.events())).sum::<i64>()
            + rest.iter().map(|r| i64::from(r.1)).sum::<i64>()
    } else {
        0
    };
    let numbered = plans::update(
        c,
        "INSERT INTO emit.destinations AS d (destination, next_event_id, origin)
         VALUES ($1, 1 + $2, $3)
         ON CONFLICT (destination) DO UPDATE SET next_event_id = d.next_event_id + $2
         RETURNING d.next_event_id - $2, d.stream::pg_catalog.text",
        &[key.into(), total.into(), origin.into()],
    )?;
    let (first, stream) = numbered.first().get_two::<i64, String>()?;
    if !assign {
        return Ok(stream.unwrap_or_default());
    }
    let mut next = first.unwrap_or(1);
    for r in rows.iter_mut() {
        r.first_event_id = next;
        next += i64::from(r.events());
    }
    let mut ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut firsts: Vec<i64> = rows.iter().map(|r| r.first_event_id).collect();
    for &(id, events) in rest {
        ids.push(id);
        firsts.push(next);
        next += i64::from(events);
    }
    plans::update(
        c,
        "UPDATE emit.outbox o SET first_event_id = v.f
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]),
                          pg_catalog.unnest($2::pg_catalog.int8[])) v(id, f) WHERE o.id = v.id",
        &[ids.into(), firsts.into()],
    )?;
    Ok(stream.unwrap_or_default())
}

/// Applies one job's outcome: delete delivered rows, keep progress, count
/// a failed attempt, move rows past the limits to the dead letters, and
/// update the destination's counters. Returns the dead-lettered events.
fn record(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    job: &Job,
    out: &Outcome,
    ws: &WorkerSettings,
) -> Result<i64, pgrx::spi::Error> {
    let mut sent_now = out.sent.clone();
    let mut dead: i64 = 0;
    // A refused event becomes a dead letter of its own, with the status
    // and the response excerpt; the rest of its row carries on.
    // (A refused batch: each of its events.)
    if let Some(JobError::Reject {
        status,
        message,
        excerpt,
        events,
    }) = &out.error
    {
        for _ in 0..*events {
            let Some(r) = (0..job.rows.len()).find(|&r| sent_now[r] < job.rows[r].events()) else {
                break;
            };
            let row = &job.rows[r];
            let k = sent_now[r] as usize;
            let event = row.payload.split('\n').nth(k).unwrap_or_default();
            plans::update(
                c,
                REJECTED_SQL,
                &[
                    row.id.into(),
                    event.as_bytes().into(),
                    message_text(message).as_ref().into(),
                    i32::from(*status).into(),
                    message_text(excerpt).as_ref().into(),
                ],
            )?;
            sent_now[r] += 1;
            dead += 1;
        }
    }
    let mut delivered_rows = Vec::new();
    let mut partial: (Vec<i64>, Vec<i32>) = (Vec::new(), Vec::new());
    let mut unfinished = Vec::new();
    let mut delivered: i64 = -dead;
    for (row, &sent) in job.rows.iter().zip(&sent_now) {
        delivered += i64::from(sent - row.sent);
        if sent == row.events() {
            delivered_rows.push(row.id);
        } else {
            unfinished.push(row.id);
            if sent != row.sent {
                partial.0.push(row.id);
                partial.1.push(sent as i32);
            }
        }
    }
    if !delivered_rows.is_empty() {
        plans::update(
            c,
            "DELETE FROM emit.outbox WHERE id = ANY($1)",
            &[delivered_rows.into()],
        )?;
    }
    if !partial.0.is_empty() {
        plans::update(
            c,
            "UPDATE emit.outbox o SET sent = v.s
               FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]),
                          pg_catalog.unnest($2::pg_catalog.int4[])) v(id, s) WHERE o.id = v.id",
            &[partial.0.into(), partial.1.into()],
        )?;
    }
    let error = out
        .error
        .as_ref()
        .map(|e| message_text(&e.to_string()).into_owned());
    let retry = out
        .error
        .as_ref()
        .filter(|e| !matches!(e, JobError::Reject { .. }));
    if let Some(err) = retry.map(|e| e.to_string()) {
        plans::update(
            c,
            "UPDATE emit.outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)",
            &[
                unfinished.clone().into(),
                message_text(&err).as_ref().into(),
            ],
        )?;
        // A destination the allowlist refuses will not become deliverable
        // by retrying: dead-letter at once (this attempt was just counted).
        let max_attempts = match out.error {
            Some(JobError::NotAllowed(_)) => 1,
            _ => ws.max_attempts,
        };
        dead += plans::update(
            c,
            DEAD_LETTER_SQL,
            &[unfinished.into(), max_attempts.into(), ws.max_age_s.into()],
        )?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0);
    }
    plans::update(
        c,
        "INSERT INTO emit.destinations AS d
             (destination, delivered, failed_attempts, dead_lettered, last_error, last_error_at, last_delivered_at)
         VALUES ($1, $2, $3, $4, $5,
                 CASE WHEN $5 IS NOT NULL THEN pg_catalog.now() END,
                 CASE WHEN $2 > 0 THEN pg_catalog.now() END)
         ON CONFLICT (destination) DO UPDATE SET
             delivered = d.delivered + excluded.delivered,
             failed_attempts = d.failed_attempts + excluded.failed_attempts,
             dead_lettered = d.dead_lettered + excluded.dead_lettered,
             last_error = coalesce(excluded.last_error, d.last_error),
             last_error_at = coalesce(excluded.last_error_at, d.last_error_at),
             last_delivered_at = coalesce(excluded.last_delivered_at, d.last_delivered_at)",
        &[
            key.into(),
            delivered.into(),
            i64::from(retry.is_some()).into(),
            dead.into(),
            error.into(),
        ],
    )?;
    Ok(dead)
}

/// One event the receiver refused, as a dead letter of its own.
const REJECTED_SQL: &str = "
INSERT INTO emit.dead_letter
    (outbox_id, destination, host, port, framing, url, headers, events, payload, attempts,
     last_error, status, response, enqueued_at)
SELECT id, destination, host, port, framing, url, headers, 1,
       pg_catalog.convert_from($2, 'UTF8'), attempts + 1, $3, $4, $5, enqueued_at
  FROM emit.outbox WHERE id = $1";

/// Moves unfinished rows past `max_attempts` (when positive) or older than
/// `max_age` seconds (when positive) to `emit.dead_letter`, keeping only
/// their undelivered events. Returns how many events moved.
const DEAD_LETTER_SQL: &str = "
WITH dead AS (
    DELETE FROM emit.outbox
     WHERE id = ANY($1)
       AND (($2 > 0 AND attempts >= $2)
            OR ($3 > 0 AND enqueued_at < pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => $3::pg_catalog.float8)))
    RETURNING *
), moved AS (
    INSERT INTO emit.dead_letter
        (outbox_id, destination, host, port, framing, url, headers, events, payload, attempts,
         last_error, enqueued_at)
    SELECT id, destination, host, port, framing, url, headers, events - sent,
           CASE WHEN sent = 0 THEN payload
                ELSE pg_catalog.array_to_string((pg_catalog.string_to_array(payload, E'\\n'))[sent + 1:], E'\\n') END,
           attempts, last_error, enqueued_at
      FROM dead
    RETURNING events
)
SELECT coalesce(pg_catalog.sum(events), 0)::pg_catalog.int8 FROM moved";

/// Wall-clock nanoseconds, to seed the jitter differently in every worker.
fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
