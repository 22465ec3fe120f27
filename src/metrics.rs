//! `emit.metrics()`: `emit.stats` and the live listener in the Prometheus
//! text exposition format (see [`pg_emit_core::metrics`]).

#[pgrx::pg_schema]
mod emit {
    use pg_emit_core::metrics::{render, Destination, Live};
    use pgrx::prelude::*;

    /// Every counter of `emit.stats` per destination, its recent delivery
    /// latency, and the live listener if this database runs it, for a
    /// Prometheus scrape (through `postgres_exporter`, or any client that
    /// can run a query). SECURITY DEFINER so that a monitoring role needs
    /// only EXECUTE on it (`emit_admin` has it); it reads no payloads.
    #[pg_extern(volatile, parallel_unsafe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn metrics() -> String {
        Spi::connect(|c| {
            let mut dests = Vec::new();
            for r in c.select(STATS_SQL, None, &[])? {
                dests.push(Destination {
                    name: r.get::<String>(1)?.unwrap_or_default(),
                    queued: r.get::<i64>(2)?.unwrap_or(0),
                    in_flight: r.get::<i64>(3)?.unwrap_or(0),
                    delivered: r.get::<i64>(4)?.unwrap_or(0),
                    failed_attempts: r.get::<i64>(5)?.unwrap_or(0),
                    dead_lettered: r.get::<i64>(6)?.unwrap_or(0),
                    oldest_queued_age: r.get::<f64>(7)?,
                    latency_p50_ms: r.get::<f64>(8)?,
                    latency_p99_ms: r.get::<f64>(9)?,
                });
            }
            let w = c.select(WORKER_SQL, None, &[])?.first();
            let live = match w.get::<i32>(2)? {
                Some(connections) => Some(Live {
                    connections: i64::from(connections),
                    subscribers: i64::from(w.get::<i32>(3)?.unwrap_or(0)),
                    dropped: w.get::<i64>(4)?.unwrap_or(0),
                }),
                None => None,
            };
            let database = w.get::<String>(1)?.unwrap_or_default();
            Ok::<_, pgrx::spi::Error>(render(
                &database,
                &dests,
                live.as_ref(),
                crate::failures::current().as_ref(),
            ))
        })
        .unwrap_or_else(|e| error!("emit.metrics: {e}"))
    }

    const STATS_SQL: &str = "
SELECT s.destination, s.queued::pg_catalog.int8, s.in_flight::pg_catalog.int8, s.delivered,
       s.failed_attempts, s.dead_lettered,
       pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-) s.oldest_enqueued_at)
           ::pg_catalog.float8,
       s.latency_p50_ms, s.latency_p99_ms
  FROM emit.stats s ORDER BY s.destination";

    /// The listener's columns are NULL unless this database's worker
    /// listens (and has written them since it started).
    const WORKER_SQL: &str = "
SELECT pg_catalog.current_database()::pg_catalog.text, w.live_connections, w.live_subscribers,
       w.live_dropped
  FROM emit.worker w";
}
