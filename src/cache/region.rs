//! Stored bodies that may be sent by reference.
//!
//! A large cached body lives in an anonymous mapping of its own (a
//! [`Region`]) rather than on the heap. It is written once while it fills,
//! then frozen into [`Body`] and never written again; when its last user
//! drops it the mapping is unmapped, never handed back to an allocator. That
//! is what makes it safe to give the kernel references to its pages
//! (vmsplice(2), see `http::zerocopy`): a page the kernel still holds for a
//! socket after the entry is evicted keeps the bytes it had, because no
//! mapping of this process can write to it again. A heap buffer gives no
//! such promise (its memory is reused by the next allocation), so heap
//! bodies are always copied.

use bytes::Bytes;
use std::io;
use std::ops::{Deref, RangeBounds};
use std::ptr::NonNull;

/// Bodies at least this long are filled into a [`Region`] (below it the
/// heap is cheaper and a copy costs little; see loadtest/results).
pub const MAPPED_MIN_BYTES: u64 = 64 * 1024;

/// Disk-tier reads at least this long go into a [`Region`]; smaller ones to
/// the heap: a fresh mapping's page setup (zeroing, mapping, unmapping)
/// costs a 64 KiB disk hit more than the copy it saves (101 us of CPU per
/// hit against 42 us with a heap buffer, loadtest/disk_hits.sh). From
/// 1 MiB the read is mapped so that the promoted copy's later memory hits
/// are sent by reference.
pub const MAPPED_MIN_READ_BYTES: u64 = 1024 * 1024;

/// An anonymous private mapping holding one body.
pub struct Region {
    ptr: NonNull<u8>,
    /// Bytes written so far (the body's length once frozen).
    filled: usize,
    /// Bytes mapped (at least 1; the body's length).
    capacity: usize,
}

// SAFETY: a Region owns its mapping outright (no aliasing pointer exists
// elsewhere); while filling it is only reachable through `&mut`, and once
// frozen into a `Body` it is only read.
unsafe impl Send for Region {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `capacity` bytes (a mapping failure is an error, never a panic:
    /// the caller stores the body on the heap instead).
    pub fn new(capacity: usize) -> io::Result<Region> {
        let capacity = capacity.max(1);
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // touched, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                // Populated at once: every page is written next, and one
                // call costs less than a fault per page.
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Region {
            ptr,
            filled: 0,
            capacity,
        })
    }

    /// Appends `bytes`; `false` (nothing written) when they do not fit.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > self.capacity - self.filled {
            return false;
        }
        // SAFETY: the destination lies inside the mapping (checked above),
        // is writable, and cannot overlap `bytes` (a shared borrow of other
        // memory: the mapping is only reachable through `&mut self`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(self.filled),
                bytes.len(),
            );
        }
        self.filled += bytes.len();
        true
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// The bytes written, as a body that may be sent by reference.
    pub fn freeze(self) -> Body {
        Body {
            bytes: Bytes::from_owner(self),
            mapped: true,
        }
    }
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `filled` bytes of the mapping are initialized
        // (written by `extend_from_slice` or a completed read).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.filled) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; nothing refers
        // to it any more (`Bytes` drops its owner last).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.capacity);
        }
    }
}

// SAFETY: the writable pointer and capacity describe the mapping; the
// runtime reports how many bytes a read initialized through `set_init`.
unsafe impl monoio::buf::IoBufMut for Region {
    fn write_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn bytes_total(&mut self) -> usize {
        self.capacity
    }

    unsafe fn set_init(&mut self, pos: usize) {
        self.filled = pos.min(self.capacity);
    }
}

/// A stored body: shared `Bytes`, and whether it lives in a [`Region`] (and
/// so may be sent by reference).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    bytes: Bytes,
    mapped: bool,
}

impl Body {
    /// The body's bytes, to be copied when sent.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// A part of it, sharing the same memory (and so the same sending).
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Body {
        Body {
            bytes: self.bytes.slice(range),
            mapped: self.mapped,
        }
    }

    /// Its bytes when they live in a [`Region`]: never written again, and
    /// never reused for other data while the kernel may still hold pages
    /// of them (see the module comment).
    pub fn mapped(&self) -> Option<&[u8]> {
        self.mapped.then_some(&self.bytes[..])
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body {
            bytes,
            mapped: false,
        }
    }
}

impl Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A body being filled: on the heap when small, in a [`Region`] when large
/// (or when mapping fails).
pub enum Filling {
    /// A heap buffer.
    Heap(Vec<u8>),
    /// A mapping of its own.
    Mapped(Region),
}

impl Filling {
    /// Room for a body of `len` bytes.
    pub fn with_capacity(len: u64) -> Filling {
        if len >= MAPPED_MIN_BYTES {
            if let Ok(r) = usize::try_from(len)
                .map_err(io::Error::other)
                .and_then(Region::new)
            {
                return Filling::Mapped(r);
            }
        }
        Filling::Heap(Vec::with_capacity(len.min(MAPPED_MIN_BYTES) as usize))
    }

    /// Appends bytes (a mapped body that would overflow moves to the heap:
    /// never a lost byte).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        match self {
            Filling::Heap(v) => v.extend_from_slice(bytes),
            Filling::Mapped(r) => {
                if !r.extend_from_slice(bytes) {
                    let mut v = r.as_ref().to_vec();
                    v.extend_from_slice(bytes);
                    *self = Filling::Heap(v);
                }
            }
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        match self {
            Filling::Heap(v) => v.len(),
            Filling::Mapped(r) => r.len(),
        }
    }

    /// Nothing yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes so far.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Filling::Heap(v) => v,
            Filling::Mapped(r) => r.as_ref(),
        }
    }

    /// The finished body.
    pub fn freeze(self) -> Body {
        match self {
            Filling::Heap(v) => Body::from(Bytes::from(v)),
            Filling::Mapped(r) => r.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_keeps_what_was_written_and_refuses_overflow() {
        let mut r = Region::new(8).expect("mmap");
        assert!(r.extend_from_slice(b"abcd"));
        assert!(r.extend_from_slice(b"efgh"));
        assert!(!r.extend_from_slice(b"i"));
        let body = r.freeze();
        assert_eq!(&body[..], b"abcdefgh");
        assert_eq!(body.mapped(), Some(&b"abcdefgh"[..]));
        assert_eq!(body.slice(2..4).mapped(), Some(&b"cd"[..]));
    }

    #[test]
    fn small_bodies_fill_the_heap_and_are_never_sent_by_reference() {
        let mut f = Filling::with_capacity(10);
        f.extend_from_slice(b"0123456789");
        let body = f.freeze();
        assert_eq!(&body[..], b"0123456789");
        assert_eq!(body.mapped(), None);
    }

    #[test]
    fn a_large_body_is_mapped_and_one_longer_than_announced_moves_to_the_heap() {
        let len = MAPPED_MIN_BYTES as usize;
        let mut f = Filling::with_capacity(len as u64);
        f.extend_from_slice(&vec![1u8; len]);
        assert!(f.freeze().mapped().is_some());

        let mut f = Filling::with_capacity(len as u64);
        f.extend_from_slice(&vec![1u8; len]);
        f.extend_from_slice(&[2u8; 3]);
        let body = f.freeze();
        assert_eq!(body.len(), len + 3);
        assert_eq!(&body[len..], &[2, 2, 2]);
        assert_eq!(body.mapped(), None);
    }
}
