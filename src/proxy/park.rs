//! Parked connections: an idle keep-alive connection waits for its socket to
//! become readable with no buffer and no timer of its own. A monoio timer
//! (`Sleep`) is 640 bytes; ten thousand idle clients would hold 6 MiB of
//! them. Instead each parked connection holds a small slot in its worker's
//! [`Parking`] list, which the worker's tick sweeps: a slot past its deadline
//! is marked expired and its task woken, and the connection closes.
//!
//! The sweep runs every [`SWEEP_EVERY`] ticks, so an idle timeout fires up
//! to that much late; nothing on the request path touches the list.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};

/// Worker ticks between two sweeps (a tick is 20 ms: about 200 ms).
pub const SWEEP_EVERY: u32 = 10;

/// One parked connection's deadline and waker.
#[derive(Default)]
pub struct Slot {
    deadline_ms: Cell<u64>,
    expired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

/// The parked connections of one worker.
#[derive(Default)]
pub struct Parking {
    slots: RefCell<Vec<Weak<Slot>>>,
    ticks: Cell<u32>,
}

impl Parking {
    /// Registers a connection parked until `deadline_ms` (ms since the epoch).
    pub fn park(&self, deadline_ms: u64) -> Rc<Slot> {
        let slot = Rc::new(Slot {
            deadline_ms: Cell::new(deadline_ms),
            ..Slot::default()
        });
        self.slots.borrow_mut().push(Rc::downgrade(&slot));
        slot
    }

    /// Called on every worker tick: every [`SWEEP_EVERY`]th one, expires the
    /// slots past their deadline (waking their tasks) and forgets the slots
    /// whose connections woke up or closed.
    pub fn tick(&self, now_ms: u64) {
        let t = self.ticks.get() + 1;
        if t < SWEEP_EVERY {
            self.ticks.set(t);
            return;
        }
        self.ticks.set(0);
        self.sweep(now_ms);
    }

    fn sweep(&self, now_ms: u64) {
        self.slots.borrow_mut().retain(|w| {
            let Some(slot) = w.upgrade() else {
                return false;
            };
            if now_ms < slot.deadline_ms.get() {
                return true;
            }
            slot.expired.set(true);
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

/// Waits for `readable` (the socket's readiness) unless `slot` expires
/// first: `true` when the socket became readable.
pub async fn until_readable<F>(readable: F, slot: &Slot) -> bool
where
    F: Future<Output = std::io::Result<()>>,
{
    let mut readable = std::pin::pin!(readable);
    std::future::poll_fn(|cx| {
        if slot.expired.get() {
            return Poll::Ready(false);
        }
        match readable.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r.is_ok()),
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
    fn the_sweep_expires_only_slots_past_their_deadline() {
        let p = Parking::default();
        let early = p.park(1_000);
        let late = p.park(5_000);
        let gone = p.park(1_000);
        drop(gone);
        for _ in 0..SWEEP_EVERY - 1 {
            p.tick(2_000);
        }
        assert!(!early.expired.get(), "no sweep before SWEEP_EVERY ticks");
        p.tick(2_000);
        assert!(early.expired.get() && !late.expired.get());
        assert_eq!(p.len(), 1, "expired and dropped slots are forgotten");
        p.sweep(5_000);
        assert!(late.expired.get() && p.is_empty());
    }

    #[test]
    fn an_expired_slot_ends_the_wait_and_readiness_wins_otherwise() {
        let expired = Slot::default();
        expired.expired.set(true);
        let never = std::future::pending::<std::io::Result<()>>();
        assert!(!futures_lite_block_on(until_readable(never, &expired)));
        let open = Slot::default();
        assert!(futures_lite_block_on(until_readable(
            std::future::ready(Ok(())),
            &open
        )));
        let failed = std::future::ready(Err(std::io::Error::other("reset")));
        assert!(!futures_lite_block_on(until_readable(failed, &open)));
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
