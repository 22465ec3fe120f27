//! Fail fast: a destination that just failed is not tried again for a while.
//!
//! Without this, 50 rows inserted while a receiver's host silently drops
//! packets cost 50 connect timeouts (50 s at the 1 s default) inside one
//! statement. With it, the first row pays the timeout and the other 49 are
//! skipped at once with a WARNING until `pg_emit.failure_cooldown` passes.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Down {
    pub since: Instant,
    pub until: Instant,
    pub reason: String,
}

/// Per-backend memory of destinations that failed. A short list, scanned
/// linearly: only failing destinations are in it, and lookups then need
/// no allocated key.
#[derive(Debug, Default)]
pub struct Cooldowns {
    down: Vec<(String, u16, Down)>,
}

impl Cooldowns {
    /// The failure that still blocks `host:port` at `now`, if any.
    pub fn blocked(&self, host: &str, port: u16, now: Instant) -> Option<&Down> {
        self.down
            .iter()
            .find(|(h, p, _)| *p == port && h == host)
            .map(|(_, _, d)| d)
            .filter(|d| now < d.until)
    }

    pub fn failed(
        &mut self,
        host: &str,
        port: u16,
        now: Instant,
        window: Duration,
        reason: String,
    ) {
        self.succeeded(host, port);
        if !window.is_zero() {
            let until = now + window;
            self.down.push((
                host.to_string(),
                port,
                Down {
                    since: now,
                    until,
                    reason,
                },
            ));
        }
    }

    pub fn succeeded(&mut self, host: &str, port: u16) {
        if !self.down.is_empty() {
            self.down.retain(|(h, p, _)| !(*p == port && h == host));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_for_the_window_only() {
        let mut c = Cooldowns::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(5);
        assert!(c.blocked("h", 1, t0).is_none());
        c.failed("h", 1, t0, w, "refused".into());
        assert_eq!(
            c.blocked("h", 1, t0 + Duration::from_secs(1))
                .unwrap()
                .reason,
            "refused"
        );
        assert!(c.blocked("h", 2, t0).is_none());
        assert!(c.blocked("h", 1, t0 + w).is_none());
    }

    #[test]
    fn success_clears_and_zero_window_disables() {
        let mut c = Cooldowns::default();
        let t0 = Instant::now();
        c.failed("h", 1, t0, Duration::from_secs(5), "x".into());
        c.succeeded("h", 1);
        assert!(c.blocked("h", 1, t0).is_none());
        c.failed("h", 1, t0, Duration::ZERO, "x".into());
        assert!(c.blocked("h", 1, t0).is_none());
    }
}
