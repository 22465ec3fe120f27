//! The worker's network side: deliver claimed outbox rows to one
//! destination. Runs on a per-destination thread and never touches
//! PostgreSQL, so a receiver that hangs holds up only its own destination.

use crate::destination::Destination;
use crate::event::{event_id, with_id, Kind};
use crate::options::{Format, Framing};
use crate::schedule::{Flow, Order, Scheduler};
use crate::security::Allowlist;
use crate::sink::{self, Item};
use crate::transport::http::{self, ClientConfig, HttpError, Request, Signing};
use crate::transport::tcp::{self, SendError};
use crate::transport::{Interrupt, Timeouts};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A claimed outbox row: `payload` holds one event per line; event `k`
/// (0-based) has id `first_event_id + k`; the first `sent` are delivered,
/// and so are those in `acked`.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub first_event_id: i64,
    pub sent: u32,
    pub payload: String,
    /// How its events were made, which says where their ids go (see
    /// [`with_id`]), how they are sent and what signs them.
    pub kind: Kind,
    /// Each event's ordering key (`None`: a barrier, see
    /// [`crate::schedule`]); `None` for the whole row: all barriers.
    pub keys: Option<Vec<Option<i64>>>,
    /// Each event's key as text, for destinations that carry it (see
    /// [`crate::sink::Broker::record_keys`]); `None` for the whole row:
    /// no event has one.
    pub record_keys: Option<Vec<Option<String>>>,
    /// Events past `sent` already delivered (ascending): they were sent
    /// while an earlier event of another key was failing, and are never
    /// sent again by parallel HTTP, which alone leaves such gaps.
    pub acked: Vec<u32>,
}

impl Row {
    pub fn events(&self) -> u32 {
        self.payload.split('\n').count() as u32
    }

    /// Its events still to send, with their index: past `sent` and not
    /// in `acked`.
    fn unsent(&self) -> Vec<(usize, &str)> {
        let mut acked = self.acked.iter().peekable();
        self.payload
            .split('\n')
            .enumerate()
            .skip(self.sent as usize)
            .filter(|&(k, _)| acked.next_if_eq(&&(k as u32)).is_none())
            .collect()
    }
}

/// Where a job goes: the same [`Destination`] sync and commit send to
/// (the worker has already read a stored one: never
/// [`Destination::Stored`]), with what its HTTP requests need. One per
/// job, never in a collection: its size does not matter.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Resolved {
    Ready(Destination, HttpSetup),
    /// A stored destination that cannot be used now (dropped, say): every
    /// job fails with this message and is retried.
    Unavailable(String),
}

/// What HTTP requests need beyond the URL and headers.
#[derive(Debug, Clone)]
pub struct HttpSetup {
    /// Client settings and signing key, or why they could not be read.
    pub client: Result<(ClientConfig, Option<Vec<u8>>), String>,
    /// Standard Webhooks secrets (a stored destination's `secret`): they
    /// sign instead of the key when set.
    pub standard: Option<Vec<Vec<u8>>>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub dest: Resolved,
    pub rows: Vec<Row>,
    /// How many go at once, in what order.
    pub flow: Flow,
    /// The destination's stream: with an event's id, the key a receiver
    /// de-duplicates by.
    pub stream: String,
    pub timeouts: Timeouts,
    /// `pg_emit.allowed_destinations` as of the claim: checked again at
    /// delivery, so a destination disallowed after queueing is refused.
    pub allow: Allowlist,
    /// HTTP responses to keep (`pg_emit.response_log`).
    pub log: ResponseLog,
}

/// Which HTTP responses the worker keeps in `emit.http_responses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    #[default]
    Off,
    /// Failures: a status outside 2xx, or no response at all.
    Errors,
    All,
}

/// One HTTP request's outcome, as the response log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    /// The events it carried (one, or a batch).
    pub first: i64,
    pub last: i64,
    /// `None`: no response (the error says why).
    pub status: Option<u16>,
    pub ms: f64,
    /// The start of the response body (see [`http::Response`]).
    pub excerpt: String,
    pub error: Option<String>,
}

/// A job's response log, filled by its sender threads.
#[derive(Debug, Default)]
pub struct ResponseLog {
    pub level: LogLevel,
    entries: Mutex<Vec<Logged>>,
}

impl Clone for ResponseLog {
    /// The level; a copy of a job starts with an empty log.
    fn clone(&self) -> Self {
        ResponseLog::new(self.level)
    }
}

impl ResponseLog {
    pub fn new(level: LogLevel) -> Self {
        ResponseLog {
            level,
            entries: Mutex::default(),
        }
    }

    fn record(&self, l: Logged) {
        let success = l.status.is_some_and(|s| (200..300).contains(&s));
        match self.level {
            LogLevel::Off => {}
            LogLevel::Errors if success => {}
            _ => self
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(l),
        }
    }

    /// What was recorded, in the order the requests ended.
    pub fn take(&self) -> Vec<Logged> {
        std::mem::take(&mut *self.entries.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Why a job stopped.
#[derive(Debug)]
pub enum JobError {
    /// Worth trying again later (network trouble, 5xx, 408, 429), after at
    /// least `after` if the receiver said so (Retry-After).
    Retry {
        message: String,
        after: Option<Duration>,
    },
    /// The receiver refused this event for good (3xx, other 4xx): it goes
    /// to the dead letters and the destination carries on.
    Reject {
        status: u16,
        message: String,
        excerpt: String,
        /// Events the refused request carried (a batch), from the first
        /// undelivered one.
        events: u32,
    },
    /// The allowlist refuses the destination.
    NotAllowed(String),
}

impl From<SendError> for JobError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::NotAllowed(m) => JobError::NotAllowed(m),
            e => JobError::Retry {
                message: e.to_string(),
                after: None,
            },
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retry { message, .. } | JobError::Reject { message, .. } => {
                f.write_str(message)
            }
            JobError::NotAllowed(m) => f.write_str(m),
        }
    }
}

/// How far a job got: the new `sent` and `acked` of each row (see
/// [`Row`]), and the error that stopped it, if any.
#[derive(Debug)]
pub struct Outcome {
    pub sent: Vec<u32>,
    pub acked: Vec<Vec<u32>>,
    pub error: Option<JobError>,
}

impl Outcome {
    /// From each row's new in-order count and the events it delivered past
    /// that: what was delivered before is kept, and each count moves past
    /// the delivered events that now follow it.
    fn settle(
        rows: &[Row],
        sent: Vec<u32>,
        delivered: Vec<Vec<u32>>,
        error: Option<JobError>,
    ) -> Self {
        let mut acked = Vec::with_capacity(rows.len());
        let mut sent = sent;
        for (r, row) in rows.iter().enumerate() {
            let mut a: Vec<u32> = row
                .acked
                .iter()
                .chain(delivered.get(r).into_iter().flatten())
                .copied()
                .collect();
            a.sort_unstable();
            a.dedup();
            let mut n = sent[r];
            let mut rest = Vec::new();
            for k in a {
                if k < n {
                    continue;
                }
                if k == n {
                    n += 1;
                } else {
                    rest.push(k);
                }
            }
            sent[r] = n;
            acked.push(rest);
        }
        Outcome { sent, acked, error }
    }
}

/// What a sender thread keeps between jobs: the kept-open ndjson
/// connection, or the keep-alive HTTP client.
#[derive(Default)]
pub struct Conn {
    tcp: Option<tcp::Kept>,
    broker: sink::Connection,
    http: Option<http::Client>,
    /// With `max_rate`: the earliest time the next request may start,
    /// kept from one job to the next.
    next_slot: Option<Instant>,
}

/// Delivers a job in order, stopping at the first failure, or pausing
/// after [`JOB_SLICE`] where events go one connection or request at a time.
pub fn send_job(conn: &mut Conn, job: &Job, intr: &dyn Interrupt) -> Outcome {
    let started = Instant::now();
    let sent: Vec<u32> = job.rows.iter().map(|r| r.sent).collect();
    // Each row's events still to send (past `sent`, not acked), and how
    // many of them, in order, this job delivered.
    let pending: Vec<Vec<(usize, &str)>> = job.rows.iter().map(Row::unsent).collect();
    let mut done = vec![0usize; job.rows.len()];
    let delivered = |done: &[usize]| -> Vec<Vec<u32>> {
        pending
            .iter()
            .zip(done)
            .map(|(p, &n)| p[..n].iter().map(|&(k, _)| k as u32).collect())
            .collect()
    };
    let mut buf = Vec::new();
    if let Resolved::Unavailable(why) = &job.dest {
        let error = Some(JobError::Retry {
            message: why.clone(),
            after: None,
        });
        return Outcome::settle(&job.rows, sent, Vec::new(), error);
    }
    if let Resolved::Ready(
        Destination::Http { url, headers },
        HttpSetup {
            client: Ok((cfg, key)),
            standard,
        },
    ) = &job.dest
    {
        if (job.flow.concurrency > 1 && job.flow.order != Order::Destination)
            || job.flow.batch > 1
            || job.flow.max_rate.is_some()
        {
            return match http_client(&mut conn.http, cfg) {
                Ok(c) => {
                    let signer = Signer { key, standard };
                    send_parallel(&c, url, headers, &signer, job, &mut conn.next_slot, intr)
                }
                Err(e) => Outcome::settle(&job.rows, sent, Vec::new(), Some(e)),
            };
        }
    }
    for (i, row) in job.rows.iter().enumerate() {
        let lines = pending[i].iter().copied();
        let result = match &job.dest {
            Resolved::Ready(
                Destination::Tcp {
                    framing: Framing::Ndjson,
                    host,
                    port,
                },
                _,
            ) => {
                buf.clear();
                for (k, line) in lines {
                    let id = row.first_event_id + k as i64;
                    with_id(&mut buf, row.kind, &job.stream, id, line);
                    buf.push(b'\n');
                }
                let mut acked = 0;
                let r = tcp::write_kept(
                    &mut conn.tcp,
                    host,
                    *port,
                    &buf,
                    &job.timeouts,
                    &job.allow,
                    &mut acked,
                    intr,
                );
                // Whole lines the receiving host acknowledged count as
                // sent, also when the write then stalled: a retry resumes
                // after them instead of starting the row over.
                let lines_acked = buf[..acked].iter().filter(|&&b| b == b'\n').count();
                done[i] += lines_acked;
                r.map_err(|e| Stopped(JobError::from(e)))
            }
            Resolved::Ready(
                Destination::Tcp {
                    framing: Framing::Close,
                    host,
                    port,
                },
                _,
            ) => lines.into_iter().try_for_each(|(k, line)| {
                if sliced(started) {
                    return Err(Pause);
                }
                buf.clear();
                let id = row.first_event_id + k as i64;
                with_id(&mut buf, row.kind, &job.stream, id, line);
                tcp::send_once(host, *port, &buf, &job.timeouts, &job.allow, intr)
                    .map_err(|e| Stopped(JobError::from(e)))?;
                done[i] += 1;
                Ok(())
            }),
            Resolved::Ready(
                Destination::Http { url, headers },
                HttpSetup {
                    client: setup,
                    standard,
                },
            ) => setup
                .as_ref()
                .map_err(|e| JobError::Retry {
                    message: e.clone(),
                    after: None,
                })
                .and_then(|(client, key)| Ok((http_client(&mut conn.http, client)?, key)))
                .map_err(Stopped)
                .and_then(|(c, key)| {
                    let signer = Signer { key, standard };
                    lines.into_iter().try_for_each(|(k, line)| {
                        if sliced(started) {
                            return Err(Pause);
                        }
                        buf.clear();
                        let id = row.first_event_id + k as i64;
                        with_id(&mut buf, row.kind, &job.stream, id, line);
                        let signing = signer.sign(row.kind, &job.stream, &[id]);
                        let body = Body::one(row.kind.format, &buf);
                        post(&c, url, headers, signing, body, &job.log, (id, id))
                            .map_err(Stopped)?;
                        done[i] += 1;
                        Ok(())
                    })
                }),
            Resolved::Ready(Destination::Broker(b), _) => {
                let (ids, ends) = broker_batch(&mut buf, row, lines, &job.stream);
                let content_type = crate::cloudevents::content_type(row.kind.format, false);
                let items: Vec<Item<'_>> = (0..ids.len())
                    .map(|n| Item {
                        id: &ids[n],
                        key: row
                            .keys
                            .as_ref()
                            .and_then(|ks| ks.get(pending[i][n].0).copied().flatten()),
                        record_key: row
                            .record_keys
                            .as_ref()
                            .and_then(|ks| ks.get(pending[i][n].0)?.as_deref()),
                        body: &buf[ends[n].clone()],
                        content_type,
                    })
                    .collect();
                let (acked, r) = b.send(&mut conn.broker, &items, &job.timeouts, &job.allow, intr);
                done[i] += acked;
                r.map_err(broker_error)
            }
            Resolved::Ready(Destination::Stored { name, .. }, _) => Err(Stopped(JobError::Retry {
                message: format!("stored destination {name:?} was not read before delivery"),
                after: None,
            })),
            Resolved::Ready(Destination::Routed { template, .. }, _) => {
                Err(Stopped(JobError::Retry {
                    message: format!("{template:?} routes by table and was not filled in"),
                    after: None,
                }))
            }
            Resolved::Ready(Destination::Channel(_), _) => {
                unreachable!("the worker publishes channel events itself, it never sends them")
            }
            Resolved::Unavailable(_) => unreachable!("returned above"),
        };
        match result {
            Ok(()) => {}
            Err(Pause) => break,
            Err(Stopped(e)) => return Outcome::settle(&job.rows, sent, delivered(&done), Some(e)),
        }
    }
    Outcome::settle(&job.rows, sent, delivered(&done), None)
}

/// A broker's error as a job error: a network failure as every
/// destination's, anything the broker said retried with its words.
fn broker_error(e: sink::Stopped) -> Halt {
    Stopped(match e {
        sink::Stopped::Network(s) => JobError::from(s),
        sink::Stopped::Broker(message) => JobError::Retry {
            message,
            after: None,
        },
    })
}

/// A row's unsent events for a broker, one after the other in `buf`: each
/// event's id (see [`event_id`], its dedupe key there) and byte range.
fn broker_batch<'a>(
    buf: &mut Vec<u8>,
    row: &Row,
    lines: impl Iterator<Item = (usize, &'a str)>,
    stream: &str,
) -> (Vec<String>, Vec<std::ops::Range<usize>>) {
    buf.clear();
    let (mut ids, mut ranges) = (Vec::new(), Vec::new());
    for (k, line) in lines {
        let id = row.first_event_id + k as i64;
        let start = buf.len();
        with_id(buf, row.kind, stream, id, line);
        ranges.push(start..buf.len());
        ids.push(event_id(row.kind, stream, id, id));
    }
    (ids, ranges)
}

/// HTTP requests of `job.flow.batch` events each (one request per event when
/// 1, else a JSON array), up to `job.flow.concurrency` in flight, in per-key
/// order (see [`crate::schedule`]). Each event's outcome is its own: a
/// failed one holds back only the events of its key (everything, for an
/// event without a key), the others go on, and what was delivered is
/// recorded and never sent again (see [`Row::acked`]).
fn send_parallel(
    client: &http::Client,
    url: &str,
    headers: &[(String, String)],
    signer: &Signer<'_>,
    job: &Job,
    next_slot: &mut Option<Instant>,
    intr: &dyn Interrupt,
) -> Outcome {
    let started = Instant::now();
    // max_rate: requests start no sooner than their slot, spaced by their
    // events' share of a second.
    let slot = Mutex::new(next_slot.unwrap_or(started));
    // (row, event id, line) of every event still to send, in order.
    let mut events: Vec<(usize, i64, &str)> = Vec::new();
    let mut keys: Vec<Option<i64>> = Vec::new();
    for (r, row) in job.rows.iter().enumerate() {
        let mut acked = row.acked.iter().peekable();
        for (k, line) in row.payload.split('\n').enumerate().skip(row.sent as usize) {
            if acked.next_if_eq(&&(k as u32)).is_some() {
                continue;
            }
            events.push((r, row.first_event_id + k as i64, line));
            keys.push(match job.flow.order {
                Order::None => Some(events.len() as i64),
                // Strict order: every event a barrier, so requests are
                // consecutive and a failure holds back everything after it.
                Order::Destination => None,
                Order::Key => row
                    .keys
                    .as_ref()
                    .and_then(|ks| ks.get(k).copied().flatten()),
            });
        }
    }
    let kind = |e: &(usize, i64, &str)| job.rows[e.0].kind;
    // As many lanes as full requests can keep busy, up to the requests in
    // flight allowed (three events at batch 3 are one request, not three);
    // strict commit order: one lane, requests of consecutive events.
    let lanes = match job.flow.order {
        Order::Destination => 1,
        _ => (events.len() / job.flow.batch.max(1)).clamp(1, job.flow.concurrency.max(1)),
    };
    let units = units(&events, &keys, job.flow.batch, lanes, kind);
    let scheduler = Scheduler::batched(
        units
            .iter()
            .map(|u| u.iter().map(|&e| keys[e]).collect())
            .collect(),
    );
    let state = Mutex::new((scheduler, Failures::default()));
    let wake = Condvar::new();
    let concurrency = match job.flow.order {
        Order::Destination => 1,
        _ => job.flow.concurrency,
    };
    let threads = concurrency.min(units.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let next = {
                        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if let Some(i) = st.0.take() {
                                break Some(i);
                            }
                            if st.0.finished() {
                                break None;
                            }
                            st = wake
                                .wait_timeout(st, crate::transport::SLICE)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    };
                    let Some(i) = next else {
                        wake.notify_all();
                        return;
                    };
                    if let Some(rate) = job.flow.max_rate {
                        let at = {
                            let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
                            let at = (*s).max(Instant::now());
                            *s = at + Duration::from_secs_f64(units[i].len() as f64 / rate);
                            at
                        };
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    }
                    buf.clear();
                    let unit: Vec<(usize, i64, &str)> =
                        units[i].iter().map(|&e| events[e]).collect();
                    // A binary-mode event is always alone (see units()), and
                    // never an array, whatever batch the destination has.
                    let batched =
                        job.flow.batch > 1 && kind(&unit[0]).format != Format::CloudEventsBinary;
                    if batched {
                        buf.push(b'[');
                    }
                    for (n, e) in unit.iter().enumerate() {
                        if n > 0 {
                            buf.push(b',');
                        }
                        with_id(&mut buf, kind(e), &job.stream, e.1, e.2);
                    }
                    if batched {
                        buf.push(b']');
                    }
                    let (first, last) = (unit[0].1, unit[unit.len() - 1].1);
                    let ids: Vec<i64> = unit.iter().map(|e| e.1).collect();
                    let signing = signer.sign(kind(&unit[0]), &job.stream, &ids);
                    let body = if batched {
                        Body::Batch(kind(&unit[0]).format, &buf)
                    } else {
                        Body::one(kind(&unit[0]).format, &buf)
                    };
                    let log = (&job.log, (first, last));
                    let r =
                        post(client, url, headers, signing, body, log.0, log.1).map_err(
                            |e| match e {
                                JobError::Reject {
                                    status,
                                    message,
                                    excerpt,
                                    ..
                                } => JobError::Reject {
                                    status,
                                    message,
                                    excerpt,
                                    events: units[i].len() as u32,
                                },
                                e => e,
                            },
                        );
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.0.finish(i, r.is_ok());
                    if let Err(e) = r {
                        st.1.add(i, e);
                    }
                    drop(st);
                    wake.notify_all();
                }
            });
        }
        // This thread watches the clock and the worker's stop request; the
        // senders finish what is in flight and return.
        loop {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            if st.0.finished() {
                break;
            }
            if intr.check().is_err() {
                st.0.stop();
                drop(st);
                wake.notify_all();
                break;
            }
            if sliced(started) {
                st.0.stop();
                drop(st);
                wake.notify_all();
                break;
            }
            drop(
                wake.wait_timeout(st, crate::transport::SLICE)
                    .unwrap_or_else(|p| p.into_inner()),
            );
        }
    });
    if job.flow.max_rate.is_some() {
        *next_slot = Some(slot.into_inner().unwrap_or_else(|p| p.into_inner()));
    }
    let (sched, failures) = state.into_inner().unwrap_or_else(|p| p.into_inner());
    let sent: Vec<u32> = job.rows.iter().map(|r| r.sent).collect();
    let mut delivered: Vec<Vec<u32>> = vec![Vec::new(); job.rows.len()];
    for (i, u) in units.iter().enumerate() {
        if sched.is_done(i) {
            for &(r, id, _) in u.iter().map(|&e| &events[e]) {
                delivered[r].push((id - job.rows[r].first_event_id) as u32);
            }
        }
    }
    // A refusal is dead-lettered as the first undelivered events of the
    // job: only when its request's events are exactly those (everything
    // before them delivered, no gap among them); otherwise, or when a
    // request failed in a way worth retrying (whose backoff and
    // Retry-After then apply), it is retried, and dead-lettered once it
    // comes first.
    let first_undelivered = units
        .iter()
        .enumerate()
        .filter(|&(i, _)| !sched.is_done(i))
        .flat_map(|(_, u)| u.iter().copied())
        .min();
    let error = match failures {
        Failures {
            retry: Some((_, e)),
            ..
        } => Some(e),
        Failures {
            refusal: Some((i, e)),
            ..
        } => {
            let u = &units[i];
            let leads = Some(u[0]) == first_undelivered && u.windows(2).all(|w| w[1] == w[0] + 1);
            Some(match e {
                JobError::Reject { message, .. } if !leads => JobError::Retry {
                    message,
                    after: None,
                },
                e => e,
            })
        }
        _ => None,
    };
    Outcome::settle(&job.rows, sent, delivered, error)
}

/// What went wrong in a parallel job: the first refusal (request index
/// and error), and the retryable failure that asks for the longest wait.
#[derive(Default)]
struct Failures {
    refusal: Option<(usize, JobError)>,
    retry: Option<(usize, JobError)>,
}

impl Failures {
    fn add(&mut self, i: usize, e: JobError) {
        let after = |e: &JobError| match e {
            JobError::Retry { after, .. } => *after,
            _ => None,
        };
        match e {
            JobError::Reject { .. } => {
                if self.refusal.as_ref().is_none_or(|(f, _)| i < *f) {
                    self.refusal = Some((i, e));
                }
            }
            e => {
                if self
                    .retry
                    .as_ref()
                    .is_none_or(|(_, r)| after(&e) > after(r))
                {
                    self.retry = Some((i, e));
                }
            }
        }
    }
}

/// Why a job ended before its last event.
enum Halt {
    /// The time slice is used up: report progress, the rest comes next.
    Pause,
    Stopped(JobError),
}
use Halt::{Pause, Stopped};

/// A job of one event per connection or request reports back after this
/// long, so that progress is recorded (and a crash resends little) even
/// when a receiver takes hundreds of milliseconds per event.
const JOB_SLICE: Duration = Duration::from_secs(1);

fn sliced(started: Instant) -> bool {
    started.elapsed() >= JOB_SLICE
}

fn http_client(
    slot: &mut Option<http::Client>,
    cfg: &ClientConfig,
) -> Result<http::Client, JobError> {
    match slot {
        Some(c) if c.config == *cfg => Ok(c.clone()),
        _ => {
            let c = http::Client::new(cfg.clone()).map_err(|message| JobError::Retry {
                message,
                after: None,
            })?;
            *slot = Some(c.clone());
            Ok(c)
        }
    }
}

/// How a destination's requests are signed.
struct Signer<'a> {
    /// `pg_emit.signing_secret_file`'s key (0.1.0's scheme).
    key: &'a Option<Vec<u8>>,
    /// Standard Webhooks secrets.
    standard: &'a Option<Vec<Vec<u8>>>,
}

impl Signer<'_> {
    /// The id and signing of a request carrying events `first..=last` of
    /// `stream`: its `webhook-id` is made of them, so a retry has the same
    /// one. A message is signed only by the destination's own secret,
    /// never by the server's key (a sender cannot read either, and the key
    /// vouches that pg_emit wrote the body).
    /// The request's id (see [`batch_id`]) and how it is signed.
    fn sign(&self, kind: Kind, stream: &str, ids: &[i64]) -> (String, Signing) {
        let id = batch_id(kind, stream, ids);
        let signing = match (self.standard, self.key) {
            (Some(secrets), _) => Signing::Standard {
                id: id.clone(),
                secrets: secrets.clone(),
            },
            (None, Some(key)) if !kind.message => Signing::Emit(key.clone()),
            (None, _) => Signing::None,
        };
        (id, signing)
    }
}

/// The id of a request carrying events `ids` (in order): the event's id,
/// or `…_<first>-<last>` for a batch of consecutive ids. A batch of one
/// lane skips ids (see [`units`]), and the lanes may differ in a later
/// job: its id then also names exactly its events (`…~<hash>` of them),
/// so that a receiver that drops a repeated id never drops a request
/// holding an event it has not seen.
fn batch_id(kind: Kind, stream: &str, ids: &[i64]) -> String {
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    let id = event_id(kind, stream, first, last);
    if ids.windows(2).all(|w| w[1] == w[0] + 1) {
        return id;
    }
    // FNV-1a over the ids: stable across releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ids.iter().flat_map(|i| i.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{id}~{:016x}", h)
}

/// What one request carries.
enum Body<'a> {
    /// One event in its format.
    One(Format, &'a [u8]),
    /// A JSON array of events in one format.
    Batch(Format, &'a [u8]),
}

impl<'a> Body<'a> {
    fn one(format: Format, event: &'a [u8]) -> Self {
        Body::One(format, event)
    }
}

/// Groups events into requests (each the indexes of its events, in
/// order): up to `batch` events each, one kind per request (a destination
/// can get several formats when triggers choose their own, and messages
/// are never signed as events), a CloudEvents binary-mode event always
/// alone. Events without a key (barriers) share a request only with the
/// keyless events right next to them.
///
/// Keyed events go to `lanes` lanes by key, and a request holds events of
/// one lane: requests of different lanes share no key and go in parallel,
/// while a lane's requests go one after the other, each carrying its keys'
/// events in commit order. Consecutive events would make every request
/// share keys with the next when a few rows are updated over and over
/// (hot keys), and a destination would have two requests in flight.
fn units<E>(
    events: &[E],
    keys: &[Option<i64>],
    batch: usize,
    lanes: usize,
    kind: impl Fn(&E) -> Kind,
) -> Vec<Vec<usize>> {
    let (batch, lanes) = (batch.max(1), lanes.max(1));
    let mut out: Vec<Vec<usize>> = Vec::new();
    // Each lane's request still taking events, and the barriers' one.
    let mut open: Vec<Option<usize>> = vec![None; lanes];
    let mut barrier: Option<usize> = None;
    let joins = |u: &Vec<usize>, k: Kind| {
        u.len() < batch && k.format != Format::CloudEventsBinary && kind(&events[u[0]]) == k
    };
    for (i, e) in events.iter().enumerate() {
        let k = kind(e);
        let Some(key) = keys[i] else {
            open.fill(None);
            match barrier {
                Some(u) if joins(&out[u], k) => out[u].push(i),
                _ => {
                    out.push(vec![i]);
                    barrier = (k.format != Format::CloudEventsBinary).then_some(out.len() - 1);
                }
            }
            continue;
        };
        barrier = None;
        let lane = (key as u64 % lanes as u64) as usize;
        match open[lane] {
            Some(u) if joins(&out[u], k) => out[u].push(i),
            _ => {
                out.push(vec![i]);
                open[lane] = (k.format != Format::CloudEventsBinary).then_some(out.len() - 1);
            }
        }
    }
    out
}

fn post(
    client: &http::Client,
    url: &str,
    headers: &[(String, String)],
    (id, signing): (String, Signing),
    body: Body<'_>,
    log: &ResponseLog,
    (first, last): (i64, i64),
) -> Result<(), JobError> {
    let (content_type, headers, body) = match body {
        Body::One(Format::CloudEventsBinary, event) => {
            let b = crate::cloudevents::to_binary(headers, event).map_err(|message| {
                JobError::Reject {
                    status: 0,
                    message: message.clone(),
                    excerpt: message,
                    events: 1,
                }
            })?;
            (b.content_type, b.headers, b.body)
        }
        Body::One(f, event) => (
            crate::cloudevents::content_type(f, false).into(),
            headers.to_vec(),
            event.to_vec(),
        ),
        Body::Batch(f, events) => (
            crate::cloudevents::content_type(f, true).into(),
            headers.to_vec(),
            events.to_vec(),
        ),
    };
    let req = Request {
        method: "POST".into(),
        url: url.to_string(),
        content_type,
        headers,
        body,
        id: Some(id),
        signing,
    };
    let started = Instant::now();
    let result = http::request(client, &req);
    if log.level != LogLevel::Off {
        let (status, excerpt, error) = match &result {
            Ok(r) => (Some(r.status), r.excerpt.clone(), None),
            Err(e) => (None, String::new(), Some(e.to_string())),
        };
        log.record(Logged {
            first,
            last,
            status,
            ms: started.elapsed().as_secs_f64() * 1000.0,
            excerpt,
            error,
        });
    }
    match result {
        Ok(r) if r.success() => Ok(()),
        Ok(r) if r.retryable() => Err(JobError::Retry {
            message: r.describe(url),
            after: r.retry_after,
        }),
        Ok(r) => Err(JobError::Reject {
            status: r.status,
            message: r.describe(url),
            excerpt: r.excerpt,
            events: 1,
        }),
        Err(HttpError::NotAllowed(m)) => Err(JobError::NotAllowed(m)),
        Err(e) => Err(JobError::Retry {
            message: e.to_string(),
            after: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Uninterruptible;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    fn job(port: u16, framing: Framing, rows: Vec<Row>) -> Job {
        Job {
            dest: Resolved::Ready(
                Destination::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                    framing,
                },
                HttpSetup {
                    client: Err("TCP".into()),
                    standard: None,
                },
            ),
            rows,
            flow: Flow::SERIAL,
            stream: "s".into(),
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                write: Duration::from_secs(2),
                stall: true,
            },
            allow: Allowlist::default(),
            log: ResponseLog::default(),
        }
    }

    /// An HTTP destination on loopback, unsigned, 2 s timeouts.
    fn http_dest(port: u16) -> Resolved {
        Resolved::Ready(
            Destination::Http {
                url: format!("http://127.0.0.1:{port}/"),
                headers: Vec::new(),
            },
            HttpSetup {
                client: Ok((
                    ClientConfig {
                        connect_timeout: Duration::from_secs(2),
                        request_timeout: Duration::from_secs(2),
                        trust: crate::transport::http::Trust::System,
                        allow: Allowlist::default(),
                        tls: Default::default(),
                    },
                    None,
                )),
                standard: None,
            },
        )
    }

    fn row(id: i64, first: i64, sent: u32, payload: &str) -> Row {
        Row {
            id,
            first_event_id: first,
            sent,
            payload: payload.into(),
            kind: Kind::default(),
            keys: None,
            record_keys: None,
            acked: Vec::new(),
        }
    }

    #[test]
    fn requests_hold_one_format_and_binary_events_alone() {
        use Format::*;
        let fs = [
            Json,
            Json,
            Json,
            Supabase,
            CloudEventsBinary,
            CloudEventsBinary,
            Json,
        ];
        let one_lane = [Some(1); 7];
        assert_eq!(
            units(&fs, &one_lane, 2, 1, |f| Kind::event(*f)),
            [vec![0, 1], vec![2], vec![3], vec![4], vec![5], vec![6]]
        );
        assert_eq!(
            units(&fs[..3], &one_lane, 1, 1, |f| Kind::event(*f)),
            [vec![0], vec![1], vec![2]]
        );
        assert!(units(&[] as &[Format], &[], 5, 4, |f| Kind::event(*f)).is_empty());
        let mixed = [Kind::event(Json), Kind::message(Json), Kind::message(Json)];
        assert_eq!(
            units(&mixed, &one_lane, 5, 1, |k| *k),
            [vec![0], vec![1, 2]]
        );
    }

    /// 0.2.0 batched consecutive events: with a hundred rows updated over
    /// and over, each batch shared keys with the next, and a destination
    /// had two requests in flight (3,595 events/s at batch 50).
    #[test]
    fn hot_keys_batch_by_lane_and_barriers_by_themselves() {
        let fs = [Format::Json; 10];
        // Keys 1, 2, 1, 2, 1, 2, two barriers, 1, 2.
        let (a, b) = (Some(1), Some(2));
        let keys = [a, b, a, b, a, b, None, None, a, b];
        assert_eq!(
            units(&fs, &keys, 2, 2, |f| Kind::event(*f)),
            [
                vec![0, 2],
                vec![1, 3],
                vec![4],
                vec![5],
                vec![6, 7],
                vec![8],
                vec![9]
            ]
        );
        // One lane: consecutive events, as strict order needs.
        assert_eq!(
            units(&fs, &keys, 3, 1, |f| Kind::event(*f)),
            [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7], vec![8, 9]]
        );
    }

    #[test]
    fn messages_are_never_signed_with_the_servers_key() {
        let (key, none) = (Some(b"k".to_vec()), None);
        let s = Signer {
            key: &key,
            standard: &none,
        };
        let (id, signing) = s.sign(Kind::event(Format::Json), "s", &[1]);
        assert!(id == "evt_s_1" && matches!(signing, Signing::Emit(_)));
        let (id, signing) = s.sign(Kind::message(Format::Json), "s", &[1]);
        assert!(id == "message_s_1" && matches!(signing, Signing::None));
        // The destination's own secret signs both, under ids that differ.
        let standard = Some(vec![b"secret".to_vec()]);
        let s = Signer {
            key: &key,
            standard: &standard,
        };
        let (id, signing) = s.sign(Kind::message(Format::Json), "s", &[1, 2]);
        assert!(id == "message_s_1-2" && matches!(signing, Signing::Standard { .. }));
    }

    #[test]
    fn id_becomes_the_first_key() {
        let mut b = Vec::new();
        with_id(
            &mut b,
            Kind::event(Format::Json),
            "s",
            7,
            r#"{"op":"INSERT"}"#,
        );
        assert_eq!(b, br#"{"id":7,"stream":"s","op":"INSERT"}"#);
        b.clear();
        with_id(&mut b, Kind::event(Format::Json), "s", 8, "{}");
        assert_eq!(b, br#"{"id":8,"stream":"s"}"#);
    }

    #[test]
    fn ndjson_job_numbers_events_and_skips_sent_ones() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let rows = vec![
            row(1, 10, 1, "{\"a\":1}\n{\"a\":2}"),
            row(2, 12, 0, "{\"a\":3}"),
        ];
        let mut conn = Conn::default();
        let out = send_job(
            &mut conn,
            &job(port, Framing::Ndjson, rows),
            &Uninterruptible,
        );
        assert!(out.error.is_none());
        assert_eq!(out.sent, vec![2, 1]);
        let r = BufReader::new(l.accept().unwrap().0);
        drop(conn);
        let lines: Vec<String> = r.lines().map(Result::unwrap).collect();
        assert_eq!(
            lines,
            [
                r#"{"id":11,"stream":"s","a":2}"#,
                r#"{"id":12,"stream":"s","a":3}"#
            ]
        );
    }

    /// A stored destination altered to another address: the kept
    /// connection to the old one is not written to again (0.2.0 sent the
    /// next events to the old address for as long as it stayed open).
    #[test]
    fn a_kept_connection_serves_only_its_address() {
        let (old, new) = (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let (old_port, new_port) = (
            old.local_addr().unwrap().port(),
            new.local_addr().unwrap().port(),
        );
        let mut conn = Conn::default();
        let first = job(old_port, Framing::Ndjson, vec![row(1, 1, 0, "{\"a\":1}")]);
        assert!(send_job(&mut conn, &first, &Uninterruptible)
            .error
            .is_none());
        let second = job(new_port, Framing::Ndjson, vec![row(2, 2, 0, "{\"a\":2}")]);
        assert!(send_job(&mut conn, &second, &Uninterruptible)
            .error
            .is_none());
        drop(conn);
        let read = |l: TcpListener| {
            let mut s = String::new();
            l.accept().unwrap().0.read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read(old), "{\"id\":1,\"stream\":\"s\",\"a\":1}\n");
        assert_eq!(read(new), "{\"id\":2,\"stream\":\"s\",\"a\":2}\n");
    }

    /// A receiver that reads 16 kB every 20 ms (~800 kB/s); after
    /// `pause_after` bytes it stops reading for 800 ms (long enough for the
    /// sender to give up), then reads whatever reached it to the end.
    fn slow_reader(l: TcpListener, pause_after: usize) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut chunk = vec![0; 16 << 10];
            while got.len() < pause_after {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(800));
            let _ = s.read_to_end(&mut got);
            got
        })
    }

    /// The ids of the whole lines in `got` (`{"id":N,...}\n`); a line cut
    /// off by a closed connection does not count.
    fn ids(got: &[u8]) -> Vec<i64> {
        got.split_inclusive(|&b| b == b'\n')
            .filter(|l| l.ends_with(b"\n"))
            .map(|l| {
                let s = std::str::from_utf8(l).unwrap();
                s[6..s.find(',').unwrap()].parse().unwrap()
            })
            .collect()
    }

    fn big_row(events: usize) -> Row {
        let line = format!("{{\"v\":\"{}\"}}", "x".repeat(1000));
        row(1, 1, 0, &vec![line; events].join("\n"))
    }

    #[test]
    fn a_slow_but_reading_receiver_gets_a_big_row_within_a_short_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reader = slow_reader(l, usize::MAX);
        let mut j = job(port, Framing::Ndjson, vec![big_row(1500)]);
        // 1.5 MB takes about two seconds; the timeout is 300 ms of no
        // progress, not of the whole row.
        j.timeouts.write = Duration::from_millis(300);
        let mut conn = Conn::default();
        let out = send_job(&mut conn, &j, &Uninterruptible);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.sent, vec![1500]);
        drop(conn);
        let got = reader.join().unwrap();
        assert_eq!(got.iter().filter(|&&b| b == b'\n').count(), 1500);
    }

    #[test]
    fn a_stalled_write_keeps_the_lines_that_got_through() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reader = slow_reader(l, 300 << 10);
        // More than loopback's socket buffers can absorb.
        let mut j = job(port, Framing::Ndjson, vec![big_row(20_000)]);
        j.timeouts.write = Duration::from_millis(300);
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(matches!(out.error, Some(JobError::Retry { .. })));
        // What the reader's host acknowledged: a retry resumes there.
        let sent = out.sent[0];
        assert!(sent > 200 && sent < 20_000, "{sent}");
        let first = ids(&reader.join().unwrap());
        // A retry starts after them.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut rest = big_row(20_000);
        rest.sent = sent;
        let mut j = job(l.local_addr().unwrap().port(), Framing::Ndjson, vec![rest]);
        j.timeouts.write = Duration::from_secs(5);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            l.accept().unwrap().0.read_to_end(&mut got).unwrap();
            got
        });
        let mut conn = Conn::default();
        let out = send_job(&mut conn, &j, &Uninterruptible);
        assert_eq!(out.sent, vec![20_000]);
        drop(conn);
        let second = ids(&reader.join().unwrap());
        assert_eq!(second.first(), Some(&(1 + i64::from(sent))));
        assert_eq!(second.len(), 20_000 - sent as usize);
        // Nothing counted as sent was missing from what the first receiver
        // got: together they have every event.
        let mut all: Vec<i64> = first.into_iter().chain(second).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (1..=20_000).collect::<Vec<_>>());
    }

    #[test]
    fn close_framing_sends_one_connection_per_event() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reader = std::thread::spawn(move || {
            (0..2)
                .map(|_| {
                    let mut got = String::new();
                    l.accept().unwrap().0.read_to_string(&mut got).unwrap();
                    got
                })
                .collect::<Vec<_>>()
        });
        let rows = vec![row(1, 5, 0, "{\"a\":1}\n{\"a\":2}")];
        let out = send_job(
            &mut Conn::default(),
            &job(port, Framing::Close, rows),
            &Uninterruptible,
        );
        assert!(out.error.is_none());
        assert_eq!(out.sent, vec![2]);
        assert_eq!(
            reader.join().unwrap(),
            [
                r#"{"id":5,"stream":"s","a":1}"#,
                r#"{"id":6,"stream":"s","a":2}"#
            ]
        );
    }

    #[test]
    fn slow_one_at_a_time_deliveries_report_progress_every_second() {
        // An HTTP receiver that takes 300 ms per request.
        let (port, _) = slow_http(Duration::from_millis(300));
        let mut j = job(
            port,
            Framing::Close,
            vec![row(1, 1, 0, &vec!["{}"; 20].join("\n"))],
        );
        j.dest = http_dest(port);
        let t = Instant::now();
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(out.error.is_none(), "{:?}", out.error);
        // About a second's worth, then back to the worker.
        assert!(out.sent[0] >= 2 && out.sent[0] <= 5, "{:?}", out.sent);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    /// An HTTP/1.1 receiver that takes `delay` per request on every
    /// connection, recording request bodies as they arrive.
    fn slow_http(delay: Duration) -> (u16, std::sync::Arc<Mutex<Vec<String>>>) {
        http_server(delay, |_| "200 OK")
    }

    /// A receiver that answers each body with the status `status` gives
    /// it, after `delay`; it keeps every body it got.
    fn http_server(
        delay: Duration,
        status: fn(&str) -> &'static str,
    ) -> (u16, std::sync::Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let s = s.unwrap();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    loop {
                        let mut len = 0;
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        let body = String::from_utf8(body).unwrap();
                        let status = status(&body);
                        seen.lock().unwrap().push(body);
                        std::thread::sleep(delay);
                        let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                        let _ = (&s).write_all(reply.as_bytes());
                    }
                });
            }
        });
        (port, got)
    }

    #[test]
    fn parallel_http_keeps_each_keys_order() {
        let (port, got) = slow_http(Duration::from_millis(50));
        let n = 64;
        let payload: Vec<String> = (0..n).map(|i| format!("{{\"k\":{}}}", i % 8)).collect();
        let mut r = row(1, 1, 0, &payload.join("\n"));
        // Eight keys, and one barrier in the middle.
        r.keys = Some(
            (0..n)
                .map(|i| (i != 32).then_some((i % 8) as i64))
                .collect(),
        );
        let mut j = job(port, Framing::Close, vec![r]);
        j.flow = Flow {
            concurrency: 16,
            ..Flow::HTTP
        };
        j.dest = http_dest(port);
        let t = Instant::now();
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.sent, vec![n as u32]);
        // 64 events at 50 ms: one at a time would take 3.2 s; eight keys
        // in parallel take about 8 rounds on each side of the barrier.
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        let got = got.lock().unwrap().clone();
        let ids: Vec<i64> = got
            .iter()
            .map(|b| b[6..b.find(',').unwrap()].parse().unwrap())
            .collect();
        assert_eq!(ids.len(), n);
        for k in 0..8 {
            let seq: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| (id - 1) % 8 == k && *id != 33)
                .collect();
            assert!(seq.windows(2).all(|w| w[0] < w[1]), "key {k}: {seq:?}");
        }
        let barrier = ids.iter().position(|&id| id == 33).unwrap();
        assert!(ids[..barrier].iter().all(|&id| id < 33));
        assert!(ids[barrier + 1..].iter().all(|&id| id > 33));
    }

    #[test]
    fn a_failed_event_holds_back_its_key_only_and_successes_are_never_resent() {
        static FAIL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
        let (port, got) = http_server(Duration::ZERO, |b| {
            match b.contains("\"fail\"") && FAIL.load(std::sync::atomic::Ordering::SeqCst) {
                true => "500 Oops",
                false => "200 OK",
            }
        });
        // Keys 1 (fails), 2, 1 (must wait for the failed one), 3.
        let mut r = row(1, 1, 0, "{\"fail\":1}\n{\"b\":2}\n{\"c\":3}\n{\"d\":4}");
        r.keys = Some(vec![Some(1), Some(2), Some(1), Some(3)]);
        let mut j = job(port, Framing::Close, vec![r]);
        j.flow = Flow {
            concurrency: 4,
            ..Flow::HTTP
        };
        j.dest = http_dest(port);
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(
            matches!(out.error, Some(JobError::Retry { .. })),
            "{:?}",
            out.error
        );
        assert_eq!(
            (out.sent.clone(), out.acked.clone()),
            (vec![0], vec![vec![1, 3]])
        );
        let ids = |got: &Mutex<Vec<String>>| -> Vec<i64> {
            let mut v: Vec<i64> = got
                .lock()
                .unwrap()
                .drain(..)
                .map(|b| b[6..b.find(',').unwrap()].parse().unwrap())
                .collect();
            v.sort();
            v
        };
        // Event 3 (key 1) was not sent behind the failed event 1.
        assert_eq!(ids(&got), vec![1, 2, 4]);
        // The retry sends only what was not delivered, in key order.
        FAIL.store(false, std::sync::atomic::Ordering::SeqCst);
        j.rows[0].sent = out.sent[0];
        j.rows[0].acked = out.acked[0].clone();
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!((out.sent, out.acked), (vec![4], vec![vec![]]));
        assert_eq!(ids(&got), vec![1, 3]);
    }

    /// Strict order with batches: a failed request holds back everything
    /// after it, whatever the rows' keys.
    #[test]
    fn strict_order_stops_at_a_failed_batch() {
        let (port, got) = http_server(Duration::ZERO, |b| match b.contains("\"a\":1") {
            true => "500 Oops",
            false => "200 OK",
        });
        let mut r = row(1, 1, 0, "{\"a\":1}\n{\"a\":2}\n{\"b\":3}\n{\"b\":4}");
        r.keys = Some(vec![Some(1), Some(1), Some(2), Some(2)]);
        let mut j = job(port, Framing::Close, vec![r]);
        j.flow = Flow {
            batch: 2,
            order: Order::Destination,
            ..Flow::HTTP
        };
        j.dest = http_dest(port);
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(out.error.is_some());
        assert_eq!((out.sent, out.acked), (vec![0], vec![vec![]]));
        assert_eq!(got.lock().unwrap().len(), 1);
    }

    /// A refused batch of one lane skips events of another: its refusal
    /// is not dead-lettered as the job's first events (those are others),
    /// and its id names exactly its events.
    #[test]
    fn a_refused_lane_batch_is_retried_and_its_id_names_its_events() {
        let (port, got) = http_server(Duration::ZERO, |b| match b.contains("\"k\":1") {
            true => "400 No",
            false => "500 Oops",
        });
        let mut r = row(1, 1, 0, "{\"k\":1}\n{\"k\":2}\n{\"k\":1}\n{\"k\":2}");
        r.keys = Some(vec![Some(2), Some(3), Some(2), Some(3)]);
        let mut j = job(port, Framing::Close, vec![r]);
        j.flow = Flow {
            batch: 2,
            concurrency: 4,
            ..Flow::HTTP
        };
        j.dest = http_dest(port);
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        // Two lanes: [1, 3] refused, [2, 4] failing: retried, nothing
        // dead-lettered as events 1 and 2.
        assert!(
            matches!(out.error, Some(JobError::Retry { .. })),
            "{:?}",
            out.error
        );
        assert_eq!(got.lock().unwrap().len(), 2);
        let id = batch_id(Kind::event(Format::Json), "s", &[1, 3]);
        assert!(
            id.starts_with("evt_s_1-3~")
                && id != batch_id(Kind::event(Format::Json), "s", &[1, 2, 3])
        );
        assert_eq!(
            batch_id(Kind::event(Format::Json), "s", &[1, 2, 3]),
            "evt_s_1-3"
        );
    }

    #[test]
    fn the_response_log_keeps_what_its_level_says() {
        let (port, _) = slow_http(Duration::ZERO);
        let payload: Vec<String> = (0..4).map(|i| format!("{{\"n\":{i}}}")).collect();
        let mut j = job(
            port,
            Framing::Close,
            vec![row(1, 1, 0, &payload.join("\n"))],
        );
        j.dest = http_dest(port);
        (j.flow.concurrency, j.flow.batch) = (2, 2);
        for (level, n) in [
            (LogLevel::Off, 0),
            (LogLevel::Errors, 0),
            (LogLevel::All, 2),
        ] {
            j.log = ResponseLog::new(level);
            let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
            assert!(out.error.is_none(), "{:?}", out.error);
            let mut got = j.log.take();
            assert_eq!(got.len(), n, "{level:?}");
            got.sort_by_key(|l| l.first);
            if n > 0 {
                assert_eq!(
                    (got[0].first, got[0].last, got[0].status),
                    (1, 2, Some(200))
                );
                assert_eq!((got[1].first, got[1].last), (3, 4));
                assert!(got[0].ms >= 0.0 && got[0].error.is_none());
            }
        }
        // No response at all is a failure the log keeps, with why.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        j.dest = http_dest(closed);
        j.log = ResponseLog::new(LogLevel::Errors);
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(out.error.is_some());
        let got = j.log.take();
        assert!(!got.is_empty() && got[0].status.is_none(), "{got:?}");
        assert!(
            got[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("refused")),
            "{got:?}"
        );
    }

    #[test]
    fn batches_are_json_arrays_of_whole_events() {
        let (port, got) = slow_http(Duration::from_millis(20));
        let payload: Vec<String> = (0..25).map(|i| format!("{{\"n\":{i}}}")).collect();
        let mut r = row(1, 1, 0, &payload.join("\n"));
        r.keys = Some((0..25).map(|i| Some(i % 3)).collect());
        let mut j = job(port, Framing::Close, vec![r]);
        (j.flow.concurrency, j.flow.batch) = (4, 10);
        j.dest = http_dest(port);
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.sent, vec![25]);
        let bodies = got.lock().unwrap().clone();
        // Batches share keys 0..3, so they go one after the other.
        assert_eq!(bodies.len(), 3);
        let mut ids = Vec::new();
        for b in &bodies {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            ids.extend(
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["id"].as_i64().unwrap()),
            );
        }
        assert_eq!(ids, (1..=25).collect::<Vec<_>>());
    }

    #[test]
    fn max_rate_spaces_requests() {
        let (port, got) = slow_http(Duration::ZERO);
        let payload = vec!["{}"; 21].join("\n");
        let mut j = job(port, Framing::Close, vec![row(1, 1, 0, &payload)]);
        j.flow = Flow {
            concurrency: 8,
            max_rate: Some(50.0),
            ..Flow::HTTP
        };
        j.dest = http_dest(port);
        let t = Instant::now();
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert_eq!(out.sent, vec![21]);
        // 21 events at 50/s: the last starts 400 ms after the first.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(390), "{took:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
        assert_eq!(got.lock().unwrap().len(), 21);
    }

    #[test]
    fn allowlist_is_checked_at_delivery() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut j = job(
            l.local_addr().unwrap().port(),
            Framing::Ndjson,
            vec![row(1, 1, 0, "{}")],
        );
        j.allow = Allowlist::parse("10.0.0.0/8").unwrap();
        let out = send_job(&mut Conn::default(), &j, &Uninterruptible);
        assert_eq!(out.sent, vec![0]);
        assert!(matches!(out.error, Some(JobError::NotAllowed(_))));
    }

    #[test]
    fn failure_keeps_progress_and_reports_the_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let rows = vec![row(1, 5, 1, "{\"a\":1}\n{\"a\":2}"), row(2, 7, 0, "{}")];
        let out = send_job(
            &mut Conn::default(),
            &job(port, Framing::Close, rows),
            &Uninterruptible,
        );
        assert_eq!(out.sent, vec![1, 0]);
        assert!(
            matches!(out.error, Some(JobError::Retry { ref message, .. }) if message.contains("refused"))
        );
    }
}
