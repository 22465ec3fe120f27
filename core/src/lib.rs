//! pg_emit's core: everything about events and getting them to receivers
//! that does not need a PostgreSQL backend. Destinations
//! ([`destination`]) and trigger options ([`options`]), the event envelope and formats ([`event`], [`cloudevents`]), the allowlist
//! ([`security`]), the transports (TCP and HTTP: [`transport`]), the
//! brokers spoken over them (Redis, NATS, Kafka: [`sink`]), live channels ([`live`]), delivery of
//! claimed outbox rows ([`job`]), retry policy ([`backoff`], [`cooldown`]),
//! the per-transaction event buffer ([`pending`]) and `emit.metrics()`'s
//! exposition ([`metrics`]).
//!
//! The extension crate is glue around it: triggers, SPI, hooks, the
//! worker's main loop and settings. Everything here is tested with plain
//! `cargo test -p pg_emit_core`, on a machine without PostgreSQL.

pub mod backoff;
pub mod budget;
pub mod cloudevents;
pub mod cooldown;
pub mod destination;
pub mod event;
pub mod health;
pub mod http_target;
pub mod job;
pub mod live;
pub mod metrics;
pub mod options;
pub mod pending;
pub mod pgoutput;
pub mod route;
pub mod sasl;
pub mod schedule;
pub mod security;
pub mod sink;
pub mod transport;
