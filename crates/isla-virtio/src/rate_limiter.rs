//! Token-bucket rate limiting with Firecracker's configuration model: a bucket of `size` tokens
//! refilled completely every `refill_time_ms`, plus an optional `one_time_burst` spent first and
//! never refilled; one bucket for bytes and one for operations.
//!
//! A request needs all its tokens at once. A request bigger than the whole bucket is let through
//! when the bucket is full and leaves it in debt, so it waits as long as its size asks but is
//! never refused forever (Firecracker does the same). When a request cannot go through, the device
//! stops taking requests and arms the limiter's timerfd in the event loop for the time the missing
//! tokens need; the timer handler resumes the queue.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::Deserialize;
use vmm_sys_util::timerfd::TimerFd;

/// One bucket's configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds (bytes or operations).
    pub size: u64,
    /// Extra tokens usable once, before the bucket.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Time to refill the whole bucket, in milliseconds.
    pub refill_time_ms: u64,
}

/// A device's limits; an absent bucket does not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes per `refill_time_ms`.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, frames) per `refill_time_ms`.
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// One token bucket. Time is passed in, so its arithmetic is testable without clocks.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    burst: u64,
    /// May go negative after an oversized request.
    budget: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when the configuration limits nothing (size or refill time zero).
    pub fn new(cfg: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if cfg.size == 0 || cfg.refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size: cfg.size,
            refill_ns: u128::from(cfg.refill_time_ms) * 1_000_000,
            burst: cfg.one_time_burst,
            budget: i128::from(cfg.size),
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let tokens = elapsed * u128::from(self.size) / self.refill_ns;
        if tokens == 0 {
            return;
        }
        let size = i128::from(self.size);
        let room = (size - self.budget).max(0) as u128;
        if tokens >= room {
            self.budget = size;
            self.last = now;
        } else {
            self.budget += tokens as i128;
            // Advance by the time those whole tokens took, keeping the fraction for later.
            let used_ns = tokens * self.refill_ns / u128::from(self.size);
            self.last += Duration::from_nanos(used_ns.min(u128::from(u64::MAX)) as u64);
        }
    }

    /// Tokens available now (one-time burst included).
    pub fn available(&mut self, now: Instant) -> i128 {
        self.refill(now);
        self.budget + i128::from(self.burst)
    }

    /// How long until `tokens` can be taken (zero if now).
    fn wait_for(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = i128::from(tokens.saturating_sub(self.burst));
        let size = i128::from(self.size);
        // Oversized requests need a full bucket; others need their own count.
        let target = need.min(size);
        if need == 0 || self.budget >= target {
            return Duration::ZERO;
        }
        let missing = (target - self.budget) as u128;
        let ns = (missing * self.refill_ns).div_ceil(u128::from(self.size));
        // At least a millisecond, so a timer never spins on rounding.
        Duration::from_nanos(ns.clamp(1_000_000, u128::from(u64::MAX)) as u64)
    }

    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }
}

/// A device's byte and operation buckets with the timerfd that wakes it when they refill.
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// Creates the buckets (full) and a disarmed timer.
    pub fn new(cfg: &RateLimiterConfig) -> io::Result<Self> {
        let now = Instant::now();
        Ok(RateLimiter {
            bytes: cfg.bandwidth.as_ref().and_then(|c| TokenBucket::new(c, now)),
            ops: cfg.ops.as_ref().and_then(|c| TokenBucket::new(c, now)),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Takes one operation and `bytes` bytes at `now`, or arms the timer and returns false.
    pub fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let wait_bytes = self.bytes.as_mut().map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_ops = self.ops.as_mut().map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait = wait_bytes.max(wait_ops);
        if wait > Duration::ZERO {
            self.blocked = true;
            if let Err(e) = self.timer.reset(wait, None) {
                // Without a timer nothing would wake the device: let the request through.
                tracing::warn!("rate limiter: arming timer: {e}");
                self.blocked = false;
            } else {
                return false;
            }
        }
        if let Some(b) = self.bytes.as_mut() {
            b.take(bytes);
        }
        if let Some(o) = self.ops.as_mut() {
            o.take(1);
        }
        true
    }

    /// [`consume_at`](Self::consume_at) now.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    /// True while waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Called when the timer fd is readable: clears the expiry and unblocks.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Available (bytes, operations) at `now`, `None` for an absent bucket.
    pub fn available_at(&mut self, now: Instant) -> (Option<i128>, Option<i128>) {
        (self.bytes.as_mut().map(|b| b.available(now)), self.ops.as_mut().map(|b| b.available(now)))
    }

    /// The timer fd to register (readable when the limiter unblocks).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(&TokenBucketConfig { size, one_time_burst: burst, refill_time_ms: ms }, now).unwrap()
    }

    #[test]
    fn zero_sized_buckets_do_not_limit() {
        let now = Instant::now();
        assert!(TokenBucket::new(&TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 10 }, now).is_none());
        assert!(TokenBucket::new(&TokenBucketConfig { size: 10, one_time_burst: 0, refill_time_ms: 0 }, now).is_none());
    }

    #[test]
    fn bucket_refills_proportionally() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.wait_for(1000, t0), Duration::ZERO);
        b.take(1000);
        assert_eq!(b.available(t0), 0);
        // 100 tokens need 100 ms.
        assert_eq!(b.wait_for(100, t0), Duration::from_millis(100));
        assert_eq!(b.available(t0 + Duration::from_millis(250)), 250);
        // Fractions are kept: 0.5 ms twice is one token.
        let mut c = bucket(1000, 0, 1000, t0);
        c.take(1000);
        assert_eq!(c.available(t0 + Duration::from_micros(500)), 0);
        assert_eq!(c.available(t0 + Duration::from_micros(1000)), 1);
        // Never above the size.
        assert_eq!(c.available(t0 + Duration::from_secs(60)), 1000);
    }

    #[test]
    fn burst_is_spent_first_and_once() {
        let t0 = Instant::now();
        let mut b = bucket(100, 50, 1000, t0);
        assert_eq!(b.available(t0), 150);
        b.take(120);
        assert_eq!(b.available(t0), 30);
        assert_eq!(b.available(t0 + Duration::from_secs(10)), 100, "the burst does not come back");
    }

    #[test]
    fn oversized_requests_go_through_from_a_full_bucket_and_leave_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert_eq!(b.wait_for(300, t0), Duration::ZERO);
        b.take(300);
        assert_eq!(b.available(t0), -200);
        // Back to a full bucket takes 3 s.
        assert_eq!(b.wait_for(300, t0), Duration::from_secs(3));
        assert_eq!(b.wait_for(300, t0 + Duration::from_secs(3)), Duration::ZERO);
    }

    #[test]
    fn limiter_blocks_until_its_timer_fires() {
        let t0 = Instant::now();
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig { size: 4096, one_time_burst: 0, refill_time_ms: 1000 }),
            ops: Some(TokenBucketConfig { size: 2, one_time_burst: 0, refill_time_ms: 60_000 }),
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.consume_at(1024, t0));
        assert!(rl.consume_at(1024, t0));
        assert!(!rl.consume_at(1024, t0), "ops bucket empty");
        assert!(rl.is_blocked());
        assert!(rl.timer.is_armed().unwrap());
        assert_eq!(rl.available_at(t0), (Some(2048), Some(0)));
        // Blocked stays blocked until the timer handler runs, whatever the time.
        assert!(!rl.consume_at(1, t0 + Duration::from_secs(120)));
        let json = r#"{"bandwidth":{"size":10,"refill_time_ms":5}}"#;
        let parsed: RateLimiterConfig = serde_json::from_str(json).unwrap();
        assert_eq!(parsed.bandwidth.unwrap().one_time_burst, 0);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bandwith":{}}"#).is_err());
    }
}
