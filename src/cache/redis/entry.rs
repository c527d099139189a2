//! A Redis entry: one cached object that describes itself, so a value that
//! is not ours, was cut short or had a bit flipped is recognised and dropped,
//! never served.
//!
//! An object up to the chunk size (`cache.redis.chunk_size_kb`) is one
//! value, its body inline. A larger one is a manifest plus chunks, each
//! chunk a value of its own under the entry's key, the write's id and the
//! chunk's number (`mod.rs` names them; one hash tag, so one Cluster slot).
//! The manifest, written last, lists each chunk's CRC-32: a chunk missing,
//! cut, flipped or left by another write is caught before a byte is sent,
//! and the lookup is a miss, never a short or mixed body. A range is read
//! from the chunks it covers.
//!
//! ```text
//! "YTGRS2\n"   magic and format version
//! u32 BE       length of the metadata that follows
//! JSON         key (the whole cache key, origin fingerprint included),
//!              etag, last_modified, headers, total, stored_at_ms,
//!              fresh_for_ms, body_len, crc32 (of an inline body),
//!              chunk_size, chunks (CRC-32 of each), write_id
//! body         body_len bytes when inline, nothing when chunked
//! ```
//!
//! Pure: no I/O.

use crate::cache::region::Filling;
use crate::cache::store::Object;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::time::{Duration, SystemTime};

const MAGIC: &[u8] = b"YTGRS2\n";
/// The magic of a stream record: an object being fetched, its chunks
/// published as they arrive.
const STREAM_MAGIC: &[u8] = b"YTGRST1\n";

#[derive(Serialize, Deserialize)]
struct EntryMeta {
    key: String,
    etag: String,
    last_modified: Option<String>,
    headers: String,
    total: u64,
    stored_at_ms: u64,
    fresh_for_ms: u64,
    body_len: u64,
    crc32: u32,
    chunk_size: u64,
    chunks: Vec<u32>,
    write_id: String,
}

/// Why a value under one of our keys was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// Not in our format (another writer, or another version).
    Foreign,
    /// Shorter or longer than it says.
    Length,
    /// The body (or a chunk) does not match its checksum.
    Checksum,
    /// Written for another cache key (another origin, or a hash collision).
    OtherKey,
    /// A chunk the manifest lists is not there.
    MissingChunk,
}

/// An entry ready to write: the manifest (with the body when inline) and
/// the chunks' bytes, in order (each stored as [`chunk_value`]).
pub struct Encoded {
    /// The manifest's value.
    pub manifest: Vec<u8>,
    /// The chunks' bytes (none when the body is inline).
    pub chunks: Vec<Bytes>,
}

/// A chunk's value: its CRC-32 (4 bytes, big-endian), then its bytes, so
/// a chunk read while its object is still being fetched (no manifest yet)
/// is checked too.
pub fn chunk_value(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + bytes.len());
    v.extend_from_slice(&crc32fast::hash(bytes).to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

/// The bytes of a chunk's value, if intact and `len` long.
pub fn open_chunk(value: Bytes, len: u64) -> Result<Bytes, Bad> {
    let crc = value.first_chunk::<4>().map(|c| u32::from_be_bytes(*c));
    let bytes = value.slice(4.min(value.len())..);
    if crc.is_none() || bytes.len() as u64 != len {
        return Err(Bad::Length);
    }
    if Some(crc32fast::hash(&bytes)) != crc {
        return Err(Bad::Checksum);
    }
    Ok(bytes)
}

/// The bytes of chunk `n` of an object of `body_len` bytes in chunks of
/// `chunk_size`.
pub fn chunk_len(n: usize, chunk_size: u64, body_len: u64) -> u64 {
    chunk_size.min(body_len.saturating_sub(n as u64 * chunk_size))
}

/// `object`, stored under cache key `key`: inline when its body fits in
/// `chunk_size`, else as chunks of that size written by `write_id`.
pub fn encode(key: &str, object: &Object, chunk_size: usize, write_id: &str) -> Encoded {
    let body: &Bytes = object.body.bytes();
    let chunk_size = chunk_size.max(1);
    if body.len() <= chunk_size {
        let mut meta = meta_of(key, object, body.len() as u64, chunk_size, write_id);
        meta.crc32 = crc32fast::hash(body);
        return Encoded {
            manifest: frame(&meta, body),
            chunks: Vec::new(),
        };
    }
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(chunk_size)
        .map(|at| body.slice(at..(at + chunk_size).min(body.len())))
        .collect();
    let crcs = chunks.iter().map(|c| crc32fast::hash(c)).collect();
    let manifest = encode_manifest(key, object, body.len() as u64, chunk_size, crcs, write_id);
    Encoded { manifest, chunks }
}

/// The manifest of a chunked object whose chunks were written already
/// (published as it arrived): `object` without its body, `body_len` bytes
/// in chunks of `chunk_size` whose CRC-32s are `crcs`.
pub fn encode_manifest(
    key: &str,
    object: &Object,
    body_len: u64,
    chunk_size: usize,
    crcs: Vec<u32>,
    write_id: &str,
) -> Vec<u8> {
    let mut meta = meta_of(key, object, body_len, chunk_size, write_id);
    meta.chunks = crcs;
    frame(&meta, &[])
}

/// The description of `object` (its body aside).
fn meta_of(
    key: &str,
    object: &Object,
    body_len: u64,
    chunk_size: usize,
    write_id: &str,
) -> EntryMeta {
    let stored_at_ms = object
        .stored_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    EntryMeta {
        key: key.to_string(),
        etag: object.etag.clone(),
        last_modified: object.last_modified.clone(),
        headers: object.headers.clone(),
        total: body_len,
        stored_at_ms,
        fresh_for_ms: object.fresh_for.as_millis() as u64,
        body_len,
        crc32: 0,
        chunk_size: chunk_size.max(1) as u64,
        chunks: Vec::new(),
        write_id: write_id.to_string(),
    }
}

/// A manifest's value: magic, the metadata's length and the metadata,
/// then `inline` (the body, when it is not chunked).
fn frame(meta: &EntryMeta, inline: &[u8]) -> Vec<u8> {
    // Serializing plain strings and numbers cannot fail.
    let meta = serde_json::to_vec(meta).unwrap_or_default();
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + meta.len() + inline.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(inline);
    out
}

/// How long the value whose first bytes are `head` says it is (its header
/// and, when inline, its body); `None` when `head` does not hold the whole
/// header or is not an entry. Only a hint for reading the rest: [`decode`]
/// checks the whole value.
pub fn value_len(head: &[u8]) -> Option<u64> {
    let rest = head.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    let meta: EntryMeta = serde_json::from_slice(rest.get(..len)?).ok()?;
    let header = (MAGIC.len() + 4 + len) as u64;
    match meta.chunks.is_empty() {
        true => header.checked_add(meta.body_len),
        false => Some(header),
    }
}

/// A manifest read back: what the object is, and its body when inline.
pub struct Manifest {
    meta: EntryMeta,
    inline: Option<Bytes>,
}

/// The manifest in `value`, if it is an intact entry for `key`.
pub fn decode(key: &str, value: Bytes) -> Result<Manifest, Bad> {
    let rest = value.strip_prefix(MAGIC).ok_or(Bad::Foreign)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(Bad::Length)?;
    let len = u32::from_be_bytes(*len) as usize;
    let meta = rest.get(..len).ok_or(Bad::Length)?;
    let meta: EntryMeta = serde_json::from_slice(meta).map_err(|_| Bad::Foreign)?;
    if meta.key != key {
        return Err(Bad::OtherKey);
    }
    let body_at = MAGIC.len() + 4 + len;
    let body_len = value.len() - body_at;
    if meta.chunks.is_empty() {
        if body_len as u64 != meta.body_len {
            return Err(Bad::Length);
        }
        let body = value.slice(body_at..);
        if crc32fast::hash(&body) != meta.crc32 {
            return Err(Bad::Checksum);
        }
        return Ok(Manifest {
            meta,
            inline: Some(body),
        });
    }
    let expected = meta.body_len.div_ceil(meta.chunk_size.max(1));
    if body_len != 0 || meta.chunk_size == 0 || expected != meta.chunks.len() as u64 {
        return Err(Bad::Length);
    }
    Ok(Manifest { meta, inline: None })
}

impl Manifest {
    /// The object's length.
    pub fn body_len(&self) -> u64 {
        self.meta.body_len
    }

    /// The id of the write its chunks came from (part of their keys).
    pub fn write_id(&self) -> &str {
        &self.meta.write_id
    }

    /// Whether the body is in chunks.
    pub fn chunked(&self) -> bool {
        self.inline.is_none()
    }

    /// The chunks holding bytes `bytes` (all of them for `0..body_len`).
    pub fn chunks_for(&self, bytes: Range<u64>) -> Range<usize> {
        let size = self.meta.chunk_size.max(1);
        let n = self.meta.chunks.len();
        if bytes.start >= bytes.end {
            return 0..0;
        }
        let first = (bytes.start / size) as usize;
        let last = ((bytes.end - 1) / size) as usize;
        first.min(n)..(last + 1).min(n)
    }

    /// The length of chunk `n`.
    pub fn chunk_len(&self, n: usize) -> u64 {
        chunk_len(n, self.meta.chunk_size, self.meta.body_len)
    }

    /// What streaming the chunks needs (each checks itself).
    pub fn into_stream_head(self) -> StreamHead {
        StreamHead { meta: self.meta }
    }

    /// Where chunk `n` starts in the body.
    pub fn chunk_offset(&self, n: usize) -> u64 {
        n as u64 * self.meta.chunk_size
    }

    /// The object with `body` (the inline body, or the chunks `which`
    /// holds, read in order, `None` where absent), checked chunk by chunk.
    /// The body starts at byte `chunk_offset(which.start)` of the object.
    pub fn object(self, which: Range<usize>, chunks: Vec<Option<Bytes>>) -> Result<Object, Bad> {
        let body = match self.inline {
            Some(body) => body.into(),
            None => {
                if chunks.len() != which.len() {
                    return Err(Bad::MissingChunk);
                }
                let len: u64 = which.clone().map(|n| self.chunk_len(n)).sum();
                let mut body = Filling::with_capacity(len);
                for (n, chunk) in which.zip(chunks) {
                    let chunk = open_chunk(chunk.ok_or(Bad::MissingChunk)?, self.chunk_len(n))?;
                    if Some(&crc32fast::hash(&chunk)) != self.meta.chunks.get(n) {
                        return Err(Bad::Checksum);
                    }
                    body.extend_from_slice(&chunk);
                }
                body.freeze()
            }
        };
        let meta = self.meta;
        Ok(Object {
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(meta.stored_at_ms),
            fresh_for: Duration::from_millis(meta.fresh_for_ms),
            etag: meta.etag,
            last_modified: meta.last_modified,
            headers: meta.headers,
            body,
            total: meta.total,
            touched_ms: Default::default(),
        })
    }
}

/// An object another instance is fetching now, publishing its chunks as
/// they arrive (`lease.rs`): everything but the body, which its chunks
/// bring, each checked by its own CRC.
pub struct StreamHead {
    meta: EntryMeta,
}

/// The stream record of `object` (its body still empty), `body_len` bytes
/// to come in chunks of `chunk_size`, written by `write_id`.
pub fn encode_stream(
    key: &str,
    object: &Object,
    body_len: u64,
    chunk_size: usize,
    write_id: &str,
) -> Vec<u8> {
    let meta = meta_of(key, object, body_len, chunk_size, write_id);
    let mut out = STREAM_MAGIC.to_vec();
    // Serializing plain strings and numbers cannot fail.
    out.extend_from_slice(&serde_json::to_vec(&meta).unwrap_or_default());
    out
}

/// The stream record in `value`, if it is one for `key`.
pub fn decode_stream(key: &str, value: &[u8]) -> Result<StreamHead, Bad> {
    let json = value.strip_prefix(STREAM_MAGIC).ok_or(Bad::Foreign)?;
    let meta: EntryMeta = serde_json::from_slice(json).map_err(|_| Bad::Foreign)?;
    if meta.key != key {
        return Err(Bad::OtherKey);
    }
    if meta.chunk_size == 0 {
        return Err(Bad::Length);
    }
    Ok(StreamHead { meta })
}

impl StreamHead {
    /// The object's length.
    pub fn body_len(&self) -> u64 {
        self.meta.body_len
    }

    /// How many chunks bring the body.
    pub fn chunk_count(&self) -> usize {
        self.meta.body_len.div_ceil(self.meta.chunk_size) as usize
    }

    /// The length of chunk `n`.
    pub fn chunk_len(&self, n: usize) -> u64 {
        chunk_len(n, self.meta.chunk_size, self.meta.body_len)
    }

    /// The id of the write its chunks come from.
    pub fn write_id(&self) -> &str {
        &self.meta.write_id
    }

    /// The object, its body empty (`total` its length).
    pub fn object(&self) -> Object {
        let meta = &self.meta;
        Object {
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(meta.stored_at_ms),
            fresh_for: Duration::from_millis(meta.fresh_for_ms),
            etag: meta.etag.clone(),
            last_modified: meta.last_modified.clone(),
            headers: meta.headers.clone(),
            body: Default::default(),
            total: meta.total,
            touched_ms: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(body: &'static [u8]) -> Object {
        Object {
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            fresh_for: Duration::from_secs(60),
            etag: "\"abc\"".into(),
            last_modified: Some("Tue, 01 Dec 2026 00:00:00 GMT".into()),
            headers: "Content-Type: text/plain\r\n".into(),
            body: Bytes::from_static(body).into(),
            total: body.len() as u64,
            touched_ms: Default::default(),
        }
    }

    /// Chunks as Redis holds them.
    fn values(chunks: &[Bytes]) -> Vec<Option<Bytes>> {
        chunks.iter().map(|c| Some(chunk_value(c).into())).collect()
    }

    fn whole(m: Manifest, chunks: &[Bytes]) -> Result<Object, Bad> {
        let all = m.chunks_for(0..m.body_len());
        let read = values(chunks)[all.clone()].to_vec();
        m.object(all, read)
    }

    #[test]
    fn an_entry_reads_back_as_written_inline_or_in_chunks() {
        for chunk_size in [1024, 5, 4, 1] {
            let e = encode("k", &object(b"hello, redis"), chunk_size, "w1");
            let m = decode("k", e.manifest.into()).expect("decodes");
            assert_eq!(m.chunked(), chunk_size < 12, "chunk size {chunk_size}");
            assert_eq!(
                e.chunks.len(),
                if chunk_size < 12 {
                    12usize.div_ceil(chunk_size)
                } else {
                    0
                }
            );
            let back = whole(m, &e.chunks).expect("whole");
            let want = object(b"hello, redis");
            assert_eq!(&back.body[..], &want.body[..]);
            assert_eq!(back.etag, want.etag);
            assert_eq!(back.headers, want.headers);
            assert_eq!(back.last_modified, want.last_modified);
            assert_eq!(back.stored_at, want.stored_at);
            assert_eq!(back.fresh_for, want.fresh_for);
            assert_eq!(back.total, 12);
        }
    }

    #[test]
    fn a_value_s_length_is_read_from_its_header_alone() {
        for chunk_size in [1024, 4] {
            let value = encode("k", &object(b"hello, redis"), chunk_size, "w").manifest;
            let header = value.len() - if chunk_size == 1024 { 12 } else { 0 };
            for cut in [header, (header + 3).min(value.len()), value.len()] {
                assert_eq!(value_len(&value[..cut]), Some(value.len() as u64), "{cut}");
            }
            assert_eq!(value_len(&value[..header - 1]), None, "header cut");
        }
        assert_eq!(value_len(b"YTGRS1\nxxxx{}"), None, "foreign");
    }

    #[test]
    fn a_range_is_read_from_the_chunks_it_covers() {
        let e = encode("k", &object(b"0123456789abcdef"), 4, "w");
        let m = decode("k", e.manifest.into()).expect("decodes");
        assert_eq!(m.chunks_for(5..7), 1..2);
        assert_eq!(m.chunks_for(3..9), 0..3);
        assert_eq!(m.chunks_for(12..16), 3..4);
        assert_eq!(m.chunks_for(0..16), 0..4);
        assert_eq!(m.chunks_for(7..7), 0..0);
        assert_eq!(m.chunk_offset(2), 8);
        let part = m.object(2..4, values(&e.chunks[2..4])).expect("part");
        assert_eq!(&part.body[..], b"89abcdef");
        assert_eq!(part.total, 16, "the whole object's length");
    }

    #[test]
    fn foreign_cut_flipped_misplaced_and_mixed_values_are_refused() {
        let value: Bytes = encode("k", &object(b"hello, redis"), 1024, "w")
            .manifest
            .into();
        assert_eq!(
            decode("k", Bytes::from_static(b"hello")).err(),
            Some(Bad::Foreign)
        );
        assert_eq!(decode("other", value.clone()).err(), Some(Bad::OtherKey));
        for cut in [value.len() - 1, MAGIC.len() + 2, MAGIC.len() + 10] {
            assert!(decode("k", value.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut longer = value.to_vec();
        longer.push(b'!');
        assert_eq!(decode("k", longer.into()).err(), Some(Bad::Length));
        let mut flipped = value.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x04;
        assert_eq!(decode("k", flipped.into()).err(), Some(Bad::Checksum));

        // Chunks: one missing, one cut, one flipped, one from another write
        // of another body: each refused, never served short or mixed.
        let e = encode("k", &object(b"0123456789abcdef"), 4, "w");
        let other = encode("k", &object(b"0123456789ABCDEF"), 4, "v");
        let m = || decode("k", e.manifest.clone().into()).expect("decodes");
        let mut read = values(&e.chunks);
        read[1] = None;
        assert_eq!(m().object(0..4, read).err(), Some(Bad::MissingChunk));
        let mut read = values(&e.chunks);
        read[3] = Some(Bytes::from(chunk_value(&e.chunks[3])).slice(..6));
        assert_eq!(m().object(0..4, read).err(), Some(Bad::Length));
        let mut read = values(&e.chunks);
        let mut flipped = chunk_value(&e.chunks[2]);
        flipped[5] ^= 0x20;
        read[2] = Some(flipped.into());
        assert_eq!(m().object(0..4, read).err(), Some(Bad::Checksum));
        // Intact in itself, but another write's bytes.
        let mut read = values(&e.chunks);
        read[3] = values(&other.chunks)[3].clone();
        assert_eq!(m().object(0..4, read).err(), Some(Bad::Checksum));
        assert_eq!(
            open_chunk(Bytes::from_static(b"ab"), 0).err(),
            Some(Bad::Length)
        );
        assert_eq!(m().object(0..4, vec![None]).err(), Some(Bad::MissingChunk));
    }

    #[test]
    fn a_stream_record_describes_the_object_its_chunks_bring() {
        let o = object(b"");
        let v = encode_stream("k", &o, 10, 4, "w9");
        let h = decode_stream("k", &v).expect("decodes");
        assert_eq!((h.body_len(), h.chunk_count(), h.write_id()), (10, 3, "w9"));
        assert_eq!((h.chunk_len(0), h.chunk_len(2)), (4, 2));
        let back = h.object();
        assert_eq!(
            (back.etag, back.headers, back.total),
            (o.etag, o.headers, 10)
        );
        assert_eq!(decode_stream("other", &v).err(), Some(Bad::OtherKey));
        assert_eq!(decode_stream("k", b"YTGRS2\nxx").err(), Some(Bad::Foreign));
    }
}
