//! Reads of one core to one Redis node, sent together (auto-pipelining):
//! the lookups that reach a node in the same pass of the core's run queue
//! share one write and one connection, and their replies come back in one
//! read where they fit. Redis then spends a fraction of a lone command's
//! CPU on each (loadtest/results/performance.md: 1 KiB `GET`s cost it 15 us
//! each one per round trip, 2-5 us pipelined four to sixteen deep), and the
//! core makes fewer system calls.
//!
//! The first lookup to find no batch open opens one and leads it: it lets
//! the run queue go round once ([`Deferred`]), and waits on while
//! [`FLIGHTS`] batches are out to the node or no connection to it is
//! free, so that the busier Redis is the deeper the batch. Then it closes
//! the batch, sends every command in it in one write and hands each member
//! its replies. The others join and wait
//! ([`Member`]). A leader whose lookup is dropped before the
//! replies are handed out abandons the batch; its members then try again.
//! Only plain reads (`GET`, `GETRANGE`) are batched, at most [`MAX`] a
//! batch, and only while the node's recent replies to them were small
//! ([`ReplySizes`]): a batch of large values makes Redis hold them all at
//! once, and its allocator then faults in fresh pages for them (1 MiB
//! objects cost it 1.3-1.5x as much CPU a read batched as alone, and
//! 64 KiB ones gained nothing; loadtest/results/performance.md).

use redis_protocol::resp2::types::OwnedFrame;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Commands in one batch at most.
pub const MAX: usize = 16;
/// Batches in flight to one node at once; a batch being gathered while
/// they are out goes on gathering until one lands.
pub const FLIGHTS: usize = 4;

/// Whether `commands` may share a batch: one plain read.
pub fn batchable(commands: &[&[&[u8]]]) -> bool {
    matches!(commands, [[name, ..]] if *name == b"GET" || *name == b"GETRANGE")
}

/// Replies averaging more than this are read alone.
pub const SMALL: u64 = 16 * 1024;

/// A moving average of the sizes of a node's replies to plain reads (each
/// new one weighs an eighth): whether reads to it are batched.
#[derive(Default)]
pub struct ReplySizes {
    average: Cell<u64>,
}

impl ReplySizes {
    /// Counts `replies` in.
    pub fn record(&self, replies: &[OwnedFrame]) {
        for r in replies {
            let len = match r {
                OwnedFrame::BulkString(v) => v.len() as u64,
                _ => 0,
            };
            let avg = self.average.get();
            self.average.set(avg - avg / 8 + len / 8);
        }
    }

    /// Whether recent replies were small enough to batch reads.
    pub fn small(&self) -> bool {
        self.average.get() <= SMALL
    }
}

/// One member's outcome: its replies, or why there are none.
pub type Outcome = Result<Vec<OwnedFrame>, String>;

/// Commands of several lookups, to be sent to one node together.
#[derive(Default)]
pub struct Batch {
    /// Each member's command, as it will be sent.
    commands: RefCell<Vec<Vec<Vec<u8>>>>,
    /// Each member's outcome, once known.
    outcomes: RefCell<Vec<Option<Outcome>>>,
    /// Closed to new members (its leader is sending it).
    closed: Cell<bool>,
    /// Its leader went away before handing out the outcomes.
    abandoned: Cell<bool>,
    waiting: RefCell<Vec<Waker>>,
}

impl Batch {
    /// Whether another member fits.
    pub fn has_room(&self) -> bool {
        !self.closed.get() && self.outcomes.borrow().len() < MAX
    }

    /// Adds `command` (one read); its member's number.
    pub fn join(&self, command: &[&[u8]]) -> usize {
        let mut commands = self.commands.borrow_mut();
        commands.push(command.iter().map(|a| a.to_vec()).collect());
        let mut outcomes = self.outcomes.borrow_mut();
        outcomes.push(None);
        outcomes.len() - 1
    }

    /// Closes the batch; its commands, in members' order (taken: nobody
    /// joins a closed batch).
    pub fn close(&self) -> Vec<Vec<Vec<u8>>> {
        self.closed.set(true);
        std::mem::take(&mut *self.commands.borrow_mut())
    }

    /// Hands out the replies to the batch's commands (one each, in order),
    /// or the error that ended it.
    pub fn finish(&self, replies: Result<Vec<OwnedFrame>, String>) {
        let mut outcomes = self.outcomes.borrow_mut();
        match replies {
            Ok(replies) if replies.len() == outcomes.len() => {
                for (slot, reply) in outcomes.iter_mut().zip(replies) {
                    *slot = Some(Ok(vec![reply]));
                }
            }
            Ok(replies) => {
                let e = format!("{} replies to {} commands", replies.len(), outcomes.len());
                outcomes.iter_mut().for_each(|o| *o = Some(Err(e.clone())));
            }
            Err(e) => outcomes.iter_mut().for_each(|o| *o = Some(Err(e.clone()))),
        }
        drop(outcomes);
        self.wake();
    }

    /// Its leader is gone: the members still waiting try again.
    pub fn abandon(&self) {
        self.closed.set(true);
        self.abandoned.set(true);
        self.wake();
    }

    /// Member `me`'s outcome, taken (`None`: not yet, or abandoned).
    pub fn take(&self, me: usize) -> Option<Outcome> {
        self.outcomes
            .borrow_mut()
            .get_mut(me)
            .and_then(Option::take)
    }

    fn wake(&self) {
        for w in self.waiting.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// What a member waiting on its batch gets.
pub enum Waited {
    /// The member's replies, or why there are none.
    Done(Outcome),
    /// The leader went away: try again.
    Abandoned,
}

/// Ready once member `me`'s outcome is handed out, or the batch abandoned.
pub struct Member<'a> {
    /// The batch joined.
    pub batch: &'a Batch,
    /// The member's number in it ([`Batch::join`]).
    pub me: usize,
}

impl Future for Member<'_> {
    type Output = Waited;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Waited> {
        if let Some(outcome) = self.batch.take(self.me) {
            return Poll::Ready(Waited::Done(outcome));
        }
        if self.batch.abandoned.get() {
            return Poll::Ready(Waited::Abandoned);
        }
        self.batch.waiting.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Ready after every task ready now has run once: a task that wakes itself
/// runs again at once on monoio (`yield_now` queues it first), so a task
/// spawned behind the others wakes it instead.
#[derive(Default)]
pub struct Deferred {
    spawned: bool,
}

impl Future for Deferred {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.spawned {
            return Poll::Ready(());
        }
        self.spawned = true;
        let waker = cx.waker().clone();
        monoio::spawn(async move { waker.wake() });
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn only_one_plain_read_is_batched() {
        assert!(batchable(&[&[b"GET", b"k"]]));
        assert!(batchable(&[&[b"GETRANGE", b"k", b"0", b"9"]]));
        assert!(!batchable(&[&[b"MGET", b"a", b"b"]]));
        assert!(!batchable(&[&[b"SET", b"k", b"v"]]));
        assert!(!batchable(&[&[b"GET", b"a"], &[b"GET", b"b"]]));
        assert!(!batchable(&[]));
    }

    #[test]
    fn each_member_gets_its_own_reply_in_order() {
        let b = Batch::default();
        let first = b.join(&[b"GET", b"a"]);
        let second = b.join(&[b"GETRANGE", b"b", b"0", b"9"]);
        assert_eq!(b.take(first), None);
        let sent = b.close();
        assert!(!b.has_room());
        assert_eq!(
            sent[1],
            vec![
                b"GETRANGE".to_vec(),
                b"b".to_vec(),
                b"0".to_vec(),
                b"9".to_vec()
            ]
        );
        b.finish(Ok(vec![bulk("A"), OwnedFrame::Null]));
        assert_eq!(b.take(second), Some(Ok(vec![OwnedFrame::Null])));
        assert_eq!(b.take(first), Some(Ok(vec![bulk("A")])));
        // Taken once.
        assert_eq!(b.take(first), None);
    }

    #[test]
    fn a_failure_or_a_miscount_fails_every_member() {
        let b = Batch::default();
        let (x, y) = (b.join(&[b"GET", b"a"]), b.join(&[b"GET", b"b"]));
        b.finish(Err("gone".into()));
        assert_eq!(b.take(x), Some(Err("gone".into())));
        assert_eq!(b.take(y), Some(Err("gone".into())));
        let b = Batch::default();
        let (x, y) = (b.join(&[b"GET", b"a"]), b.join(&[b"GET", b"b"]));
        b.finish(Ok(vec![bulk("A")]));
        assert!(matches!(b.take(x), Some(Err(e)) if e.contains("1 replies to 2")));
        assert!(b.take(y).is_some_and(|o| o.is_err()));
    }

    #[test]
    fn reads_stop_being_batched_once_replies_run_large_and_start_again() {
        let sizes = ReplySizes::default();
        assert!(sizes.small());
        let big = OwnedFrame::BulkString(vec![0; 1 << 20]);
        sizes.record(std::slice::from_ref(&big));
        // One 1 MiB reply in: an eighth of it is over the bound.
        assert!(!sizes.small());
        let small = vec![bulk("x"); 8];
        sizes.record(&small);
        assert!(!sizes.small(), "still 1 MiB * (7/8)^8 = 344 KiB");
        for _ in 0..3 {
            sizes.record(&small);
        }
        assert!(sizes.small());
        // Nulls and errors weigh as empty.
        sizes.record(&[OwnedFrame::Null, OwnedFrame::Error("x".into())]);
        assert!(sizes.small());
    }

    fn poll_member(batch: &Batch, me: usize) -> Poll<Waited> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut Member { batch, me }).poll(&mut cx)
    }

    #[test]
    fn a_waiting_member_is_woken_with_its_reply_or_told_to_try_again() {
        let b = Batch::default();
        let me = b.join(&[b"GET", b"a"]);
        assert!(poll_member(&b, me).is_pending());
        assert_eq!(b.waiting.borrow().len(), 1);
        b.finish(Ok(vec![bulk("A")]));
        assert!(b.waiting.borrow().is_empty(), "woken");
        assert!(
            matches!(poll_member(&b, me), Poll::Ready(Waited::Done(Ok(r))) if r == vec![bulk("A")])
        );
        // A leader gone before the replies: members try again, and nobody
        // joins the batch any more.
        let b = Batch::default();
        let me = b.join(&[b"GET", b"a"]);
        assert!(poll_member(&b, me).is_pending());
        b.abandon();
        assert!(b.waiting.borrow().is_empty(), "woken");
        assert!(!b.has_room());
        assert!(matches!(
            poll_member(&b, me),
            Poll::Ready(Waited::Abandoned)
        ));
    }

    #[test]
    fn a_batch_is_full_at_max() {
        let b = Batch::default();
        for _ in 0..MAX {
            assert!(b.has_room());
            b.join(&[b"GET", b"k"]);
        }
        assert!(!b.has_room());
    }
}
