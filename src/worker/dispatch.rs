//! The worker's main loop: wait on the latch, claim rows for idle
//! destinations and hand them to their sender threads, record finished
//! jobs, and retry failing destinations with backoff (see
//! [`pg_emit_core::health`]), each on its own.

use super::capture::Captures;
use super::live::{self, Live};
use super::queue::{claim, record, DESTINATIONS_SQL};
use super::txn::{commit_without_waiting, stop_or_raise, transaction};
use super::{database_wanted, Stop, Stopping};
use crate::backoff::{self, Backoff};
use crate::plans;
use crate::settings;
use crate::transport;
use pg_emit_core::health::{Ended, Health};
use pg_emit_core::job::{self as send, Job, JobError, Outcome};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Least time between two claims (see [`Worker::run`]).
const CLAIM_GAP: Duration = Duration::from_millis(2);
/// Safety net for wakeups nobody sends (COMMIT PREPARED of an async
/// transaction, rows re-queued by hand with INSERT).
const IDLE_RESCAN: Duration = Duration::from_secs(10);
/// How often the worker checks [`database_wanted`] while it waits.
const DATABASE_CHECK: Duration = Duration::from_secs(1);

unsafe extern "C" {
    /// Declared here without pgrx's FFI guard, which only allows calls from
    /// the main thread: sender threads use it to wake the main thread.
    /// SetLatch is async-signal-safe, so it is safe from any thread.
    #[link_name = "SetLatch"]
    pub(super) fn set_latch_from_any_thread(latch: *mut pg_sys::Latch);
}

/// What one claim transaction took: jobs for sender threads, and channel
/// events it stored, to publish once it has committed.
type Claimed = (Vec<(String, Job)>, live::Stored);

/// A destination as the worker tracks it.
struct Dest {
    jobs: mpsc::Sender<Job>,
    busy: bool,
    /// Connections its running job may use (see [`Worker::budget`]).
    granted: usize,
    health: Health,
    last_job: Instant,
}

/// A destination with nothing to do for this long loses its thread and
/// its kept-open connection; the next event starts them again.
const IDLE_DEST: Duration = Duration::from_secs(300);

pub(super) struct Worker {
    dests: HashMap<String, Dest>,
    done_tx: mpsc::Sender<(String, Job, Outcome)>,
    done_rx: mpsc::Receiver<(String, Job, Outcome)>,
    rng: u64,
    /// Where this worker runs (see [`origin`]), recorded with each
    /// destination's stream.
    origin: String,
    /// Schema `emit` of the installation this worker serves.
    emit_nsp: pg_sys::Oid,
    live: Live,
    captures: Captures,
    /// When `emit.http_responses` was last purged.
    responses_purged: Instant,
    /// When destinations' shares of the outbox were last marked.
    shares_marked: Instant,
    /// Connections to receivers it may hold at once (see
    /// [`pg_emit_core::budget`]).
    budget: usize,
}

/// How often responses past their retention are deleted.
const RESPONSES_PURGE: Duration = Duration::from_secs(10);
/// How often the outbox is measured against `pg_emit.max_outbox_size`
/// (see [`super::queue::mark_shares`]).
const SHARES_MARKED: Duration = Duration::from_secs(2);

pub(super) struct WorkerSettings {
    backoff: Backoff,
    pub(super) max_attempts: i32,
    pub(super) max_age_s: i32,
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
    pub(super) fn new(origin: String, emit_nsp: pg_sys::Oid) -> Self {
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
            live: Live::new(),
            captures: Captures::new(),
            responses_purged: Instant::now(),
            shares_marked: Instant::now(),
            budget: pg_emit_core::budget::connections(raise_open_files()),
        }
    }

    pub(super) fn run(&mut self) -> Stop {
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
            let timeout = self
                .next_timeout()
                .min(DATABASE_CHECK)
                .min(self.live.next_timeout())
                .min(self.captures.next_timeout());
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
                self.live.configure();
            }
            self.live.serve();
            self.live.housekeeping();
            if self.shares_marked.elapsed() >= SHARES_MARKED {
                self.shares_marked = Instant::now();
                let limit = settings::max_outbox_bytes();
                let marked = transaction(c"pg_emit: measuring the outbox", || {
                    Spi::connect_mut(|c| super::queue::mark_shares(c, limit))
                });
                if let Err(e) = marked {
                    pgrx::warning!("pg_emit worker: could not measure emit.outbox: {e}");
                }
            }
            if self.responses_purged.elapsed() >= RESPONSES_PURGE {
                self.responses_purged = Instant::now();
                let purged = transaction(c"pg_emit: deleting old HTTP responses", || {
                    Spi::connect_mut(super::queue::purge_responses)
                });
                if let Err(e) = purged {
                    pgrx::warning!("pg_emit worker: could not delete old HTTP responses: {e}");
                }
            }
            if self.captures.due() {
                match self.captures.run() {
                    Ok(queued) => scan |= queued,
                    Err(e) => return stop_or_raise("capturing changes", e),
                }
                if self.captures.wants_fresh_process() {
                    return Stop::FreshDecoder;
                }
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
                .any(|d| !d.busy && d.health.retry_at.is_some_and(|t| t <= now));
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
            .filter_map(|d| d.health.retry_at)
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
        self.dests.retain(|_, d| {
            d.busy || d.health.failures > 0 || now.duration_since(d.last_job) < IDLE_DEST
        });
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
        // Past the budget (one connection each, at least), no more
        // destinations start until one finishes.
        let mut room = self
            .budget
            .saturating_sub(self.dests.values().filter(|d| d.busy).count());
        let mut ready = move |d: Option<&Dest>| {
            let ok = room > 0 && d.is_none_or(|d| !d.busy && d.health.ready(now));
            room -= usize::from(ok);
            ok
        };
        let (dests, origin, installed) = (&self.dests, self.origin.as_str(), self.emit_nsp);
        let jobs = transaction(c"pg_emit: claiming events", || {
            Spi::connect_mut(|c| -> Result<Result<Claimed, Stop>, pgrx::spi::Error> {
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
                plans::update(c, SEQUENCE_PREPARED_SQL, &[])?;
                let keys: Vec<String> = plans::select(c, DESTINATIONS_SQL, None, &[])?
                    .filter_map(|r| r.get::<String>(1).ok().flatten())
                    .collect();
                let mut jobs = Vec::new();
                let mut stored = Vec::new();
                for key in keys {
                    // Stored here, in this transaction: no thread,
                    // no network.
                    if let Some(channel) = key.strip_prefix("channel:") {
                        let events = live::store(c, &key, channel, origin)?;
                        if !events.is_empty() {
                            stored.push((channel.to_string(), events));
                        }
                        continue;
                    }
                    if !ready(dests.get(&key)) {
                        continue;
                    }
                    if let Some(job) = claim(c, &key, origin, timeouts, &allow, &http)? {
                        jobs.push((key, job));
                    }
                }
                Ok(Ok((jobs, stored)))
            })
        });
        let jobs = match jobs {
            Ok(Ok((jobs, stored))) => {
                self.live.publish(stored);
                jobs
            }
            Ok(Err(stop)) => return Err(stop),
            Err(e) => return Err(stop_or_raise("claiming events", e)),
        };
        // Connections are granted from what running jobs leave of the
        // budget, no destination more than an equal share of it: a
        // destination that is down or hangs is probed with one request.
        let busy = self.dests.values().filter(|d| d.busy).count() + jobs.len();
        let share = pg_emit_core::budget::share(self.budget, busy);
        let in_use: usize = self
            .dests
            .values()
            .filter(|d| d.busy)
            .map(|d| d.granted)
            .sum();
        let mut left = self.budget.saturating_sub(in_use);
        let mut waiting = jobs.len();
        for (key, mut job) in jobs {
            let dest = self.dest(&key);
            let grant = match dest.health.probing() {
                true => 1,
                false => job.flow.concurrency.min(share).min(left / waiting).max(1),
            };
            job.flow.concurrency = grant;
            dest.granted = grant;
            left = left.saturating_sub(grant);
            waiting -= 1;
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
                    granted: 0,
                    health: Health::default(),
                    last_job: Instant::now(),
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
                // A dead letter waits: lost, its event would come back
                // and go out after later events of its key that were sent
                // meanwhile.
                if dead.iter().all(|&d| d == 0) {
                    commit_without_waiting();
                }
                Ok(dead)
            })
        });
        let dead = match result {
            Ok(d) => d,
            Err(e) => return Err(stop_or_raise("recording deliveries", e)),
        };
        for ((key, job, out), dead) in done.into_iter().zip(dead) {
            let jitter = backoff::jitter(&mut self.rng);
            let dest = self.dests.get_mut(&key).expect("dispatched before");
            dest.busy = false;
            let progressed = (out.sent.iter().zip(&out.acked))
                .zip(&job.rows)
                .any(|((s, a), r)| *s > r.sent || a.len() > r.acked.len());
            let ended = match &out.error {
                None => Ended::Delivered,
                Some(JobError::Reject { .. }) => Ended::Refused,
                Some(JobError::Retry { after, .. }) => Ended::Failed {
                    after: *after,
                    progressed,
                },
                Some(JobError::NotAllowed(_)) => Ended::Failed {
                    after: None,
                    progressed: false,
                },
            };
            let error: &dyn std::fmt::Display = match &out.error {
                Some(e) => e,
                None => &"",
            };
            let now = Instant::now();
            logs.extend(
                dest.health
                    .record(ended, now, &ws.backoff, jitter, &key, error),
            );
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

/// Wall-clock nanoseconds, to seed the jitter differently in every worker.
fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Rows of prepared transactions that COMMIT PREPARED has made visible
/// carry no commit-order number yet: each such transaction gets the next
/// one now, in the order of its first row. So does each row written
/// without one by other means (a 0.1.0 library still loaded in a backend
/// after ALTER EXTENSION UPDATE, an INSERT by hand). The worker runs this
/// before every claim, and is woken for it after COMMIT PREPARED
/// ([`super::wake::after_commit_prepared`]).
pub const SEQUENCE_PREPARED_SQL: &str = "
UPDATE emit.outbox o SET tx_seq = t.seq
  FROM (SELECT u.g, pg_catalog.nextval('emit.tx_seq'::pg_catalog.regclass) AS seq
          FROM (SELECT coalesce(p.tx, -p.id) AS g, pg_catalog.min(p.id) AS first
                  FROM emit.outbox p WHERE p.tx_seq IS NULL
                 GROUP BY 1 ORDER BY 2) u) t
 WHERE o.tx_seq IS NULL AND coalesce(o.tx, -o.id) = t.g";

/// Raises the soft limit of open files to the hard one (PostgreSQL starts
/// its processes with the soft limit, often 1,024, which connections to
/// many receivers would exhaust) and returns the limit in effect.
/// PostgreSQL counts the descriptors its own files may use at startup and
/// keeps to that count, so a higher limit only adds room for sockets.
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}
