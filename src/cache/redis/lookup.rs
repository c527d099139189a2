//! A lookup in the Redis tier, on the requesting core: the entry's
//! manifest (read 256 KiB a round trip, `GETRANGE`, so that Redis holds
//! no whole large reply for it), then (for a chunked object) the chunks
//! the answer needs in one `MGET` (they share the manifest's slot), every
//! one checked (`entry`) before anything is served. A single range of a
//! chunked object reads only the chunks it covers, and is answered from
//! them without entering the memory tier. A bad value is deleted, counted
//! and read as a miss.

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

/// An entry is read this much a round trip.
const PIECE: usize = 256 * 1024;

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
        let value = match self.value(tier, &rkey).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                tier.misses.fetch_add(1, Ordering::Relaxed);
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

    /// The value at `rkey` (`None`: none), read [`PIECE`] bytes a round
    /// trip: Redis holds no more than that of a reply for one lookup (with
    /// 32 connections each awaiting a whole 1 MiB value, Redis's own GET
    /// cost 3x as much: its allocator faulted in fresh pages for the
    /// replies; loadtest/results/performance.md). Most entries are one
    /// piece; a longer one says its length in its header, in the first.
    async fn value(&self, tier: &RedisTier, rkey: &str) -> Result<Option<Bytes>, String> {
        let first = self.range(tier, rkey, 0, PIECE).await?;
        if first.is_empty() {
            return Ok(None);
        }
        // A short first piece is the whole value: its header is read once,
        // by `entry::decode`.
        if first.len() < PIECE {
            return Ok(Some(values::share(first)));
        }
        // A length beyond what an inline entry may have is not believed:
        // the piece in hand goes to `entry::decode`, which refuses it.
        let limit = (tier.settings.chunk_bytes + PIECE) as u64;
        let total = match entry::value_len(&first) {
            Some(total) if total <= limit => total as usize,
            _ => return Ok(Some(values::share(first))),
        };
        // One byte past the length it says: a longer value is refused too.
        let mut whole = values::take(total + 1);
        whole.extend_from_slice(&first);
        values::give(first);
        while whole.len() <= total {
            let piece = PIECE.min(total + 1 - whole.len());
            let more = self.range(tier, rkey, whole.len(), piece).await?;
            whole.extend_from_slice(&more);
            // Short: the value's end (as it says, or sooner: refused).
            let short = more.len() < piece;
            values::give(more);
            if short {
                break;
            }
        }
        Ok(Some(values::share(whole)))
    }

    /// Up to `len` bytes of the value at `rkey` from `start` on (`GETRANGE`:
    /// empty past its end, and for no value).
    async fn range(
        &self,
        tier: &RedisTier,
        rkey: &str,
        start: usize,
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let (from, to) = (start.to_string(), (start + len - 1).to_string());
        let args = [
            &b"GETRANGE"[..],
            rkey.as_bytes(),
            from.as_bytes(),
            to.as_bytes(),
        ];
        match self.call(tier, rkey.as_bytes(), &args).await? {
            OwnedFrame::BulkString(v) => Ok(v),
            other => Err(format!("GETRANGE answered {other:?}")),
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
