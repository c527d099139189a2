//! Buffers for the large values read from Redis. A value of
//! [`POOLED_MIN`] bytes or more (a chunk, an object's inline body) is read
//! off the socket straight into a buffer of its own ([`take`]), and served
//! from it as shared bytes ([`share`]); when the last of them is dropped
//! (its response sent, or its memory-tier copy evicted) the buffer goes
//! back to the dropping thread's pool, to hold the next value of about its
//! size.
//!
//! Why: a 1 MiB Redis-tier hit spent a fifth to a quarter of its core in
//! the decoder's copy of each value into a new allocation and in the page
//! faults of that freshly mapped memory (the profile in
//! loadtest/results/performance.md). A reused buffer costs neither.

use bytes::Bytes;
use std::cell::RefCell;

/// Values this large and larger get buffers of their own.
pub const POOLED_MIN: usize = 16 * 1024;
/// Free buffers a thread keeps, at most, in bytes and in number; a buffer
/// freed beyond these goes back to the allocator.
const KEPT_BYTES: usize = 32 << 20;
const KEPT_COUNT: usize = 64;

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { free: Vec::new(), bytes: 0 }) };
}

/// One thread's free buffers.
struct Pool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    /// A free buffer with room for `n` bytes and at most an eighth more (a
    /// value kept in the memory tier keeps its buffer: little is wasted).
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        let i = self
            .free
            .iter()
            .position(|b| b.capacity() >= n && b.capacity() <= n + n / 8)?;
        let b = self.free.swap_remove(i);
        self.bytes -= b.capacity();
        Some(b)
    }

    /// Keeps `b` for a later value, if there is room for it.
    fn give(&mut self, mut b: Vec<u8>) {
        let cap = b.capacity();
        if cap < POOLED_MIN || self.bytes + cap > KEPT_BYTES || self.free.len() >= KEPT_COUNT {
            return;
        }
        b.clear();
        self.bytes += cap;
        self.free.push(b);
    }
}

/// An empty buffer with room for at least `n` bytes: this thread's free
/// one of about that size, else a new one.
pub fn take(n: usize) -> Vec<u8> {
    let kept = POOL
        .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take(n)))
        .ok()
        .flatten();
    kept.unwrap_or_else(|| Vec::with_capacity(n))
}

/// Hands `b`, no longer needed, back to this thread's pool (when there is
/// room for it).
pub fn give(b: Vec<u8>) {
    // A thread whose pool is gone (it is exiting) frees the buffer.
    let _ = POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.give(b);
        }
    });
}

/// `v` as shared bytes; a buffer of [`POOLED_MIN`] bytes or more goes back
/// to a pool when the last of them is dropped.
pub fn share(v: Vec<u8>) -> Bytes {
    if v.capacity() < POOLED_MIN {
        return Bytes::from(v);
    }
    Bytes::from_owner(Pooled(v))
}

/// A buffer lent out as shared bytes.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept() -> (usize, usize) {
        POOL.with(|p| {
            let p = p.borrow();
            (p.free.len(), p.bytes)
        })
    }

    #[test]
    fn a_large_value_s_buffer_serves_the_next_value_of_about_its_size() {
        let mut v = take(64 * 1024 + 2);
        let cap = v.capacity();
        let at = v.as_ptr();
        v.extend_from_slice(&[7; 64 * 1024]);
        let shared = share(v);
        let part = shared.slice(10..20);
        drop(shared);
        assert_eq!(kept(), (0, 0), "still lent out: a slice holds it");
        assert_eq!(&part[..], &[7; 10]);
        drop(part);
        assert_eq!(kept(), (1, cap), "back once the last slice is gone");
        let larger = take(1024 * 1024);
        assert_ne!(larger.as_ptr(), at, "far larger: not this one");
        drop(larger);
        assert_eq!(kept(), (1, cap));
        let again = take(64 * 1024);
        assert_eq!(again.as_ptr(), at, "about its size: reused");
        assert!(again.is_empty());
        assert_eq!(kept(), (0, 0));
    }

    #[test]
    fn a_buffer_given_back_is_kept_for_the_next_value() {
        let b = take(300 * 1024);
        let at = b.as_ptr();
        give(b);
        let again = take(300 * 1024);
        assert_eq!(again.as_ptr(), at);
    }

    #[test]
    fn small_values_are_plain_bytes_and_the_pool_is_bounded() {
        let small = share(vec![1; 100]);
        drop(small);
        assert_eq!(kept(), (0, 0), "below POOLED_MIN: freed, not kept");
        let many: Vec<Bytes> = (0..KEPT_COUNT + 5)
            .map(|_| share(Vec::with_capacity(POOLED_MIN)))
            .collect();
        drop(many);
        assert_eq!(
            kept(),
            (KEPT_COUNT, KEPT_COUNT * POOLED_MIN),
            "at most KEPT_COUNT"
        );
        POOL.with(|p| {
            *p.borrow_mut() = Pool {
                free: Vec::new(),
                bytes: 0,
            }
        });
        let big: Vec<Bytes> = (0..3)
            .map(|_| share(Vec::with_capacity(KEPT_BYTES / 2)))
            .collect();
        drop(big);
        assert_eq!(kept(), (2, KEPT_BYTES), "at most KEPT_BYTES");
    }
}
