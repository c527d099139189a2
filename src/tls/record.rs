//! TLS record protection of our own, for the traffic after a handshake
//! rustls has run (issue #28): TLS 1.3 (RFC 8446 section 5) and TLS 1.2
//! with AES-GCM (RFC 5288) or ChaCha20-Poly1305 (RFC 7905), the only
//! suites we offer.
//!
//! Why: rustls's unbuffered API seals every record into a `Vec` of its own
//! and hands every received record over through another, two allocations
//! and two extra copies per kept-alive request. Here a record is opened
//! straight into the reader's buffer (in place in the input buffer when
//! the reader's has no room for all of it) and sealed straight from the
//! writer's bytes into the output buffer (in place there when small pieces
//! are gathered into one record). The keys come from rustls
//! ([`rustls::kernel`]), which also derives the next ones on a TLS 1.3 key
//! update and keeps a server's session tickets: this file never touches a
//! secret beyond the AEAD key and IV it is given.
//!
//! Pure: no I/O, no clock. [`super::stream`] moves the bytes and decides
//! what an alert or a handshake message means for the connection.

use rustls::ConnectionTrafficSecrets;
use std::io;
use std::ops::Range;

#[cfg(not(feature = "tls-ring"))]
use aws_lc_rs::aead;
#[cfg(feature = "tls-ring")]
use ring::aead;

/// A record's header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag (16 bytes for every suite we seal with).
pub const TAG: usize = 16;
/// The most plaintext one record carries (2^14).
pub const MAX_PLAIN: usize = 16_384;

// TLS content types (the outer one of every protected record is
// application_data; the real one is inside).
/// change_cipher_spec (only ever unprotected, during a handshake).
pub const CHANGE_CIPHER_SPEC: u8 = 20;
/// alert.
pub const ALERT: u8 = 21;
/// handshake.
pub const HANDSHAKE: u8 = 22;
/// application_data.
pub const APPLICATION_DATA: u8 = 23;

/// Records sealed under one key before a key update: the AES-GCM bound of
/// 2^24 records that rustls also uses (RFC 8446 5.5, and the AEAD-limits
/// draft rustls cites); ChaCha20-Poly1305's is far higher, the lower one
/// serves both.
pub const RECORDS_PER_KEY: u64 = 1 << 24;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {what}"))
}

/// How a connection's records are protected (its version and AEAD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// TLS 1.3 (RFC 8446 5.2): every record's outer type is
    /// application_data, the real one is the last non-zero byte inside.
    Tls13,
    /// TLS 1.2 AES-GCM (RFC 5288): the record's real type outside, an
    /// 8-byte explicit nonce before the ciphertext.
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305 (RFC 7905): the real type outside, the
    /// nonce made as in TLS 1.3.
    Tls12Chacha,
}

/// One direction's key, IV and record sequence number.
pub struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    protection: Protection,
}

impl Keys {
    /// The key of one direction, as rustls hands it over, at `seq`
    /// (`tls12`: a TLS 1.2 connection's; for AES-GCM the IV is the 4-byte
    /// salt followed by the start of the explicit nonces).
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets, tls12: bool) -> io::Result<Keys> {
        let (alg, key, iv, protection) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, Protection::Tls12Gcm)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, Protection::Tls12Gcm)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, Protection::Tls12Chacha)
            }
            _ => {
                return Err(io::Error::other(
                    "TLS: a cipher suite we cannot seal ourselves",
                ))
            }
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("TLS: unusable traffic key"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS: an IV that is not 12 bytes"))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
            protection: if tls12 { protection } else { Protection::Tls13 },
        })
    }

    /// How these keys protect records.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// Records sealed or opened under this key so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes between a record's header and its ciphertext.
    fn explicit(&self) -> usize {
        match self.protection {
            Protection::Tls12Gcm => 8,
            Protection::Tls13 | Protection::Tls12Chacha => 0,
        }
    }

    /// Where a record's plaintext starts, counted from its header.
    pub fn body_at(&self) -> usize {
        HEADER + self.explicit()
    }

    /// What sealing adds to a record's plaintext: the header, an explicit
    /// nonce (TLS 1.2 AES-GCM), the inner type byte (TLS 1.3), the tag.
    pub fn overhead(&self) -> usize {
        let inner_type = usize::from(self.protection == Protection::Tls13);
        HEADER + self.explicit() + inner_type + TAG
    }

    /// The length of the record at the start of `buf` (header included)
    /// once all of it is there, after checking its header; `None` while
    /// it is not.
    pub fn complete(&self, buf: &[u8]) -> io::Result<Option<usize>> {
        let Some(head) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        let tls13 = self.protection == Protection::Tls13;
        match head[0] {
            APPLICATION_DATA => {}
            ALERT | HANDSHAKE if !tls13 => {}
            // Allowed only during the handshake (RFC 8446 5; RFC 5246
            // 7.1: a TLS 1.2 one would start a renegotiation).
            CHANGE_CIPHER_SPEC => return Err(bad("change_cipher_spec after the handshake")),
            other if tls13 => {
                return Err(bad(&format!(
                    "unprotected record of type {other} after the handshake"
                )))
            }
            other => return Err(bad(&format!("a record of content type {other}"))),
        }
        if head[1] != 3 {
            return Err(bad("record with a version that is not TLS"));
        }
        // RFC 8446 5.2 (2^14 + 256); RFC 5246 6.2.3 (2^14 + 2048).
        let max = if tls13 {
            MAX_PLAIN + 256
        } else {
            MAX_PLAIN + 2048
        };
        if len > max {
            return Err(bad(
                "record_overflow: a record longer than its version allows",
            ));
        }
        if len < self.overhead() - HEADER {
            return Err(bad("record too short to be protected"));
        }
        Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// The length of the plaintext [`Self::open_into`] writes for a
    /// protected record `record_len` bytes long, header included (for TLS
    /// 1.3 the inner plaintext: content, type byte, padding).
    pub fn plain_len(&self, record_len: usize) -> usize {
        record_len.saturating_sub(self.body_at() + TAG)
    }

    /// The sequence number for the next record; the number then moves on,
    /// so no nonce is used twice.
    fn next_seq(&mut self) -> io::Result<u64> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| bad("sequence number exhausted"))?;
        Ok(seq)
    }

    /// The IV xor the sequence number (RFC 8446 5.3; RFC 7905 2; rustls's
    /// choice of explicit nonces for TLS 1.2 AES-GCM, RFC 5288 3).
    fn xor_nonce(&self, seq: u64) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// Writes the header (and explicit nonce) of a record of type `typ`
    /// carrying `len` plaintext bytes into `record`; returns the nonce and
    /// the additional data to seal it with.
    fn seal_head(
        &mut self,
        typ: u8,
        len: usize,
        record: &mut [u8],
    ) -> io::Result<(aead::Nonce, Aad)> {
        let seq = self.next_seq()?;
        let nonce = self.xor_nonce(seq);
        let body = (self.overhead() - HEADER + len) as u16;
        let [hi, lo] = body.to_be_bytes();
        let outer = if self.protection == Protection::Tls13 {
            APPLICATION_DATA
        } else {
            typ
        };
        record[..HEADER].copy_from_slice(&[outer, 3, 3, hi, lo]);
        if self.protection == Protection::Tls12Gcm {
            record[HEADER..HEADER + 8].copy_from_slice(&nonce[4..]);
        }
        let aad = match self.protection {
            Protection::Tls13 => Aad::header(&record[..HEADER]),
            _ => Aad::tls12(seq, typ, len),
        };
        Ok((aead::Nonce::assume_unique_for_key(nonce), aad))
    }

    /// Seals the `len` plaintext bytes at `out[self.body_at()..]` as one
    /// record of type `typ`, in place: writes the header, explicit nonce,
    /// type byte and tag around them. `out` must hold `len +
    /// self.overhead()` bytes; returns the record's length.
    pub fn seal(&mut self, typ: u8, out: &mut [u8], len: usize) -> io::Result<usize> {
        debug_assert!(len <= MAX_PLAIN);
        let total = len + self.overhead();
        let at = self.body_at();
        let Some(record) = out.get_mut(..total) else {
            return Err(io::Error::other(
                "TLS: output buffer too small for a record",
            ));
        };
        let (nonce, aad) = self.seal_head(typ, len, record)?;
        let sealed_len = total - at - TAG;
        if self.protection == Protection::Tls13 {
            record[at + len] = typ;
        }
        let (sealed, tag) = record[at..].split_at_mut(sealed_len);
        let t = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(aad.bytes()), sealed)
            .map_err(|_| io::Error::other("TLS: sealing failed"))?;
        tag.copy_from_slice(t.as_ref());
        Ok(total)
    }

    /// Seals `plain` (at most [`MAX_PLAIN`] bytes) as one record of type
    /// `typ` into the start of `out`, which must hold `plain.len() +
    /// self.overhead()` bytes; returns the record's length. With aws-lc-rs
    /// the plaintext is encrypted straight from where it lies (no copy
    /// first).
    pub fn seal_from(&mut self, typ: u8, plain: &[u8], out: &mut [u8]) -> io::Result<usize> {
        let len = plain.len();
        let at = self.body_at();
        #[cfg(feature = "tls-ring")]
        {
            let Some(body) = out.get_mut(at..at + len) else {
                return Err(io::Error::other(
                    "TLS: output buffer too small for a record",
                ));
            };
            body.copy_from_slice(plain);
            self.seal(typ, out, len)
        }
        #[cfg(not(feature = "tls-ring"))]
        {
            debug_assert!(len <= MAX_PLAIN);
            let total = len + self.overhead();
            let Some(record) = out.get_mut(..total) else {
                return Err(io::Error::other(
                    "TLS: output buffer too small for a record",
                ));
            };
            let (nonce, aad) = self.seal_head(typ, len, record)?;
            let inner: &[u8] = if self.protection == Protection::Tls13 {
                &[typ]
            } else {
                &[]
            };
            let (cipher, type_and_tag) = record[at..].split_at_mut(len);
            self.key
                .seal_out_of_place_scatter(
                    nonce,
                    aead::Aad::from(aad.bytes()),
                    plain,
                    cipher,
                    inner,
                    type_and_tag,
                )
                .map_err(|_| io::Error::other("TLS: sealing failed"))?;
            Ok(total)
        }
    }

    /// The nonce and additional data to open the complete record `record`
    /// with, its plaintext being `len` bytes.
    fn open_head(&mut self, record: &[u8], len: usize) -> io::Result<(aead::Nonce, Aad)> {
        let seq = self.next_seq()?;
        let nonce = match self.protection {
            Protection::Tls12Gcm => {
                let mut nonce = self.iv;
                nonce[4..].copy_from_slice(&record[HEADER..HEADER + 8]);
                nonce
            }
            Protection::Tls13 | Protection::Tls12Chacha => self.xor_nonce(seq),
        };
        let aad = match self.protection {
            Protection::Tls13 => Aad::header(&record[..HEADER]),
            _ => Aad::tls12(seq, record[0], len),
        };
        Ok((aead::Nonce::assume_unique_for_key(nonce), aad))
    }

    /// Opens the complete record `record` (header included; see
    /// [`Self::complete`]) in place: its content type and where its
    /// content now lies in `record`.
    pub fn open(&mut self, record: &mut [u8]) -> io::Result<(u8, Range<usize>)> {
        let at = self.body_at();
        let len = self.plain_len(record.len());
        if record.len() < at + TAG {
            return Err(bad("record too short to be protected"));
        }
        let (nonce, aad) = self.open_head(record, len)?;
        let outer = record[0];
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(aad.bytes()), &mut record[at..])
            .map_err(|_| not_opened())?;
        let (typ, len) = self.content(outer, plain)?;
        Ok((typ, at..at + len))
    }

    /// Opens the complete record `record` into `out`, which must be
    /// [`Self::plain_len`] bytes long: its content type and the length of
    /// its content, now at the start of `out`. With aws-lc-rs it is
    /// decrypted straight into `out` (no copy after); `record` is left as
    /// it was. Should it not open, `out` holds garbage.
    pub fn open_into(&mut self, record: &[u8], out: &mut [u8]) -> io::Result<(u8, usize)> {
        let at = self.body_at();
        if record.len() < at + TAG || out.len() != self.plain_len(record.len()) {
            return Err(io::Error::other("TLS: a record and a buffer that differ"));
        }
        let (nonce, aad) = self.open_head(record, out.len())?;
        let (cipher, tag) = record[at..].split_at(out.len());
        let aad = aead::Aad::from(aad.bytes());
        #[cfg(feature = "tls-ring")]
        {
            out.copy_from_slice(cipher);
            let tag = aead::Tag::try_from(tag).map_err(|_| not_opened())?;
            self.key
                .open_in_place_separate_tag(nonce, aad, tag, out, 0..)
                .map_err(|_| not_opened())?;
        }
        #[cfg(not(feature = "tls-ring"))]
        self.key
            .open_separate_gather(nonce, aad, cipher, tag, out)
            .map_err(|_| not_opened())?;
        self.content(record[0], out)
    }

    /// An opened record's content type and content length: for TLS 1.3
    /// the inner plaintext is the content, the type byte, then zero
    /// padding; for TLS 1.2 it is all content, of the outer type.
    fn content(&self, outer: u8, plain: &[u8]) -> io::Result<(u8, usize)> {
        if self.protection != Protection::Tls13 {
            if plain.len() > MAX_PLAIN {
                return Err(bad("record_overflow: more than 2^14 bytes of plaintext"));
            }
            return Ok((outer, plain.len()));
        }
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(bad("a record with no content type"));
        };
        if at > MAX_PLAIN {
            return Err(bad("record_overflow: more than 2^14 bytes of plaintext"));
        }
        Ok((plain[at], at))
    }
}

/// A record's additional data: its header (TLS 1.3), or the sequence
/// number, type, version and plaintext length (TLS 1.2, RFC 5246 6.2.3.3).
struct Aad {
    bytes: [u8; 13],
    len: usize,
}

impl Aad {
    fn header(head: &[u8]) -> Aad {
        let mut bytes = [0u8; 13];
        bytes[..HEADER].copy_from_slice(head);
        Aad { bytes, len: HEADER }
    }

    fn tls12(seq: u64, typ: u8, len: usize) -> Aad {
        let mut bytes = [0u8; 13];
        bytes[..8].copy_from_slice(&seq.to_be_bytes());
        bytes[8..11].copy_from_slice(&[typ, 3, 3]);
        bytes[11..].copy_from_slice(&(len as u16).to_be_bytes());
        Aad { bytes, len: 13 }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn not_opened() -> io::Error {
    bad("bad_record_mac: a record that does not decrypt")
}

/// What a handshake message received after the handshake asks.
#[derive(Debug, PartialEq, Eq)]
pub enum PostHandshake<'a> {
    /// A key update.
    KeyUpdate {
        /// The peer wants ours updated too.
        update_requested: bool,
    },
    /// A TLS 1.3 session ticket (the body of the message).
    NewSessionTicket(&'a [u8]),
}

/// Handshake message types this layer understands.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// Splits the plaintext of a handshake record into its messages. A message
/// split across records is refused (no peer splits these small ones), as is
/// anything after a key update in the same record (RFC 8446 5.1: a key
/// change must fall on a record boundary).
pub fn post_handshake(mut plain: &[u8]) -> io::Result<Vec<PostHandshake<'_>>> {
    let mut messages = Vec::new();
    while !plain.is_empty() {
        let [typ, a, b, c, rest @ ..] = plain else {
            return Err(bad("a handshake message split across records"));
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(bad("a handshake message split across records"));
        }
        let (body, rest) = rest.split_at(len);
        plain = rest;
        match (*typ, body) {
            (KEY_UPDATE, [0 | 1]) if plain.is_empty() => messages.push(PostHandshake::KeyUpdate {
                update_requested: body[0] == 1,
            }),
            (KEY_UPDATE, [0 | 1]) => return Err(bad("data after a key update in its record")),
            (KEY_UPDATE, _) => return Err(bad("a malformed key update")),
            (NEW_SESSION_TICKET, _) => messages.push(PostHandshake::NewSessionTicket(body)),
            (other, _) => {
                return Err(bad(&format!(
                    "unexpected handshake message {other} after the handshake"
                )))
            }
        }
    }
    Ok(messages)
}

/// Checks the plaintext of a handshake record received on a TLS 1.2
/// connection after its handshake: HelloRequests (a server inviting a
/// renegotiation, which a client may ignore, RFC 5246 7.4.1.1) are; any
/// other message (a renegotiation's ClientHello) is refused: we never
/// renegotiate.
pub fn tls12_post_handshake(mut plain: &[u8]) -> io::Result<()> {
    while let [typ, a, b, c, rest @ ..] = plain {
        if [*typ, *a, *b, *c] != [HELLO_REQUEST, 0, 0, 0] {
            return Err(bad(&format!(
                "handshake message {typ} after a TLS 1.2 handshake (no renegotiation)"
            )));
        }
        plain = rest;
    }
    if plain.is_empty() {
        Ok(())
    } else {
        Err(bad("a handshake message split across records"))
    }
}

/// HelloRequest's handshake type (TLS 1.2).
const HELLO_REQUEST: u8 = 0;

/// A KeyUpdate message's plaintext (`update_not_requested`: ours answers or
/// starts one; we never ask the peer for theirs).
pub const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// A close_notify alert's plaintext (warning level).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// What an alert's plaintext means: `Ok(true)` close_notify, `Ok(false)`
/// one to ignore (user_canceled: a close_notify follows), an error for the
/// rest (all fatal in TLS 1.3).
pub fn alert(plain: &[u8]) -> io::Result<bool> {
    match plain {
        [_, 0] => Ok(true),
        [_, 90] => Ok(false),
        [_, d] => Err(bad(&format!("the peer sent alert {d}"))),
        _ => Err(bad("a malformed alert")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    /// What sealing adds to a TLS 1.3 record's plaintext, written out (the
    /// header, the inner type byte, the tag) to check `Keys::overhead`.
    const OVERHEAD: usize = HEADER + 1 + TAG;

    fn secrets(kind: u8, seed: u8) -> ConnectionTrafficSecrets {
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
        let iv = Iv::from([seed; 12]);
        // AES-128-GCM (rustls cannot make a 16-byte key outside itself)
        // is covered by the handshakes of `stream`'s tests.
        match kind {
            0 => ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from(key),
                iv,
            },
            _ => ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from(key),
                iv,
            },
        }
    }

    fn pair(kind: u8) -> (Keys, Keys) {
        (
            Keys::new(7, secrets(kind, 1), false).expect("keys"),
            Keys::new(7, secrets(kind, 1), false).expect("keys"),
        )
    }

    #[test]
    fn records_round_trip_for_every_suite_and_size() {
        for kind in 0..2 {
            let (mut tx, mut rx) = pair(kind);
            for len in [0, 1, 100, MAX_PLAIN] {
                let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let mut out = vec![0u8; len + OVERHEAD];
                out[HEADER..HEADER + len].copy_from_slice(&data);
                let n = tx.seal(APPLICATION_DATA, &mut out, len).expect("seal");
                assert_eq!(n, len + OVERHEAD);
                assert_eq!(rx.complete(&out[..n - 1]).expect("header"), None);
                assert_eq!(rx.complete(&out).expect("header"), Some(n));
                let (typ, range) = rx.open(&mut out).expect("open");
                assert_eq!(typ, APPLICATION_DATA);
                assert_eq!(&out[range], &data[..], "suite {kind}, {len} bytes");
            }
            assert_eq!((tx.seq(), rx.seq()), (11, 11));
        }
    }

    #[test]
    fn sealing_from_the_writers_bytes_and_opening_into_the_readers_match_the_in_place_forms() {
        for kind in 0..2 {
            let (mut a, mut b) = pair(kind);
            let (mut c, mut d) = pair(kind);
            for len in [0, 1, 100, 4097, MAX_PLAIN] {
                let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
                let mut from = vec![0xEE; len + OVERHEAD + 3];
                let n = a
                    .seal_from(APPLICATION_DATA, &data, &mut from)
                    .expect("seal");
                assert_eq!(n, len + OVERHEAD);
                let mut in_place = vec![0u8; len + OVERHEAD];
                in_place[HEADER..HEADER + len].copy_from_slice(&data);
                c.seal(APPLICATION_DATA, &mut in_place, len).expect("seal");
                assert_eq!(&from[..n], &in_place[..], "the same record, {len} bytes");
                assert_eq!(&from[n..], &[0xEE; 3], "nothing written past it");

                let mut out = vec![0x55; b.plain_len(n)];
                let (typ, got) = b.open_into(&from[..n], &mut out).expect("open");
                assert_eq!((typ, &out[..got]), (APPLICATION_DATA, &data[..]));
                let (typ, range) = d.open(&mut in_place).expect("open");
                assert_eq!((typ, &in_place[range]), (APPLICATION_DATA, &data[..]));
            }
            let mut short = vec![0u8; 10];
            assert!(a.seal_from(ALERT, &[1, 0], &mut short).is_err(), "no room");
        }
    }

    #[test]
    fn a_record_opened_into_another_buffer_checks_like_one_opened_in_place() {
        let (mut tx, mut rx) = pair(1);
        let mut record = vec![0u8; 10 + OVERHEAD];
        let n = tx
            .seal_from(HANDSHAKE, b"0123456789", &mut record)
            .expect("seal");
        for bit in 0..n * 8 {
            let mut flipped = record.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let mut fresh = Keys::new(7, secrets(1, 1), false).expect("keys");
            let mut out = vec![0u8; rx.plain_len(n)];
            assert!(fresh.open_into(&flipped, &mut out).is_err(), "bit {bit}");
        }
        let mut out = vec![0u8; rx.plain_len(n)];
        let (typ, len) = rx.open_into(&record, &mut out).expect("opens");
        assert_eq!((typ, &out[..len]), (HANDSHAKE, &b"0123456789"[..]));
        assert!(rx.open_into(&record, &mut out).is_err(), "a replay");
        let mut wrong = vec![0u8; rx.plain_len(n) + 1];
        let e = rx.open_into(&record, &mut wrong).expect_err("size");
        assert!(e.to_string().contains("differ"), "{e}");
        assert!(
            rx.open_into(&record[..HEADER], &mut []).is_err(),
            "too short"
        );
    }

    #[test]
    fn a_flipped_bit_a_replay_or_a_wrong_key_never_opens() {
        let (mut tx, mut rx) = pair(0);
        let mut out = vec![0u8; 10 + OVERHEAD];
        let n = tx.seal(APPLICATION_DATA, &mut out, 10).expect("seal");
        for bit in 0..n * 8 {
            let mut flipped = out.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let mut fresh = Keys::new(7, secrets(0, 1), false).expect("keys");
            assert!(fresh.open(&mut flipped).is_err(), "bit {bit} flipped");
        }
        let mut copy = out.clone();
        rx.open(&mut copy).expect("the record itself opens");
        // The same record again: the next sequence number, another nonce.
        let mut again = out.clone();
        assert!(rx.open(&mut again).is_err(), "a replay does not open");
        let mut other = Keys::new(7, secrets(0, 2), false).expect("keys");
        assert!(other.open(&mut out).is_err(), "another key does not open");
    }

    #[test]
    fn padding_is_stripped_and_a_record_of_zeros_has_no_type() {
        let (mut tx, mut rx) = pair(1);
        // Plaintext "hi", type 23, then five bytes of padding, sealed as
        // the content of a record whose own type byte is a zero of padding.
        let inner = [b'h', b'i', APPLICATION_DATA, 0, 0, 0, 0];
        let mut out = vec![0u8; inner.len() + OVERHEAD];
        out[HEADER..HEADER + inner.len()].copy_from_slice(&inner);
        tx.seal(0, &mut out, inner.len()).expect("seal");
        let (typ, range) = rx.open(&mut out).expect("open");
        assert_eq!((typ, &out[range]), (APPLICATION_DATA, &b"hi"[..]));

        let mut zeros = vec![0u8; 4 + OVERHEAD];
        tx.seal(0, &mut zeros, 4).expect("seal");
        let e = rx.open(&mut zeros).expect_err("no type");
        assert!(e.to_string().contains("no content type"), "{e}");
    }

    #[test]
    fn headers_that_cannot_be_a_protected_record_are_refused() {
        let (tls13, _) = pair(0);
        let gcm12 = Keys::new(0, secrets(0, 1), true).expect("keys");
        let chacha12 = Keys::new(0, secrets(1, 1), true).expect("keys");
        assert_eq!(tls13.complete(&[23, 3, 3]).expect("short"), None);
        for (keys, head, why) in [
            (&tls13, [20u8, 3, 3, 0, 1], "change_cipher_spec"),
            (&tls13, [22, 3, 3, 0, 40], "unprotected"),
            (&tls13, [23, 2, 0, 0, 40], "version"),
            (&tls13, [23, 3, 3, 0x41, 1], "record_overflow"),
            (&tls13, [23, 3, 3, 0, 16], "too short"),
            (&gcm12, [20, 3, 3, 0, 1], "change_cipher_spec"),
            (&gcm12, [24, 3, 3, 0, 40], "content type 24"),
            (&gcm12, [23, 3, 3, 0x48, 1], "record_overflow"),
            (&gcm12, [21, 3, 3, 0, 23], "too short"),
            (&chacha12, [22, 3, 3, 0, 15], "too short"),
        ] {
            let e = keys.complete(&head).expect_err(why);
            assert!(e.to_string().contains(why), "{e}");
        }
        // TLS 1.2 records carry their real type outside; 2^14 + 2048 is
        // the most a TLS 1.2 record may carry, 2^14 + 256 a TLS 1.3 one.
        assert_eq!(gcm12.complete(&[21, 3, 3, 0, 24]).expect("alert"), None);
        assert_eq!(chacha12.complete(&[22, 3, 3, 0, 16]).expect("empty"), None);
        assert_eq!(gcm12.complete(&[23, 3, 3, 0x47, 0xff]).expect("long"), None);
        assert!(tls13.complete(&[23, 3, 3, 0x47, 0xff]).is_err());
    }

    #[test]
    fn tls12_records_round_trip_with_their_type_outside_and_their_own_nonces() {
        for kind in 0..2 {
            let keys = || Keys::new(3, secrets(kind, 4), true).expect("keys");
            let (mut tx, mut rx, mut rx_into) = (keys(), keys(), keys());
            let explicit = if kind == 0 { 8 } else { 0 };
            assert_eq!(tx.overhead(), HEADER + explicit + TAG);
            let mut explicit_nonces = Vec::new();
            for (typ, len) in [
                (APPLICATION_DATA, 0),
                (ALERT, 2),
                (HANDSHAKE, 100),
                (APPLICATION_DATA, MAX_PLAIN),
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
                let mut record = vec![0u8; len + tx.overhead()];
                let n = if len % 2 == 0 {
                    tx.seal_from(typ, &data, &mut record).expect("seal")
                } else {
                    let at = tx.body_at();
                    record[at..at + len].copy_from_slice(&data);
                    tx.seal(typ, &mut record, len).expect("seal")
                };
                assert_eq!(n, record.len());
                assert_eq!(&record[..3], &[typ, 3, 3], "the real type, outside");
                assert_eq!(rx.complete(&record).expect("header"), Some(n));
                explicit_nonces.push(record[HEADER..HEADER + explicit].to_vec());

                let mut out = vec![0u8; rx_into.plain_len(n)];
                assert_eq!(out.len(), len);
                let (t, got) = rx_into.open_into(&record, &mut out).expect("open");
                assert_eq!((t, &out[..got]), (typ, &data[..]));
                let (t, range) = rx.open(&mut record).expect("open");
                assert_eq!((t, &record[range]), (typ, &data[..]));
            }
            explicit_nonces.dedup();
            assert_eq!(explicit_nonces.len(), if kind == 0 { 4 } else { 1 });
            // The sequence number is in the additional data: a replay, a
            // record from another position or of another type never opens.
            let mut record = vec![0u8; 5 + tx.overhead()];
            tx.seal_from(APPLICATION_DATA, b"hello", &mut record)
                .expect("seal");
            let mut skipped = keys();
            assert!(
                skipped.open(&mut record.clone()).is_err(),
                "at seq 3, sealed at 7"
            );
            let mut retyped = record.clone();
            retyped[0] = HANDSHAKE;
            let mut at7 = Keys::new(7, secrets(kind, 4), true).expect("keys");
            assert!(at7.open(&mut retyped).is_err(), "another type");
            assert!(rx.open(&mut record.clone()).is_ok());
            assert!(rx.open(&mut record).is_err(), "a replay");
        }
    }

    #[test]
    fn random_bytes_are_refused_without_a_panic() {
        // A small deterministic fuzz: any bytes after a valid header either
        // fail to open or (never, in practice) open to a checked record.
        let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..2000 {
            let len = (next() % 400) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next().is_multiple_of(2) && len >= HEADER {
                buf[..3].copy_from_slice(&[23, 3, 3]);
                let body = (len - HEADER) as u16;
                buf[3..5].copy_from_slice(&body.to_be_bytes());
            }
            let probe = Keys::new(0, secrets(0, 9), false).expect("keys");
            if let Ok(Some(n)) = probe.complete(&buf) {
                let tls12 = next().is_multiple_of(2);
                let mut rx = Keys::new(0, secrets((next() % 2) as u8, 9), tls12).expect("keys");
                assert!(rx.open(&mut buf[..n]).is_err());
            }
            let _ = post_handshake(&buf);
            let _ = alert(&buf);
        }
    }

    #[test]
    fn post_handshake_messages_are_parsed_and_bad_ones_refused() {
        assert_eq!(
            post_handshake(&KEY_UPDATE_NOT_REQUESTED).expect("key update"),
            vec![PostHandshake::KeyUpdate {
                update_requested: false
            }]
        );
        assert_eq!(
            post_handshake(&[4, 0, 0, 2, 9, 9, 24, 0, 0, 1, 1]).expect("two"),
            vec![
                PostHandshake::NewSessionTicket(&[9, 9]),
                PostHandshake::KeyUpdate {
                    update_requested: true
                }
            ]
        );
        for (bytes, why) in [
            (&[24u8, 0, 0, 1, 0, 4, 0, 0, 0][..], "after a key update"),
            (&[24, 0, 0, 1, 2][..], "malformed key update"),
            (&[4, 0, 0, 9, 1][..], "split across records"),
            (&[1, 0, 0, 0][..], "unexpected handshake message 1"),
        ] {
            let e = post_handshake(bytes).expect_err(why);
            assert!(e.to_string().contains(why), "{e}");
        }
        assert!(alert(&CLOSE_NOTIFY).expect("close_notify"));
        assert!(!alert(&[1, 90]).expect("user_canceled"));
        assert!(alert(&[2, 20]).is_err());
    }
}
