//! Parked connections: an idle keep-alive connection waits for its socket to
//! become readable with no buffer and no timer of its own. A monoio timer
//! (`Sleep`) is 640 bytes; ten thousand idle clients would hold 6 MiB of
//! them. Instead each parked connection holds a small slot in its worker's
//! [`Parking`] list, which the worker's tick sweeps: a slot past its deadline
//! is marked expired and its task woken, and the connection closes; a slot
//! still waiting is told to move to the lot ([`super::lot`]), where an idle
//! connection has no task at all.
//!
//! The sweep runs every [`SWEEP_EVERY`] ticks, so an idle timeout fires up
//! to that much late; nothing on the request path touches the list.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};

/// Core ticks between two sweeps (a tick is 20 ms: about 200 ms).
pub const SWEEP_EVERY: u32 = 10;

/// How a parked connection's wait ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Woke {
    /// Still waiting (never returned by [`until_readable`]).
    #[default]
    Waiting,
    /// The socket is readable (or hung up): serve it.
    Readable,
    /// The idle deadline passed (or the socket failed): close it.
    Expired,
    /// A sweep found it still idle: move it to the lot.
    ToLot,
}

/// One parked connection's deadline and waker.
#[derive(Default)]
pub struct ParkSlot {
    deadline_ms: Cell<u64>,
    /// May this connection move to the lot (false after the lot refused it).
    movable: Cell<bool>,
    woke: Cell<Woke>,
    waker: RefCell<Option<Waker>>,
}

/// The parked connections of one worker.
#[derive(Default)]
pub struct Parking {
    slots: RefCell<Vec<Weak<ParkSlot>>>,
    ticks: Cell<u32>,
}

impl Parking {
    /// Registers a connection parked until `deadline_ms` (ms since the
    /// epoch); a `movable` one is moved to the lot by the next sweep.
    pub fn park(&self, deadline_ms: u64, movable: bool) -> Rc<ParkSlot> {
        let slot = Rc::new(ParkSlot {
            deadline_ms: Cell::new(deadline_ms),
            movable: Cell::new(movable),
            ..ParkSlot::default()
        });
        self.slots.borrow_mut().push(Rc::downgrade(&slot));
        slot
    }

    /// Called on every worker tick: `true` on every [`SWEEP_EVERY`]th one,
    /// after expiring the slots past their deadline, sending the movable
    /// ones still waiting to the lot (waking their tasks), and forgetting
    /// the slots whose connections woke up or closed.
    pub fn tick(&self, now_ms: u64) -> bool {
        let t = self.ticks.get() + 1;
        if t < SWEEP_EVERY {
            self.ticks.set(t);
            return false;
        }
        self.ticks.set(0);
        self.sweep(now_ms);
        true
    }

    fn sweep(&self, now_ms: u64) {
        self.slots.borrow_mut().retain(|w| {
            let Some(slot) = w.upgrade() else {
                return false;
            };
            let woke = if now_ms >= slot.deadline_ms.get() {
                Woke::Expired
            } else if slot.movable.get() {
                Woke::ToLot
            } else {
                return true;
            };
            slot.woke.set(woke);
            if let Some(waker) = slot.waker.borrow_mut().take() {
                waker.wake();
            }
            false
        });
    }

    /// Connections parked now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    /// No connection is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits for `readable` (the socket's readiness) unless a sweep ends the
/// wait first (expired, or to the lot).
pub async fn until_readable<F>(readable: F, slot: &ParkSlot) -> Woke
where
    F: Future<Output = std::io::Result<()>>,
{
    let mut readable = std::pin::pin!(readable);
    std::future::poll_fn(|cx| {
        let woke = slot.woke.get();
        if woke != Woke::Waiting {
            return Poll::Ready(woke);
        }
        match readable.as_mut().poll(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Woke::Readable),
            Poll::Ready(Err(_)) => Poll::Ready(Woke::Expired),
            Poll::Pending => {
                let mut w = slot.waker.borrow_mut();
                if !w.as_ref().is_some_and(|old| old.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_expires_slots_past_their_deadline_and_moves_the_others() {
        let p = Parking::default();
        let early = p.park(1_000, true);
        let late = p.park(5_000, true);
        let stays = p.park(5_000, false);
        let gone = p.park(1_000, true);
        drop(gone);
        for _ in 0..SWEEP_EVERY - 1 {
            assert!(!p.tick(2_000));
        }
        assert_eq!(
            early.woke.get(),
            Woke::Waiting,
            "no sweep before SWEEP_EVERY ticks"
        );
        assert!(p.tick(2_000));
        assert_eq!(early.woke.get(), Woke::Expired);
        assert_eq!(late.woke.get(), Woke::ToLot);
        assert_eq!(stays.woke.get(), Woke::Waiting, "not movable: waits on");
        assert_eq!(p.len(), 1, "woken and dropped slots are forgotten");
        p.sweep(5_000);
        assert_eq!(stays.woke.get(), Woke::Expired);
        assert!(p.is_empty());
    }

    #[test]
    fn a_sweep_ends_the_wait_and_readiness_wins_otherwise() {
        let never = || std::future::pending::<std::io::Result<()>>();
        for woke in [Woke::Expired, Woke::ToLot] {
            let slot = ParkSlot::default();
            slot.woke.set(woke);
            assert_eq!(futures_lite_block_on(until_readable(never(), &slot)), woke);
        }
        let open = ParkSlot::default();
        let ready = std::future::ready(Ok(()));
        assert_eq!(
            futures_lite_block_on(until_readable(ready, &open)),
            Woke::Readable
        );
        let failed = std::future::ready(Err(std::io::Error::other("reset")));
        assert_eq!(
            futures_lite_block_on(until_readable(failed, &open)),
            Woke::Expired
        );
    }

    /// Polls a future that is ready without waiting, on a no-op waker.
    fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the test future must be ready at once"),
        }
    }
}
