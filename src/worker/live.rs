//! The worker's side of live channels. Every worker stores the channel
//! events of its database (in the claim transaction: the outbox rows go,
//! the channel rows come, exactly once) and deletes those past
//! `pg_emit.channel_retention`. The worker of `pg_emit.listen_database`
//! also runs the listener ([`pg_emit_core::live`]): it publishes what it
//! stored right after each commit, and answers the listener's requests
//! (token checks, replay pages) between claims, on this thread, the only
//! one that touches the database.

use super::dispatch::set_latch_from_any_thread;
use super::txn::transaction;
use crate::plans;
use crate::settings;
use pg_emit_core::live::hub::{Bounds, Event};
use pg_emit_core::live::{Listener, Opened, Refusal, Request, PAGE, PAGE_BYTES};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far a subscriber may fall behind (see [`pg_emit_core::live::hub`]).
const BOUNDS: Bounds = Bounds {
    events: 10_000,
    bytes: 16 << 20,
};
/// How often open subscriptions' tokens are checked (revoked, expired).
const TOKEN_CHECK: Duration = Duration::from_secs(1);
/// How often events past the retention are deleted.
const RETENTION_CHECK: Duration = Duration::from_secs(10);
/// How often a listener that could not bind tries again.
const BIND_RETRY: Duration = Duration::from_secs(10);
/// Replay pages read per turn of the main loop (see [`Live::serve`]).
const PAGES_PER_TURN: usize = 2;
/// Most payload bytes stored per channel and claim.
const STORE_BYTES: i64 = 8 << 20;

/// Events one claim stored, by channel, to publish after its commit.
pub(super) type Stored = Vec<(String, Vec<(i64, String)>)>;

pub(super) struct Live {
    database: String,
    listening: Option<(String, Listener)>,
    bind_failed: Option<(String, Instant)>,
    tokens_checked: Instant,
    retention_checked: Instant,
    /// Requests left for the next turn (see [`Live::serve`]).
    waiting: Vec<Request>,
    /// The listener's state as last written to `emit.worker` (`None`:
    /// not written yet; `Some(None)`: not listening).
    reported: Option<Option<[i64; 3]>>,
    reported_at: Instant,
}

impl Live {
    pub(super) fn new() -> Live {
        let database = transaction(c"pg_emit: starting", || {
            // SAFETY: a syscache lookup inside the transaction.
            let name = unsafe { pg_sys::get_database_name(pg_sys::MyDatabaseId) };
            let name = if name.is_null() {
                String::new()
            } else {
                // SAFETY: a palloc'd NUL-terminated name.
                unsafe { std::ffi::CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            };
            Ok::<_, String>(name)
        })
        .unwrap_or_default();
        let mut live = Live {
            database,
            listening: None,
            bind_failed: None,
            tokens_checked: Instant::now(),
            retention_checked: Instant::now() - RETENTION_CHECK,
            waiting: Vec::new(),
            reported: None,
            reported_at: Instant::now(),
        };
        live.configure();
        live
    }

    /// At start and after a reload: listen where `pg_emit.listen` says
    /// when this worker serves `pg_emit.listen_database`, else not.
    pub(super) fn configure(&mut self) {
        let wanted = settings::listen().filter(|_| settings::listen_database() == self.database);
        if self.listening.as_ref().map(|(a, _)| a) == wanted.as_ref() {
            return;
        }
        if let Some((addr, _)) = self.listening.take() {
            pgrx::log!("pg_emit worker: no longer listening on {addr}");
        }
        let Some(addr) = wanted else {
            self.bind_failed = None;
            return;
        };
        if let Some((failed, at)) = &self.bind_failed {
            if *failed == addr && at.elapsed() < BIND_RETRY {
                return;
            }
        }
        // SAFETY: MyLatch points at this process's latch for its life.
        let latch = unsafe { pg_sys::MyLatch } as usize;
        // SAFETY: see set_latch_from_any_thread.
        let wake =
            Box::new(move || unsafe { set_latch_from_any_thread(latch as *mut pg_sys::Latch) });
        // What PostgreSQL may open itself, and a margin.
        // SAFETY: reading a setting.
        let reserved = unsafe { pg_sys::max_files_per_process }.max(0) as usize + 64;
        match Listener::bind(&addr, BOUNDS, wake, reserved) {
            Ok(l) => {
                pgrx::log!(
                    "pg_emit worker: serving live channels of database {:?} on {}",
                    self.database,
                    l.addr()
                );
                self.bind_failed = None;
                self.listening = Some((addr, l));
            }
            Err(e) => {
                pgrx::warning!(
                    "pg_emit worker: cannot listen on {addr:?} (pg_emit.listen): {e}; \
                     trying again every {} s",
                    BIND_RETRY.as_secs()
                );
                self.bind_failed = Some((addr, Instant::now()));
            }
        }
    }

    /// How long the main loop may sleep before [`Live::housekeeping`] is due.
    pub(super) fn next_timeout(&self) -> Duration {
        if self.listening.is_some() {
            TOKEN_CHECK
        } else if self.bind_failed.is_some() {
            BIND_RETRY
        } else {
            RETENTION_CHECK
        }
    }

    /// Right after the transaction that stored them committed.
    pub(super) fn publish(&self, stored: Stored) {
        let Some((_, l)) = &self.listening else {
            return;
        };
        for (channel, events) in stored {
            let events: Vec<Arc<Event>> = events
                .iter()
                .map(|(id, payload)| Arc::new(Event::new(*id, payload)))
                .collect();
            l.hub().publish(&channel, &events);
        }
    }

    /// Answers what connection threads asked, in one transaction: every
    /// token check, and at most [`PAGES_PER_TURN`] replay pages, so that
    /// subscribers replaying a long history delay deliveries by a few
    /// pages' reading at a time (the main loop delivers between turns).
    pub(super) fn serve(&mut self) {
        let Some((_, l)) = &self.listening else {
            return;
        };
        self.waiting.extend(l.requests());
        let mut pages = 0;
        let (requests, later): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|r| match r {
                Request::Page { .. } => {
                    pages += 1;
                    pages <= PAGES_PER_TURN
                }
                Request::Open { .. } => true,
            });
        self.waiting = later;
        if !self.waiting.is_empty() {
            // SAFETY: setting our own latch: the next turn comes at once.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
        if requests.is_empty() {
            return;
        }
        let answered = transaction(c"pg_emit: serving live channels", || {
            Spi::connect_mut(|c| {
                requests
                    .into_iter()
                    .map(|r| answer(c, r))
                    .collect::<Result<Vec<_>, pgrx::spi::Error>>()
            })
        });
        let answered = match answered {
            Ok(a) => a,
            Err(e) => {
                // Dropping the requests' reply ends each with 503.
                pgrx::warning!("pg_emit worker: could not answer live subscribers: {e}");
                return;
            }
        };
        // Subscribed here, after the reading transaction and before the
        // next publish: events after `head` are exactly what comes next.
        for a in answered {
            match a {
                Answer::Open {
                    channel,
                    token,
                    head,
                    reply,
                } => {
                    let opened = match l.hub().subscribe(&channel, token) {
                        Ok(sub) => Opened::Subscribed { sub, head },
                        Err(e) => Opened::Refused(Refusal::Unavailable(e.to_string())),
                    };
                    if let Err(
                        std::sync::mpsc::TrySendError::Full(Opened::Subscribed { sub, .. })
                        | std::sync::mpsc::TrySendError::Disconnected(Opened::Subscribed {
                            sub, ..
                        }),
                    ) = reply.try_send(opened)
                    {
                        l.hub().unsubscribe(&sub);
                    }
                }
                Answer::Page {
                    channel,
                    events,
                    reply,
                } => {
                    l.hub().remember(&channel, &events);
                    let _ = reply.try_send(Ok(events));
                }
                Answer::Done => {}
            }
        }
    }

    /// Closes subscriptions whose token was revoked or has expired,
    /// deletes events past the retention, and writes the listener's state
    /// for `emit.metrics()`.
    pub(super) fn housekeeping(&mut self) {
        if self.listening.is_none() && self.bind_failed.is_some() {
            self.configure();
        }
        self.report();
        if let Some((_, l)) = &self.listening {
            if self.tokens_checked.elapsed() >= TOKEN_CHECK {
                self.tokens_checked = Instant::now();
                let open = l.hub().tokens();
                if !open.is_empty() {
                    let hashes: Vec<Vec<u8>> = open.iter().map(|h| h.to_vec()).collect();
                    let valid = transaction(c"pg_emit: checking subscriber tokens", || {
                        Spi::connect_mut(|c| {
                            plans::select(c, VALID_TOKENS_SQL, None, &[hashes.into()])?
                                .map(|r| r.get::<Vec<u8>>(1).map(Option::unwrap_or_default))
                                .collect::<Result<Vec<_>, _>>()
                        })
                    });
                    if let Ok(valid) = valid {
                        let gone: Vec<[u8; 32]> = open
                            .into_iter()
                            .filter(|h| !valid.iter().any(|v| v.as_slice() == h))
                            .collect();
                        l.hub().close_tokens(&gone);
                    }
                }
            }
        }
        if self.retention_checked.elapsed() >= RETENTION_CHECK {
            self.retention_checked = Instant::now();
            let keep = settings::CHANNEL_RETENTION.get();
            let deleted = transaction(c"pg_emit: deleting old channel events", || {
                Spi::connect_mut(|c| plans::update(c, RETENTION_SQL, &[keep.into()]).map(|_| ()))
            });
            if let Err(e) = deleted {
                pgrx::warning!("pg_emit worker: could not delete old channel events: {e}");
            }
        }
    }
}

impl Live {
    /// Writes the listener's connections, subscribers and drops into
    /// `emit.worker` when they changed (NULLs when not listening, which
    /// also clears what an earlier worker wrote).
    fn report(&mut self) {
        // At most once a second (the main loop may turn far more often).
        if self.reported.is_some() && self.reported_at.elapsed() < TOKEN_CHECK {
            return;
        }
        self.reported_at = Instant::now();
        let now = self.listening.as_ref().map(|(_, l)| {
            [
                l.connections() as i64,
                l.hub().subscribers() as i64,
                l.hub().dropped() as i64,
            ]
        });
        if self.reported == Some(now) {
            return;
        }
        let [c, s, d] = now.map_or([None; 3], |v| v.map(Some));
        let written = transaction(c"pg_emit: reporting the listener", || {
            Spi::connect_mut(|sc| {
                plans::update(
                    sc,
                    REPORT_SQL,
                    &[
                        c.map(|v| v as i32).into(),
                        s.map(|v| v as i32).into(),
                        d.into(),
                    ],
                )
                .map(|_| ())
            })
        });
        match written {
            Ok(()) => self.reported = Some(now),
            Err(e) => pgrx::warning!("pg_emit worker: could not report the listener: {e}"),
        }
    }
}

const REPORT_SQL: &str = "
UPDATE emit.worker SET live_connections = $1, live_subscribers = $2, live_dropped = $3";

enum Answer {
    Page {
        channel: String,
        events: Vec<Arc<Event>>,
        reply: std::sync::mpsc::SyncSender<Result<Vec<Arc<Event>>, String>>,
    },
    Open {
        channel: String,
        token: [u8; 32],
        head: i64,
        reply: std::sync::mpsc::SyncSender<Opened>,
    },
    Done,
}

fn answer(c: &mut pgrx::spi::SpiClient<'_>, r: Request) -> Result<Answer, pgrx::spi::Error> {
    match r {
        Request::Open {
            channel,
            token,
            reply,
        } => {
            let mut found = plans::select(c, TOKEN_SQL, None, &[token.to_vec().into()])?;
            let row = match found.next() {
                Some(r) => Some((
                    r.get::<Vec<String>>(1)?.unwrap_or_default(),
                    r.get::<bool>(2)?.unwrap_or(false),
                )),
                None => None,
            };
            let refused = match row {
                None => Some(Refusal::Unauthorized("unknown or revoked token")),
                Some((_, false)) => Some(Refusal::Unauthorized("token expired")),
                Some((channels, true)) if !channels.contains(&channel) => Some(Refusal::Forbidden(
                    format!("this token does not give channel {channel:?}"),
                )),
                Some(_) => None,
            };
            if let Some(r) = refused {
                let _ = reply.try_send(Opened::Refused(r));
                return Ok(Answer::Done);
            }
            let head = plans::select(c, HEAD_SQL, None, &[channel.as_str().into()])?
                .first()
                .get_one::<i64>()?
                .unwrap_or(0);
            Ok(Answer::Open {
                channel,
                token,
                head,
                reply,
            })
        }
        Request::Page {
            channel,
            after,
            upto,
            reply,
        } => {
            let rows = plans::select(
                c,
                PAGE_SQL,
                None,
                &[
                    channel.as_str().into(),
                    after.into(),
                    upto.into(),
                    PAGE.into(),
                    (PAGE_BYTES as i64).into(),
                ],
            )?
            .map(|r| {
                let id = r.get::<i64>(1)?.unwrap_or(0);
                let payload = r.get::<Vec<u8>>(2)?.unwrap_or_default();
                Ok(Arc::new(Event::new(id, &String::from_utf8_lossy(&payload))))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()?;
            Ok(Answer::Page {
                channel,
                events: rows,
                reply,
            })
        }
    }
}

const TOKEN_SQL: &str = "
SELECT t.channels, t.expires_at > pg_catalog.now() FROM emit.channel_tokens t WHERE t.hash = $1";
const VALID_TOKENS_SQL: &str = "
SELECT t.hash FROM emit.channel_tokens t
 WHERE t.hash = ANY($1) AND t.expires_at > pg_catalog.now()";
/// The last id stored, which is the last one published: this thread
/// publishes right after each commit, before it answers anything.
const HEAD_SQL: &str = "
SELECT pg_catalog.max(e.id) FROM emit.channel_events e WHERE e.channel = $1";
/// At most $4 events and, past the first, $5 bytes: sizes come from the
/// values' headers, so events past the page are never read.
const PAGE_SQL: &str = "
SELECT p.id, pg_catalog.convert_to(e.payload, 'UTF8')
  FROM (SELECT e.id, pg_catalog.sum(pg_catalog.octet_length(e.payload)) OVER (ORDER BY e.id)
                     - pg_catalog.octet_length(e.payload) AS before
          FROM emit.channel_events e
         WHERE e.channel = $1 AND e.id > $2 AND e.id <= $3
         ORDER BY e.id LIMIT $4) p
  JOIN emit.channel_events e ON e.channel = $1 AND e.id = p.id
 WHERE p.before < $5
 ORDER BY p.id";
/// Deletes the oldest channel events past the newest `$1` bytes; returns
/// the bytes kept.
const TRIM_SQL: &str = "
WITH sized AS (
    SELECT e.channel, e.id, pg_catalog.octet_length(e.payload) AS n,
           pg_catalog.sum(pg_catalog.octet_length(e.payload))
               OVER (ORDER BY e.created_at DESC, e.id DESC) AS newer
      FROM emit.channel_events e
), gone AS (
    DELETE FROM emit.channel_events e USING sized s
     WHERE s.newer > $1 AND e.channel = s.channel AND e.id = s.id
)
SELECT coalesce(pg_catalog.sum(s.n) FILTER (WHERE s.newer <= $1), 0)::pg_catalog.int8
  FROM sized s";
const RETENTION_SQL: &str = "
DELETE FROM emit.channel_events
 WHERE created_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1::pg_catalog.float8)";

/// In the claim transaction: moves the head of channel destination
/// `key`'s queue (whole outbox rows, up to [`STORE_BYTES`]) into
/// `emit.channel_events`, numbering its events after the channel's last
/// id, and counts them delivered. Returns them, in id order.
pub(super) fn store(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    channel: &str,
    origin: &str,
) -> Result<Vec<(i64, String)>, pgrx::spi::Error> {
    let mut ids = Vec::new();
    let (mut events, mut bytes, mut more) = (0i64, 0i64, false);
    for r in plans::select(c, CHANNEL_QUEUE_SQL, None, &[key.into()])? {
        let size = r.get::<i32>(3)?.unwrap_or(0) as i64;
        if !ids.is_empty() && bytes + size > STORE_BYTES {
            more = true;
            break;
        }
        bytes += size;
        ids.push(r.get::<i64>(1)?.unwrap_or(0));
        events += i64::from(r.get::<i32>(2)?.unwrap_or(0));
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // More than one claim's worth: come back at once rather than at the
    // next commit.
    if more || ids.len() == 1000 {
        // SAFETY: setting our own latch.
        unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
    }
    let first = plans::update(
        c,
        RESERVE_SQL,
        &[key.into(), events.into(), origin.into(), channel.into()],
    )?
    .first()
    .get_one::<i64>()?
    .unwrap_or(1);
    let mut stored = plans::update(c, MOVE_SQL, &[ids.into(), channel.into(), first.into()])?
        .map(|r| {
            let id = r.get::<i64>(1)?.unwrap_or(0);
            let payload = r.get::<Vec<u8>>(2)?.unwrap_or_default();
            Ok((id, String::from_utf8_lossy(&payload).into_owned()))
        })
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()?;
    stored.sort_unstable_by_key(|e| e.0);
    trim(c, bytes)?;
    Ok(stored)
}

thread_local! {
    /// Bytes of payload in `emit.channel_events` as last measured, plus
    /// what was stored since (`None`: not measured yet).
    static RETAINED: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

/// Holds the retained channel events to `pg_emit.max_outbox_size` as well
/// as to `pg_emit.channel_retention`: `added` bytes were just stored, and
/// once the estimate passes the limit the oldest events (of any channel)
/// are deleted until the rest fits. Events reach channels through the
/// outbox, whose limit they would otherwise leave behind; a subscriber
/// replaying from before what was trimmed gets what is still kept, as after
/// the retention time.
fn trim(c: &mut pgrx::spi::SpiClient<'_>, added: i64) -> Result<(), pgrx::spi::Error> {
    let limit = settings::max_outbox_bytes();
    let estimate = RETAINED.get().map(|r| r + added);
    if limit == 0 || estimate.is_some_and(|e| e <= limit) {
        RETAINED.set(estimate);
        return Ok(());
    }
    let kept = plans::update(c, TRIM_SQL, &[limit.into()])?
        .first()
        .get_one::<i64>()?;
    RETAINED.set(Some(kept.unwrap_or(0)));
    Ok(())
}

const CHANNEL_QUEUE_SQL: &str = "
SELECT id, events, pg_catalog.octet_length(payload)
  FROM emit.outbox
 WHERE destination = $1 AND tx_seq IS NOT NULL
 ORDER BY tx_seq, part
 LIMIT 1000";
/// Reserves `$2` ids after both the destination's counter and the
/// channel's last stored id (a copy of the database starts its counters
/// again, but keeps the events).
const RESERVE_SQL: &str = "
INSERT INTO emit.destinations AS d
       (destination, next_event_id, origin, delivered, last_delivered_at)
SELECT $1, t.n + $2, $3, $2, pg_catalog.now()
  FROM (SELECT coalesce(pg_catalog.max(e.id), 0) + 1 AS n
          FROM emit.channel_events e WHERE e.channel = $4) t
ON CONFLICT (destination) DO UPDATE
   SET next_event_id = GREATEST(d.next_event_id, excluded.next_event_id - $2) + $2,
       delivered = d.delivered + $2,
       last_delivered_at = pg_catalog.now()
RETURNING d.next_event_id - $2";
const MOVE_SQL: &str = "
WITH gone AS (
    DELETE FROM emit.outbox o WHERE o.id = ANY($1)
    RETURNING o.tx_seq, o.part, o.payload
), lines AS (
    SELECT l.line,
           pg_catalog.row_number() OVER (ORDER BY g.tx_seq, g.part, l.n) AS k
      FROM gone g,
           pg_catalog.string_to_table(g.payload, E'\\n') WITH ORDINALITY AS l(line, n)
)
INSERT INTO emit.channel_events (channel, id, payload)
SELECT $2, $3 + lines.k - 1, lines.line FROM lines
RETURNING id, pg_catalog.convert_to(payload, 'UTF8')";
