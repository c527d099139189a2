//! Rate limits, pure: token buckets on a caller-supplied millisecond clock,
//! and a bounded (LRU) table of per-address buckets.
//!
//! Each worker keeps its own buckets (no cross-core traffic): a limit of R
//! requests/s over W workers gives each worker R/W per second and a burst of
//! burst/W (at least 1). Clients spread over workers by the kernel's
//! `SO_REUSEPORT` hashing, so the whole process admits between R/W (one
//! client whose connections all land on one worker) and R per second.

use std::net::IpAddr;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now_ms: u64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last_ms: now_ms,
        }
    }

    /// Takes one token: `Ok` when there was one, else how long (ms) until
    /// there will be.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(((missing / self.rate) * 1000.0).ceil() as u64)
    }
}

/// Per-address token buckets, at most `capacity` addresses (least recently
/// seen dropped first), so a flood of addresses cannot exhaust memory.
pub struct PerAddress {
    rate: f64,
    burst: f64,
    table: quick_cache::unsync::Cache<IpAddr, TokenBucket>,
}

impl PerAddress {
    /// Buckets of `rate`/`burst` for up to `capacity` addresses.
    pub fn new(rate: f64, burst: f64, capacity: usize) -> PerAddress {
        PerAddress {
            rate,
            burst,
            table: quick_cache::unsync::Cache::new(capacity.max(16)),
        }
    }

    /// Takes a token from `ip`'s bucket (a new address starts full).
    pub fn take(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), u64> {
        if let Some(mut b) = self.table.get_mut(&ip) {
            return b.take(now_ms);
        }
        let mut b = TokenBucket::new(self.rate, self.burst, now_ms);
        let r = b.take(now_ms);
        self.table.insert(ip, b);
        r
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// No address is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let mut b = TokenBucket::new(2.0, 3.0, 0);
        for _ in 0..3 {
            assert_eq!(b.take(0), Ok(()));
        }
        assert_eq!(b.take(0), Err(500));
        assert_eq!(b.take(250), Err(250));
        assert_eq!(b.take(500), Ok(()));
        // A long pause refills to the burst, not beyond.
        for _ in 0..3 {
            assert_eq!(b.take(60_000), Ok(()));
        }
        assert!(b.take(60_000).is_err());
        // A clock going backwards takes nothing.
        assert!(b.take(10).is_err());
    }

    #[test]
    fn per_address_buckets_are_separate_and_bounded() {
        let mut t = PerAddress::new(1.0, 1.0, 16);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(t.take(a, 0), Ok(()));
        assert!(t.take(a, 0).is_err());
        assert_eq!(t.take(b, 0), Ok(()));
        for i in 0..10_000u32 {
            let _ = t.take(IpAddr::from(i.to_be_bytes()), 0);
        }
        assert!(t.len() <= 64, "{}", t.len());
    }
}
