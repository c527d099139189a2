//! Publishing an object while it is fetched, so the fleet's other
//! instances stream it as it arrives rather than wait for all of it.
//!
//! The instance holding the fleet's lease on a key (`lease.rs`) writes,
//! through the writer thread, a stream record (`{entry}:stream`: the
//! object's headers, length, chunk size and write id) when the head
//! arrives, then each chunk as soon as it is complete (`SET`, its own CRC
//! inside), extending the record and the lease with each one; a leader
//! that stops publishing lets both expire. The entry written at the end
//! uses the same write id and writes only the chunks not published yet;
//! its script deletes the record.
//!
//! A chunk the queue had no room for is written with the entry: a follower
//! waiting for it waits for the entry. Queued chunk bytes are bounded
//! ([`MAX_QUEUED`]); past that, chunks are dropped the same way.
//!
//! An object too large for the memory tier is never held whole: its fill
//! passes it through. It is still published ([`RedisTier::publish_bytes`]),
//! and when its last byte has passed, its manifest is written from the
//! chunks' CRCs ([`RedisTier::finish`]): stored in Redis only, and only if
//! every chunk was written. A fill that breaks ends its stream record and
//! lease at once ([`RedisTier::abort`]).

use super::entry;
use super::reader::Reader;
use super::{RedisTier, RedisWrite};
use crate::cache::store::Object;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Chunk bytes the write queue may hold at once.
const MAX_QUEUED: u64 = 64 * 1024 * 1024;

/// A stream record to write.
pub struct StreamWrite {
    key: String,
    value: Vec<u8>,
    hold: Duration,
}

/// A published chunk to write.
pub struct ChunkWrite {
    key: String,
    write_id: String,
    n: usize,
    /// The chunk's value ([`entry::chunk_value`]).
    pub(super) value: Vec<u8>,
    ttl: Duration,
    hold: Duration,
}

/// What a fill that publishes its object needs (`proxy::fill`).
pub struct Publisher {
    /// The cache key.
    pub key: String,
    /// The write its chunks and entry belong to.
    pub write_id: String,
    /// How long the record and the lease live past each chunk.
    pub hold: Duration,
    /// The chunks' TTL.
    pub ttl: Duration,
    /// Chunks published so far.
    pub sent: usize,
    /// Their CRC-32s (a passed-through object's manifest lists them).
    crcs: Vec<u32>,
    /// Bytes of the next chunk, for a passed-through object.
    pending: Vec<u8>,
}

/// The manifest of a passed-through object, once all its chunks are
/// queued.
pub struct FinishWrite {
    pub(super) key: String,
    pub(super) manifest: Vec<u8>,
    pub(super) chunks: usize,
    pub(super) write_id: String,
    pub(super) ttl: Duration,
    /// The memory tier's purge count when the fill started.
    pub(super) epoch: u64,
}

impl RedisTier {
    /// Starts publishing `object` (its body still empty), `len` bytes, if
    /// it is larger than a chunk: its stream record is queued. `hold`: the
    /// lease's length; `servable`: how long the object may be served.
    pub fn publish(
        &self,
        key: &str,
        object: &Object,
        len: u64,
        hold: Duration,
        servable: Duration,
    ) -> Option<Publisher> {
        if len <= self.settings.chunk_bytes as u64 {
            return None;
        }
        let write_id = self.new_write_id();
        let value = entry::encode_stream(key, object, len, self.settings.chunk_bytes, &write_id);
        let queued = self.enqueue(RedisWrite::Stream(StreamWrite {
            key: key.to_string(),
            value,
            hold,
        }));
        queued.then(|| Publisher {
            key: key.to_string(),
            write_id,
            hold,
            ttl: super::ttl(&self.settings, servable),
            sent: 0,
            crcs: Vec::new(),
            pending: Vec::new(),
        })
    }

    /// Passes bytes of a passed-through object to `p`: each chunk is queued
    /// as soon as it is complete.
    pub fn publish_bytes(&self, p: &mut Publisher, mut bytes: &[u8]) {
        let size = self.settings.chunk_bytes;
        while !bytes.is_empty() {
            let take = (size - p.pending.len()).min(bytes.len());
            p.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if p.pending.len() == size {
                let chunk = std::mem::take(&mut p.pending);
                self.publish_chunk(p, &chunk);
            }
        }
    }

    /// The last byte of a passed-through object has passed: its last chunk
    /// and its manifest (`object` without its body, `len` bytes) are
    /// queued. `epoch`: the memory tier's purge count when its fill began.
    pub fn finish(&self, mut p: Publisher, object: &Object, len: u64, epoch: u64) {
        if !p.pending.is_empty() {
            let chunk = std::mem::take(&mut p.pending);
            self.publish_chunk(&mut p, &chunk);
        }
        let manifest = entry::encode_manifest(
            &p.key,
            object,
            len,
            self.settings.chunk_bytes,
            std::mem::take(&mut p.crcs),
            &p.write_id,
        );
        self.enqueue(RedisWrite::Finish(FinishWrite {
            key: p.key,
            manifest,
            chunks: p.sent,
            write_id: p.write_id,
            ttl: p.ttl,
            epoch,
        }));
    }

    /// The object `p` published will not be whole: its stream record and
    /// lease end, so its followers fetch for themselves now.
    pub fn abort(&self, p: &Publisher) {
        self.enqueue(RedisWrite::Abort(p.key.clone()));
    }

    /// Queues the next chunk of `p`'s object, `bytes`; never waits.
    pub fn publish_chunk(&self, p: &mut Publisher, bytes: &[u8]) {
        let n = p.sent;
        p.sent += 1;
        p.crcs.push(crc32fast::hash(bytes));
        let len = bytes.len() as u64 + 4;
        if self.chunks_queued.fetch_add(len, Ordering::Relaxed) + len > MAX_QUEUED {
            self.chunks_queued.fetch_sub(len, Ordering::Relaxed);
            self.writes_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let queued = self.enqueue(RedisWrite::Chunk(ChunkWrite {
            key: p.key.clone(),
            write_id: p.write_id.clone(),
            n,
            value: entry::chunk_value(bytes),
            ttl: p.ttl,
            hold: p.hold,
        }));
        if !queued {
            self.chunks_queued.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Writes a stream record.
    pub(super) async fn write_stream(&self, redis: &Reader, w: &StreamWrite) -> Result<(), String> {
        let key = self.stream_key(&w.key);
        let px = w.hold.as_millis().max(1).to_string();
        let args: [&[u8]; 5] = [b"SET", key.as_bytes(), &w.value, b"PX", px.as_bytes()];
        redis.call(self, key.as_bytes(), &args).await.map(drop)
    }

    /// Writes a chunk and extends its object's stream record and lease;
    /// `published` counts, per write, the chunks written in order from the
    /// first (a gap stops the count: the entry writes the rest).
    pub(super) async fn write_chunk(
        &self,
        redis: &Reader,
        w: &ChunkWrite,
        published: &mut HashMap<String, usize>,
    ) -> Result<(), String> {
        let rkey = self.redis_key(&w.key);
        let chunk = self.chunk_key(&rkey, &w.write_id, w.n);
        let (stream, lease) = (self.stream_key(&w.key), self.lease_key(&w.key));
        let px = w.ttl.as_millis().max(1).to_string();
        let hold = w.hold.as_millis().max(1).to_string();
        let commands: [&[&[u8]]; 3] = [
            &[b"SET", chunk.as_bytes(), &w.value, b"PX", px.as_bytes()],
            &[b"PEXPIRE", stream.as_bytes(), hold.as_bytes()],
            &[b"PEXPIRE", lease.as_bytes(), hold.as_bytes()],
        ];
        let mut replies = redis.pipeline(self, rkey.as_bytes(), &commands).await?;
        replies.truncate(1);
        for reply in replies {
            super::conn::ok(reply).map_err(|e| format!("Redis said: {e}"))?;
        }
        let count = published.entry(w.write_id.clone()).or_insert(0);
        if *count == w.n {
            *count += 1;
        }
        // Writes whose entry never comes (a fill that broke) are forgotten.
        if published.len() > 1024 {
            published.clear();
        }
        Ok(())
    }

    /// Ends `cache_key`'s stream record and lease: its followers stop
    /// waiting for chunks and fetch for themselves.
    pub(super) async fn end_stream(&self, redis: &Reader, cache_key: &str) {
        let (stream, lease) = (self.stream_key(cache_key), self.lease_key(cache_key));
        let args: [&[u8]; 3] = [b"DEL", stream.as_bytes(), lease.as_bytes()];
        let _ = redis.call(self, stream.as_bytes(), &args).await;
    }
}
