//! A lookup in the Redis tier, on the requesting core: the entry's
//! manifest, then (for a chunked object) the chunks the answer needs in one
//! `MGET` (they share the manifest's slot), every one checked (`entry`)
//! before anything is served. A single range of a chunked object reads only
//! the chunks it covers, and is answered from them without entering the
//! memory tier. A bad value is deleted, counted and read as a miss.

use super::entry;
use super::reader::Reader;
use super::values;
use super::RedisTier;
use crate::cache::policy::{self, RangeAnswer};
use crate::cache::store::Object;
use crate::config::Level;
use crate::log;
use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use std::sync::atomic::Ordering;

/// What a lookup found.
pub enum Found {
    /// The whole object.
    Hit(Object),
    /// Part of a chunked object, for the range asked: `Object::body` holds
    /// the object's bytes from `offset` on, `Object::total` its length.
    Part(Object, u64),
    /// A chunked object, to be streamed chunk by chunk
    /// ([`Reader::follow_chunk`]).
    Stream(entry::StreamHead),
    /// Nothing usable (absent, refused, or Redis unavailable).
    Miss,
}

impl Reader {
    /// Looks cache key `key` up. `range`: the request's `Range` header,
    /// when a part of a chunked object would do; `stream`: a chunked object
    /// is to be streamed (its chunks are not read here).
    pub async fn get(
        &self,
        tier: &RedisTier,
        key: &str,
        range: Option<&str>,
        stream: bool,
    ) -> Found {
        let rkey = tier.redis_key(key);
        let value = match self
            .call(tier, rkey.as_bytes(), &[b"GET", rkey.as_bytes()])
            .await
        {
            Ok(OwnedFrame::BulkString(v)) => values::share(v),
            Ok(OwnedFrame::Null) => {
                tier.misses.fetch_add(1, Ordering::Relaxed);
                return Found::Miss;
            }
            Ok(other) => {
                self.unavailable(tier, &format!("GET answered {other:?}"));
                return Found::Miss;
            }
            Err(e) => {
                self.unavailable(tier, &e);
                return Found::Miss;
            }
        };
        let found = match entry::decode(key, value) {
            Ok(m) if !m.chunked() => m.object(0..0, Vec::new()).map(Found::Hit),
            Ok(m) if stream => Ok(Found::Stream(m.into_stream_head())),
            Ok(m) => {
                let len = m.body_len();
                let bytes = match range.map(|r| policy::range(Some(r), len)) {
                    Some(RangeAnswer::Part { first, last }) => first..last + 1,
                    _ => 0..len,
                };
                let which = m.chunks_for(bytes.clone());
                let whole = which == m.chunks_for(0..len);
                let chunks = match self.chunks(tier, &rkey, m.write_id(), which.clone()).await {
                    Ok(chunks) => chunks,
                    Err(e) => {
                        self.unavailable(tier, &e);
                        return Found::Miss;
                    }
                };
                let offset = m.chunk_offset(which.start);
                m.object(which, chunks).map(|o| match whole {
                    true => Found::Hit(o),
                    false => Found::Part(o, offset),
                })
            }
            Err(bad) => Err(bad),
        };
        match found {
            // Counted once its first chunk is in hand (`proxy::tiers`).
            Ok(found @ Found::Stream(_)) => found,
            Ok(found) => {
                tier.hits.fetch_add(1, Ordering::Relaxed);
                found
            }
            Err(bad) => {
                self.refuse(tier, &rkey, bad).await;
                Found::Miss
            }
        }
    }

    /// Chunks `which` of the entry at `rkey` written by `write_id`, in
    /// order, `None` where absent.
    pub(super) async fn chunks(
        &self,
        tier: &RedisTier,
        rkey: &str,
        write_id: &str,
        which: std::ops::Range<usize>,
    ) -> Result<Vec<Option<Bytes>>, String> {
        let keys: Vec<String> = which.map(|n| tier.chunk_key(rkey, write_id, n)).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        match self.call(tier, rkey.as_bytes(), &args).await? {
            OwnedFrame::Array(values) => Ok(values
                .into_iter()
                .map(|v| match v {
                    OwnedFrame::BulkString(b) => Some(values::share(b)),
                    _ => None,
                })
                .collect()),
            other => Err(format!("MGET answered {other:?}")),
        }
    }

    /// The entry of cache key `key` is broken (a chunk missing or bad,
    /// found while streaming it): counted, said and deleted.
    pub async fn drop_entry(&self, tier: &RedisTier, key: &str, why: &str) {
        self.refuse(tier, &tier.redis_key(key), why).await;
    }

    /// A value under our key that is not a whole, intact entry for it: a
    /// miss, counted, said and deleted.
    async fn refuse(&self, tier: &RedisTier, rkey: &str, bad: impl std::fmt::Debug) {
        tier.bad_entries.fetch_add(1, Ordering::Relaxed);
        tier.misses.fetch_add(1, Ordering::Relaxed);
        log!(
            Level::Warn,
            "Redis cache entry refused and deleted",
            key = rkey,
            reason = format_args!("{bad:?}"),
        );
        let _ = self
            .call(tier, rkey.as_bytes(), &[b"DEL", rkey.as_bytes()])
            .await;
    }
}
