//! The lot: keep-alive connections that stay idle wait here with no task.
//!
//! A parked connection first waits in its own task (see [`super::park`]).
//! At the worker's next sweep it moves to the lot: its socket is added to
//! the worker's epoll instance, its task ends, and all it holds is an entry
//! here (the socket and its deadline). One task per worker waits for the
//! epoll instance to be readable and gives each connection that has bytes
//! (or a close) a task again; the sweep closes entries past their idle
//! deadline. Ten thousand idle clients then cost their sockets and these
//! entries, not ten thousand suspended tasks with their readiness waits.
//!
//! Nothing here runs on the request path: a connection reaches the lot only
//! after it was idle for a parking period and a sweep.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Most connections taken from the kernel per `epoll_wait`.
const BATCH: usize = 64;

struct Entry<T> {
    item: T,
    fd: RawFd,
    deadline_ms: u64,
}

/// Idle connections (`T`: the socket and what is kept with it) watched by
/// one epoll instance.
pub struct Lot<T> {
    epoll: OwnedFd,
    entries: RefCell<Vec<Option<Entry<T>>>>,
    free: RefCell<Vec<u32>>,
    len: std::cell::Cell<usize>,
}

/// An epoll token: the entry's index and its descriptor, so an event can
/// never be taken for another entry's.
fn token(index: u32, fd: RawFd) -> u64 {
    (u64::from(index) << 32) | u64::from(fd as u32)
}

impl<T: AsRawFd> Lot<T> {
    /// A lot with its own epoll instance.
    pub fn new() -> io::Result<Lot<T>> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Lot {
            // SAFETY: `fd` was just created and is owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            entries: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            len: std::cell::Cell::new(0),
        })
    }

    /// A descriptor of the epoll instance, readable when an entry's socket
    /// is (for the task that waits on it).
    pub fn watch_fd(&self) -> io::Result<OwnedFd> {
        self.epoll.try_clone()
    }

    /// Connections in the lot.
    pub fn len(&self) -> usize {
        self.len.get()
    }

    /// No connection is in the lot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `item` until its socket is readable, hangs up, or `deadline_ms`
    /// passes. When the kernel refuses (out of memory, `max_user_watches`),
    /// the item comes back with the error and stays with its caller.
    pub fn insert(&self, item: T, deadline_ms: u64) -> Result<(), (io::Error, T)> {
        let fd = item.as_raw_fd();
        let mut entries = self.entries.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => match u32::try_from(entries.len()) {
                Ok(i) => {
                    entries.push(None);
                    i
                }
                Err(_) => return Err((io::Error::other("lot full"), item)),
            },
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token(index, fd),
        };
        // SAFETY: both descriptors are open (`fd` belongs to `item`, which we
        // hold); `ev` is a valid epoll_event for the duration of the call.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            self.free.borrow_mut().push(index);
            return Err((io::Error::last_os_error(), item));
        }
        entries[index as usize] = Some(Entry {
            item,
            fd,
            deadline_ms,
        });
        self.len.set(self.len.get() + 1);
        Ok(())
    }

    /// Takes out every entry whose socket is ready (readable or hung up),
    /// appending them to `out`. Does not wait.
    pub fn take_ready(&self, out: &mut Vec<T>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            // SAFETY: `events` has room for BATCH events; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    BATCH as libc::c_int,
                    0,
                )
            };
            if n <= 0 {
                // Nothing ready, or EINTR: the watcher's next wake retries.
                return;
            }
            for ev in &events[..n as usize] {
                let t = ev.u64;
                let (index, fd) = ((t >> 32) as u32, t as u32 as RawFd);
                if let Some(item) = self.remove(index, Some(fd)) {
                    out.push(item);
                }
            }
            if (n as usize) < BATCH {
                return;
            }
        }
    }

    /// Takes out every entry past its deadline (to be closed).
    pub fn take_expired(&self, now_ms: u64, out: &mut Vec<T>) {
        let due: Vec<u32> = self
            .entries
            .borrow()
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|e| e.deadline_ms <= now_ms)
                    .map(|_| i as u32)
            })
            .collect();
        for index in due {
            if let Some(item) = self.remove(index, None) {
                out.push(item);
            }
        }
    }

    /// Removes entry `index` (when its descriptor is `fd`, if given) from
    /// the lot and from the epoll instance.
    fn remove(&self, index: u32, fd: Option<RawFd>) -> Option<T> {
        let mut entries = self.entries.borrow_mut();
        let slot = entries.get_mut(index as usize)?;
        if slot
            .as_ref()
            .is_none_or(|e| fd.is_some_and(|fd| e.fd != fd))
        {
            return None;
        }
        let entry = slot.take()?;
        // SAFETY: the entry's descriptor is open (its item is still held);
        // EPOLL_CTL_DEL ignores the event pointer.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                entry.fd,
                std::ptr::null_mut(),
            );
        }
        self.free.borrow_mut().push(index);
        self.len.set(self.len.get() - 1);
        Some(entry.item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_with_bytes_or_a_hangup_is_taken_out_and_others_stay() {
        let lot = Lot::new().expect("epoll");
        let (a, mut a_peer) = UnixStream::pair().expect("pair");
        let (b, _b_peer) = UnixStream::pair().expect("pair");
        let (c, c_peer) = UnixStream::pair().expect("pair");
        for s in [a, b, c] {
            assert!(lot.insert(s, u64::MAX).is_ok());
        }
        let mut out = Vec::new();
        lot.take_ready(&mut out);
        assert!(out.is_empty(), "nothing is ready yet");
        a_peer.write_all(b"GET").expect("write");
        drop(c_peer);
        lot.take_ready(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(lot.len(), 1);
        // Taken out means out of the epoll set: more bytes do not return it.
        a_peer.write_all(b" /").expect("write");
        let mut again = Vec::new();
        lot.take_ready(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn entries_past_their_deadline_are_taken_out_and_slots_are_reused() {
        let lot = Lot::new().expect("epoll");
        let (early, _p1) = UnixStream::pair().expect("pair");
        let (late, _p2) = UnixStream::pair().expect("pair");
        assert!(lot.insert(early, 1_000).is_ok());
        assert!(lot.insert(late, 5_000).is_ok());
        let mut out = Vec::new();
        lot.take_expired(999, &mut out);
        assert!(out.is_empty());
        lot.take_expired(1_000, &mut out);
        assert_eq!((out.len(), lot.len()), (1, 1));
        let (next, mut next_peer) = UnixStream::pair().expect("pair");
        assert!(lot.insert(next, 5_000).is_ok());
        assert_eq!(lot.entries.borrow().len(), 2, "the freed slot is reused");
        next_peer.write_all(b"x").expect("write");
        let mut ready = Vec::new();
        lot.take_ready(&mut ready);
        assert_eq!(ready.len(), 1);
    }

    #[test]
    fn a_descriptor_the_kernel_refuses_comes_back() {
        let lot: Lot<std::fs::File> = Lot::new().expect("epoll");
        // Regular files cannot be watched by epoll (EPERM).
        let f = std::fs::File::open("Cargo.toml").expect("file");
        let Err((e, back)) = lot.insert(f, u64::MAX) else {
            panic!("a regular file was accepted");
        };
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(back.as_raw_fd() >= 0);
        assert!(lot.is_empty());
        assert!(lot.free.borrow().len() == 1);
    }
}
