//! A destination's failure streak as the worker sees it: when it may be
//! tried again, and which failures are worth a line in the server log.
//!
//! Pure: the worker feeds it outcomes and the time, and writes the lines
//! it returns.

use crate::backoff::Backoff;
use std::time::{Duration, Instant};

/// Least time between two lines about one destination: the first failure,
/// then one line a minute, so a thousand dead receivers, or one that fails
/// a request in a hundred (a failure and a recovery every second), do not
/// flood the server log.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// How a job ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Delivered,
    /// An event was refused for good and dead-lettered: carry on at once.
    Refused,
    /// Worth trying again, not before `after` if the receiver said so.
    /// `progressed`: the job delivered events before it failed.
    Failed {
        after: Option<Duration>,
        progressed: bool,
    },
}

#[derive(Debug, Default, Clone)]
pub struct Health {
    /// Failed attempts in a row.
    pub failures: u32,
    /// Not to be tried before this.
    pub retry_at: Option<Instant>,
    /// The last job delivered nothing and failed: the destination is down
    /// or hanging, and is probed with one request at a time (see
    /// [`Health::probing`]).
    stalled: bool,
    last_logged: Option<Instant>,
    logged_failures: u32,
}

impl Health {
    /// Whether the next job should be a probe: one request at a time, so
    /// that a receiver that is down or hangs holds one connection, not a
    /// destination's whole concurrency.
    pub fn probing(&self) -> bool {
        self.stalled
    }

    /// Whether the destination may be tried at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }

    /// Records how a job ended at `now`, with `jitter` in [0, 1) for the
    /// backoff; returns what to log, if anything (`error` describes the
    /// failure, `key` names the destination).
    pub fn record(
        &mut self,
        ended: Ended,
        now: Instant,
        backoff: &Backoff,
        jitter: f64,
        key: &str,
        error: &dyn std::fmt::Display,
    ) -> Option<String> {
        match ended {
            Ended::Delivered => {
                // Said only when the failures were: a streak that was never
                // logged (inside the minute) ends as quietly.
                let resumed = (self.failures > 0 && self.logged_failures > 0).then(|| {
                    format!(
                        "pg_emit: delivery to {key} resumed after {} failed attempt(s)",
                        self.failures
                    )
                });
                // The minute between lines spans streaks.
                *self = Health {
                    last_logged: self.last_logged,
                    ..Health::default()
                };
                resumed
            }
            Ended::Refused => {
                self.retry_at = None;
                None
            }
            Ended::Failed { after, progressed } => {
                // A job that delivered events besides the ones that failed
                // is a receiver that works and failed some requests (a 500
                // in a hundred): the streak starts again, and the next job
                // comes after the shortest backoff, not a doubled one
                // (unless the receiver asked for longer with Retry-After).
                // Not at once: an event that always fails is retried once
                // a job while others flow, and at most that often.
                if progressed {
                    self.failures = 0;
                    self.logged_failures = 0;
                }
                self.stalled = !progressed;
                self.failures += 1;
                let delay = backoff
                    .delay(self.failures, jitter)
                    .max(after.unwrap_or_default());
                self.retry_at = Some(now + delay);
                let due = self
                    .last_logged
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
                if !due {
                    return None;
                }
                let quiet = self.failures - self.logged_failures - 1;
                let since = if quiet > 0 {
                    format!(" ({quiet} failed attempt(s) since the last message)")
                } else {
                    String::new()
                };
                self.last_logged = Some(now);
                self.logged_failures = self.failures;
                Some(format!(
                    "pg_emit: delivery to {key} failed (attempt {}): {error}; retrying in {} ms{since}",
                    self.failures,
                    delay.as_millis()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(30),
    };

    #[test]
    fn failures_back_off_and_log_once_a_minute() {
        let mut h = Health::default();
        let t0 = Instant::now();
        let fail = Ended::Failed {
            after: None,
            progressed: false,
        };
        let first = h.record(fail, t0, &B, 0.0, "d", &"refused").unwrap();
        assert!(
            first.contains("attempt 1") && first.contains("refused"),
            "{first}"
        );
        assert!(!h.ready(t0));
        // Quiet for a minute, then one line that counts the quiet ones.
        for i in 1..10 {
            assert_eq!(
                h.record(fail, t0 + Duration::from_secs(i), &B, 0.0, "d", &"x"),
                None
            );
        }
        let later = h.record(fail, t0 + LOG_EVERY, &B, 0.0, "d", &"x").unwrap();
        assert!(
            later.contains("attempt 11") && later.contains("9 failed attempt(s) since"),
            "{later}"
        );
        let back = h
            .record(Ended::Delivered, t0 + LOG_EVERY, &B, 0.0, "d", &"")
            .unwrap();
        assert!(back.contains("resumed after 11"), "{back}");
        assert!(h.ready(t0) && h.failures == 0);
    }

    #[test]
    fn retry_after_is_honoured_and_refusals_do_not_wait() {
        let mut h = Health::default();
        let t0 = Instant::now();
        let after = Some(Duration::from_secs(120));
        h.record(
            Ended::Failed {
                after,
                progressed: false,
            },
            t0,
            &B,
            0.0,
            "d",
            &"429",
        );
        assert!(!h.ready(t0 + Duration::from_secs(119)));
        assert!(h.ready(t0 + Duration::from_secs(120)));
        h.record(Ended::Refused, t0, &B, 0.0, "d", &"400");
        assert!(h.ready(t0));
        assert_eq!(h.failures, 1);
    }

    /// A receiver failing 1 % of requests: each failed job still delivered
    /// the other events, so the next job comes after the shortest backoff
    /// instead of one doubling to 30 s (0.2.0: 71 of 300 events/s after an
    /// outage).
    #[test]
    fn a_job_that_made_progress_does_not_lengthen_the_backoff() {
        let mut h = Health::default();
        let t0 = Instant::now();
        let stalled = Ended::Failed {
            after: None,
            progressed: false,
        };
        for _ in 0..5 {
            h.record(stalled, t0, &B, 0.0, "d", &"down");
        }
        assert!(!h.ready(t0 + Duration::from_millis(700)));
        let progressed = Ended::Failed {
            after: None,
            progressed: true,
        };
        for _ in 0..5 {
            h.record(progressed, t0, &B, 0.0, "d", &"500");
            assert_eq!(h.failures, 1);
            assert!(h.ready(t0 + B.min));
        }
        // Unless the receiver asked for a pause.
        let limited = Ended::Failed {
            after: Some(Duration::from_secs(1)),
            progressed: true,
        };
        h.record(limited, t0, &B, 0.0, "d", &"429");
        assert!(!h.ready(t0 + Duration::from_millis(999)));
        assert!(h.ready(t0 + Duration::from_secs(1)));
        assert!(!h.probing());
        h.record(stalled, t0, &B, 0.0, "d", &"down");
        assert!(h.probing());
        h.record(Ended::Delivered, t0, &B, 0.0, "d", &"");
        assert!(!h.probing());
    }

    /// A failure and a recovery every second (1 % of requests failing)
    /// make one line a minute, not two a second.
    #[test]
    fn a_flapping_destination_logs_once_a_minute() {
        let mut h = Health::default();
        let t0 = Instant::now();
        let failed = Ended::Failed {
            after: None,
            progressed: true,
        };
        let mut lines = 0;
        for s in 0..120 {
            let t = t0 + Duration::from_secs(s);
            lines += h.record(failed, t, &B, 0.0, "d", &"500").is_some() as u32;
            let t = t + Duration::from_millis(500);
            lines += h.record(Ended::Delivered, t, &B, 0.0, "d", &"").is_some() as u32;
        }
        // Failures at 0 s and 60 s, each followed by its "resumed".
        assert_eq!(lines, 4);
    }
}
