//! `emit.metrics()`: what `emit.stats` and the live listener know, in the
//! Prometheus text exposition format (version 0.0.4), and the recent
//! delivery latencies the worker keeps per destination for it.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One destination's row of `emit.stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Destination {
    pub name: String,
    pub queued: i64,
    pub in_flight: i64,
    pub delivered: i64,
    pub failed_attempts: i64,
    pub dead_lettered: i64,
    /// Seconds since the oldest queued event was queued.
    pub oldest_queued_age: Option<f64>,
    /// Commit to acknowledgement, over [`Latencies`]' window, in ms.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// The live listener of this database, as the worker last wrote it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    pub connections: i64,
    pub subscribers: i64,
    /// Subscribers closed for falling too far behind, since the worker
    /// started.
    pub dropped: i64,
}

/// Events that sync and commit delivery failed to deliver in this
/// database since the server started: counted in shared memory, so only
/// when pg_emit is preloaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Immediate {
    pub sync_failed: u64,
    pub commit_failed: u64,
}

/// A metric of every destination: name, type, help, its value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Destination) -> Option<f64>,
);

/// The exposition of `dests`, `live` (when this database listens) and
/// `immediate` (when counted), each sample labelled with `database`.
pub fn render(
    database: &str,
    dests: &[Destination],
    live: Option<&Live>,
    immediate: Option<&Immediate>,
) -> String {
    let mut out = String::new();
    let db = escape(database);
    let per_dest: [Family; 6] = [
        (
            "pg_emit_queued_events",
            "gauge",
            "Async events waiting for the worker to claim them.",
            |d| Some(d.queued as f64),
        ),
        (
            "pg_emit_in_flight_events",
            "gauge",
            "Async events claimed and not yet delivered.",
            |d| Some(d.in_flight as f64),
        ),
        (
            "pg_emit_delivered_events_total",
            "counter",
            "Async events delivered.",
            |d| Some(d.delivered as f64),
        ),
        (
            "pg_emit_failed_attempts_total",
            "counter",
            "Delivery attempts that failed (each is retried or dead-lettered).",
            |d| Some(d.failed_attempts as f64),
        ),
        (
            "pg_emit_dead_lettered_events_total",
            "counter",
            "Async events moved to emit.dead_letter.",
            |d| Some(d.dead_lettered as f64),
        ),
        (
            "pg_emit_oldest_queued_age_seconds",
            "gauge",
            "Age of the oldest event still queued or in flight.",
            |d| d.oldest_queued_age,
        ),
    ];
    for (name, kind, help, value) in per_dest {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in dests {
            if let Some(v) = value(d) {
                let dest = escape(&d.name);
                let _ = writeln!(
                    out,
                    "{name}{{database=\"{db}\",destination=\"{dest}\"}} {}",
                    number(v)
                );
            }
        }
    }
    let name = "pg_emit_delivery_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Commit to delivery of async events over the last {} minutes (quantiles).\n\
         # TYPE {name} summary",
        WINDOW.as_secs() / 60
    );
    for d in dests {
        let dest = escape(&d.name);
        for (q, v) in [("0.5", d.latency_p50_ms), ("0.99", d.latency_p99_ms)] {
            if let Some(ms) = v {
                let _ = writeln!(
                    out,
                    "{name}{{database=\"{db}\",destination=\"{dest}\",quantile=\"{q}\"}} {}",
                    number(ms / 1000.0)
                );
            }
        }
    }
    if let Some(l) = live {
        for (name, kind, help, v) in [
            (
                "pg_emit_live_connections",
                "gauge",
                "Open connections to the live listener.",
                l.connections,
            ),
            (
                "pg_emit_live_subscribers",
                "gauge",
                "Subscribers of live channels.",
                l.subscribers,
            ),
            (
                "pg_emit_live_dropped_total",
                "counter",
                "Subscribers closed for falling too far behind.",
                l.dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{database=\"{db}\"}} {v}"
            );
        }
    }
    if let Some(i) = immediate {
        for (name, help, v) in [
            (
                "pg_emit_sync_failed_events_total",
                "Events of delivery=sync and send_* that were not delivered (a WARNING or an ERROR said why).",
                i.sync_failed,
            ),
            (
                "pg_emit_commit_failed_events_total",
                "Events of delivery=commit that were not delivered after their COMMIT (a WARNING said why).",
                i.commit_failed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{database=\"{db}\"}} {v}"
            );
        }
    }
    out
}

/// A label value as the format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// How far back delivery latencies count.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Most latencies kept per destination.
const SAMPLES: usize = 1024;

/// One destination's recent delivery latencies: (when, ms, events).
#[derive(Debug, Default)]
pub struct Latencies {
    samples: VecDeque<(Instant, f64, u32)>,
}

impl Latencies {
    /// `events` delivered `ms` after they were queued.
    pub fn add(&mut self, at: Instant, ms: f64, events: u32) {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, ms, events));
    }

    /// The 50th and 99th percentiles of what was delivered within
    /// [`WINDOW`] of `now`, each event weighing one; `None` when nothing was.
    pub fn quantiles(&mut self, now: Instant) -> Option<(f64, f64)> {
        while self
            .samples
            .front()
            .is_some_and(|s| now.duration_since(s.0) > WINDOW)
        {
            self.samples.pop_front();
        }
        let mut v: Vec<(f64, u32)> = self.samples.iter().map(|s| (s.1, s.2)).collect();
        let total: u64 = v.iter().map(|s| u64::from(s.1)).sum();
        if total == 0 {
            return None;
        }
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let at = |q: f64| {
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (ms, n) in &v {
                seen += u64::from(*n);
                if seen >= rank {
                    return *ms;
                }
            }
            v[v.len() - 1].0
        };
        Some((at(0.5), at(0.99)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition() {
        let d = Destination {
            name: "http://h/a\"b\\c".into(),
            queued: 3,
            delivered: 10,
            oldest_queued_age: Some(1.5),
            latency_p50_ms: Some(20.0),
            latency_p99_ms: Some(250.0),
            ..Default::default()
        };
        let text = render(
            "shop",
            &[d],
            Some(&Live {
                connections: 2,
                subscribers: 1,
                dropped: 0,
            }),
            Some(&Immediate {
                sync_failed: 4,
                commit_failed: 0,
            }),
        );
        let label = r#"database="shop",destination="http://h/a\"b\\c""#;
        for line in [
            format!("pg_emit_queued_events{{{label}}} 3"),
            format!("pg_emit_delivered_events_total{{{label}}} 10"),
            format!("pg_emit_oldest_queued_age_seconds{{{label}}} 1.5"),
            format!("pg_emit_delivery_latency_seconds{{{label},quantile=\"0.99\"}} 0.25"),
            "# TYPE pg_emit_delivered_events_total counter".to_string(),
            "pg_emit_live_subscribers{database=\"shop\"} 1".to_string(),
            "pg_emit_sync_failed_events_total{database=\"shop\"} 4".to_string(),
            "pg_emit_commit_failed_events_total{database=\"shop\"} 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        let bare = render("shop", &[], None, None);
        assert!(!bare.contains("pg_emit_live") && !bare.contains("failed_events"));
    }

    #[test]
    fn quantiles_weigh_events_and_forget_the_old() {
        let mut l = Latencies::default();
        let t0 = Instant::now();
        assert_eq!(l.quantiles(t0), None);
        l.add(t0, 10.0, 98);
        l.add(t0, 1000.0, 2);
        assert_eq!(l.quantiles(t0), Some((10.0, 1000.0)));
        l.add(t0 + WINDOW, 5.0, 1);
        assert_eq!(
            l.quantiles(t0 + WINDOW + Duration::from_secs(1)),
            Some((5.0, 5.0))
        );
    }
}
