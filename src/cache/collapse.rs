//! Collapsed forwarding: concurrent misses for one key, on any core, cause
//! one upstream GET. The first request (the leader) fetches and relays as
//! usual while copying the body into a [`SharedFill`]; the others (waiters)
//! stream the same bytes as they arrive: a late joiner first gets what is
//! already there, then follows. Waiters are woken across cores through
//! monoio's thread-safe wakers.
//!
//! The pieces are a second copy of the body (or, for chunks read from
//! Redis, those chunks themselves, shared: [`SharedFill::push_shared`]):
//! they live only while the fill is open. When it ends `Done` they are dropped, and readers still behind
//! continue from the stored copy (`proxy::cache::stream_fill`), so a reader
//! that stalls holds no copy of its own.
//!
//! An object too large to store is still fetched once for everyone waiting
//! on it: a *pass-through* fill keeps only a window of its latest pieces
//! ([`SharedFill::set_window`]); a reader that falls behind the window is
//! told so ([`FillEvent::Behind`]) and continues with a range request of its own.
//!
//! The fill ends `Done` (complete, and stored), `Failed` (the body broke and
//! nothing could resume it: waiters abort their connections, never a short
//! body), or `Abandoned` (the answer was not cacheable, or the leader got no
//! answer: waiters go upstream themselves).

use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Most pieces one [`FillEvent::Body`] hands out.
pub const PIECES_PER_EVENT: usize = 4;

/// What a waiter needs to write the response head.
#[derive(Debug, Default)]
pub struct FillHead {
    /// Headers relayed (`Name: value\r\n`), without `Content-Length`.
    pub headers: String,
    /// The body's length.
    pub len: u64,
    /// The object's `ETag` (a reader that falls behind resumes with it).
    pub etag: String,
    /// Not stored: readers get the pieces while they are in the window, and
    /// none once the fill ends.
    pub passthrough: bool,
}

/// How a fill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Still filling.
    Open,
    /// Complete.
    Done,
    /// Broken mid-body: waiters abort.
    Failed,
    /// Not shared after all: waiters fetch for themselves.
    Abandoned,
}

#[derive(Default)]
struct FillState {
    head: Option<Arc<FillHead>>,
    /// The pieces kept: piece `base + i` is `body[i]`.
    body: std::collections::VecDeque<Bytes>,
    /// Pieces dropped from the front (a pass-through fill's window moved on).
    base: usize,
    /// Bytes in `body`.
    kept: usize,
    /// Most bytes kept (0: every piece, until the fill is stored).
    window: usize,
    end: Option<End>,
    wakers: Vec<Waker>,
    waiters: usize,
    /// The stored object, once `Done` (weak: it pins nothing).
    stored: Option<std::sync::Weak<crate::cache::store::Object>>,
}

/// One body being fetched once for several clients.
#[derive(Default)]
pub struct SharedFill {
    state: Mutex<FillState>,
}

/// What a waiter learns on each wake-up.
#[derive(Debug)]
pub enum FillEvent {
    /// The response head (once).
    Head(Arc<FillHead>),
    /// Body pieces from where the waiter stood.
    Body(Vec<Bytes>),
    /// The pieces after where the waiter stood were dropped (a pass-through
    /// fill's window moved past it): it must continue on its own.
    Behind,
    /// The fill ended this way (never `Open`).
    Ended(End),
}

impl SharedFill {
    fn lock(&self) -> MutexGuard<'_, FillState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn wake(state: &mut FillState) {
        for w in state.wakers.drain(..) {
            w.wake();
        }
    }

    /// The leader has a cacheable head.
    pub fn set_head(&self, head: FillHead) {
        let mut s = self.lock();
        s.head = Some(Arc::new(head));
        Self::wake(&mut s);
    }

    /// Keeps at most `bytes` of the latest pieces (at least the last one):
    /// a pass-through fill, whose pieces are the only copy, holds bounded
    /// memory however far behind its slowest reader is.
    pub fn set_window(&self, bytes: usize) {
        self.lock().window = bytes;
    }

    /// The next body bytes.
    pub fn push(&self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.push_shared(Bytes::copy_from_slice(bytes));
        }
    }

    /// The next body bytes, kept by reference (no copy).
    pub fn push_shared(&self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        let mut s = self.lock();
        s.kept += piece.len();
        s.body.push_back(piece);
        while s.window > 0 && s.kept > s.window && s.body.len() > 1 {
            if let Some(front) = s.body.pop_front() {
                s.kept -= front.len();
                s.base += 1;
            }
        }
        Self::wake(&mut s);
    }

    /// Ends the fill (the first end wins).
    pub fn end(&self, end: End) {
        let mut s = self.lock();
        if s.end.is_none() {
            s.end = Some(end);
        }
        Self::wake(&mut s);
    }

    /// Ends the fill complete. With the stored object, the pieces are
    /// dropped and readers continue from it ([`SharedFill::stored`]); a
    /// fill that was not stored (a purge came first) keeps its pieces for
    /// the readers still behind.
    pub fn done(&self, stored: Option<&Arc<crate::cache::store::Object>>) {
        let mut s = self.lock();
        if s.end.is_none() {
            s.end = Some(End::Done);
            if let Some(object) = stored {
                s.stored = Some(Arc::downgrade(object));
                s.base += s.body.len();
                s.body = Default::default();
                s.kept = 0;
            }
        }
        Self::wake(&mut s);
    }

    /// The stored object of a fill that ended `Done`, while it lives (in
    /// the store, or being sent).
    pub fn stored(&self) -> Option<Arc<crate::cache::store::Object>> {
        self.lock()
            .stored
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
    }

    /// Body pieces past the first `seen`, as many as are there now (at
    /// most [`PIECES_PER_EVENT`]), without waiting; `None` when the window
    /// moved past `seen`.
    pub fn available(&self, seen: usize) -> Option<Vec<Bytes>> {
        let s = self.lock();
        s.pieces_after(seen)
    }

    /// The head, once the leader set it.
    pub fn head(&self) -> Option<Arc<FillHead>> {
        self.lock().head.clone()
    }

    /// Whether it ended, and how.
    pub fn ended(&self) -> Option<End> {
        self.lock().end
    }

    /// Clients waiting on this fill.
    pub fn waiters(&self) -> usize {
        self.lock().waiters
    }

    /// The next event for a waiter that has seen the head (`have_head`) and
    /// `seen` body pieces.
    pub fn next(self: &Arc<Self>, have_head: bool, seen: usize) -> Next {
        Next {
            fill: self.clone(),
            have_head,
            seen,
        }
    }
}

impl FillState {
    /// Up to [`PIECES_PER_EVENT`] pieces after the first `seen` (a bounded
    /// batch: a reader far behind holds only what it is writing now);
    /// `None` when some of them were dropped.
    fn pieces_after(&self, seen: usize) -> Option<Vec<Bytes>> {
        let from = seen.checked_sub(self.base)?;
        let to = self.body.len().min(from + PIECES_PER_EVENT);
        Some(self.body.range(from.min(to)..to).cloned().collect())
    }
}

/// Future of [`SharedFill::next`].
pub struct Next {
    fill: Arc<SharedFill>,
    have_head: bool,
    seen: usize,
}

impl Future for Next {
    type Output = FillEvent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FillEvent> {
        let mut s = self.fill.lock();
        if !self.have_head {
            if let Some(h) = &s.head {
                return Poll::Ready(FillEvent::Head(h.clone()));
            }
        } else if s.stored.is_none() {
            match s.pieces_after(self.seen) {
                None => return Poll::Ready(FillEvent::Behind),
                Some(pieces) if !pieces.is_empty() => return Poll::Ready(FillEvent::Body(pieces)),
                Some(_) => {}
            }
        }
        if let Some(end) = s.end {
            return Poll::Ready(FillEvent::Ended(end));
        }
        s.wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

/// The role of a request in a key's fill.
pub enum Role {
    /// Fetch, relay and fill.
    Leader(Arc<SharedFill>),
    /// Stream what the leader fetches.
    Waiter(Arc<SharedFill>),
}

/// Fills under way, process-wide, by cache key.
#[derive(Default)]
pub struct Fills {
    map: Mutex<HashMap<String, Arc<SharedFill>>>,
}

impl Fills {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<SharedFill>>> {
        match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Joins the open fill of `key`, or starts one.
    pub fn join_or_lead(&self, key: &str) -> Role {
        let mut map = self.lock();
        if let Some(f) = map.get(key) {
            if f.ended().is_none() {
                f.lock().waiters += 1;
                return Role::Waiter(f.clone());
            }
        }
        let f = Arc::new(SharedFill::default());
        map.insert(key.to_string(), f.clone());
        Role::Leader(f)
    }

    /// Whether a fill of `key` is under way (a request for it would join).
    pub fn is_open(&self, key: &str) -> bool {
        self.lock().get(key).is_some_and(|f| f.ended().is_none())
    }

    /// Starts the fill of `key` unless one is open (then `None`, and the
    /// caller is no waiter of it).
    pub fn lead(&self, key: &str) -> Option<Arc<SharedFill>> {
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| f.ended().is_none()) {
            return None;
        }
        let f = Arc::new(SharedFill::default());
        map.insert(key.to_string(), f.clone());
        Some(f)
    }

    /// Requests waiting now on a fetch another request leads (fills still
    /// open), over every key: for the metrics scrape.
    pub fn waiting(&self) -> usize {
        self.lock()
            .values()
            .filter(|f| f.ended().is_none())
            .map(|f| f.waiters())
            .sum()
    }

    /// Removes `fill` (if it is still the one under `key`), ending it as
    /// abandoned unless it already ended.
    pub fn finish(&self, key: &str, fill: &Arc<SharedFill>) {
        fill.end(End::Abandoned);
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_now(n: &mut Next) -> Poll<FillEvent> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(n).poll(&mut cx)
    }

    #[test]
    fn waiters_see_the_head_the_bytes_so_far_then_the_end() {
        let fills = Fills::default();
        let Role::Leader(lead) = fills.join_or_lead("k") else {
            panic!("first is the leader")
        };
        let Role::Waiter(w) = fills.join_or_lead("k") else {
            panic!("second waits")
        };
        assert!(poll_now(&mut w.next(false, 0)).is_pending());
        lead.set_head(FillHead {
            len: 6,
            ..FillHead::default()
        });
        lead.push(b"abc");
        assert!(
            matches!(poll_now(&mut w.next(false, 0)), Poll::Ready(FillEvent::Head(h)) if h.len == 6)
        );
        assert!(
            matches!(poll_now(&mut w.next(true, 0)), Poll::Ready(FillEvent::Body(b)) if b.len() == 1)
        );
        assert!(poll_now(&mut w.next(true, 1)).is_pending());
        lead.push(b"def");
        assert!(
            matches!(poll_now(&mut w.next(true, 1)), Poll::Ready(FillEvent::Body(b)) if &b[0][..] == b"def")
        );
        assert_eq!(w.available(0).map(|p| p.len()), Some(2));
        let object = Arc::new(crate::cache::store::Object {
            stored_at: std::time::UNIX_EPOCH,
            fresh_for: std::time::Duration::ZERO,
            etag: String::new(),
            last_modified: None,
            headers: String::new(),
            body: Bytes::from_static(b"abcdef").into(),
            total: 6,
            touched_ms: Default::default(),
        });
        lead.done(Some(&object));
        assert!(w.stored().is_some());
        // Done: the pieces are gone; readers go on from the stored copy.
        assert!(matches!(
            poll_now(&mut w.next(true, 1)),
            Poll::Ready(FillEvent::Ended(End::Done))
        ));
        assert!(w.available(0).is_none_or(|p| p.is_empty()));
        drop(object);
        assert!(w.stored().is_none(), "the fill pins nothing");
        fills.finish("k", &lead);
        assert!(
            matches!(fills.join_or_lead("k"), Role::Leader(_)),
            "a new fill after the end"
        );
    }

    #[test]
    fn a_pass_through_fill_keeps_a_window_and_tells_readers_left_behind() {
        let f = Arc::new(SharedFill::default());
        f.set_window(8);
        f.set_head(FillHead {
            len: 20,
            passthrough: true,
            ..FillHead::default()
        });
        for piece in [b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeee"] {
            f.push(piece);
        }
        // Eight bytes kept: the last two pieces; pieces 0-2 are gone.
        assert!(matches!(
            poll_now(&mut f.next(true, 0)),
            Poll::Ready(FillEvent::Behind)
        ));
        assert!(matches!(
            poll_now(&mut f.next(true, 2)),
            Poll::Ready(FillEvent::Behind)
        ));
        assert!(
            matches!(poll_now(&mut f.next(true, 3)), Poll::Ready(FillEvent::Body(b)) if b.len() == 2 && &b[0][..] == b"dddd")
        );
        assert!(f.available(1).is_none());
        assert!(poll_now(&mut f.next(true, 5)).is_pending());
        // Done without a stored copy: readers in the window still get it.
        f.done(None);
        assert!(
            matches!(poll_now(&mut f.next(true, 4)), Poll::Ready(FillEvent::Body(b)) if &b[0][..] == b"eeee")
        );
        assert!(matches!(
            poll_now(&mut f.next(true, 5)),
            Poll::Ready(FillEvent::Ended(End::Done))
        ));
    }

    #[test]
    fn a_shared_piece_is_kept_by_reference_in_order_with_copied_ones() {
        let f = Arc::new(SharedFill::default());
        f.set_head(FillHead {
            len: 6,
            ..FillHead::default()
        });
        let shared = Bytes::from_static(b"def");
        f.push(b"abc");
        f.push_shared(shared.clone());
        f.push_shared(Bytes::new());
        let Poll::Ready(FillEvent::Body(pieces)) = poll_now(&mut f.next(true, 0)) else {
            panic!("two pieces")
        };
        assert_eq!(pieces.len(), 2, "an empty piece is not kept");
        assert_eq!((&pieces[0][..], &pieces[1][..]), (&b"abc"[..], &b"def"[..]));
        assert_eq!(pieces[1].as_ptr(), shared.as_ptr(), "not copied");
    }

    #[test]
    fn the_first_end_wins() {
        let f = SharedFill::default();
        f.end(End::Failed);
        f.end(End::Abandoned);
        assert_eq!(f.ended(), Some(End::Failed));
    }

    #[test]
    fn a_fill_is_open_from_its_lead_to_its_end() {
        let fills = Fills::default();
        assert!(!fills.is_open("k"));
        let Role::Leader(f) = fills.join_or_lead("k") else {
            panic!("the first request leads");
        };
        assert!(fills.is_open("k") && !fills.is_open("other"));
        f.done(None);
        assert!(!fills.is_open("k"), "an ended fill is joined by no one");
        fills.finish("k", &f);
        assert!(!fills.is_open("k"));
    }
}
