//! Fleet-wide collapsed forwarding: one S3 fetch per object for every
//! instance sharing the Redis tier. The instance whose request misses first
//! takes a short lease on the key (`SET NX PX`) and fetches; the others find
//! the lease taken and wait for the entry the fetching instance writes (the
//! write removes the lease), polling, bounded by the lease; a lease that
//! ends without an entry (the leader died, or its answer is not stored) is
//! taken by the next waiter, which fetches. Nobody waits longer than the
//! lease.

use super::{Found, Reader, RedisTier};
use crate::cache::store::Object;
use redis_protocol::resp2::types::OwnedFrame;
use std::time::{Duration, Instant};

/// How often a waiting instance looks for the entry.
const POLL: Duration = Duration::from_millis(25);

/// What the fleet says about a key this instance is about to fetch.
pub enum Lease {
    /// This instance fetches (it holds the lease, or Redis cannot say).
    Fetch,
    /// Another instance fetched it: the entry, from Redis.
    Fetched(Object),
}

impl Reader {
    /// Takes the fleet's lease on `cache_key` for `hold`, or waits (at most
    /// `hold`) for the instance holding it to write the entry.
    pub async fn lease(&self, tier: &RedisTier, cache_key: &str, hold: Duration) -> Lease {
        let lease = tier.lease_key(cache_key);
        let ms = hold.as_millis().max(1).to_string();
        let deadline = Instant::now() + hold;
        loop {
            match self.take_lease(tier, &lease, &ms).await {
                // Redis cannot say: fetch alone rather than wait on it.
                Err(_) | Ok(true) => {
                    // The entry may have landed as the lease was freed.
                    if let Found::Hit(o) = self.get(tier, cache_key, None).await {
                        return Lease::Fetched(o);
                    }
                    return Lease::Fetch;
                }
                Ok(false) => {}
            }
            if let Found::Hit(o) = self.get(tier, cache_key, None).await {
                return Lease::Fetched(o);
            }
            if Instant::now() >= deadline {
                return Lease::Fetch;
            }
            monoio::time::sleep(POLL).await;
        }
    }

    async fn take_lease(&self, tier: &RedisTier, lease: &str, ms: &str) -> Result<bool, String> {
        let args: [&[u8]; 6] = [b"SET", lease.as_bytes(), b"1", b"NX", b"PX", ms.as_bytes()];
        match self.call(tier, lease.as_bytes(), &args).await? {
            OwnedFrame::SimpleString(_) => Ok(true),
            OwnedFrame::Null => Ok(false),
            other => Err(format!("SET NX answered {other:?}")),
        }
    }

    /// Gives the lease up (the answer will not be stored in Redis), so the
    /// instances waiting on it fetch now rather than when it expires.
    pub async fn release(&self, tier: &RedisTier, cache_key: &str) {
        let lease = tier.lease_key(cache_key);
        let _ = self
            .call(tier, lease.as_bytes(), &[b"DEL", lease.as_bytes()])
            .await;
    }
}
