//! Each core's pool of TLS record buffers. A TLS connection borrows one only
//! while ciphertext or plaintext is in flight and gives it back as soon as it
//! is empty, so an idle connection holds none (monoio-rustls kept two 16 KiB
//! buffers per connection for its whole life: 36 KB per idle TLS client
//! against nginx's 15 KB, issue #28).
//!
//! Two kinds: input buffers (ciphertext read from the socket, plaintext not
//! yet read), kept empty with their capacity; output buffers (records being
//! encrypted and sent), kept at their full length, zeroed once when made,
//! because rustls encrypts into an initialised slice. Thread-local: a core's
//! buffers never cross to another core.

use std::cell::RefCell;

/// The largest TLS record on the wire: 2^14 bytes of plaintext plus at
/// most 256 of expansion (RFC 8446 5.2) plus the 5-byte header.
pub const MAX_RECORD: usize = 16_384 + 256 + 5;

/// Plaintext per record (rustls's default maximum fragment).
pub const RECORD_PLAIN: usize = 16_384;

/// Records one write encrypts at most, and one read takes from the socket
/// at most: a 1 MiB body moves in 64 KiB system calls, not 16 KiB ones.
pub const RECORDS_PER_IO: usize = 4;

/// Capacity of every pooled buffer.
pub const SIZE: usize = RECORDS_PER_IO * MAX_RECORD;

/// Buffers of each kind a core keeps for reuse; beyond it they are freed.
const KEEP: usize = 32;

thread_local! {
    static INPUT: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static OUTPUT: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty input buffer of [`SIZE`] capacity.
pub fn input() -> Vec<u8> {
    INPUT
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(SIZE))
}

/// Gives an input buffer back (emptied). A buffer that grew is dropped.
pub fn give_input(mut buf: Vec<u8>) {
    if buf.capacity() != SIZE {
        return;
    }
    buf.clear();
    INPUT.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(buf);
        }
    });
}

/// An output buffer: [`SIZE`] initialised bytes.
pub fn output() -> Vec<u8> {
    OUTPUT
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; SIZE])
}

/// Gives an output buffer back. One that grew or shrank is dropped.
pub fn give_output(buf: Vec<u8>) {
    if buf.len() != SIZE || buf.capacity() != SIZE {
        return;
    }
    OUTPUT.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(buf);
        }
    });
}

/// Buffers of each kind (input, output) waiting in this core's pool.
pub fn pooled() -> (usize, usize) {
    (
        INPUT.with(|p| p.borrow().len()),
        OUTPUT.with(|p| p.borrow().len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_are_reused_up_to_the_limit() {
        let before = pooled();
        let a = input();
        let b = output();
        assert_eq!(a.capacity(), SIZE);
        assert!(a.is_empty());
        assert_eq!(b.len(), SIZE);
        give_input(a);
        give_output(b);
        assert_eq!(pooled().0, before.0.max(1));
        assert_eq!(pooled().1, before.1.max(1));
        let many: Vec<_> = (0..KEEP + 5).map(|_| input()).collect();
        for b in many {
            give_input(b);
        }
        assert_eq!(pooled().0, KEEP);
    }

    #[test]
    fn a_buffer_that_changed_size_is_not_kept() {
        let mut a = input();
        a.reserve(SIZE * 2);
        let before = pooled().0;
        give_input(a);
        assert_eq!(pooled().0, before);
        let mut b = output();
        b.truncate(10);
        let before = pooled().1;
        give_output(b);
        assert_eq!(pooled().1, before);
    }
}
