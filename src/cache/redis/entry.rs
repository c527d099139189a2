//! A Redis entry: one cached object that describes itself, so a value that
//! is not ours, was cut short or had a bit flipped is recognised and dropped,
//! never served.
//!
//! ```text
//! "YTGRS1\n"   magic and format version
//! u32 BE       length of the metadata that follows
//! JSON         key (the whole cache key, origin fingerprint included),
//!              etag, last_modified, headers, total, stored_at_ms,
//!              fresh_for_ms, body_len, crc32 (of the body)
//! body         body_len bytes
//! ```
//!
//! Pure: no I/O.

use crate::cache::store::Object;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

const MAGIC: &[u8] = b"YTGRS1\n";

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
}

/// Why a value under one of our keys was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// Not in our format (another writer, or another version).
    Foreign,
    /// Shorter or longer than it says.
    Length,
    /// The body does not match its checksum.
    Checksum,
    /// Written for another cache key (another origin, or a hash collision).
    OtherKey,
}

/// `object`, stored under cache key `key`, as one value.
pub fn encode(key: &str, object: &Object) -> Vec<u8> {
    let body: &[u8] = &object.body;
    let stored_at_ms = object
        .stored_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let meta = EntryMeta {
        key: key.to_string(),
        etag: object.etag.clone(),
        last_modified: object.last_modified.clone(),
        headers: object.headers.clone(),
        total: object.total,
        stored_at_ms,
        fresh_for_ms: object.fresh_for.as_millis() as u64,
        body_len: body.len() as u64,
        crc32: crc32fast::hash(body),
    };
    // Serializing plain strings and numbers cannot fail.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + meta.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(body);
    out
}

/// The object in `value`, if it is a whole, intact entry for `key`.
pub fn decode(key: &str, value: &[u8]) -> Result<Object, Bad> {
    let rest = value.strip_prefix(MAGIC).ok_or(Bad::Foreign)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(Bad::Length)?;
    let len = u32::from_be_bytes(*len) as usize;
    let (meta, body) = (rest.get(..len), rest.get(len..));
    let (Some(meta), Some(body)) = (meta, body) else {
        return Err(Bad::Length);
    };
    let meta: EntryMeta = serde_json::from_slice(meta).map_err(|_| Bad::Foreign)?;
    if meta.key != key {
        return Err(Bad::OtherKey);
    }
    if body.len() as u64 != meta.body_len {
        return Err(Bad::Length);
    }
    if crc32fast::hash(body) != meta.crc32 {
        return Err(Bad::Checksum);
    }
    Ok(Object {
        stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(meta.stored_at_ms),
        fresh_for: Duration::from_millis(meta.fresh_for_ms),
        etag: meta.etag,
        last_modified: meta.last_modified,
        headers: meta.headers,
        body: Bytes::copy_from_slice(body).into(),
        total: meta.total,
        touched_ms: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> Object {
        Object {
            stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            fresh_for: Duration::from_secs(60),
            etag: "\"abc\"".into(),
            last_modified: Some("Tue, 01 Dec 2026 00:00:00 GMT".into()),
            headers: "Content-Type: text/plain\r\n".into(),
            body: Bytes::from_static(b"hello, redis").into(),
            total: 12,
            touched_ms: Default::default(),
        }
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        let value = encode("k", &object());
        let back = decode("k", &value).expect("decodes");
        let want = object();
        assert_eq!(&back.body[..], &want.body[..]);
        assert_eq!(back.etag, want.etag);
        assert_eq!(back.headers, want.headers);
        assert_eq!(back.last_modified, want.last_modified);
        assert_eq!(back.stored_at, want.stored_at);
        assert_eq!(back.fresh_for, want.fresh_for);
        assert_eq!(back.total, 12);
    }

    #[test]
    fn foreign_cut_flipped_and_misplaced_values_are_refused() {
        let value = encode("k", &object());
        assert_eq!(decode("k", b"hello").err(), Some(Bad::Foreign));
        assert_eq!(decode("other", &value).err(), Some(Bad::OtherKey));
        for cut in [value.len() - 1, MAGIC.len() + 2, MAGIC.len() + 10] {
            assert!(decode("k", &value[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = value.clone();
        longer.push(b'!');
        assert_eq!(decode("k", &longer).err(), Some(Bad::Length));
        let mut flipped = value.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x04;
        assert_eq!(decode("k", &flipped).err(), Some(Bad::Checksum));
    }
}
