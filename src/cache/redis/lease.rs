//! Fleet-wide collapsed forwarding: one S3 fetch per object for every
//! instance sharing the Redis tier. The instance whose request misses first
//! takes a short lease on the key (`SET NX PX`) and fetches; the others find
//! the lease taken and wait for the entry the fetching instance writes (the
//! write removes the lease), polling, bounded by the lease; a lease that
//! ends without an entry (the leader died, or its answer is not stored) is
//! taken by the next waiter, which fetches. Nobody waits longer than the
//! lease.
//!
//! An object larger than a chunk is published as it arrives
//! (`publish.rs`): a waiter that finds its stream record streams the chunks
//! as they land ([`Reader::follow_chunk`]) instead of waiting for all of
//! them.

use super::entry::{self, StreamHead};
use super::{values, Found, Reader, RedisTier};
use crate::cache::store::Object;
use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use std::time::{Duration, Instant};

/// How often a waiting instance looks for the entry.
const POLL: Duration = Duration::from_millis(25);
/// How often a follower looks for the next chunk.
const CHUNK_POLL: Duration = Duration::from_millis(5);

/// Why a chunk could not be had.
#[derive(Debug)]
pub enum ChunkError {
    /// The entry is broken: a chunk missing, cut or flipped (a stored
    /// entry), or its publisher stopped (the fleet's stream).
    Broken(String),
    /// Redis failed or did not answer.
    Unavailable(String),
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::Broken(e) | ChunkError::Unavailable(e) => f.write_str(e),
        }
    }
}

/// What the fleet says about a key this instance is about to fetch.
pub enum Lease {
    /// This instance fetches (it holds the lease, or Redis cannot say).
    Fetch,
    /// Another instance fetched it: the entry, from Redis.
    Fetched(Object),
    /// Another instance is fetching it and publishing its chunks.
    Streaming(StreamHead),
}

impl Reader {
    /// Takes the fleet's lease on `cache_key` for `hold`, or waits (at most
    /// `hold`) for the instance holding it to write the entry, or (when
    /// `stream`) to publish its stream record.
    pub async fn lease(
        &self,
        tier: &RedisTier,
        cache_key: &str,
        hold: Duration,
        stream: bool,
    ) -> Lease {
        let lease = tier.lease_key(cache_key);
        let ms = hold.as_millis().max(1).to_string();
        let deadline = Instant::now() + hold;
        loop {
            match self.take_lease(tier, &lease, &ms).await {
                // Redis cannot say: fetch alone rather than wait on it.
                Err(_) | Ok(true) => {
                    // The entry may have landed as the lease was freed.
                    if let Found::Hit(o) = self.get(tier, cache_key, None, false).await {
                        return Lease::Fetched(o);
                    }
                    return Lease::Fetch;
                }
                Ok(false) => {}
            }
            // Written meanwhile: a chunked entry is streamed, not read whole.
            match self.get(tier, cache_key, None, stream).await {
                Found::Hit(o) => return Lease::Fetched(o),
                Found::Stream(head) => return Lease::Streaming(head),
                Found::Part(..) | Found::Miss => {}
            }
            if stream {
                if let Some(head) = self.stream_head(tier, cache_key).await {
                    return Lease::Streaming(head);
                }
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
        let (lease, stream) = (tier.lease_key(cache_key), tier.stream_key(cache_key));
        let args: [&[u8]; 3] = [b"DEL", lease.as_bytes(), stream.as_bytes()];
        let _ = self.call(tier, lease.as_bytes(), &args).await;
    }

    /// The stream record of `cache_key`, while another instance publishes it.
    async fn stream_head(&self, tier: &RedisTier, cache_key: &str) -> Option<StreamHead> {
        let key = tier.stream_key(cache_key);
        match self
            .call(tier, key.as_bytes(), &[b"GET", key.as_bytes()])
            .await
        {
            Ok(OwnedFrame::BulkString(v)) => entry::decode_stream(cache_key, &v).ok(),
            _ => None,
        }
    }

    /// Chunks `which` of the object `head` describes, checked: of a stored
    /// entry in one `MGET` (`stall` zero), else each as [`Self::follow_chunk`]
    /// waits for it.
    pub async fn read_chunks(
        &self,
        tier: &RedisTier,
        cache_key: &str,
        head: &StreamHead,
        which: std::ops::Range<usize>,
        stall: Duration,
    ) -> Result<Vec<Bytes>, ChunkError> {
        if !stall.is_zero() {
            let mut out = Vec::with_capacity(which.len());
            for n in which {
                out.push(self.follow_chunk(tier, cache_key, head, n, stall).await?);
            }
            return Ok(out);
        }
        let rkey = tier.redis_key(cache_key);
        let values = self
            .chunks(tier, &rkey, head.write_id(), which.clone())
            .await
            .map_err(ChunkError::Unavailable)?;
        which
            .zip(values)
            .map(|(n, v)| {
                let v = v.ok_or_else(|| ChunkError::Broken(format!("chunk {n} missing")))?;
                entry::open_chunk(v, head.chunk_len(n))
                    .map_err(|bad| ChunkError::Broken(format!("chunk {n}: {bad:?}")))
            })
            .collect()
    }

    /// Chunk `n` of the object `head` describes, once its publisher wrote
    /// it (checked against its own CRC). `Err` when it will not come: the
    /// publisher stopped (its record and lease are gone, and no entry holds
    /// the chunk), nothing came for `stall`, or Redis failed.
    pub async fn follow_chunk(
        &self,
        tier: &RedisTier,
        cache_key: &str,
        head: &StreamHead,
        n: usize,
        stall: Duration,
    ) -> Result<Bytes, ChunkError> {
        let rkey = tier.redis_key(cache_key);
        let chunk = tier.chunk_key(&rkey, head.write_id(), n);
        let (stream, lease) = (tier.stream_key(cache_key), tier.lease_key(cache_key));
        let deadline = Instant::now() + stall;
        loop {
            let commands: [&[&[u8]]; 2] = [
                &[b"GET", chunk.as_bytes()],
                &[
                    b"EXISTS",
                    stream.as_bytes(),
                    lease.as_bytes(),
                    rkey.as_bytes(),
                ],
            ];
            let mut replies = self
                .pipeline(tier, rkey.as_bytes(), &commands)
                .await
                .map_err(ChunkError::Unavailable)?;
            let alive = replies.pop();
            match replies.pop() {
                Some(OwnedFrame::BulkString(v)) => {
                    return entry::open_chunk(values::share(v), head.chunk_len(n))
                        .map_err(|bad| ChunkError::Broken(format!("chunk {n}: {bad:?}")));
                }
                Some(OwnedFrame::Null) => {}
                other => return Err(ChunkError::Unavailable(format!("GET answered {other:?}"))),
            }
            if alive == Some(OwnedFrame::Integer(0)) {
                let e = "the fetching instance stopped publishing";
                return Err(ChunkError::Broken(e.into()));
            }
            if Instant::now() >= deadline {
                let e = format!("chunk {n} missing");
                return Err(ChunkError::Broken(e));
            }
            monoio::time::sleep(CHUNK_POLL).await;
        }
    }
}
