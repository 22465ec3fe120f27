//! Retry schedule for async delivery: exponential, capped, with jitter.
//!
//! Jitter matters when one receiver serves several databases (one worker
//! each): without it their retries stay in lockstep and hit the receiver
//! together the moment it comes back.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before retry number `attempt` (1 = first retry), scaled by
    /// `jitter` in [0, 1): the result lies in [d/2, d) where
    /// d = min(max, min * 2^(attempt-1)) ("equal jitter").
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let full = self
            .min
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let half = full / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// A cheap per-process random number in [0, 1): jitter does not need a
/// cryptographic generator, only different values in different workers.
pub fn jitter(state: &mut u64) -> f64 {
    // xorshift64*
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(60),
    };

    #[test]
    fn doubles_until_the_cap() {
        assert_eq!(B.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(B.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(B.delay(4, 0.0), Duration::from_millis(400));
        assert_eq!(B.delay(30, 0.0), Duration::from_secs(30));
        assert_eq!(B.delay(u32::MAX, 0.0), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        for a in 1..20 {
            let lo = B.delay(a, 0.0);
            let hi = B.delay(a, 0.999_999);
            assert!(hi >= lo && hi < lo * 2 + Duration::from_millis(1), "{a}");
        }
    }

    #[test]
    fn jitter_source_spreads() {
        let mut s = 0x1234_5678_9abc_def1;
        let v: Vec<f64> = (0..1000).map(|_| jitter(&mut s)).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }
}
