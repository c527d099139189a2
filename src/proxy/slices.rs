//! Step "slices": with `cache.slice_size_mb` set, a single-range GET on a
//! bucket that caches is answered from slices of the object (see
//! `crate::cache::slice`), so a 1 MiB range of a 5 GiB object costs one
//! slice fetch, not the object, and the next range in that slice costs none.
//!
//! A missing slice is fetched from the replicas in plan order with
//! `Range: bytes=<slice>` and `If-Match: <the object's ETag>`; only a
//! single-range 206 at the slice's offset, of the right length, with that
//! ETag is kept. A 412, or another ETag, means the object changed: its
//! slices are dropped and, before any byte was sent, the request starts over
//! once on the new version; after bytes were sent the client connection is
//! reset (never a body joined from two versions, never a short body). An
//! answer that is not a slice (a 200 from an origin that ignores ranges, a
//! 404, a 416, an uncacheable 206) sends the request down the normal path.

use super::attempt::Resume;
use super::cache::CacheUse;
use super::*;
use crate::cache::policy::{self, RangeAnswer};
use crate::cache::region::Filling;
use crate::cache::slice;
use crate::cache::store::{self, Object};

/// Why a slice could not be had.
enum SliceError {
    /// The answer is not a slice: the request goes the normal way.
    NotSliceable,
    /// The object changed under its stored ETag.
    Changed,
    /// No replica gave the slice (failures, breakers open).
    Failed,
}

/// How a replica's answer to a slice request was taken, when it was not.
enum Taken {
    /// A well-formed answer that is not the slice (a 412, another ETag, a
    /// 200, an uncacheable 206): the replica answered.
    Refused(SliceError),
    /// A malformed answer or a broken body: the replica's failure; the
    /// next replica is tried.
    ReplicaFailed(Cause),
}

/// The slice being fetched.
struct Want<'a> {
    object_key: &'a str,
    n: u64,
    size: u64,
    /// The object's known ETag (`None` on the first fetch).
    etag: Option<&'a str>,
    /// The object's known length (`None` on the first fetch).
    total: Option<u64>,
}

impl CoreGeneration {
    /// Whether the request is one slices may answer (a cheap check made
    /// before the slice step's future is built).
    pub(super) fn wants_slices(&self, c: &Client, bucket: usize) -> bool {
        self.shared.config.cache.slice_bytes.is_some()
            && self.shared.process.cache.is_some()
            && self.shared.bucket(bucket).cache.enabled
            && c.s.req.method() == Method::Get
            && (super::cache::single_range_only(c) || super::cache::plain_get(c))
    }

    /// Answers a single-range GET from slices; `None` when the request is
    /// not one for slices or the object cannot be sliced (the caller goes on
    /// with the normal lookup and relay).
    pub(super) async fn serve_sliced(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
    ) -> Option<Outcome> {
        let size = self.shared.config.cache.slice_bytes?;
        let store = self.shared.process.cache.as_ref()?;
        if !self.wants_slices(c, bucket) {
            return None;
        }
        let object_key = self.cache_key(bucket, key, &c.s.query);
        // A whole copy answers its ranges in the normal lookup.
        if store.get(&object_key).is_some() {
            return None;
        }
        // A whole GET goes through slices only for an object known to be
        // above the item limit (its slice metadata stored, see
        // `cache::Fill`); any other is relayed and stored whole as before.
        let range = match c.s.req.header(Forwarded::Range) {
            Some(r) => r.to_string(),
            None => {
                self.stored(&slice::meta_key(&object_key))
                    .await
                    .filter(|m| m.total > 0)?;
                String::new()
            }
        };
        c.s.cache = CacheUse::Off;
        if let Some(refused) = self.limit_upstream(c, bucket).await {
            return Some(refused);
        }
        for _ in 0..2 {
            match self
                .slices_once(c, bucket, key, &object_key, &range, size)
                .await
            {
                Err(SliceError::Changed) => {
                    drop_slices(store, &object_key, size);
                }
                Err(SliceError::NotSliceable) | Err(SliceError::Failed) => return None,
                Ok(outcome) => return Some(outcome),
            }
        }
        None
    }

    /// One go at answering from slices: the object's metadata (stored, or
    /// learned from the first slice fetched), the first slice needed, the
    /// head, then every slice of the range in order.
    async fn slices_once(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        object_key: &str,
        range: &str,
        size: u64,
    ) -> Result<Outcome, SliceError> {
        let store = self
            .shared
            .process
            .cache
            .as_ref()
            .ok_or(SliceError::NotSliceable)?;
        let (meta, mut fetched) = self
            .slice_meta(c, bucket, key, (store, object_key, range, size))
            .await?;
        let whole = range.is_empty();
        let asked = if whole { None } else { Some(range) };
        let (first, last) = match policy::range(asked, meta.total) {
            RangeAnswer::Part { first, last } => (first, last),
            RangeAnswer::Whole if whole && meta.total > 0 => (0, meta.total - 1),
            RangeAnswer::Unsatisfiable => {
                let keep = c.s.req.keep_alive && !self.core.draining.get();
                let answer = Some(RangeAnswer::Unsatisfiable);
                self.cached_head(c, &meta, (416, answer, "HIT"), keep);
                let (Ok(out) | Err(out)) = self.write_cached_head(c, bucket, 416, keep).await;
                return Ok(out);
            }
            RangeAnswer::Whole => return Err(SliceError::NotSliceable),
        };
        let slices = slice::covering(first, last, size);
        // The first slice before the head: an object that changed is found
        // while the request can still start over.
        let head_slice = *slices.start();
        let mut fetched_any = fetched.is_some();
        let (first_slice, was_fetched) = self
            .slice_of(
                c,
                bucket,
                key,
                (object_key, &meta, size),
                head_slice,
                &mut fetched,
            )
            .await?;
        fetched_any |= was_fetched;
        let all_stored = !fetched_any
            && slices
                .clone()
                .skip(1)
                .all(|n| stored_slice(store, object_key, (&meta, size), n).is_some());
        let x_cache = if all_stored { "HIT" } else { "MISS" };
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().cache(
            mid,
            if all_stored {
                CacheResult::Hit
            } else {
                CacheResult::Miss
            },
        );
        let keep = c.s.req.keep_alive && !self.core.draining.get();
        let (status, part) = match whole {
            true => (200, RangeAnswer::Whole),
            false => (206, RangeAnswer::Part { first, last }),
        };
        self.cached_head(c, &meta, (status, Some(part), x_cache), keep);
        // The head leaves with the first slice's bytes (send_stored).
        let mut out = super::cache::cached_outcome(bucket, status, keep);
        let range = (first, last);
        let head_sent = self
            .send_slices(
                c,
                (bucket, key),
                (object_key, &meta, size),
                (slices, range, first_slice),
                &mut fetched,
                &mut out,
            )
            .await;
        if out.abort {
            return Ok(out);
        }
        if !head_sent {
            // No slice to send (nothing in range): the head alone.
            let (Ok(head_only) | Err(head_only)) =
                self.write_cached_head(c, bucket, status, keep).await;
            return Ok(head_only);
        }
        if all_stored {
            self.core.metrics.borrow_mut().cache_saved(mid, out.bytes);
        }
        Ok(out)
    }

    /// The object's slice metadata (its length, ETag, headers): the stored
    /// copy while fresh, else fetched with the first slice the range needs
    /// (that slice returned too, by its number). Stale slices are dropped.
    async fn slice_meta(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        (store, object_key, range, size): (&store::MemoryStore, &str, &str, u64),
    ) -> Result<(Arc<Object>, Option<(u64, Arc<Object>)>), SliceError> {
        let now = crate::clock::now();
        if let Some(m) = self
            .stored(&slice::meta_key(object_key))
            .await
            .filter(|m| policy::is_fresh(m.stored_at, m.fresh_for, now))
        {
            return Ok((m, None));
        }
        drop_slices(store, object_key, size);
        let n = if range.is_empty() {
            0
        } else {
            slice::first_to_fetch(range, size)
        };
        let want = Want {
            object_key,
            n,
            size,
            etag: None,
            total: None,
        };
        let (meta, s) = self.fetch_slice(c, bucket, key, &want).await?;
        Ok((meta, Some((n, s))))
    }

    /// Sends the part of each slice in `slices` that `range` covers, the
    /// head (in `c.s.wbuf`) with the first; later slices stored or fetched
    /// as they are reached. Whether anything was sent; a failure once bytes
    /// went out aborts `out` (the client must not take a short body for the
    /// whole range).
    async fn send_slices(
        &self,
        c: &mut Client,
        (bucket, key): (usize, &str),
        (object_key, meta, size): (&str, &Object, u64),
        (slices, range, first_slice): (std::ops::RangeInclusive<u64>, (u64, u64), Arc<Object>),
        fetched: &mut Option<(u64, Arc<Object>)>,
        out: &mut Outcome,
    ) -> bool {
        let timeout = self.shared.config.server.idle_timeout;
        let mut current = Some(first_slice);
        let (first, last) = range;
        let mut head_sent = false;
        for n in slices {
            let s = match current.take() {
                Some(s) => s,
                None => match self
                    .slice_of(c, bucket, key, (object_key, meta, size), n, fetched)
                    .await
                {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Bytes went out: the client must not take what it
                        // has for the whole range.
                        out.keep_alive = false;
                        out.abort = true;
                        return head_sent;
                    }
                },
            };
            // Every slice here is exactly its bounds (`take_slice`,
            // `is_slice_of`); should one not be, the client is cut off
            // rather than given a short body or a slice out of bounds.
            let (s_first, s_last) = slice::bounds(n, size, meta.total);
            let from = first.max(s_first) - s_first;
            let to = last.min(s_last) - s_first;
            if from > to || to >= s.body.len() as u64 {
                out.keep_alive = false;
                out.abort = true;
                return head_sent;
            }
            let part = s.body.slice(from as usize..=to as usize);
            let len = part.len() as u64;
            if self
                .send_stored(c, part, !head_sent, timeout)
                .await
                .is_err()
            {
                out.keep_alive = false;
                out.abort = true;
                return head_sent;
            }
            out.bytes += len;
            head_sent = true;
        }
        head_sent
    }

    /// Slice `n`: the one just fetched, a stored one of the same ETag, or a
    /// new fetch with `If-Match` (then `true`).
    async fn slice_of(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        (object_key, meta, size): (&str, &Object, u64),
        n: u64,
        fetched: &mut Option<(u64, Arc<Object>)>,
    ) -> Result<(Arc<Object>, bool), SliceError> {
        if let Some((_, s)) = fetched.take_if(|(m, _)| *m == n) {
            return Ok((s, true));
        }
        if let Some(s) = self.stored(&slice::key(object_key, size, n)).await {
            if is_slice_of(&s, meta, size, n) {
                return Ok((s, false));
            }
        }
        let want = Want {
            object_key,
            n,
            size,
            etag: Some(&meta.etag),
            total: Some(meta.total),
        };
        let (_, s) = self.fetch_slice(c, bucket, key, &want).await?;
        Ok((s, true))
    }

    /// Fetches one slice once for every request that misses it at the same
    /// time, on any core (collapsed as whole objects are): the first leads
    /// the upstream fetch; the others wait for it and take what it stored,
    /// and go upstream themselves only when it failed or its copy is gone.
    async fn fetch_slice(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        want: &Want<'_>,
    ) -> Result<(Arc<Object>, Arc<Object>), SliceError> {
        use crate::cache::collapse::{FillEvent, Role};
        let slice_key = slice::key(want.object_key, want.size, want.n);
        let fills = &self.shared.process.fills;
        let fill = match fills.join_or_lead(&slice_key) {
            Role::Leader(fill) => {
                let got = self.fetch_slice_upstream(c, bucket, key, want).await;
                if let Ok((_, piece)) = &got {
                    fill.done(Some(piece));
                }
                fills.finish(&slice_key, &fill);
                return got;
            }
            Role::Waiter(fill) => fill,
        };
        let wait = self.shared.config.server.idle_timeout;
        let ended = monoio::time::timeout(wait, fill.next(true, 0)).await;
        if let (Ok(FillEvent::Ended(crate::cache::collapse::End::Done)), Some(piece)) =
            (ended, fill.stored())
        {
            let meta = self.stored(&slice::meta_key(want.object_key)).await;
            let same = meta.filter(|m| {
                is_slice_of(&piece, m, want.size, want.n) && want.etag.is_none_or(|e| e == m.etag)
            });
            if let Some(meta) = same {
                let mid = self.shared.bucket_metric[bucket];
                self.core.metrics.borrow_mut().coalesced(mid);
                return Ok((meta, piece));
            }
        }
        self.fetch_slice_upstream(c, bucket, key, want).await
    }

    /// Fetches one slice from the replicas in plan order and stores it (and,
    /// on a first fetch, the object's metadata); returns both.
    async fn fetch_slice_upstream(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        want: &Want<'_>,
    ) -> Result<(Arc<Object>, Arc<Object>), SliceError> {
        let mut order_buf = [0usize; crate::config::MAX_REPLICAS];
        let order = self.plan(bucket, &mut order_buf);
        let ctx = RequestCtx { bucket, key, order };
        let first = want.n.saturating_mul(want.size);
        let resume = Resume {
            first,
            last: first + want.size - 1,
            etag: want.etag.unwrap_or(""),
        };
        // A purge that lands while the slice is on its way wins: the slice
        // then answers this request and is not stored.
        let epoch = self.purge_epoch();
        let mut cursor = Cursor::new(self, ctx.order);
        while let Some(rid) = cursor.next_replica() {
            let result = self.attempt_timed(c, &ctx, rid, Some(resume)).await;
            let answer = match result {
                Ok(a) => a,
                Err(f) => {
                    cursor.failed(f.cause);
                    continue;
                }
            };
            let taken = match self.take_slice(c, answer, (want, epoch), resume).await {
                Err(Taken::ReplicaFailed(cause)) => {
                    cursor.failed(cause);
                    continue;
                }
                // A well-formed answer that is not this slice: answered.
                Err(Taken::Refused(e)) => Err(e),
                Ok(got) => Ok(got),
            };
            cursor.answered_whole();
            return taken;
        }
        Err(SliceError::Failed)
    }

    /// Checks one replica's answer to a slice request and reads its body.
    /// A 206 at the slice's offset must be exactly the slice (the object's
    /// length, as the metadata knows it, decides where the slice ends):
    /// anything shorter, longer or of another length is a malformed answer
    /// (RFC 9110 §14.4, §15.3.7), the replica's failure, never stored.
    async fn take_slice(
        &self,
        c: &mut Client,
        mut a: Answer,
        (want, epoch): (&Want<'_>, u64),
        asked: Resume<'_>,
    ) -> Result<(Arc<Object>, Arc<Object>), Taken> {
        let resp = &a.resp;
        let cr = resp
            .content_range
            .filter(|_| resp.status == 206 && !resp.multipart);
        let verdict = match (resp.status, cr) {
            (412, _) => Err(SliceError::Changed),
            (206, Some(cr)) if cr.first == asked.first && cr.total.is_some() => match want.etag {
                Some(e) if e != resp.etag => Err(SliceError::Changed),
                _ if resp.etag.is_empty() => Err(SliceError::NotSliceable),
                _ => Ok(cr),
            },
            _ => Err(SliceError::NotSliceable),
        };
        let cr = match verdict {
            Ok(cr) => cr,
            Err(e) => {
                c.give_response(a.resp);
                return Err(Taken::Refused(e));
            }
        };
        let total = cr.total.unwrap_or(0);
        let (s_first, s_last) = slice::bounds(want.n, want.size, total);
        let exact_slice = cr.first == s_first
            && cr.last == s_last
            && s_first <= s_last
            && want.total.is_none_or(|t| t == total);
        let len = cr.last.saturating_sub(cr.first) + 1;
        if !exact_slice || resp.framing() != Framing::Length(len) {
            c.give_response(a.resp);
            return Err(Taken::ReplicaFailed(Cause::Malformed));
        }
        let bucket = self.shared.replicas[a.rid].bucket;
        let ttl = self.shared.bucket(bucket).cache.ttl;
        let Some(fresh_for) = self.freshness_as(resp, 200, ttl) else {
            c.give_response(a.resp);
            return Err(Taken::Refused(SliceError::NotSliceable));
        };
        let want_bytes = a.head_len + len as usize;
        a.conn
            .buf
            .reserve(want_bytes.saturating_sub(a.conn.buf.len()));
        let deadline = Instant::now() + self.replica(a.rid).timeout;
        while a.conn.buf.len() < want_bytes {
            let left = deadline.saturating_duration_since(Instant::now());
            match read_more(&mut a.conn.stream, &mut a.conn.buf, left).await {
                Ok(n) if n > 0 => {}
                Ok(_) => {
                    c.give_response(a.resp);
                    return Err(Taken::ReplicaFailed(Cause::Truncated));
                }
                Err(e) => {
                    c.give_response(a.resp);
                    return Err(Taken::ReplicaFailed(Cause::of_io(&e)));
                }
            }
        }
        let body = {
            let piece = &a.conn.buf[a.head_len..want_bytes];
            let mut f = Filling::with_capacity(piece.len() as u64);
            f.extend_from_slice(piece);
            f.freeze()
        };
        let exact = a.conn.buf.len() == want_bytes;
        let meta = self.stored_meta(&a.resp, fresh_for, total);
        let now = meta.stored_at;
        let piece = Object {
            stored_at: now,
            fresh_for,
            etag: a.resp.etag.clone(),
            last_modified: None,
            headers: String::new(),
            body,
            total,
            touched_ms: Default::default(),
        };
        if upclient::reusable(&a.resp, &a.conn, a.head_len, exact) {
            self.pool.put(a.rid, a.conn);
        }
        c.give_response(a.resp);
        Ok(self.store_slice(want, epoch, meta, piece))
    }

    /// A whole answer too large to store (`len` above the item limit):
    /// with slices configured, its metadata is stored, so that later whole
    /// GETs of the object are answered from slices. Needs an ETag (slices
    /// are fetched with `If-Match`) and a storable answer.
    pub(super) fn note_large(&self, object_key: &str, resp: &Response, len: u64, ttl: Duration) {
        let Some(store) = self.shared.process.cache.as_ref() else {
            return;
        };
        let Some(size) = self.shared.config.cache.slice_bytes else {
            return;
        };
        if resp.etag.is_empty() {
            return;
        }
        let Some(fresh_for) = self.freshness(resp, ttl) else {
            return;
        };
        let meta_key = slice::meta_key(object_key);
        if store.get(&meta_key).is_some_and(|m| m.etag == resp.etag) {
            return;
        }
        let meta = self.stored_meta(resp, fresh_for, len);
        // Slices of another version are dropped with the old metadata.
        drop_slices(store, object_key, size);
        let epoch = store.purge_epoch();
        let meta = store.insert(meta_key.clone(), meta);
        if let Some(disk) = &self.shared.process.disk {
            disk.offer(meta_key, meta, epoch);
        }
    }

    /// Stores a fetched slice (and the metadata on a first fetch) in memory
    /// and hands both to the disk tier, unless a purge came after the fetch
    /// began (`epoch`): then both only answer the request that fetched them.
    fn store_slice(
        &self,
        want: &Want<'_>,
        epoch: u64,
        meta: Object,
        piece: Object,
    ) -> (Arc<Object>, Arc<Object>) {
        let process = &self.shared.process;
        let Some(store) = process.cache.as_ref().filter(|s| s.purge_epoch() == epoch) else {
            return (Arc::new(meta), Arc::new(piece));
        };
        let meta_key = slice::meta_key(want.object_key);
        let meta = match (want.etag, store.get(&meta_key)) {
            (Some(_), Some(m)) => m,
            _ => store.insert(meta_key.clone(), meta),
        };
        let key = slice::key(want.object_key, want.size, want.n);
        let piece = store.insert(key.clone(), piece);
        if let Some(disk) = &process.disk {
            disk.offer(meta_key, meta.clone(), epoch);
            disk.offer(key, piece.clone(), epoch);
        }
        (meta, piece)
    }

    /// A stored slice or slice metadata: from memory, else from the disk
    /// tier (promoted into memory).
    async fn stored(&self, key: &str) -> Option<Arc<Object>> {
        let process = &self.shared.process;
        let store = process.cache.as_ref()?;
        if let Some(o) = store.get(key) {
            return Some(o);
        }
        let disk = process.disk.as_ref().filter(|d| d.contains(key))?;
        let epoch = store.purge_epoch();
        let object = disk.load(key).await?;
        if store.purge_epoch() != epoch {
            return None;
        }
        Some(store.insert(key.to_string(), object))
    }
}

/// Slices ahead of the one being filled that a [`SliceFeed`] leads too:
/// a request on the slice path reads slices in order and never passes the
/// feed, so one is enough; two leave room for a range that starts a slice
/// further on.
const FEED_AHEAD: u64 = 2;

/// A pass-through fill's body (a whole answer above the item limit, with
/// `cache.slice_size_mb` set) cut into slices as it arrives: each slice is
/// stored once complete, and the feed leads the collapsed fetch of the
/// slice it fills and of the next [`FEED_AHEAD`], so requests that take the
/// slice path meanwhile (every whole GET once the object's metadata is
/// stored) wait for these slices instead of fetching the same bytes again.
/// One origin fetch for a burst on a large object, slices on or off.
pub(super) struct SliceFeed<'s> {
    store: &'s store::MemoryStore,
    disk: Option<&'s crate::cache::disk::DiskStore>,
    fills: &'s crate::cache::collapse::Fills,
    object_key: String,
    size: u64,
    meta: Arc<Object>,
    /// The store's purge count when the fill started.
    epoch: u64,
    /// The slice being filled, and its bytes so far.
    n: u64,
    piece: Filling,
    /// The slice fills this feed leads, by slice number.
    leads: Vec<(u64, Arc<crate::cache::collapse::SharedFill>)>,
}

impl CoreGeneration {
    /// A feed for the pass-through fill of `object_key` (`len` bytes),
    /// when slices are configured and its metadata was just stored
    /// (`note_large`).
    pub(super) fn slice_feed(&self, object_key: &str, len: u64) -> Option<SliceFeed<'_>> {
        let size = self.shared.config.cache.slice_bytes?;
        let store = self.shared.process.cache.as_ref()?;
        let meta = store
            .get(&slice::meta_key(object_key))
            .filter(|m| m.total == len && len > 0)?;
        let mut feed = SliceFeed {
            store,
            disk: self.shared.process.disk.as_deref(),
            fills: &self.shared.process.fills,
            object_key: object_key.to_string(),
            size,
            epoch: store.purge_epoch(),
            n: 0,
            piece: Filling::with_capacity(slice_len(0, size, len)),
            leads: Vec::new(),
            meta,
        };
        feed.lead_ahead();
        Some(feed)
    }
}

/// The length of slice `n` of a `total` bytes object.
fn slice_len(n: u64, size: u64, total: u64) -> u64 {
    let (first, last) = slice::bounds(n, size, total);
    (last + 1).saturating_sub(first)
}

impl SliceFeed<'_> {
    /// Takes the next bytes of the body.
    pub(super) fn push(&mut self, mut bytes: &[u8]) {
        let total = self.meta.total;
        while !bytes.is_empty() && self.n * self.size < total {
            let want = slice_len(self.n, self.size, total) as usize;
            let take = (want - self.piece.len()).min(bytes.len());
            self.piece.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.piece.len() == want {
                self.complete();
            }
        }
    }

    /// Stores the slice just filled (unless a purge came, or the object's
    /// metadata changed), hands it to the waiters on it, and moves on.
    fn complete(&mut self) {
        let n = self.n;
        self.n += 1;
        let next = slice_len(self.n, self.size, self.meta.total);
        let body = std::mem::replace(&mut self.piece, Filling::with_capacity(next)).freeze();
        let meta_key = slice::meta_key(&self.object_key);
        let current = self.store.purge_epoch() == self.epoch
            && self
                .store
                .get(&meta_key)
                .is_some_and(|m| Arc::ptr_eq(&m, &self.meta));
        let key = slice::key(&self.object_key, self.size, n);
        let stored = current.then(|| {
            let piece = self.store.insert(
                key.clone(),
                Object {
                    stored_at: self.meta.stored_at,
                    fresh_for: self.meta.fresh_for,
                    etag: self.meta.etag.clone(),
                    last_modified: None,
                    headers: String::new(),
                    body,
                    total: self.meta.total,
                    touched_ms: Default::default(),
                },
            );
            if let Some(disk) = self.disk {
                disk.offer(key.clone(), piece.clone(), self.epoch);
            }
            piece
        });
        if let Some(i) = self.leads.iter().position(|(m, _)| *m == n) {
            let (_, fill) = self.leads.swap_remove(i);
            fill.done(stored.as_ref());
            self.fills.finish(&key, &fill);
        }
        self.lead_ahead();
    }

    /// Leads the fills of the slice being filled and the next
    /// [`FEED_AHEAD`], where no other request leads them.
    fn lead_ahead(&mut self) {
        let count = self.meta.total.div_ceil(self.size);
        let last = (self.n + FEED_AHEAD).min(count.saturating_sub(1));
        for n in self.n..=last {
            if self.leads.iter().any(|(m, _)| *m == n) {
                continue;
            }
            let key = slice::key(&self.object_key, self.size, n);
            if let Some(fill) = self.fills.lead(&key) {
                self.leads.push((n, fill));
            }
        }
    }
}

impl Drop for SliceFeed<'_> {
    /// Slices never filled (the body broke, the client left): their
    /// waiters fetch them themselves.
    fn drop(&mut self) {
        for (n, fill) in self.leads.drain(..) {
            self.fills
                .finish(&slice::key(&self.object_key, self.size, n), &fill);
        }
    }
}

/// Drops the object's slice metadata and the slices it describes, by key:
/// this runs on the request path (a cold or expired object, a new version),
/// where a scan of the whole memory tier would stall the core. A scan
/// happens only when the object has more slices than the tier has entries.
/// Slices no metadata describes any more (it was evicted first) stay until
/// evicted; they are never joined into an answer (`is_slice_of`).
fn drop_slices(store: &store::MemoryStore, object_key: &str, size: u64) {
    let meta_key = slice::meta_key(object_key);
    let Some(meta) = store.get(&meta_key) else {
        return;
    };
    let count = meta.total.div_ceil(size.max(1));
    if count > store.items() as u64 {
        store.remove_prefix(&slice::prefix(object_key));
        return;
    }
    for n in 0..count {
        store.remove(&slice::key(object_key, size, n));
    }
    store.remove(&meta_key);
}

/// Stored slice `n` of the object described by `meta`, if it is one.
fn stored_slice(
    store: &store::MemoryStore,
    object_key: &str,
    (meta, size): (&Object, u64),
    n: u64,
) -> Option<Arc<Object>> {
    store
        .get(&slice::key(object_key, size, n))
        .filter(|s| is_slice_of(s, meta, size, n))
}

/// Whether `s` is slice `n` of `size` bytes of the object `meta` describes:
/// the object's ETag, and exactly the bytes such a slice holds (a stored
/// slice of another length is never joined into an answer).
fn is_slice_of(s: &Object, meta: &Object, size: u64, n: u64) -> bool {
    let (first, last) = slice::bounds(n, size, meta.total);
    s.etag == meta.etag && first <= last && s.body.len() as u64 == last - first + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(etag: &str, body_len: usize, total: u64) -> Object {
        Object {
            stored_at: std::time::UNIX_EPOCH,
            fresh_for: Duration::from_secs(60),
            etag: etag.into(),
            last_modified: None,
            headers: String::new(),
            body: bytes::Bytes::from(vec![0u8; body_len]).into(),
            total,
            touched_ms: Default::default(),
        }
    }

    #[test]
    fn dropping_an_object_s_slices_removes_them_by_key_and_nothing_else() {
        let store = store::MemoryStore::new(64 << 20, 1 << 20).expect("store");
        let (a, b) = (
            store::key("bk", "o", "a", ""),
            store::key("bk", "o", "b", ""),
        );
        store.insert(slice::meta_key(&a), object("\"v1\"", 0, 2500));
        for n in 0..3 {
            store.insert(slice::key(&a, 1000, n), object("\"v1\"", 1000, 0));
        }
        store.insert(slice::meta_key(&b), object("\"v1\"", 0, 2500));
        store.insert(slice::key(&b, 1000, 0), object("\"v1\"", 1000, 0));
        store.insert(a.clone(), object("\"v1\"", 10, 10));
        drop_slices(&store, &a, 1000);
        assert!(store.get(&slice::meta_key(&a)).is_none());
        assert!((0..3).all(|n| store.get(&slice::key(&a, 1000, n)).is_none()));
        assert_eq!(store.items(), 3, "b's slices and a's whole copy stay");
        // No metadata: nothing is known to drop, and nothing is scanned.
        drop_slices(&store, &a, 1000);
        assert_eq!(store.items(), 3);
    }

    #[test]
    fn a_stored_slice_must_have_the_object_s_etag_and_the_slice_s_length() {
        let meta = object("\"v1\"", 0, 2500);
        assert!(is_slice_of(&object("\"v1\"", 1000, 0), &meta, 1000, 1));
        assert!(
            is_slice_of(&object("\"v1\"", 500, 0), &meta, 1000, 2),
            "the short last one"
        );
        assert!(
            !is_slice_of(&object("\"v2\"", 1000, 0), &meta, 1000, 1),
            "another version"
        );
        assert!(
            !is_slice_of(&object("\"v1\"", 2000, 0), &meta, 1000, 1),
            "another size"
        );
        assert!(
            !is_slice_of(&object("\"v1\"", 0, 0), &meta, 1000, 3),
            "past the end"
        );
    }
}
