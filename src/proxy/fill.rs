//! Phase "respond", into the cache: a cacheable answer is copied while it
//! is relayed ([`Fill`]) and stored the moment its last byte is in hand;
//! concurrent requests for the key stream the same fill (`waiter.rs`). An
//! answer too large to store is still shared: a pass-through fill keeps a
//! window of its latest pieces for its waiters and is never stored.

use super::cache::{forwarded_value, starts_with_ignore_case};
use super::*;
use crate::cache::collapse::{End, FillHead, SharedFill};
use crate::cache::policy;
use crate::cache::region::{Body, Filling};
use crate::cache::store::{self, Object};
use crate::http::body::Tee as _;

impl CoreGeneration {
    /// A fill for the answer's body, when it is to be stored: a 200 with a
    /// Content-Length within the bucket's item limit that the policy lets a
    /// shared cache store. The bytes already sent with the head
    /// (`answer.conn.buf[head_len..start]`) are copied in.
    pub(super) fn fill_start(&self, c: &Client, answer: &Answer, start: usize) -> Option<Fill<'_>> {
        let key = c.s.cache.fill_key()?;
        let store = self.shared.process.cache.as_ref()?;
        let resp = &answer.resp;
        let Framing::Length(len) = resp.framing() else {
            return None;
        };
        let bucket = self.shared.replicas[answer.rid].bucket;
        let settings = &self.shared.bucket(bucket).cache;
        if len > settings.max_item_bytes {
            self.note_large(key, resp, len, settings.ttl);
            return self.pass_through(c, (key, answer), start, len);
        }
        let fresh_for = self.freshness(resp, settings.ttl)?;
        // The body, and the copy waiters stream, count against the budget
        // of fills in flight until the fill ends; past it the answer is
        // relayed uncached, at the client's pace.
        let reservation = store.reserve_fill(len.saturating_mul(2))?;
        let meta = self.stored_meta(resp, fresh_for, len);
        let stale = self.shared.config.cache.stale_if_error;
        let publish = self.publisher(c, key, &meta, fresh_for);
        let shared = c.s.leading.as_ref().map(|(_, f)| f.clone());
        if let Some(f) = &shared {
            f.set_head(FillHead {
                headers: meta.headers.clone(),
                len,
                etag: resp.etag.clone(),
                passthrough: false,
            });
        }
        let mut fill = Fill {
            disk: self.shared.process.disk.as_deref(),
            redis: (self.shared.process.redis.as_deref()).map(|r| (r, stale)),
            publish,
            ..Fill::storing(store, shared, (key, meta), reservation)
        };
        fill.push(&answer.conn.buf[answer.head_len..start]);
        Some(fill)
    }

    /// When this request holds the fleet's lease on `key` (and the object,
    /// `meta`, is larger than a chunk): its publisher, so the other
    /// instances stream the object from Redis as it arrives.
    fn publisher(
        &self,
        c: &Client,
        key: &str,
        meta: &Object,
        fresh_for: Duration,
    ) -> Option<(
        &crate::cache::redis::RedisTier,
        crate::cache::redis::publish::Publisher,
    )> {
        let (redis, hold) = (self.shared.process.redis.as_deref()?, c.s.fleet_hold?);
        let servable = fresh_for + self.shared.config.cache.stale_if_error;
        let p = redis.publish(key, meta, meta.total, hold, servable)?;
        Some((redis, p))
    }

    /// A fill for an object another instance is fetching and publishing
    /// (`cache::redis::publish`): its chunks, read from Redis as they land,
    /// are pushed into it as an upstream body would be, so this instance's
    /// waiters stream them and the object is stored (memory, disk; not
    /// written back to Redis) once whole; an object larger than the
    /// bucket's item limit is passed to the waiters through a window and
    /// kept nowhere. `meta`: the object, its body empty, `total` its
    /// length. `None` when the fill budget is spent (or, for a large
    /// object, nobody leads a fill to share).
    pub(super) fn fleet_fill(
        &self,
        c: &Client,
        bucket: usize,
        key: &str,
        meta: Object,
    ) -> Option<Fill<'_>> {
        let store = self.shared.process.cache.as_ref()?;
        let len = meta.total;
        if len > self.shared.bucket(bucket).cache.max_item_bytes {
            // Too large to store: this instance's waiters stream it through
            // a window, and it is kept nowhere.
            let (_, shared) = c.s.leading.as_ref()?;
            let head = FillHead {
                headers: meta.headers,
                len,
                etag: meta.etag,
                passthrough: true,
            };
            let reservation = pass_window(store, shared, head)?;
            return Some(Fill::passing(store, shared.clone(), len, reservation));
        }
        let reservation = store.reserve_fill(len.saturating_mul(2))?;
        let shared = c.s.leading.as_ref().map(|(_, f)| f.clone());
        if let Some(f) = &shared {
            f.set_head(FillHead {
                headers: meta.headers.clone(),
                len,
                etag: meta.etag.clone(),
                passthrough: false,
            });
        }
        Some(Fill {
            disk: self.shared.process.disk.as_deref(),
            ..Fill::storing(store, shared, (key, meta), reservation)
        })
    }

    /// A fill for an answer too large to store that other requests may be
    /// waiting on: a 200 with a Content-Length and an ETag that a shared
    /// cache could store but for its size. Its body goes to the waiters
    /// through a window of [`PASS_WINDOW`] bytes (counted in the fill
    /// budget) and is kept nowhere; a waiter that falls behind continues
    /// with a range request (`serve_waiter`). One origin fetch for the
    /// burst, bounded memory for any object size.
    fn pass_through(
        &self,
        c: &Client,
        (key, answer): (&str, &Answer),
        start: usize,
        len: u64,
    ) -> Option<Fill<'_>> {
        let resp = &answer.resp;
        let (_, shared) = c.s.leading.as_ref()?;
        let store = self.shared.process.cache.as_ref()?;
        let bucket = self.shared.replicas[answer.rid].bucket;
        let ttl = self.shared.bucket(bucket).cache.ttl;
        if resp.status != 200 || resp.etag.is_empty() {
            return None;
        }
        let fresh_for = self.freshness(resp, ttl)?;
        let head = FillHead {
            headers: self.stored_headers(resp),
            len,
            etag: resp.etag.clone(),
            passthrough: true,
        };
        let reservation = pass_window(store, shared, head)?;
        // Published as it passes: it lives in Redis only.
        let meta = self.stored_meta(resp, fresh_for, len);
        let publish = self.publisher(c, key, &meta, fresh_for);
        c.s.fleet_published.set(publish.is_some());
        let mut fill = Fill {
            publish,
            meta: Some(meta),
            slices: self.slice_feed(key, len),
            ..Fill::passing(store, shared.clone(), len, reservation)
        };
        fill.push(&answer.conn.buf[answer.head_len..start]);
        Some(fill)
    }

    /// A copy of `resp` stored now, fresh for `fresh_for`, of a `total`
    /// bytes object, its body still empty: a whole object's before its
    /// fill, or a sliced object's metadata.
    pub(super) fn stored_meta(&self, resp: &Response, fresh_for: Duration, total: u64) -> Object {
        Object {
            stored_at: crate::clock::now(),
            fresh_for,
            etag: resp.etag.clone(),
            last_modified: forwarded_value(&resp.forward, "last-modified").map(str::to_string),
            headers: self.stored_headers(resp),
            body: Body::default(),
            total,
            touched_ms: Default::default(),
        }
    }

    /// The headers stored with a copy (a whole object or a slice's
    /// metadata): the upstream's, less the framing ones (`Content-Length`,
    /// `Content-Range`: computed per answer), with a `Date` when the
    /// upstream sent none.
    pub(super) fn stored_headers(&self, resp: &Response) -> String {
        let mut headers = String::with_capacity(resp.forward.len() + 40);
        for line in resp.forward.split_inclusive("\r\n") {
            if !starts_with_ignore_case(line, "content-length:")
                && !starts_with_ignore_case(line, "content-range:")
            {
                headers.push_str(line);
            }
        }
        if !resp.has_date {
            self.core.with_date(|d| {
                for part in ["Date: ", d, "\r\n"] {
                    headers.push_str(part);
                }
            });
        }
        headers
    }

    /// How long `resp` may be served from the cache (`None`: not stored).
    pub(super) fn freshness(&self, resp: &Response, ttl: Duration) -> Option<Duration> {
        self.freshness_as(resp, resp.status, ttl)
    }

    /// [`Self::freshness`] judging `resp` as if its status were `status`
    /// (a slice, a 206 to the proxy's own range request, is judged as the
    /// 200 it is a part of).
    pub(super) fn freshness_as(
        &self,
        resp: &Response,
        status: u16,
        ttl: Duration,
    ) -> Option<Duration> {
        let stored = policy::Stored {
            status,
            cache_control: forwarded_value(&resp.forward, "cache-control"),
            expires: forwarded_value(&resp.forward, "expires"),
            date: forwarded_value(&resp.forward, "date"),
        };
        policy::freshness(&stored, ttl, crate::clock::now())
    }
}
/// Sizes a pass-through fill's window and announces its head: the whole
/// object while the fill budget has room for it (up to half the budget),
/// so no waiter in a burst falls behind and fetches again; else
/// [`PASS_WINDOW`]. `None` when even that is not in the budget.
fn pass_window(
    store: &store::MemoryStore,
    shared: &SharedFill,
    head: FillHead,
) -> Option<store::FillReservation> {
    let whole = head
        .len
        .min(store.fill_budget() / 2)
        .max(PASS_WINDOW as u64);
    let (reservation, window) = match store.reserve_fill_quietly(whole) {
        Some(r) => (r, whole),
        None => (store.reserve_fill(PASS_WINDOW as u64)?, PASS_WINDOW as u64),
    };
    shared.set_window(window as usize);
    shared.set_head(head);
    Some(reservation)
}

/// The bytes of its latest pieces a pass-through fill keeps for its
/// waiters (`CoreGeneration::pass_through`).
pub(super) const PASS_WINDOW: usize = 8 * 1024 * 1024;

/// A body being copied into the cache while it is relayed. The object is
/// stored the moment its last byte is in hand, before that byte is written
/// to the client, so a client that has the whole body finds it cached.
pub(super) struct Fill<'s> {
    store: &'s store::MemoryStore,
    /// The disk tier, which gets the object once it is stored in memory.
    disk: Option<&'s crate::cache::disk::DiskStore>,
    /// The Redis tier, offered the object once it is stored in memory,
    /// with how long past its freshness it may be served.
    redis: Option<(&'s crate::cache::redis::RedisTier, Duration)>,
    /// Publishing the object to the fleet while it arrives, chunk by
    /// chunk (`cache::redis::publish`).
    publish: Option<(
        &'s crate::cache::redis::RedisTier,
        crate::cache::redis::publish::Publisher,
    )>,
    /// Waiters on other requests stream these bytes too (collapsed forwarding).
    shared: Option<Arc<SharedFill>>,
    /// The store's purge count when the fill started.
    epoch: u64,
    key: String,
    len: u64,
    body: Filling,
    /// Everything but the body; taken when stored.
    meta: Option<Object>,
    /// Its share of the budget of fills in flight, given back once stored.
    reservation: Option<store::FillReservation>,
    /// Too large to store: the body is passed to the waiters through the
    /// shared fill's window and kept nowhere else.
    passthrough: bool,
    /// Bytes passed on (pass-through only).
    passed: u64,
    /// A pass-through body cut into stored slices (`cache.slice_size_mb`).
    slices: Option<super::slices::SliceFeed<'s>>,
}

impl crate::http::body::Tee for Fill<'_> {
    fn push(&mut self, bytes: &[u8]) {
        if let Some(f) = &self.shared {
            f.push(bytes);
        }
        self.keep(bytes);
    }

    fn push_shared(&mut self, piece: &bytes::Bytes) {
        if let Some(f) = &self.shared {
            f.push_shared(piece.clone());
        }
        self.keep(piece);
    }
}

impl Fill<'_> {
    /// The next body bytes, after the shared fill's waiters were given
    /// them: passed on, or kept (and the object stored once whole).
    fn keep(&mut self, bytes: &[u8]) {
        if self.passthrough {
            // Nothing kept here: the shared pieces are the only copy (and
            // the slices, stored as they complete).
            self.passed += bytes.len() as u64;
            if let Some(feed) = &mut self.slices {
                feed.push(bytes);
            }
            if let Some((redis, p)) = &mut self.publish {
                redis.publish_bytes(p, bytes);
            }
            if self.passed == self.len {
                if let (Some((redis, p)), Some(meta)) = (self.publish.take(), &self.meta) {
                    redis.finish(p, meta, self.len, self.epoch);
                }
                if let Some(f) = &self.shared {
                    f.done(None);
                }
                self.reservation = None;
            }
            return;
        }
        self.body.extend_from_slice(bytes);
        if let Some((redis, p)) = &mut self.publish {
            let size = redis.settings.chunk_bytes;
            while (p.sent + 1) * size <= self.body.len() {
                let at = p.sent * size;
                redis.publish_chunk(p, &self.body.as_slice()[at..at + size]);
            }
        }
        if self.body.len() as u64 == self.len {
            let purged = self.store.purge_epoch() != self.epoch;
            let mut stored = None;
            if let Some(mut object) = self.meta.take().filter(|_| !purged) {
                let body = std::mem::replace(&mut self.body, Filling::Heap(Vec::new()));
                object.body = body.freeze();
                let key = std::mem::take(&mut self.key);
                let shared = self.store.insert(key.clone(), object);
                if let Some((redis, stale)) = self.redis {
                    let now = crate::clock::now();
                    let servable = crate::cache::redis::servable(
                        shared.stored_at,
                        shared.fresh_for,
                        stale,
                        now,
                    );
                    let write_id = self.publish.take().map(|(_, p)| p.write_id);
                    redis.offer(key.clone(), shared.clone(), servable, self.epoch, write_id);
                }
                if let Some(disk) = self.disk {
                    disk.offer(key, shared.clone(), self.epoch);
                }
                stored = Some(shared);
            }
            // Stored first: a request arriving now finds the copy.
            if let Some(f) = &self.shared {
                f.done(stored.as_ref());
            }
            // Both copies are gone (into the store; the waiters' pieces).
            self.reservation = None;
        }
    }
}

impl<'s> Fill<'s> {
    /// A fill that stores the object (`meta`, its body empty) under `key`
    /// once whole, in memory only until a caller adds the other tiers.
    fn storing(
        store: &'s store::MemoryStore,
        shared: Option<Arc<SharedFill>>,
        (key, meta): (&str, Object),
        reservation: store::FillReservation,
    ) -> Fill<'s> {
        let len = meta.total;
        Fill {
            store,
            disk: None,
            redis: None,
            publish: None,
            shared,
            epoch: store.purge_epoch(),
            key: key.to_string(),
            len,
            body: Filling::with_capacity(len),
            meta: Some(meta),
            reservation: Some(reservation),
            passthrough: false,
            passed: 0,
            slices: None,
        }
    }

    /// A fill that passes `len` bytes to `shared`'s waiters through its
    /// window and keeps nothing.
    fn passing(
        store: &'s store::MemoryStore,
        shared: Arc<SharedFill>,
        len: u64,
        reservation: store::FillReservation,
    ) -> Fill<'s> {
        Fill {
            store,
            disk: None,
            redis: None,
            publish: None,
            shared: Some(shared),
            epoch: store.purge_epoch(),
            key: String::new(),
            len,
            body: Filling::Heap(Vec::new()),
            meta: None,
            reservation: Some(reservation),
            passthrough: true,
            passed: 0,
            slices: None,
        }
    }

    /// Other requests are streaming this fill.
    pub(super) fn has_waiters(&self) -> bool {
        self.shared.as_ref().is_some_and(|f| f.waiters() > 0)
    }

    /// The copy readers stream, when there is one (collapsed forwarding).
    pub(super) fn shared(&self) -> Option<Arc<SharedFill>> {
        self.shared.clone()
    }

    /// Body bytes in hand (for a pass-through fill: passed on).
    pub(super) fn filled(&self) -> u64 {
        match self.passthrough {
            true => self.passed,
            false => self.body.len() as u64,
        }
    }

    /// Body bytes still to come.
    pub(super) fn missing(&self) -> u64 {
        self.len.saturating_sub(self.filled())
    }

    /// Not stored: shared with the waiters only (see `fill_start`).
    pub(super) fn passthrough(&self) -> bool {
        self.passthrough
    }

    /// The body broke and nothing completed it: waiters abort, and so do
    /// the other instances streaming what it published.
    pub(super) fn fail(&self) {
        if let Some(f) = &self.shared {
            f.end(End::Failed);
        }
        if let Some((redis, p)) = &self.publish {
            redis.abort(p);
        }
    }
}

/// How streaming a fill to a client ended (`stream_fill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Streamed {
    /// Every byte of the body went out.
    Whole,
    /// The client went away or stopped taking bytes.
    ClientGone,
    /// The fill failed, was abandoned mid-body, or stalled past the wait.
    Broken,
    /// The leader's fetch stopped early; every byte it had went out.
    Stopped,
    /// The fill completed, but its stored copy was gone (evicted, purged,
    /// replaced) before this reader caught up.
    Detached,
}

/// A one-shot signal between two futures of one task (the leader's fetch
/// and its client's stream, run together by `monoio::join!`).
#[derive(Default)]
pub(super) struct Signal {
    fired: std::cell::Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Signal {
    pub(super) fn fire(&self) {
        self.fired.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub(super) fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes once fired.
    pub(super) async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.fired.get() {
                return std::task::Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

/// A client that takes every byte and keeps none: where a leader whose own
/// client left keeps pumping, so its waiters still get the whole body.
pub(super) struct Discard;

impl monoio::io::AsyncWriteRent for Discard {
    async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        let n = buf.bytes_init();
        (Ok(n), buf)
    }

    async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        (Err(io::Error::from(io::ErrorKind::Unsupported)), buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        Ok(())
    }
}
