//! The queue's SQL: which destinations have work, claiming and numbering
//! rows in commit order, and recording what a job achieved (deletes,
//! progress, attempts, dead letters, counters). Runs inside the worker's
//! transactions as the extension's owner, every statement a kept plan.

use super::dispatch::WorkerSettings;
use crate::encoding::message_text;
use crate::event::Kind;
use crate::options::Framing;
use crate::plans;
use crate::security::Allowlist;
use crate::transport;
use crate::transport::http::ClientConfig;
use pg_emit_core::destination::{self, Destination, SignWith};
use pg_emit_core::job::{HttpSetup, Job, JobError, Outcome, Resolved, ResponseLog, Row};
use pg_emit_core::metrics::Latencies;
use pg_emit_core::schedule::Flow;
use pg_emit_core::sink::AnyBroker;

/// Most payload bytes claimed for one destination at a time (and at most
/// 1,000 rows, the LIMIT of [`QUEUE_SQL`]).
const CLAIM_BYTES: usize = 8 << 20;

/// Destinations with rows, by a loose index scan over (destination, id):
/// one index probe per destination however long the backlog is.
pub(super) const DESTINATIONS_SQL: &str = "
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
pub(super) fn claim(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    origin: &str,
    timeouts: transport::Timeouts,
    allow: &Allowlist,
    http: &Result<(ClientConfig, Option<Vec<u8>>), String>,
) -> Result<Option<Job>, pgrx::spi::Error> {
    let mut queued = Vec::new();
    for r in plans::select(c, QUEUE_SQL, None, &[key.into()])? {
        let first_event_id = r.get_by_name::<i64, _>("first_event_id")?;
        queued.push(Queued {
            size: r.get_by_name::<i32, _>("size")?.unwrap_or(0).max(0) as usize,
            tx_seq: r.get_by_name::<i64, _>("tx_seq")?,
            numbered: first_event_id.is_some(),
            earlier_stream: match r.get_by_name::<bool, _>("earlier_stream")? {
                Some(true) => r.get_by_name::<String, _>("stream")?,
                _ => None,
            },
            host: r.get_by_name::<String, _>("host")?.unwrap_or_default(),
            port: r.get_by_name::<i32, _>("port")?.unwrap_or(0) as u16,
            framing: r.get_by_name::<String, _>("framing")?,
            url: r.get_by_name::<String, _>("url")?,
            headers: r.get_by_name::<String, _>("headers")?,
            row: Row {
                id: r.get_by_name("id")?.unwrap_or(0),
                first_event_id: first_event_id.unwrap_or(0),
                sent: r.get_by_name::<i32, _>("sent")?.unwrap_or(0) as u32,
                // Read below, for the rows this job takes only.
                payload: String::new(),
                kind: Kind::default(),
                keys: None,
                record_keys: None,
                acked: r
                    .get_by_name::<Vec<i32>, _>("acked")?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|k| k as u32)
                    .collect(),
            },
        });
    }
    // Rows already numbered go first, in id order (those of an earlier
    // stream, from before a restore or a promotion, before them), wherever
    // they are in the commit order: a transaction that became visible
    // after later ones were numbered (a cancelled synchronous-replication
    // wait) sits before them in the queue. Otherwise the next rows in
    // commit order get the destination's next ids.
    let assign = !queued.iter().any(|q| q.numbered);
    let mut take = if assign {
        queued
    } else {
        let mut numbered: Vec<Queued> = queued.into_iter().filter(|q| q.numbered).collect();
        numbered.sort_by_key(|q| (q.earlier_stream.is_none(), q.row.first_event_id));
        let stream = numbered[0].earlier_stream.clone();
        numbered.retain(|q| q.earlier_stream == stream);
        numbered
    };
    let mut bytes = 0;
    let n = take
        .iter()
        .take_while(|q| {
            let fits = bytes == 0 || bytes + q.size <= CLAIM_BYTES;
            bytes += q.size;
            fits
        })
        .count();
    take.truncate(n);
    let Some(head) = take.first() else {
        return Ok(None);
    };
    let (dest, flow) = resolve(c, key, http, head)?;
    let earlier_stream = head.earlier_stream.clone();
    let last_tx_seq = take.last().and_then(|q| q.tx_seq);
    let mut rows: Vec<Row> = take.into_iter().map(|q| q.row).collect();
    read_payloads(c, &mut rows)?;
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
            .map(|r| {
                Ok((
                    r.get_by_name::<i64, _>("id")?.unwrap_or(0),
                    r.get_by_name::<i32, _>("events")?.unwrap_or(0),
                ))
            })
            .collect::<Result<_, pgrx::spi::Error>>()?
        }
        _ => Vec::new(),
    };
    let stream = match earlier_stream {
        Some(earlier) => earlier,
        None => number_events(c, key, origin, &mut rows, &rest, assign)?,
    };
    Ok(Some(Job {
        log: ResponseLog::new(crate::settings::response_log()),
        dest,
        rows,
        flow,
        stream,
        timeouts,
        allow: allow.clone(),
    }))
}

/// A row of [`QUEUE_SQL`], before the claim decides to take it.
struct Queued {
    row: Row,
    size: usize,
    tx_seq: Option<i64>,
    numbered: bool,
    /// The stream it was numbered in, when not the destination's current
    /// one.
    earlier_stream: Option<String>,
    host: String,
    port: u16,
    framing: Option<String>,
    url: Option<String>,
    headers: Option<String>,
}

/// Where the job of the destination `key` goes, from its first row (or
/// the stored destination it names), and how its events flow.
fn resolve(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    http: &Result<(ClientConfig, Option<Vec<u8>>), String>,
    q: &Queued,
) -> Result<(Resolved, Flow), pgrx::spi::Error> {
    let plain = |endpoint| {
        let setup = HttpSetup {
            client: http.clone(),
            standard: None,
        };
        Resolved::Ready(endpoint, setup)
    };
    Ok(match q.framing.as_deref() {
        Some("stored") => stored_dest(c, key, http)?,
        Some("http") => {
            let endpoint = Destination::Http {
                url: q.url.clone().unwrap_or_default(),
                headers: q
                    .headers
                    .as_deref()
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| pg_emit_core::http_target::parse_header(l).ok())
                    .collect(),
            };
            (plain(endpoint), Flow::HTTP)
        }
        // A broker's outbox rows keep its scheme and URL.
        Some(scheme) if AnyBroker::is_scheme(scheme) => {
            match destination::parse_url(q.url.as_deref().unwrap_or_default(), Vec::new()) {
                // Queued before {schema} and {table} meant anything.
                Ok(Destination::Routed { .. }) => (
                    Resolved::Unavailable(
                        "its URL names {schema} or {table}, which now route by table; \
                         events queued without a table cannot be sent"
                            .into(),
                    ),
                    Flow::SERIAL,
                ),
                Ok(endpoint) => (plain(endpoint), Flow::SERIAL),
                Err(e) => (Resolved::Unavailable(e.to_string()), Flow::SERIAL),
            }
        }
        framing => {
            let framing = match framing {
                Some("ndjson") => Framing::Ndjson,
                _ => Framing::Close,
            };
            let endpoint = Destination::Tcp {
                host: q.host.clone(),
                port: q.port,
                framing,
            };
            (plain(endpoint), Flow::SERIAL)
        }
    })
}

/// A stored destination as it is now: queued events follow a changed URL
/// or new credentials. One that was dropped (or no longer parses) fails
/// its jobs with a message that says so; they are retried like any
/// failure, so re-creating it lets them through.
fn stored_dest(
    c: &mut pgrx::spi::SpiClient<'_>,
    name: &str,
    http: &Result<(ClientConfig, Option<Vec<u8>>), String>,
) -> Result<(Resolved, Flow), pgrx::spi::Error> {
    // `name@schema.table`: a stored destination that routes by table,
    // filled in again from its stored URL (see pg_emit_core::route).
    let (name, route) = pg_emit_core::route::split(name);
    let mut found = plans::select(c, STORED_SQL, None, &[name.into()])?;
    let row = match found.next() {
        Some(r) => (
            r.get_by_name::<String, _>("url")?,
            r.get_by_name::<String, _>("options")?,
        ),
        None => (None, None),
    };
    let unavailable = |why: String| (Resolved::Unavailable(why), Flow::SERIAL);
    let (Some(url), Some(options)) = row else {
        return Ok(unavailable(format!(
            "stored destination {name:?} does not exist (dropped?); \
             create it again and its events are delivered"
        )));
    };
    let url = match &route {
        Some((schema, table)) if pg_emit_core::route::is_template(&url) => {
            pg_emit_core::route::fill(&url, schema, table)
        }
        _ => url,
    };
    let stored = match destination::parse_stored(&url, &options) {
        Ok(s) => s,
        Err(e) => return Ok(unavailable(format!("stored destination {name:?}: {e}"))),
    };
    // Its own CA and client certificate, if it has them.
    let http = http.clone().map(|(mut c, key)| {
        c.tls = stored.tls.clone();
        (c, key)
    });
    let (client, standard) = match stored.signing {
        SignWith::FileKey => (http, None),
        SignWith::Nothing => (http.map(|(c, _)| (c, None)), None),
        SignWith::Standard(secrets) => (http.map(|(c, _)| (c, None)), Some(secrets)),
    };
    if let Destination::Routed { .. } = stored.endpoint {
        return Ok(unavailable(format!(
            "stored destination {name:?} now routes by table; events queued before that \
             have no table to fill in (alter it back, or discard them)"
        )));
    }
    let flow = match stored.endpoint {
        Destination::Http { .. } => stored.flow,
        _ => Flow::SERIAL,
    };
    Ok((
        Resolved::Ready(stored.endpoint, HttpSetup { client, standard }),
        flow,
    ))
}

/// The response log's rows of one job (`pg_emit.response_log`).
const RESPONSES_SQL: &str = "
INSERT INTO emit.http_responses (destination, first_event_id, last_event_id, status, elapsed_ms,
                                 excerpt, error)
SELECT $1, r.f, r.l, r.s, r.ms, r.x, r.e
  FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.int8[]), pg_catalog.unnest($3::pg_catalog.int8[]),
                  pg_catalog.unnest($4::pg_catalog.int4[]), pg_catalog.unnest($5::pg_catalog.float8[]),
                  pg_catalog.unnest($6::pg_catalog.text[]), pg_catalog.unnest($7::pg_catalog.text[]))
       r(f, l, s, ms, x, e)";

/// Deletes responses past `pg_emit.response_log_retention`.
pub(super) fn purge_responses(c: &mut pgrx::spi::SpiClient<'_>) -> Result<(), pgrx::spi::Error> {
    plans::update(
        c,
        "DELETE FROM emit.http_responses
          WHERE created_at < pg_catalog.now()
                OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1::pg_catalog.float8)",
        &[crate::settings::RESPONSE_LOG_RETENTION.get().into()],
    )
    .map(|_| ())
}

/// Past `pg_emit.max_outbox_size` (`limit` bytes, when positive), marks
/// each destination queueing more than an equal share of it (among the
/// destinations with queued events) in `emit.destinations.over_share`:
/// writers refuse only those destinations' new events (see
/// `crate::delivery::outbox`). Under the limit, clears the marks.
pub(super) fn mark_shares(
    c: &mut pgrx::spi::SpiClient<'_>,
    limit: i64,
) -> Result<(), pgrx::spi::Error> {
    let size = plans::select(
        c,
        "SELECT pg_catalog.pg_table_size('emit.outbox'::pg_catalog.regclass)",
        None,
        &[],
    )?
    .first()
    .get_one::<i64>()?
    .unwrap_or(0);
    if limit <= 0 || size <= limit {
        plans::update(
            c,
            "UPDATE emit.destinations SET over_share = NULL WHERE over_share",
            &[],
        )?;
        return Ok(());
    }
    plans::update(c, SHARES_SQL, &[limit.into()])?;
    Ok(())
}

/// Each destination's queued bytes (as stored: compressed, or TOAST
/// pointers' sizes) against an equal share of the limit ($1); then the
/// marks of destinations with nothing queued any more are cleared.
const SHARES_SQL: &str = "
WITH q AS (
    SELECT o.destination, pg_catalog.sum(pg_catalog.pg_column_size(o.payload)) AS bytes
      FROM emit.outbox o GROUP BY o.destination
), s AS (
    SELECT q.destination, q.bytes > $1::pg_catalog.numeric / (SELECT pg_catalog.count(*) FROM q) AS over
      FROM q
), marked AS (
    UPDATE emit.destinations d SET over_share = s.over
      FROM s WHERE s.destination = d.destination AND d.over_share IS DISTINCT FROM s.over
)
UPDATE emit.destinations d SET over_share = NULL
 WHERE d.over_share AND NOT EXISTS (SELECT FROM q WHERE q.destination = d.destination)";

thread_local! {
    /// Each destination's recent delivery latencies (`emit.metrics()`).
    static LATENCIES: std::cell::RefCell<std::collections::HashMap<String, Latencies>> =
        std::cell::RefCell::default();
}

/// Deletes delivered rows; returns each one's queue-to-delivery time (ms)
/// and its events.
const DELIVERED_SQL: &str = "
DELETE FROM emit.outbox o WHERE o.id = ANY($1)
RETURNING (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
                                o.enqueued_at) * 1000)::pg_catalog.float8, o.events";

const STORED_SQL: &str = "
SELECT url, options::pg_catalog.text AS options FROM emit.stored_destinations WHERE name = $1";

/// Fills in the payloads and keys of the rows a job takes: only theirs
/// are read (detoasted), so a claim holds at most CLAIM_BYTES of events
/// in memory however long the backlog of 8 MB rows is.
fn read_payloads(
    c: &mut pgrx::spi::SpiClient<'_>,
    rows: &mut [Row],
) -> Result<(), pgrx::spi::Error> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut read = std::collections::HashMap::with_capacity(rows.len());
    for r in plans::select(c, PAYLOADS_SQL, None, &[ids.into()])? {
        // Read as UTF-8 whatever the database encoding (the outbox holds
        // text in the database's own).
        let payload = r.get_by_name::<Vec<u8>, _>("payload")?.unwrap_or_default();
        let payload = String::from_utf8(payload)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        let keys = r.get_by_name::<Vec<Option<i64>>, _>("keys")?;
        // In hex, as UTF-8 whatever the database's encoding.
        let texts = r
            .get_by_name::<Vec<Option<String>>, _>("record_keys")?
            .map(|ks| ks.into_iter().map(|k| k.map(|h| unhex(&h))).collect());
        // Only this library writes the column; a name it does not know
        // (from a newer one, before a downgrade) gets 0.1.0's treatment.
        let kind = r
            .get_by_name::<String, _>("format")?
            .and_then(|f| Kind::from_name(&f))
            .unwrap_or_default();
        read.insert(
            r.get_by_name::<i64, _>("id")?.unwrap_or(0),
            (payload, keys, texts, kind),
        );
    }
    for row in rows.iter_mut() {
        if let Some((payload, keys, texts, kind)) = read.remove(&row.id) {
            (row.payload, row.keys, row.record_keys, row.kind) = (payload, keys, texts, kind);
        }
    }
    Ok(())
}

/// Text from its UTF-8 bytes in hex (as PAYLOADS_SQL reads record keys).
fn unhex(h: &str) -> String {
    let bytes: Vec<u8> = (0..h.len() / 2)
        .filter_map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

const PAYLOADS_SQL: &str = "
SELECT o.id, pg_catalog.convert_to(o.payload, 'UTF8') AS payload, o.keys,
       (SELECT pg_catalog.array_agg(pg_catalog.encode(pg_catalog.convert_to(u.k, 'UTF8'), 'hex')
                                    ORDER BY u.n)
          FROM pg_catalog.unnest(o.record_keys) WITH ORDINALITY u(k, n)) AS record_keys,
       o.format
  FROM emit.outbox o WHERE o.id = ANY($1)";

/// The head of a destination's queue, in commit order. LIMIT is in the SQL
/// so that the kept plan is an ordered index scan that stops early (and
/// marks the deleted rows it passes as dead for the next scan), not a scan
/// of every index entry of the destination, dead ones included. Sizes,
/// not payloads: `octet_length` reads a TOASTed value's size from its
/// pointer ([`read_payloads`] then reads what the job takes).
///
/// Rows already numbered are among the first thousand: numbering takes
/// rows from the head, and a transaction that became visible late puts
/// one row per destination and 8 MB before them. Each says whether it was
/// numbered in an earlier stream than the destination's.
const QUEUE_SQL: &str = "
SELECT o.id, o.host, o.port, o.framing, o.first_event_id,
       pg_catalog.octet_length(o.payload) AS size, o.sent, o.url, o.headers, o.tx_seq, o.acked,
       (o.stream IS NOT NULL
        AND o.stream IS DISTINCT FROM (SELECT d.stream FROM emit.destinations d
                                        WHERE d.destination = $1)) AS earlier_stream,
       o.stream::pg_catalog.text AS stream
  FROM emit.outbox o
 WHERE o.destination = $1 AND o.tx_seq IS NOT NULL
 ORDER BY o.tx_seq, o.part
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
    // The rows' stream stays NULL: the destination's current one. A copy
    // of the database records the stream they were numbered in before it
    // starts a new one (`NEW_STREAMS_SQL` in the worker), at no cost here.
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
pub(super) fn record(
    c: &mut pgrx::spi::SpiClient<'_>,
    key: &str,
    job: &Job,
    out: &Outcome,
    ws: &WorkerSettings,
) -> Result<i64, pgrx::spi::Error> {
    let mut sent_now = out.sent.clone();
    let mut acked = out.acked.clone();
    let mut dead: i64 = 0;
    // A refused event becomes a dead letter of its own, with the status
    // and the response excerpt; the rest of its row carries on.
    // (A refused batch: each of its events, which are the first
    // undelivered ones: `sent` moves past each, and past what was
    // delivered after it.)
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
                    (k as i32).into(),
                ],
            )?;
            sent_now[r] += 1;
            while acked[r].first() == Some(&sent_now[r]) {
                acked[r].remove(0);
                sent_now[r] += 1;
            }
            dead += 1;
        }
    }
    let mut delivered_rows = Vec::new();
    let mut partial: (Vec<i64>, Vec<i32>, Vec<String>) = Default::default();
    let mut unfinished = Vec::new();
    let mut delivered: i64 = -dead;
    for ((row, &sent), acked) in job.rows.iter().zip(&sent_now).zip(&acked) {
        let done = |s: u32, a: &[u32]| i64::from(s) + a.len() as i64;
        delivered += done(sent, acked) - done(row.sent, &row.acked);
        if sent == row.events() {
            delivered_rows.push(row.id);
        } else {
            unfinished.push(row.id);
            if sent != row.sent || *acked != row.acked {
                partial.0.push(row.id);
                partial.1.push(sent as i32);
                // An int4[] literal: the list of a row's acked events
                // travels as text, one array of them per row.
                let list: Vec<String> = acked.iter().map(u32::to_string).collect();
                partial.2.push(format!("{{{}}}", list.join(",")));
            }
        }
    }
    let responses = job.log.take();
    if !responses.is_empty() {
        let first: Vec<i64> = responses.iter().map(|l| l.first).collect();
        let last: Vec<i64> = responses.iter().map(|l| l.last).collect();
        let status: Vec<Option<i32>> = responses.iter().map(|l| l.status.map(i32::from)).collect();
        let ms: Vec<f64> = responses.iter().map(|l| l.ms).collect();
        let excerpt: Vec<String> = responses
            .iter()
            .map(|l| message_text(&l.excerpt).into_owned())
            .collect();
        let error: Vec<Option<String>> = responses
            .iter()
            .map(|l| l.error.as_deref().map(|e| message_text(e).into_owned()))
            .collect();
        plans::update(
            c,
            RESPONSES_SQL,
            &[
                key.into(),
                first.into(),
                last.into(),
                status.into(),
                ms.into(),
                excerpt.into(),
                error.into(),
            ],
        )?;
    }
    let mut latency = None;
    if !delivered_rows.is_empty() {
        let now = std::time::Instant::now();
        let gone = plans::update(c, DELIVERED_SQL, &[delivered_rows.into()])?;
        latency = LATENCIES.with_borrow_mut(|all| {
            let window = all.entry(key.to_string()).or_default();
            for r in gone {
                let ms = r.get::<f64>(1)?.unwrap_or(0.0);
                let events = r.get::<i32>(2)?.unwrap_or(1).max(1) as u32;
                window.add(now, ms, events);
            }
            Ok::<_, pgrx::spi::Error>(window.quantiles(now))
        })?;
    }
    if !partial.0.is_empty() {
        plans::update(
            c,
            "UPDATE emit.outbox o
                SET sent = v.s, acked = NULLIF(v.a::pg_catalog.int4[], '{}')
               FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]),
                               pg_catalog.unnest($2::pg_catalog.int4[]),
                               pg_catalog.unnest($3::pg_catalog.text[])) v(id, s, a)
              WHERE o.id = v.id",
            &[partial.0.into(), partial.1.into(), partial.2.into()],
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
             (destination, delivered, failed_attempts, dead_lettered, last_error, last_error_at,
              last_delivered_at, latency_p50_ms, latency_p99_ms)
         VALUES ($1, $2, $3, $4, $5,
                 CASE WHEN $5 IS NOT NULL THEN pg_catalog.now() END,
                 CASE WHEN $2 > 0 THEN pg_catalog.now() END, $6, $7)
         ON CONFLICT (destination) DO UPDATE SET
             delivered = d.delivered + excluded.delivered,
             failed_attempts = d.failed_attempts + excluded.failed_attempts,
             dead_lettered = d.dead_lettered + excluded.dead_lettered,
             last_error = coalesce(excluded.last_error, d.last_error),
             last_error_at = coalesce(excluded.last_error_at, d.last_error_at),
             last_delivered_at = coalesce(excluded.last_delivered_at, d.last_delivered_at),
             latency_p50_ms = coalesce(excluded.latency_p50_ms, d.latency_p50_ms),
             latency_p99_ms = coalesce(excluded.latency_p99_ms, d.latency_p99_ms)",
        &[
            key.into(),
            delivered.into(),
            i64::from(retry.is_some()).into(),
            dead.into(),
            error.into(),
            latency.map(|l| l.0).into(),
            latency.map(|l| l.1).into(),
        ],
    )?;
    Ok(dead)
}

/// One event (the `$6`th, from 0) the receiver refused, as a dead letter of
/// its own, with its keys.
const REJECTED_SQL: &str = "
INSERT INTO emit.dead_letter
    (outbox_id, destination, host, port, framing, url, headers, events, payload, attempts,
     last_error, status, response, enqueued_at, format, keys, record_keys)
SELECT id, destination, host, port, framing, url, headers, 1,
       pg_catalog.convert_from($2, 'UTF8'), attempts + 1, $3, $4, $5, enqueued_at, format,
       CASE WHEN keys IS NOT NULL THEN ARRAY[keys[$6 + 1]] END,
       CASE WHEN record_keys IS NOT NULL THEN ARRAY[record_keys[$6 + 1]] END
  FROM emit.outbox WHERE id = $1";

/// Moves unfinished rows past `max_attempts` (when positive) or older than
/// `max_age` seconds (when positive) to `emit.dead_letter`, keeping only
/// their undelivered events (neither in the first `sent` nor `acked`), and
/// those events' keys, which a re-queued event is ordered and (Kafka)
/// partitioned by again. Returns how many events moved.
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
         last_error, enqueued_at, format, keys, record_keys)
    SELECT id, destination, host, port, framing, url, headers,
           events - sent - coalesce(pg_catalog.cardinality(acked), 0),
           CASE WHEN sent = 0 AND acked IS NULL THEN payload
                WHEN acked IS NULL
                THEN pg_catalog.array_to_string((pg_catalog.string_to_array(payload, E'\\n'))[sent + 1:], E'\\n')
                ELSE (SELECT pg_catalog.string_agg(l.line, E'\\n' ORDER BY l.n)
                        FROM pg_catalog.unnest(pg_catalog.string_to_array(payload, E'\\n'))
                             WITH ORDINALITY l(line, n)
                       WHERE l.n > sent AND (l.n - 1)::pg_catalog.int4 <> ALL (acked)) END,
           attempts, last_error, enqueued_at, format,
           CASE WHEN keys IS NOT NULL THEN
               ARRAY(SELECT k.k FROM pg_catalog.unnest(keys) WITH ORDINALITY k(k, n)
                      WHERE k.n > sent AND (k.n - 1)::pg_catalog.int4 <> ALL (coalesce(acked, '{}'))
                      ORDER BY k.n) END,
           CASE WHEN record_keys IS NOT NULL THEN
               ARRAY(SELECT k.k FROM pg_catalog.unnest(record_keys) WITH ORDINALITY k(k, n)
                      WHERE k.n > sent AND (k.n - 1)::pg_catalog.int4 <> ALL (coalesce(acked, '{}'))
                      ORDER BY k.n) END
      FROM dead
    RETURNING events
)
SELECT coalesce(pg_catalog.sum(events), 0)::pg_catalog.int8 FROM moved";
