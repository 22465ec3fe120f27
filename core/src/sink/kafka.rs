//! Kafka: produce each event to a topic as an idempotent producer with
//! `acks=all`, and count it delivered when its partition's leader has
//! acknowledged it.
//!
//! A producer needs three requests of the Kafka protocol: `Metadata` (which
//! broker leads each partition), `InitProducerId` (an idempotent
//! producer's id) and `Produce` (v2 record batches). They are spoken over
//! pg_emit's own TCP transport, like Redis and NATS: every broker
//! connection, the bootstrap one and each leader the cluster advertises,
//! passes the allowlist check of its resolved address and honours the
//! timeouts and cancel requests. librdkafka would start several threads in
//! every backend that sends, and resolve and connect on its own, out of
//! the allowlist's sight (its connect callback sees an address only after
//! its own lookup of a name a hostile broker advertised).
//!
//! **Why not the `kafka-protocol` crate.** It would replace the codecs
//! here (about 300 lines of the requests above, record batches and their
//! answers) but not the transport, sessions, partitioning or retries, and
//! adds generated code for every API. TLS (rustls over the same sockets),
//! SASL (`crate::sasl`), compression (the codecs' own crates), ApiVersions
//! and throttling fit the hand-written requests in a few hundred lines,
//! each tested against librdkafka reading back what was produced.
//!
//! **Keys and partitions.** A record's key is the event's ordering key
//! (16 hex digits), or with `record_key: "columns"` the row's key columns
//! as a JSON object (`{"id":5}`, as Debezium keys with schemas off:
//! sinks that upsert by the record key need it) and a message's key as
//! given. Its partition is `murmur2(key) mod partitions`, the Java
//! client's default, so events of one row stay in one partition, in
//! commit order. Events without a key (statement-level events, tables
//! without a primary key) are spread as the Java client's sticky
//! partitioner does: a chunk's keyless records to one partition, the next
//! chunk's to the next.
//!
//! **Idempotence.** Each connection registers as an idempotent producer
//! and numbers its batches per partition, so within a connection no batch
//! is written twice or out of order. A failure closes the connection and
//! ends its producer session; what was not acknowledged is sent again by a
//! new session, which Kafka cannot tell from new records. Consumers dedupe
//! by the record's `id` header, the event's stable id.

use super::{Broker, Item, Settings, TLS_OPTIONS};
use crate::sasl::{self, Credentials, Exchange, Mechanism};
use crate::security::Allowlist;
use crate::transport::tcp::SendError;
use crate::transport::tls::{self, Link};
use crate::transport::{host_port, Interrupt, Timeouts};
use std::collections::HashMap;
use std::time::Instant;

/// A topic on a Kafka cluster, reached through its bootstrap brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub host: String,
    pub port: u16,
    /// Further bootstrap brokers, tried in order when the first does not
    /// answer.
    pub more: Vec<(String, u16)>,
    pub topic: String,
    /// `security_protocol`: TLS (`ssl`, `sasl_ssl`) and SASL
    /// (`sasl_plaintext`, `sasl_ssl`), for every broker of the cluster.
    pub tls: Option<tls::Options>,
    pub sasl: Option<Credentials>,
    /// `compression`: how record batches are compressed.
    pub compression: Compression,
    /// `record_key: "columns"`: records are keyed by [`Item::record_key`].
    pub columns_key: bool,
}

/// The record batch codecs Kafka defines (the batch's attributes' low
/// bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    fn parse(s: &str) -> Option<Compression> {
        Some(match s.to_ascii_lowercase().as_str() {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            _ => return None,
        })
    }

    fn attribute(self) -> i16 {
        self as i16
    }

    /// `records` compressed: gzip, raw snappy (what librdkafka writes and
    /// every client reads), the LZ4 frame format with independent blocks
    /// (the Java client's reader refuses dependent ones), a zstd frame.
    fn compress(self, records: &[u8]) -> std::io::Result<Vec<u8>> {
        use std::io::Write as _;
        match self {
            Compression::None => Ok(records.to_vec()),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(records)?;
                e.finish()
            }
            Compression::Snappy => snap::raw::Encoder::new()
                .compress_vec(records)
                .map_err(std::io::Error::other),
            Compression::Lz4 => {
                let mut e = lz4::EncoderBuilder::new()
                    .block_mode(lz4::BlockMode::Independent)
                    .checksum(lz4::ContentChecksum::NoChecksum)
                    .build(Vec::new())?;
                e.write_all(records)?;
                let (out, r) = e.finish();
                r.map(|()| out)
            }
            Compression::Zstd => zstd::bulk::compress(records, 3),
        }
    }
}

/// A record: headers `id` and `content-type`, the ordering key as key.
type Record<'a> = Item<'a>;

impl Broker for Topic {
    const SCHEME: &'static str = "kafka";
    const PORT: u16 = 9092;
    const FORM: &'static str =
        "a kafka:// URL is kafka://host[:port]/topic, the topic 1 to 249 of a-z A-Z 0-9 . _ -";
    const OPTIONS: &'static [&'static str] = &[
        "security_protocol",
        "sasl_mechanism",
        "compression",
        "record_key",
        "username",
        "password",
        TLS_OPTIONS[0],
        TLS_OPTIONS[1],
        TLS_OPTIONS[2],
        TLS_OPTIONS[3],
    ];
    const KEYED: bool = true;
    type Conn = Conn;
    type Error = KafkaError;

    fn from_url(u: &url::Url, host: String) -> Result<Option<Self>, String> {
        let topic = u.path().strip_prefix('/').unwrap_or_default();
        if !check_topic(topic) || u.query().is_some() || u.fragment().is_some() {
            return Ok(None);
        }
        Ok(Some(Topic {
            host,
            port: u.port().unwrap_or(Self::PORT),
            more: Vec::new(),
            topic: topic.to_string(),
            tls: None,
            sasl: None,
            compression: Compression::None,
            columns_key: false,
        }))
    }

    fn tls_options(&self) -> Option<&tls::Options> {
        self.tls.as_ref()
    }

    fn record_keys(&self) -> bool {
        self.columns_key
    }

    fn also(&mut self, servers: Vec<(String, Option<u16>)>) -> Result<(), String> {
        self.more = servers
            .into_iter()
            .map(|(h, p)| (h, p.unwrap_or(Self::PORT)))
            .collect();
        Ok(())
    }

    fn url(&self) -> String {
        let mut servers = vec![host_port(&self.host, self.port)];
        servers.extend(self.more.iter().map(|(h, p)| host_port(h, *p)));
        format!("kafka://{}/{}", servers.join(","), self.topic)
    }

    fn address(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    fn configure(&mut self, s: &Settings<'_>) -> Result<(), String> {
        if let Some(c) = s.compression {
            self.compression = Compression::parse(c).ok_or_else(|| {
                format!("compression {c:?} is not none, gzip, snappy, lz4 or zstd")
            })?;
        }
        self.columns_key = match s.record_key {
            None | Some("hash") => false,
            Some("columns") => true,
            Some(other) => return Err(format!("record_key {other:?} is not hash or columns")),
        };
        let protocol = s.security_protocol.unwrap_or("plaintext");
        let (tls, sasl) = match protocol.to_ascii_lowercase().as_str() {
            "plaintext" => (false, false),
            "ssl" => (true, false),
            "sasl_plaintext" => (false, true),
            "sasl_ssl" => (true, true),
            other => {
                return Err(format!(
                    "security_protocol {other:?} is not plaintext, ssl, sasl_plaintext or sasl_ssl"
                ))
            }
        };
        self.tls = match tls {
            true => {
                s.tls.check()?;
                Some(s.tls.clone())
            }
            false if !s.tls.is_empty() => {
                return Err(format!(
                    "ca_file, cert_file, key_file and server_name are for TLS, which \
                     security_protocol {protocol} does not use (ssl, sasl_ssl)"
                ))
            }
            false => None,
        };
        self.sasl = match (sasl, s.username, s.password) {
            (true, Some(user), Some(password)) => {
                if user.contains('\0') || password.contains('\0') {
                    return Err("a SASL username or password cannot contain NUL".into());
                }
                let name = s.sasl_mechanism.unwrap_or("PLAIN");
                let mechanism = Mechanism::parse(name).ok_or_else(|| {
                    format!("sasl_mechanism {name:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
                })?;
                Some(Credentials {
                    mechanism,
                    username: user.to_string(),
                    password: password.to_string(),
                })
            }
            (true, _, _) => {
                return Err(format!(
                    "security_protocol {protocol} needs a username and password"
                ))
            }
            (false, None, None) if s.sasl_mechanism.is_none() => None,
            (false, ..) => {
                return Err(format!(
                    "username, password and sasl_mechanism are for SASL, which \
                     security_protocol {protocol} does not use (sasl_plaintext, sasl_ssl)"
                ))
            }
        };
        Ok(())
    }

    fn send(
        &self,
        conn: &mut Option<Conn>,
        items: &[Item<'_>],
        timeouts: &Timeouts,
        allow: &Allowlist,
        intr: &dyn Interrupt,
    ) -> (usize, Result<(), KafkaError>) {
        produce(conn, self, items, timeouts, allow, intr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("{0}")]
    Send(#[from] SendError),
    #[error(
        "topic {0:?} does not exist on the Kafka cluster (create it, e.g. with kafka-topics.sh \
         --create; pg_emit does not create topics)"
    )]
    NoTopic(String),
    #[error("the broker answered {what} with error {code} ({})", error_name(*.code))]
    Broker { what: String, code: i16 },
    #[error("kafka broker sent something unexpected: {0}")]
    Protocol(String),
    /// SASL failed: the broker refused the credentials or the mechanism,
    /// or (SCRAM) could not prove it knows the password.
    #[error("SASL {mechanism}: {why}")]
    Sasl {
        mechanism: &'static str,
        why: String,
    },
}

/// Whether `s` is a name Kafka accepts for a topic.
pub fn check_topic(s: &str) -> bool {
    (1..=249).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

const PRODUCE: i16 = 0;
const METADATA: i16 = 3;
const INIT_PRODUCER_ID: i16 = 22;

/// Kafka 4.0 answers nothing older than Produce v7 and Metadata v4
/// (KIP-896); both are spoken since Kafka 2.1 and need none of the
/// "flexible" encoding of newer versions. InitProducerId v3 (Kafka 2.5)
/// is flexible, but the first that names the producer id it asks to
/// renew (-1: a new one), which brokers such as tansu require.
const PRODUCE_VERSION: i16 = 7;
const METADATA_VERSION: i16 = 4;
const INIT_PRODUCER_ID_VERSION: i16 = 3;

/// Records sent at once: one request per leader broker, each partition's
/// share as one batch. Small enough to stay under the broker's default
/// `message.max.bytes` (1 MB) unless single events are that large.
const CHUNK_RECORDS: usize = 2000;
const CHUNK_BYTES: usize = 512 * 1024;

/// Longest response accepted: metadata of one topic and produce answers
/// are small; a larger claim is a broken or hostile peer.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// A producer session with the cluster: the leaders of the topic's
/// partitions, a connection to each, the producer id and the next
/// sequence number of each partition.
pub struct Conn {
    opened_for: Topic,
    /// Open connections by broker node id, with the address they were
    /// opened for (to recheck the allowlist before reuse).
    socks: HashMap<i32, (Link, String, u16)>,
    brokers: HashMap<i32, (String, u16)>,
    /// The leader's node id of each partition.
    leaders: Vec<i32>,
    producer_id: i64,
    epoch: i16,
    sequences: Vec<i32>,
    /// The partition of the next chunk's records without a key (modulo
    /// the partition count).
    sticky: usize,
    correlation: i32,
    buf: Vec<u8>,
    /// When its metadata was read: a session older than
    /// [`METADATA_MAX_AGE`] is replaced, so partitions added since are used.
    opened_at: Instant,
    /// Until when the brokers asked to be left alone (Produce's
    /// `throttle_time_ms`).
    throttled_until: Instant,
}

/// Kafka's default `metadata.max.age.ms`.
const METADATA_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Produces `records` in order, in one producer session (see
/// [`Broker::send`]).
fn produce(
    slot: &mut Option<Conn>,
    target: &Topic,
    records: &[Record<'_>],
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> (usize, Result<(), KafkaError>) {
    let (mut conn, mut reused) = match session(slot.take(), target, timeouts, allow, intr) {
        Ok(c) => c,
        Err(e) => return (0, Err(e)),
    };
    let mut done = 0;
    while done < records.len() {
        let end = chunk_end(records, done, target.columns_key);
        let chunk = &records[done..end];
        if let Err(e) = conn.hold_off(intr) {
            *slot = Some(conn);
            return (done, Err(e));
        }
        match conn.send_chunk(chunk, timeouts, allow, intr) {
            Ok(()) => done = end,
            // A kept session's leaders may have moved since (Kafka
            // rebalances them without closing connections): once, a
            // fresh session, with fresh metadata, sends the rest.
            Err((acked, e)) if reused && stale(&e) => {
                done += acked;
                reused = false;
                conn = match session(None, target, timeouts, allow, intr) {
                    Ok((c, _)) => c,
                    Err(e) => return (done, Err(e)),
                };
            }
            Err((acked, e)) => return (done + acked, Err(e)),
        }
    }
    *slot = Some(conn);
    (done, Ok(()))
}

/// Whether a failure may come from a session's stale view of the cluster:
/// a leader that moved, a topic or producer id the broker has forgotten,
/// an idle connection the broker closed.
fn stale(e: &KafkaError) -> bool {
    match e {
        KafkaError::Broker { code, .. } => matches!(code, 3 | 5 | 6 | 45 | 47 | 59),
        KafkaError::Send(SendError::Closed) => true,
        _ => false,
    }
}

/// The kept session if its connections are open and their peers still
/// allowed (and `true`), else a new one: metadata read, producer id
/// obtained.
fn session(
    kept: Option<Conn>,
    target: &Topic,
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<(Conn, bool), KafkaError> {
    if let Some(mut c) = kept {
        let usable = c.opened_for == *target
            && c.opened_at.elapsed() < METADATA_MAX_AGE
            && c.socks.values_mut().all(|(link, host, port)| {
                let allowed = link
                    .peer_addr()
                    .is_some_and(|a| allow.filter(host, *port, None, &[a]).is_ok());
                allowed && !link.peer_closed()
            });
        if usable {
            return Ok((c, true));
        }
    }
    let mut conn = Conn {
        opened_for: target.clone(),
        socks: HashMap::new(),
        brokers: HashMap::new(),
        leaders: Vec::new(),
        producer_id: -1,
        // Where keyless records start: anywhere, as the Java client picks
        // at random, so short sessions do not all favour partition 0.
        sticky: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize),
        epoch: -1,
        sequences: Vec::new(),
        correlation: 0,
        buf: Vec::new(),
        opened_at: Instant::now(),
        throttled_until: Instant::now(),
    };
    let deadline = Instant::now() + timeouts.write;

    let mut body = Vec::new();
    put_i32(&mut body, 1);
    put_str(&mut body, &target.topic);
    body.push(0); // allow_auto_topic_creation: a typo must not create a topic
                  // The bootstrap brokers in turn, until one answers; a missing topic
                  // is the cluster's answer, not the broker's failure.
    let servers = std::iter::once((target.host.as_str(), target.port))
        .chain(target.more.iter().map(|(h, p)| (h.as_str(), *p)));
    let mut reached = None;
    let mut last = None;
    for (host, port) in servers {
        conn.brokers.clear();
        let answer = open(target, host, port, timeouts, allow, intr).and_then(|mut sock| {
            let r = conn.call(&mut sock, API_VERSIONS, 0, &[], deadline, timeouts, intr)?;
            check_versions(&r)?;
            let r = conn.call(
                &mut sock,
                METADATA,
                METADATA_VERSION,
                &body,
                deadline,
                timeouts,
                intr,
            )?;
            conn.read_metadata(&r, &target.topic)?;
            Ok(sock)
        });
        match answer {
            Ok(sock) => {
                reached = Some((sock, host, port));
                break;
            }
            Err(e @ (KafkaError::NoTopic(_) | KafkaError::Sasl { .. })) => return Err(e),
            Err(KafkaError::Send(SendError::Cancelled)) => {
                return Err(KafkaError::Send(SendError::Cancelled))
            }
            Err(e) => last = Some(e),
        }
    }
    let Some((mut sock, host, port)) = reached else {
        return Err(last.expect("one bootstrap broker at least"));
    };

    let mut body = Vec::new();
    body.push(0); // transactional_id: null (compact), idempotent only
    put_i32(&mut body, 60_000);
    put_i64(&mut body, -1); // producer_id: a new one
    put_i16(&mut body, -1); // producer_epoch
    body.push(0); // no tagged fields
    let r = conn.call(
        &mut sock,
        INIT_PRODUCER_ID,
        INIT_PRODUCER_ID_VERSION,
        &body,
        deadline,
        timeouts,
        intr,
    )?;
    let mut rd = Reader::new(&r);
    rd.tagged_fields()?; // of the response header (v1)
    rd.i32()?; // throttle_time_ms
    let code = rd.i16()?;
    if code != 0 {
        return Err(KafkaError::Broker {
            what: "InitProducerId".into(),
            code,
        });
    }
    conn.producer_id = rd.i64()?;
    conn.epoch = rd.i16()?;

    // The bootstrap connection serves the broker it reached, if that one
    // leads partitions; leaders elsewhere are connected to when needed.
    if let Some((&node, (h, p))) = conn
        .brokers
        .iter()
        .find(|(_, (h, p))| h.eq_ignore_ascii_case(host) && *p == port)
    {
        let (h, p) = (h.clone(), *p);
        conn.socks.insert(node, (sock, h, p));
    }
    Ok((conn, false))
}

/// A connection to one broker of `target`'s cluster: through the
/// allowlist, with TLS and SASL as its `security_protocol` says.
fn open(
    target: &Topic,
    host: &str,
    port: u16,
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<Link, KafkaError> {
    let mut link = Link::open(host, port, target.tls.as_ref(), timeouts, allow, intr)?;
    if let Some(c) = &target.sasl {
        authenticate(&mut link, c, timeouts, intr)?;
    }
    Ok(link)
}

const API_VERSIONS: i16 = 18;

/// Checks that the broker speaks the versions pg_emit sends (ApiVersions
/// v0), so that an old broker is a clear error rather than a cut
/// connection.
fn check_versions(r: &[u8]) -> Result<(), KafkaError> {
    let mut rd = Reader::new(r);
    let code = rd.i16()?;
    if code != 0 {
        return Err(KafkaError::Broker {
            what: "ApiVersions".into(),
            code,
        });
    }
    let mut spoken = HashMap::new();
    for _ in 0..rd.len()? {
        let (api, min, max) = (rd.i16()?, rd.i16()?, rd.i16()?);
        spoken.insert(api, min..=max);
    }
    for (api, name, version) in [
        (PRODUCE, "Produce", PRODUCE_VERSION),
        (METADATA, "Metadata", METADATA_VERSION),
        (INIT_PRODUCER_ID, "InitProducerId", INIT_PRODUCER_ID_VERSION),
    ] {
        if !spoken.get(&api).is_some_and(|v| v.contains(&version)) {
            return Err(KafkaError::Protocol(format!(
                "the broker does not speak {name} v{version} (Kafka 2.5 or later does)"
            )));
        }
    }
    Ok(())
}

const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;

/// SaslHandshake v1 for `c`'s mechanism, then its exchange in
/// SaslAuthenticate v1 requests, within the connect timeout. A broker that
/// does not offer the mechanism is refused, not offered another.
fn authenticate(
    link: &mut Link,
    c: &Credentials,
    timeouts: &Timeouts,
    intr: &dyn Interrupt,
) -> Result<(), KafkaError> {
    let mechanism = c.mechanism.name();
    let fail = |why: String| KafkaError::Sasl { mechanism, why };
    let deadline = Instant::now() + timeouts.connect.max(timeouts.write);
    let mut buf = Vec::new();
    let mut correlation = 0;
    let mut call = |link: &mut Link, api: i16, body: &[u8]| -> Result<Vec<u8>, KafkaError> {
        correlation += 1;
        link.write_all(&frame(api, 1, correlation, body), timeouts, intr)?;
        read_answer(link, &mut buf, correlation, deadline, intr)
    };
    let mut body = Vec::new();
    put_str(&mut body, mechanism);
    let r = call(link, SASL_HANDSHAKE, &body)?;
    let mut rd = Reader::new(&r);
    let code = rd.i16()?;
    let mut offered = Vec::new();
    for _ in 0..rd.len()? {
        offered.push(rd.string()?);
    }
    if code != 0 {
        return Err(fail(format!(
            "the broker does not offer it (it offers {})",
            if offered.is_empty() {
                "none".into()
            } else {
                sasl::quoted(&offered.join(", "))
            }
        )));
    }
    let (first, mut exchange) = c.start(&sasl::nonce().map_err(fail)?);
    let mut step = |link: &mut Link, msg: &[u8]| -> Result<Vec<u8>, KafkaError> {
        let mut body = Vec::new();
        put_i32(&mut body, msg.len() as i32);
        body.extend_from_slice(msg);
        let r = call(link, SASL_AUTHENTICATE, &body)?;
        let mut rd = Reader::new(&r);
        let code = rd.i16()?;
        let message = rd.nullable_string()?;
        let n = rd.i32()?;
        let bytes = rd.take(usize::try_from(n).unwrap_or(0))?.to_vec();
        if code != 0 {
            // The broker's own words (never the credentials, which it
            // does not repeat), or its error code's name.
            return Err(fail(match message {
                Some(m) if !m.is_empty() => format!("the broker refused: {}", sasl::quoted(&m)),
                _ => format!("the broker refused ({})", error_name(code)),
            }));
        }
        Ok(bytes)
    };
    let reply = step(link, &first)?;
    if let Exchange::Scram(s) = &mut exchange {
        let last = s.answer(&reply).map_err(fail)?;
        let reply = step(link, &last)?;
        s.finish(&reply).map_err(fail)?;
    }
    Ok(())
}

impl Conn {
    /// Waits out a throttle the brokers asked for, giving way to a cancel.
    fn hold_off(&self, intr: &dyn Interrupt) -> Result<(), KafkaError> {
        loop {
            intr.check().map_err(|_| SendError::Cancelled)?;
            let now = Instant::now();
            if now >= self.throttled_until {
                return Ok(());
            }
            std::thread::sleep((self.throttled_until - now).min(crate::transport::SLICE));
        }
    }

    fn read_metadata(&mut self, r: &[u8], topic: &str) -> Result<(), KafkaError> {
        let mut rd = Reader::new(r);
        rd.i32()?; // throttle_time_ms
        for _ in 0..rd.len()? {
            let node = rd.i32()?;
            let host = rd.string()?;
            let port = rd.i32()?;
            rd.nullable_string()?; // rack
            let port = u16::try_from(port)
                .map_err(|_| KafkaError::Protocol(format!("broker {node} has port {port}")))?;
            self.brokers.insert(node, (host, port));
        }
        rd.nullable_string()?; // cluster_id
        rd.i32()?; // controller_id
        let mut leaders = Vec::new();
        for _ in 0..rd.len()? {
            let code = rd.i16()?;
            let name = rd.string()?;
            rd.i8()?; // is_internal
            if name != topic {
                return Err(KafkaError::Protocol(format!(
                    "metadata of topic {name:?}, asked for {topic:?}"
                )));
            }
            if code == UNKNOWN_TOPIC_OR_PARTITION {
                return Err(KafkaError::NoTopic(topic.to_string()));
            }
            if code != 0 {
                return Err(KafkaError::Broker {
                    what: format!("Metadata of topic {topic:?}"),
                    code,
                });
            }
            for _ in 0..rd.len()? {
                let code = rd.i16()?;
                let index = rd.i32()?;
                let leader = rd.i32()?;
                for _ in 0..rd.len()? {
                    rd.i32()?; // replica_nodes
                }
                for _ in 0..rd.len()? {
                    rd.i32()?; // isr_nodes
                }
                if code != 0 || leader < 0 {
                    return Err(KafkaError::Broker {
                        what: format!("Metadata of partition {index} of {topic:?}"),
                        code: if code != 0 {
                            code
                        } else {
                            LEADER_NOT_AVAILABLE
                        },
                    });
                }
                leaders.push((index, leader));
            }
        }
        leaders.sort_unstable();
        if leaders.is_empty() || leaders.iter().enumerate().any(|(i, &(p, _))| p != i as i32) {
            return Err(KafkaError::Protocol(format!(
                "partitions of {topic:?} are not numbered 0..n: {leaders:?}"
            )));
        }
        self.leaders = leaders.into_iter().map(|(_, l)| l).collect();
        self.sequences = vec![0; self.leaders.len()];
        Ok(())
    }

    /// Sends one chunk: each partition's records as one batch, one request
    /// per leader, and reads every answer. On failure, the number of
    /// records acknowledged before the first one that was not.
    fn send_chunk(
        &mut self,
        chunk: &[Record<'_>],
        timeouts: &Timeouts,
        allow: &Allowlist,
        intr: &dyn Interrupt,
    ) -> Result<(), (usize, KafkaError)> {
        let n = self.leaders.len();
        // Records without a key stick to one partition per chunk, the next
        // chunk's the next partition (Kafka's sticky partitioner): spread
        // over the topic, each chunk's in order.
        let sticky = self.sticky % n;
        let columns = self.opened_for.columns_key;
        if chunk.iter().any(|r| r.key.is_none()) {
            self.sticky = self.sticky.wrapping_add(1);
        }
        let partition_of: Vec<usize> = chunk
            .iter()
            .map(|r| partition(record_key(r, columns).as_deref(), n).unwrap_or(sticky))
            .collect();
        let mut by_partition: Vec<Vec<&Record<'_>>> = vec![Vec::new(); n];
        for (r, &p) in chunk.iter().zip(&partition_of) {
            by_partition[p].push(r);
        }
        let mut by_leader: Vec<(i32, Vec<usize>)> = Vec::new();
        for (p, recs) in by_partition.iter().enumerate() {
            if recs.is_empty() {
                continue;
            }
            let leader = self.leaders[p];
            match by_leader.iter_mut().find(|(l, _)| *l == leader) {
                Some((_, ps)) => ps.push(p),
                None => by_leader.push((leader, vec![p])),
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let deadline = Instant::now() + timeouts.write;
        // Every request goes out before any answer is awaited, so the
        // leaders work on their shares at the same time.
        let mut sent: Vec<(i32, i32)> = Vec::new();
        for (leader, parts) in &by_leader {
            let mut body = Vec::new();
            put_i16(&mut body, -1); // transactional_id
            put_i16(&mut body, -1); // acks=all
                                    // The broker's own wait ends before ours, so that its answer
                                    // (REQUEST_TIMED_OUT, say) arrives rather than our timeout.
            put_i32(
                &mut body,
                (timeouts.write.as_millis() * 3 / 4).min(i32::MAX as u128) as i32,
            );
            put_i32(&mut body, 1);
            put_str(&mut body, &self.opened_for.topic);
            put_i32(&mut body, parts.len() as i32);
            for &p in parts {
                put_i32(&mut body, p as i32);
                let size_at = body.len();
                put_i32(&mut body, 0);
                record_batch(
                    &mut body,
                    &by_partition[p],
                    Producer {
                        id: self.producer_id,
                        epoch: self.epoch,
                        sequence: self.sequences[p],
                    },
                    self.opened_for.compression,
                    self.opened_for.columns_key,
                    now_ms,
                )
                .map_err(|e| (0, KafkaError::Send(SendError::Io(e))))?;
                let size = (body.len() - size_at - 4) as i32;
                body[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
            }
            let correlation = self
                .send_to(
                    *leader,
                    PRODUCE,
                    PRODUCE_VERSION,
                    &body,
                    timeouts,
                    allow,
                    intr,
                )
                .map_err(|e| (0, e))?;
            sent.push((*leader, correlation));
        }
        let mut failed: Vec<(usize, KafkaError)> = Vec::new();
        for ((leader, parts), (_, correlation)) in by_leader.iter().zip(sent) {
            let r = self
                .answer(*leader, correlation, deadline, intr)
                .map_err(|e| (0, e))?;
            let (results, throttle) =
                produce_results(&r, &self.opened_for.topic).map_err(|e| (0, e))?;
            // A broker over its quota says how long to hold off: the next
            // chunk waits that long (at most the write timeout).
            let until = Instant::now() + throttle.min(timeouts.write);
            self.throttled_until = self.throttled_until.max(until);
            // Each partition sent to this leader is answered exactly once,
            // by it; one the answer leaves out was not delivered.
            let mut answered = vec![false; parts.len()];
            for (p, code) in results {
                let k = usize::try_from(p)
                    .ok()
                    .and_then(|p| parts.iter().position(|&q| q == p))
                    .filter(|&k| !answered[k]);
                let Some(k) = k else {
                    return Err((
                        0,
                        KafkaError::Protocol(format!(
                            "broker {leader} answered for partition {p}, which it was not \
                             sent or answered twice"
                        )),
                    ));
                };
                answered[k] = true;
                let p = parts[k];
                // DUPLICATE_SEQUENCE_NUMBER: the broker has this batch already.
                if code == 0 || code == DUPLICATE_SEQUENCE_NUMBER {
                    let count = by_partition[p].len() as i64;
                    self.sequences[p] =
                        ((self.sequences[p] as i64 + count) % (i32::MAX as i64 + 1)) as i32;
                } else {
                    failed.push((
                        p,
                        KafkaError::Broker {
                            what: format!(
                                "Produce to partition {p} of {:?}",
                                self.opened_for.topic
                            ),
                            code,
                        },
                    ));
                }
            }
            for (k, &p) in parts.iter().enumerate() {
                if !answered[k] {
                    failed.push((
                        p,
                        KafkaError::Protocol(format!(
                            "broker {leader} did not answer for partition {p}"
                        )),
                    ));
                }
            }
        }
        match failed
            .into_iter()
            .min_by_key(|(p, _)| partition_of.iter().position(|x| x == p))
        {
            None => Ok(()),
            Some((p, e)) => {
                let acked = partition_of.iter().position(|&x| x == p).unwrap_or(0);
                Err((acked, e))
            }
        }
    }

    /// Writes a request to broker `node`, connecting first if needed;
    /// returns its correlation id.
    #[allow(clippy::too_many_arguments)]
    fn send_to(
        &mut self,
        node: i32,
        api: i16,
        version: i16,
        body: &[u8],
        timeouts: &Timeouts,
        allow: &Allowlist,
        intr: &dyn Interrupt,
    ) -> Result<i32, KafkaError> {
        if !self.socks.contains_key(&node) {
            let Some((host, port)) = self.brokers.get(&node).cloned() else {
                return Err(KafkaError::Protocol(format!(
                    "partition leader {node} is not among the brokers"
                )));
            };
            let link = open(&self.opened_for, &host, port, timeouts, allow, intr)?;
            self.socks.insert(node, (link, host, port));
        }
        self.correlation = self.correlation.wrapping_add(1);
        let frame = frame(api, version, self.correlation, body);
        let (link, _, _) = self.socks.get_mut(&node).expect("just connected");
        link.write_all(&frame, timeouts, intr)?;
        Ok(self.correlation)
    }

    /// Reads the answer with `correlation` from broker `node`.
    fn answer(
        &mut self,
        node: i32,
        correlation: i32,
        deadline: Instant,
        intr: &dyn Interrupt,
    ) -> Result<Vec<u8>, KafkaError> {
        let (link, _, _) = self.socks.get_mut(&node).expect("sent to");
        read_answer(link, &mut self.buf, correlation, deadline, intr)
    }

    /// One request on `sock` (before the session's connections are
    /// sorted by broker) and its answer.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        link: &mut Link,
        api: i16,
        version: i16,
        body: &[u8],
        deadline: Instant,
        timeouts: &Timeouts,
        intr: &dyn Interrupt,
    ) -> Result<Vec<u8>, KafkaError> {
        self.correlation = self.correlation.wrapping_add(1);
        link.write_all(&frame(api, version, self.correlation, body), timeouts, intr)?;
        read_answer(link, &mut self.buf, self.correlation, deadline, intr)
    }
}

/// A request: size, header (api key, version, correlation id, client id;
/// v2, for the flexible InitProducerId, adds empty tagged fields), body.
fn frame(api: i16, version: i16, correlation: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 24);
    put_i32(&mut out, 0);
    put_i16(&mut out, api);
    put_i16(&mut out, version);
    put_i32(&mut out, correlation);
    put_str(&mut out, "pg_emit");
    if api == INIT_PRODUCER_ID {
        out.push(0);
    }
    out.extend_from_slice(body);
    let size = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    out
}

/// The body of the next answer on `sock`, which must carry `correlation`.
fn read_answer(
    link: &mut Link,
    buf: &mut Vec<u8>,
    correlation: i32,
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<Vec<u8>, KafkaError> {
    while buf.len() < 4 {
        link.read_some(buf, deadline, intr)?;
    }
    let size = i32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
    let size = usize::try_from(size)
        .ok()
        .filter(|&s| (4..=MAX_RESPONSE).contains(&s))
        .ok_or_else(|| KafkaError::Protocol(format!("an answer of {size} bytes")))?;
    while buf.len() < 4 + size {
        link.read_some(buf, deadline, intr)?;
    }
    let body: Vec<u8> = buf.drain(..4 + size).skip(4).collect();
    // One request at a time per connection: anything more is unasked, and
    // must not pass for the start of the next answer.
    if !buf.is_empty() {
        return Err(KafkaError::Protocol(
            "more than the answer asked for".into(),
        ));
    }
    let got = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
    if got != correlation {
        return Err(KafkaError::Protocol(format!(
            "answer {got} where {correlation} was expected"
        )));
    }
    Ok(body[4..].to_vec())
}

/// Each partition's error code in a Produce v7 answer for `topic`, and how
/// long the broker asks the producer to wait (its quota's throttle).
fn produce_results(
    r: &[u8],
    topic: &str,
) -> Result<(Vec<(i32, i16)>, std::time::Duration), KafkaError> {
    let mut rd = Reader::new(r);
    let mut out = Vec::new();
    for _ in 0..rd.len()? {
        let name = rd.string()?;
        if name != topic {
            return Err(KafkaError::Protocol(format!(
                "an answer for topic {name:?}"
            )));
        }
        for _ in 0..rd.len()? {
            let index = rd.i32()?;
            let code = rd.i16()?;
            rd.i64()?; // base_offset
            rd.i64()?; // log_append_time_ms
            rd.i64()?; // log_start_offset
            out.push((index, code));
        }
    }
    let throttle = rd.i32()?.clamp(0, i32::MAX) as u64;
    Ok((out, std::time::Duration::from_millis(throttle)))
}

/// The partition of a record with `key` among `n`: the Java client's
/// default partitioner; `None` for a keyless record (see the sticky
/// partition in `send_chunk`).
fn partition(key: Option<&[u8]>, n: usize) -> Option<usize> {
    key.map(|k| (murmur2(k) & 0x7fff_ffff) as usize % n)
}

/// Where the chunk starting at `start` ends: at most [`CHUNK_RECORDS`]
/// records and [`CHUNK_BYTES`], counted whole; a record larger than a
/// chunk goes alone.
fn chunk_end(records: &[Record<'_>], start: usize, columns: bool) -> usize {
    let mut end = start;
    let mut bytes = 0;
    while end < records.len() && end - start < CHUNK_RECORDS {
        let size = encoded_size(&records[end], columns);
        if end > start && bytes + size > CHUNK_BYTES {
            break;
        }
        bytes += size;
        end += 1;
    }
    end
}

/// About what a record takes in a batch: value, key, headers, framing.
fn encoded_size(r: &Record<'_>, columns: bool) -> usize {
    let key = record_key(r, columns).map_or(0, |k| k.len());
    r.body.len() + r.id.len() + r.content_type.len() + key + 40
}

/// A record's key: [`Item::record_key`] with `record_key: "columns"`
/// (`columns`), else (and for events queued before that was set) the
/// ordering key as 16 hex digits; `None` for an event without either.
fn record_key<'a>(r: &Record<'a>, columns: bool) -> Option<std::borrow::Cow<'a, [u8]>> {
    match r.record_key {
        Some(k) if columns => Some(k.as_bytes().into()),
        _ => r.key.map(|k| key_bytes(k).into_bytes().into()),
    }
}

/// The ordering key as a record's key: 16 hex digits.
fn key_bytes(key: i64) -> String {
    format!("{:016x}", key as u64)
}

/// Appends a v2 record batch (uncompressed, create time) of `records`
/// numbered from `sequence`.
/// The idempotent producer's numbering of a batch.
struct Producer {
    id: i64,
    epoch: i16,
    sequence: i32,
}

fn record_batch(
    out: &mut Vec<u8>,
    records: &[&Record<'_>],
    producer: Producer,
    compression: Compression,
    columns: bool,
    now_ms: i64,
) -> std::io::Result<()> {
    let start = out.len();
    put_i64(out, 0); // base_offset
    put_i32(out, 0); // batch_length, set below
    put_i32(out, -1); // partition_leader_epoch
    out.push(2); // magic
    let crc_at = out.len();
    put_i32(out, 0); // crc, set below
    put_i16(out, compression.attribute()); // attributes
    put_i32(out, records.len() as i32 - 1); // last_offset_delta
    put_i64(out, now_ms);
    put_i64(out, now_ms);
    put_i64(out, producer.id);
    put_i16(out, producer.epoch);
    put_i32(out, producer.sequence);
    put_i32(out, records.len() as i32);
    let mut all = Vec::new();
    let mut rec = Vec::new();
    for (delta, r) in records.iter().enumerate() {
        rec.clear();
        rec.push(0); // attributes
        put_varint(&mut rec, 0); // timestamp_delta
        put_varint(&mut rec, delta as i64);
        match record_key(r, columns) {
            Some(k) => put_varbytes(&mut rec, &k),
            None => put_varint(&mut rec, -1),
        }
        put_varbytes(&mut rec, r.body);
        put_varint(&mut rec, 2);
        put_varbytes(&mut rec, b"id");
        put_varbytes(&mut rec, r.id.as_bytes());
        put_varbytes(&mut rec, b"content-type");
        put_varbytes(&mut rec, r.content_type.as_bytes());
        put_varint(&mut all, rec.len() as i64);
        all.extend_from_slice(&rec);
    }
    match compression {
        Compression::None => out.extend_from_slice(&all),
        c => out.extend_from_slice(&c.compress(&all)?),
    }
    let length = (out.len() - start - 12) as i32;
    out[start + 8..start + 12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c(&out[crc_at + 4..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const LEADER_NOT_AVAILABLE: i16 = 5;
const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;

/// The names of the errors a producer meets, as Kafka's documentation
/// lists them.
fn error_name(code: i16) -> &'static str {
    match code {
        -1 => "UNKNOWN_SERVER_ERROR",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        5 => "LEADER_NOT_AVAILABLE",
        6 => "NOT_LEADER_OR_FOLLOWER",
        7 => "REQUEST_TIMED_OUT",
        10 => "MESSAGE_TOO_LARGE",
        15 => "COORDINATOR_NOT_AVAILABLE",
        17 => "INVALID_TOPIC_EXCEPTION",
        18 => "RECORD_LIST_TOO_LARGE",
        19 => "NOT_ENOUGH_REPLICAS",
        20 => "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        29 => "TOPIC_AUTHORIZATION_FAILED",
        31 => "CLUSTER_AUTHORIZATION_FAILED",
        33 => "UNSUPPORTED_SASL_MECHANISM",
        34 => "ILLEGAL_SASL_STATE",
        35 => "UNSUPPORTED_VERSION",
        45 => "OUT_OF_ORDER_SEQUENCE_NUMBER",
        58 => "SASL_AUTHENTICATION_FAILED",
        47 => "INVALID_PRODUCER_EPOCH",
        59 => "UNKNOWN_PRODUCER_ID",
        87 => "INVALID_RECORD",
        _ => "see Kafka's protocol error codes",
    }
}

fn put_i16(out: &mut Vec<u8>, v: i16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_i16(out, s.len() as i16);
    out.extend_from_slice(s.as_bytes());
}

/// A zigzag varint, as record batches encode lengths and deltas.
fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push(z as u8 | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_varbytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as i64);
    out.extend_from_slice(b);
}

/// Reads an answer, every read checked against its length.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { rest: b }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KafkaError> {
        if self.rest.len() < n {
            return Err(KafkaError::Protocol("a truncated answer".into()));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    fn i8(&mut self) -> Result<i8, KafkaError> {
        Ok(self.take(1)?[0] as i8)
    }

    fn i16(&mut self) -> Result<i16, KafkaError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, KafkaError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, KafkaError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// An array's length (a null array counts as empty).
    fn len(&mut self) -> Result<usize, KafkaError> {
        let n = self.i32()?;
        // Every element takes at least a byte: a count beyond what is
        // left is a lie that must not size a loop.
        match usize::try_from(n) {
            Ok(n) if n <= self.rest.len() => Ok(n),
            Ok(_) => Err(KafkaError::Protocol(format!("an array of {n} elements"))),
            Err(_) => Ok(0),
        }
    }

    /// Skips a flexible version's tagged fields.
    fn tagged_fields(&mut self) -> Result<(), KafkaError> {
        for _ in 0..self.uvarint()? {
            self.uvarint()?; // tag
            let size = self.uvarint()?;
            self.take(usize::try_from(size).unwrap_or(usize::MAX))?;
        }
        Ok(())
    }

    fn uvarint(&mut self) -> Result<u64, KafkaError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(KafkaError::Protocol("an overlong varint".into()))
    }

    fn nullable_string(&mut self) -> Result<Option<String>, KafkaError> {
        let n = self.i16()?;
        if n < 0 {
            return Ok(None);
        }
        let b = self.take(n as usize)?;
        Ok(Some(String::from_utf8_lossy(b).into_owned()))
    }

    fn string(&mut self) -> Result<String, KafkaError> {
        self.nullable_string()?
            .ok_or_else(|| KafkaError::Protocol("a null string".into()))
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// CRC-32C (Castagnoli), which record batches carry.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

impl super::BrokerError for KafkaError {
    fn network(self) -> Result<SendError, String> {
        match self {
            KafkaError::Send(s) => Ok(s),
            e => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_are_zigzag() {
        let enc = |v| {
            let mut o = Vec::new();
            put_varint(&mut o, v);
            o
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(-1), [1]);
        assert_eq!(enc(1), [2]);
        assert_eq!(enc(63), [126]);
        assert_eq!(enc(64), [0x80, 1]);
        assert_eq!(enc(-65), [0x81, 1]);
    }

    #[test]
    fn topics() {
        assert!(check_topic("orders.v2_x-1"));
        for bad in ["", ".", "..", "a b", "a/b", "ä", &"x".repeat(250)] {
            assert!(!check_topic(bad), "{bad:?}");
        }
    }

    #[test]
    fn keys_pick_partitions() {
        assert_eq!(partition(None, 7), None);
        for k in [0, 1, -1, i64::MAX, i64::MIN] {
            let key = key_bytes(k);
            assert!(partition(Some(key.as_bytes()), 7).unwrap() < 7);
            assert_eq!(partition(Some(key.as_bytes()), 1), Some(0));
        }
        assert_eq!(key_bytes(-1), "ffffffffffffffff");
        assert_eq!(key_bytes(10), "000000000000000a");
        // The Java client's partition of these keys (murmur2, positive,
        // modulo): a consumer keyed the same way finds the same partition.
        assert_eq!(
            partition(Some(b"{\"id\":1}"), 3),
            Some((murmur2(b"{\"id\":1}") & 0x7fff_ffff) as usize % 3)
        );
    }

    #[test]
    fn records_are_keyed_by_columns_when_asked() {
        let r = Record {
            id: "evt_s_1",
            key: Some(5),
            record_key: Some("{\"id\":5}"),
            body: b"{}",
            content_type: "application/json",
        };
        assert_eq!(record_key(&r, true).as_deref(), Some(&b"{\"id\":5}"[..]));
        assert_eq!(
            record_key(&r, false).as_deref(),
            Some(&b"0000000000000005"[..])
        );
        // Queued before record_key was set: the ordering key.
        let old = Record {
            record_key: None,
            ..r
        };
        assert_eq!(
            record_key(&old, true).as_deref(),
            Some(&b"0000000000000005"[..])
        );
        let keyless = Record {
            key: None,
            record_key: None,
            ..r
        };
        assert_eq!(record_key(&keyless, true), None);
        let mut out = Vec::new();
        let p = Producer {
            id: 1,
            epoch: 0,
            sequence: 0,
        };
        record_batch(&mut out, &[&r], p, Compression::None, true, 0).unwrap();
        assert!(out.windows(8).any(|w| w == b"{\"id\":5}"));
        assert!(!out.windows(16).any(|w| w == b"0000000000000005"));
    }

    #[test]
    fn record_key_option_is_checked() {
        let u = url::Url::parse("kafka://127.0.0.1:9092/t").unwrap();
        let mut t = Topic::from_url(&u, "127.0.0.1".into()).unwrap().unwrap();
        for (v, columns) in [("columns", true), ("hash", false)] {
            let s = Settings {
                record_key: Some(v),
                ..Settings::default()
            };
            t.configure(&s).unwrap();
            assert_eq!(t.record_keys(), columns);
        }
        let s = Settings {
            record_key: Some("json"),
            ..Settings::default()
        };
        assert_eq!(
            t.configure(&s).unwrap_err(),
            "record_key \"json\" is not hash or columns"
        );
    }

    #[test]
    fn batches_are_well_formed() {
        let recs = [
            Record {
                id: "evt_s_1",
                key: Some(5),
                record_key: None,
                body: b"{\"a\":1}",
                content_type: "application/json",
            },
            Record {
                id: "evt_s_2",
                key: None,
                record_key: None,
                body: b"{}",
                content_type: "application/json",
            },
        ];
        let refs: Vec<&Record<'_>> = recs.iter().collect();
        let mut out = Vec::new();
        let producer = Producer {
            id: 42,
            epoch: 3,
            sequence: 7,
        };
        record_batch(
            &mut out,
            &refs,
            producer,
            Compression::None,
            false,
            1_700_000_000_000,
        )
        .unwrap();
        let mut rd = Reader::new(&out);
        assert_eq!(rd.i64().unwrap(), 0);
        assert_eq!(rd.i32().unwrap() as usize, out.len() - 12);
        assert_eq!(rd.i32().unwrap(), -1);
        assert_eq!(rd.i8().unwrap(), 2);
        let crc = rd.i32().unwrap() as u32;
        assert_eq!(crc, crc32c(&out[21..]));
        assert_eq!(rd.i16().unwrap(), 0);
        assert_eq!(rd.i32().unwrap(), 1);
        rd.i64().unwrap();
        rd.i64().unwrap();
        assert_eq!(rd.i64().unwrap(), 42);
        assert_eq!(rd.i16().unwrap(), 3);
        assert_eq!(rd.i32().unwrap(), 7);
        assert_eq!(rd.i32().unwrap(), 2);
        assert!(out.windows(16).any(|w| w == b"0000000000000005"));
        assert!(out.windows(7).any(|w| w == b"evt_s_2"));
    }

    #[test]
    fn compressed_batches_hold_the_same_records() {
        use std::io::Read as _;
        let body = vec![b'x'; 10_000];
        let recs: Vec<Record<'_>> = (0..20)
            .map(|_| Record {
                id: "evt_s_1",
                key: Some(1),
                record_key: None,
                body: &body,
                content_type: "application/json",
            })
            .collect();
        let refs: Vec<&Record<'_>> = recs.iter().collect();
        let batch = |c| {
            let mut out = Vec::new();
            let p = Producer {
                id: 1,
                epoch: 0,
                sequence: 0,
            };
            record_batch(&mut out, &refs, p, c, false, 0).unwrap();
            out
        };
        let plain = batch(Compression::None);
        let records = &plain[61..];
        for c in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let out = batch(c);
            assert_eq!(i16::from_be_bytes([out[21], out[22]]), c as i16);
            assert!(out.len() < plain.len() / 10, "{c:?}: {}", out.len());
            assert_eq!(
                crc32c(&out[21..]),
                u32::from_be_bytes(out[17..21].try_into().unwrap())
            );
            let z = &out[61..];
            let back = match c {
                Compression::Gzip => {
                    let mut v = Vec::new();
                    flate2::read::GzDecoder::new(z).read_to_end(&mut v).unwrap();
                    v
                }
                Compression::Snappy => snap::raw::Decoder::new().decompress_vec(z).unwrap(),
                Compression::Lz4 => {
                    let mut v = Vec::new();
                    lz4::Decoder::new(z).unwrap().read_to_end(&mut v).unwrap();
                    v
                }
                _ => zstd::bulk::decompress(z, 1 << 20).unwrap(),
            };
            assert_eq!(back, records, "{c:?}");
        }
    }

    #[test]
    fn compression_fits_a_sender_threads_stack() {
        for c in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            std::thread::Builder::new()
                .stack_size(crate::transport::SENDER_STACK)
                .spawn(move || c.compress(&vec![b'x'; CHUNK_BYTES]).unwrap())
                .unwrap()
                .join()
                .unwrap();
        }
    }

    #[test]
    fn chunks_count_records_whole_and_big_ones_go_alone() {
        let small = vec![b'x'; 100_000];
        let big = vec![b'y'; 600_000];
        let rec = |v: &'static [u8]| Record {
            id: "evt_s_1",
            key: None,
            record_key: None,
            body: v,
            content_type: "application/json",
        };
        let small: &'static [u8] = small.leak();
        let big: &'static [u8] = big.leak();
        let recs = [
            rec(small),
            rec(small),
            rec(small),
            rec(small),
            rec(small),
            rec(big),
            rec(small),
        ];
        assert_eq!(chunk_end(&recs, 0, false), 5);
        assert_eq!(chunk_end(&recs, 5, false), 6);
        assert_eq!(chunk_end(&recs, 6, false), 7);
        let tiny: Vec<Record<'_>> = (0..5000).map(|_| rec(b"{}")).collect();
        assert_eq!(chunk_end(&tiny, 0, false), CHUNK_RECORDS);
    }

    /// A one-partition broker on loopback that answers Metadata and
    /// InitProducerId, and every Produce with the body `produce` makes.
    fn fake_broker(produce: fn() -> Vec<u8>) -> u16 {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            loop {
                let mut size = [0u8; 4];
                if c.read_exact(&mut size).is_err() {
                    return;
                }
                let mut req = vec![0u8; i32::from_be_bytes(size) as usize];
                c.read_exact(&mut req).unwrap();
                let api = i16::from_be_bytes([req[0], req[1]]);
                let mut out = req[4..8].to_vec(); // correlation id
                match api {
                    API_VERSIONS => {
                        put_i16(&mut out, 0);
                        put_i32(&mut out, 3);
                        for (api, max) in [(PRODUCE, 9), (METADATA, 12), (INIT_PRODUCER_ID, 4)] {
                            put_i16(&mut out, api);
                            put_i16(&mut out, 0);
                            put_i16(&mut out, max);
                        }
                    }
                    METADATA => {
                        put_i32(&mut out, 0);
                        put_i32(&mut out, 1);
                        put_i32(&mut out, 1);
                        put_str(&mut out, "127.0.0.1");
                        put_i32(&mut out, i32::from(port));
                        put_i16(&mut out, -1);
                        put_i16(&mut out, -1);
                        put_i32(&mut out, 1);
                        put_i32(&mut out, 1);
                        put_i16(&mut out, 0);
                        put_str(&mut out, "t");
                        out.push(0);
                        put_i32(&mut out, 1);
                        put_i16(&mut out, 0);
                        put_i32(&mut out, 0);
                        put_i32(&mut out, 1);
                        put_i32(&mut out, 1);
                        put_i32(&mut out, 1);
                        put_i32(&mut out, 1);
                        put_i32(&mut out, 1);
                    }
                    INIT_PRODUCER_ID => {
                        out.push(0);
                        put_i32(&mut out, 0);
                        put_i16(&mut out, 0);
                        put_i64(&mut out, 7);
                        put_i16(&mut out, 0);
                        out.push(0);
                    }
                    _ => out.extend(produce()),
                }
                let mut frame = (out.len() as i32).to_be_bytes().to_vec();
                frame.extend(out);
                c.write_all(&frame).unwrap();
            }
        });
        port
    }

    fn produce_to(port: u16, n: usize) -> (usize, Result<(), KafkaError>) {
        let target = Topic {
            host: "127.0.0.1".into(),
            port,
            more: Vec::new(),
            topic: "t".into(),
            tls: None,
            sasl: None,
            compression: Compression::None,
            columns_key: false,
        };
        let recs: Vec<Record<'_>> = (0..n)
            .map(|_| Record {
                id: "evt_s_1",
                key: None,
                record_key: None,
                body: b"{}",
                content_type: "application/json",
            })
            .collect();
        let timeouts = Timeouts {
            connect: std::time::Duration::from_secs(2),
            write: std::time::Duration::from_secs(2),
            stall: false,
        };
        let mut slot = None;
        produce(
            &mut slot,
            &target,
            &recs,
            &timeouts,
            &Allowlist::default(),
            &crate::transport::Uninterruptible,
        )
    }

    #[test]
    fn a_partition_the_answer_leaves_out_is_not_delivered() {
        let empty = fake_broker(|| {
            let mut a = Vec::new();
            put_i32(&mut a, 0); // no topics
            put_i32(&mut a, 0);
            a
        });
        let (acked, r) = produce_to(empty, 3);
        assert_eq!(acked, 0);
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("did not answer for partition 0"));
        let ok = fake_broker(|| {
            let mut a = Vec::new();
            put_i32(&mut a, 1);
            put_str(&mut a, "t");
            put_i32(&mut a, 1);
            put_i32(&mut a, 0);
            put_i16(&mut a, 0);
            put_i64(&mut a, 0);
            put_i64(&mut a, -1);
            put_i64(&mut a, 0);
            put_i32(&mut a, 0);
            a
        });
        assert!(matches!(produce_to(ok, 3), (3, Ok(()))));
    }

    #[test]
    fn old_brokers_are_named_as_such() {
        let answer = |produce_max: i16| {
            let mut r = Vec::new();
            put_i16(&mut r, 0);
            put_i32(&mut r, 3);
            for (api, max) in [(PRODUCE, produce_max), (METADATA, 9), (INIT_PRODUCER_ID, 4)] {
                put_i16(&mut r, api);
                put_i16(&mut r, 0);
                put_i16(&mut r, max);
            }
            r
        };
        assert!(check_versions(&answer(9)).is_ok());
        let e = check_versions(&answer(5)).unwrap_err().to_string();
        assert!(e.contains("does not speak Produce v7"), "{e}");
    }

    #[test]
    fn a_throttled_producer_holds_off() {
        let throttled = fake_broker(|| {
            let mut a = Vec::new();
            put_i32(&mut a, 1);
            put_str(&mut a, "t");
            put_i32(&mut a, 1);
            put_i32(&mut a, 0);
            put_i16(&mut a, 0);
            put_i64(&mut a, 0);
            put_i64(&mut a, -1);
            put_i64(&mut a, 0);
            put_i32(&mut a, 400); // throttle_time_ms
            a
        });
        let started = Instant::now();
        // Two chunks: the second waits out the first's throttle.
        assert!(matches!(
            produce_to(throttled, CHUNK_RECORDS + 1),
            (n, Ok(())) if n == CHUNK_RECORDS + 1
        ));
        assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    }

    #[test]
    fn hostile_answers_are_refused() {
        // An array claiming more elements than bytes left.
        let mut r = Vec::new();
        put_i32(&mut r, 1_000_000);
        assert!(produce_results(&r, "t").is_err());
        assert!(produce_results(&[0, 0], "t").is_err());
        let mut r = Vec::new();
        put_i32(&mut r, 1);
        put_str(&mut r, "other");
        assert!(produce_results(&r, "t").is_err());
    }
}
