//! The async delivery worker: one background worker per database.
//!
//! The main thread owns every database interaction, in short transactions
//! ([`txn`]): claim rows (number their events), then later acknowledge what
//! was delivered ([`queue`]). Network I/O happens on one thread per
//! destination ([`pg_emit_core::job`]), which signals the main thread's
//! latch when a job is done, so nothing waits on a timer: a commit that
//! queued events sets the latch, and so does every finished job
//! ([`dispatch`]). A destination that fails is retried with exponential
//! backoff, on its own, while the others keep flowing. This file is the
//! worker's life: start, the lock that makes it the only one, where it
//! runs, and how it stops.
//!
//! Without `shared_preload_libraries` the first transaction that queues
//! events starts the worker; with it, [`launcher`] starts one per database
//! at server start, so a backlog left by a crash is delivered without
//! waiting for a new write.

mod capture;
mod dispatch;
pub(crate) mod launcher;
mod live;
mod queue;
mod txn;
pub(crate) mod wake;

use crate::transport::{Cancelled, Interrupt};
use dispatch::Worker;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use txn::{stop_or_raise, transaction};

/// Tells pg_emit's worker lock apart from every advisory lock SQL can take:
/// `pg_advisory_lock` always puts 1 or 2 in the tag's last field.
const LOCK_TAG_KIND: u16 = 0x456d;
/// First key of the worker lock ("pgEm"); the second is the database oid.
const LOCK_KEY: u32 = 0x7067_456d;

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
    // this is a stop, not a fault.
    if let Err(e) = registered {
        stopped(stop_or_raise("starting", e));
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
        Err(e) => stopped(stop_or_raise("starting", e)),
    };
    pgrx::log!("pg_emit worker started");
    let (origin, nsp) = origin;
    let stop = Worker::new(origin, nsp).run();
    STOPPING.store(true, Ordering::Relaxed);
    stopped(stop)
}

/// Leaves the worker for `stop`, logging why.
fn stopped(stop: Stop) -> ! {
    match stop {
        Stop::ExtensionDropped => dropped(),
        Stop::DatabaseWanted => {
            pgrx::log!(
                "pg_emit worker: leaving the database for CREATE DATABASE or DROP DATABASE; \
                 back once it is done"
            );
            // Exit 1: restarted a second later.
            exit(1)
        }
        // Terminated (pg_terminate_backend) or shutting down: exit 1 so a
        // terminated worker comes back; during shutdown no restart happens.
        Stop::Terminated => exit(1),
        Stop::Reinstalled => {
            pgrx::log!("pg_emit worker: extension reinstalled, restarting");
            // Exit 1: restarted a second later, for the new install.
            exit(1)
        }
        Stop::FreshDecoder => {
            pgrx::log!(
                "pg_emit worker: restarting, so that a capture decodes in a fresh process \
                 after logical decoding failed in this one"
            );
            // Exit 1: restarted a second later.
            exit(1)
        }
        Stop::Yielded => {
            pgrx::log!(
                "pg_emit worker: gave way to a concurrent transaction (deadlock), restarting"
            );
            // Exit 1: restarted a second later; what it had claimed and
            // not recorded is claimed again.
            exit(1)
        }
    }
}

/// Exits after DROP EXTENSION, to be started again a second later: a
/// CREATE EXTENSION and a commit that queues events may come while this
/// process is still on its way out, and that commit, finding it alive,
/// starts no other. The restarted worker serves the new installation, or
/// finds none and exits for good.
fn dropped() -> ! {
    pgrx::log!("pg_emit worker: extension dropped, exiting");
    // Exit 1: restarted a second later.
    exit(1)
}

/// `proc_exit`, which PostgreSQL 18's headers no longer declare as not
/// returning (so its binding returns `()`, where 15's and 17's return `!`).
#[allow(unreachable_code)]
fn exit(code: i32) -> ! {
    // SAFETY: leaves through PostgreSQL's exit callbacks, as any process does.
    unsafe { pg_sys::proc_exit(code) };
    unreachable!("proc_exit returned")
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

/// With a new library but an older release's SQL objects (before `ALTER
/// EXTENSION pg_emit UPDATE`), waits, keeping the queue, until the update
/// is done.
/// False when asked to stop meanwhile, or when the extension is gone.
fn wait_for_current_schema() -> bool {
    let mut said = false;
    loop {
        let state = transaction(c"pg_emit: checking the extension version", || {
            Ok::<_, String>((
                crate::privileged::emit_owner().is_some(),
                crate::privileged::schema() == crate::privileged::Schema::Current,
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
    /// Lost a deadlock (see `txn::Failed`).
    Yielded,
    /// Logical decoding failed in this process (see
    /// `capture::Captures::wants_fresh_process`).
    FreshDecoder,
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
            insertion_timeline(),
        )
    };
    Ok(format!("{system}/{db}/{timeline}/{install}"))
}

/// The timeline WAL is written on. PostgreSQL 14 has no function for it:
/// `ThisTimeLineID` is set once `RecoveryInProgress` has seen recovery end.
#[cfg(not(feature = "pg14"))]
unsafe fn insertion_timeline() -> pg_sys::TimeLineID {
    pg_sys::GetWALInsertionTimeLine()
}

#[cfg(feature = "pg14")]
unsafe fn insertion_timeline() -> pg_sys::TimeLineID {
    pg_sys::RecoveryInProgress();
    pg_sys::ThisTimeLineID
}

/// In a copy or a restore of a database (see [`origin`]), the
/// destinations' streams and ids came along and may already have been
/// used from the original: every such destination starts a new stream at
/// id 1 for what it numbers from now on. Events numbered before keep their
/// `(stream, id)` (their rows say which stream, see `emit.outbox.stream`),
/// so that a receiver recognises what the original may have sent already.
const NEW_STREAMS_SQL: &str = "
WITH moved AS (
    SELECT t.destination, t.stream FROM emit.destinations t
     WHERE t.origin IS DISTINCT FROM $1 AND t.destination NOT LIKE 'channel:%'
), kept AS (
    UPDATE emit.outbox o SET stream = m.stream
      FROM moved m
     WHERE o.destination = m.destination AND o.first_event_id IS NOT NULL AND o.stream IS NULL
)
UPDATE emit.destinations t
   SET stream = pg_catalog.gen_random_uuid(), next_event_id = 1, origin = $1
  FROM moved m WHERE t.destination = m.destination";
