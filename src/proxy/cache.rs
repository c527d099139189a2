//! Step "cache": after routing, before planning replicas. A fresh stored
//! copy answers the request itself (whole, a single range, 304 to a
//! conditional, HEAD); otherwise the request goes upstream, and a cacheable
//! 200 to a plain GET is copied while it is relayed and stored once complete
//! ("fill"). When no replica can answer, an expired copy within
//! `stale_if_error_seconds` does (`STALE`). Responses carry
//! `X-Cache: HIT | MISS | BYPASS | STALE | REVALIDATED` and, from the cache, `Age`. The
//! decisions are `crate::cache::policy`'s.
//!
//! An expired copy with an ETag is revalidated (`If-None-Match`; a 304
//! refreshes it: `REVALIDATED`).
//!
//! Concurrent misses for one key collapse into one upstream GET whose bytes
//! every waiter streams (`crate::cache::collapse`, [`serve_waiter`]).
//!
//! A memory miss whose object is in the disk tier is read back into memory
//! first ([`promote_from_disk`]), and that copy answers the lookup even if
//! the memory tier let it go at once; stored objects go to the disk tier too.
//! Single-range requests may be answered from slices first (`slices.rs`).
//!
//! [`promote_from_disk`]: CoreGeneration::promote_from_disk
//!
//! [`serve_waiter`]: CoreGeneration::serve_waiter

use super::session::Phase;
use super::*;
use crate::cache::collapse::{End, FillEvent, FillHead, Role, SharedFill};
use crate::cache::policy::{self, Precondition, RangeAnswer};
use crate::cache::region::{Body, Filling};
use crate::cache::store::{self, Object};
use crate::http::body::Tee as _;
use crate::http::zerocopy;
use bytes::Bytes;

/// Headers a 304 from the cache carries (RFC 9110 §15.4.5).
const NOT_MODIFIED_HEADERS: [&str; 6] = [
    "etag",
    "last-modified",
    "cache-control",
    "expires",
    "date",
    "vary",
];

/// What the cache does for one request.
#[derive(Debug, Clone, Default)]
pub(super) enum CacheUse {
    /// The bucket does not cache: nothing is added to the response.
    #[default]
    Off,
    /// Not answered from and not stored in the cache (`X-Cache: BYPASS`).
    Bypass,
    /// A miss: a cacheable answer is stored under this key (`X-Cache: MISS`).
    Fill(String),
    /// An expired copy with an ETag: the request goes upstream with
    /// `If-None-Match`; a 304 refreshes the copy without moving the body
    /// (`REVALIDATED`), a 200 replaces it like a fill.
    Revalidate(String, Arc<Object>),
}

impl CacheUse {
    /// The `X-Cache` value for a response relayed from upstream.
    pub(super) fn x_cache(&self) -> Option<&'static str> {
        match self {
            CacheUse::Off => None,
            CacheUse::Bypass => Some("BYPASS"),
            CacheUse::Fill(_) | CacheUse::Revalidate(..) => Some("MISS"),
        }
    }

    /// The key an answer is stored under, if it is to be stored.
    fn fill_key(&self) -> Option<&str> {
        match self {
            CacheUse::Fill(k) | CacheUse::Revalidate(k, _) => Some(k),
            _ => None,
        }
    }
}

impl CoreGeneration {
    /// Phase "lookup": the disk tier, then slices (a large object's
    /// ranges), then the memory tier, which may hand this request a fill
    /// in flight to follow. `Err(outcome)`: a copy answered; `Ok(())`: a
    /// miss, to forward (this request may lead the fill).
    pub(super) async fn lookup(&self, c: &mut Client, bucket: usize, key: &str) -> Phase<()> {
        // The tiers below memory, in `cache.cache_layers`' order, until
        // one has the object.
        let mut promoted = None;
        for layer in &self.shared.config.cache.lower_layers {
            if promoted.is_some() {
                break;
            }
            match layer {
                Layer::Disk if self.shared.process.disk.is_some() => {
                    if let Some(o) = self.serve_from_disk(c, bucket, key).await {
                        return Err(o);
                    }
                    promoted = self.promote_from_disk(c, bucket, key).await;
                }
                Layer::Redis if self.shared.process.redis.is_some() => {
                    promoted = self.promote_from_redis(c, bucket, key).await;
                }
                _ => {}
            }
        }
        if self.wants_slices(c, bucket) {
            if let Some(o) = Box::pin(self.serve_sliced(c, bucket, key)).await {
                return Err(o);
            }
        }
        match self.cache_lookup(c, bucket, key, promoted) {
            Ok(Some(copy)) => {
                self.note_hit_for_disk(c, bucket, key, &copy);
                Err(self.serve_cached(c, bucket, &copy, "HIT").await)
            }
            Ok(None) => Ok(()),
            Err(fill) => Err(Box::pin(self.serve_waiter(c, bucket, fill, key)).await),
        }
    }

    /// The cache key of `key` (URI-encoded) in `bucket`, with the forwarded
    /// query and the bucket's origin (see `cache::store::key`).
    pub(super) fn cache_key(&self, bucket: usize, key: &str, query: &str) -> String {
        let b = self.shared.bucket(bucket);
        store::key(&b.name, &b.origin, key, query)
    }

    /// Step "disk": a memory miss whose entry is on disk is read (on this
    /// core's driver), checked and put back into memory; the copy read is
    /// handed to the lookup that follows ([`Self::cache_lookup`]), which
    /// must not miss it because the memory tier (bounded, shared with the
    /// other cores) evicted it meanwhile. A bad entry is dropped and reads
    /// as a miss.
    pub(super) async fn promote_from_disk(
        &self,
        c: &Client,
        bucket: usize,
        key: &str,
    ) -> Option<Arc<Object>> {
        let disk = self.shared.process.disk.as_ref()?;
        let (store, k) = self.memory_miss(c, bucket, key)?;
        if !disk.contains(&k) {
            return None;
        }
        let epoch = store.purge_epoch();
        let object = disk.load(&k).await?;
        // A purge while the file was read wins.
        (store.purge_epoch() == epoch).then(|| store.insert(k, object))
    }

    /// A memory hit keeps its disk-tier entry recent too, so the disk's LRU
    /// does not evict what memory serves most: at most once per
    /// [`DISK_TOUCH_EVERY_MS`] per copy, the key is queued on this core and
    /// the disk index marked under one lock at the next tick.
    fn note_hit_for_disk(&self, c: &Client, bucket: usize, key: &str, copy: &Object) {
        if self.shared.process.disk.is_none() {
            return;
        }
        let now = now_ms().max(1);
        let last = copy.touched_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < DISK_TOUCH_EVERY_MS {
            return;
        }
        copy.touched_ms.store(now, Ordering::Relaxed);
        let k = self.cache_key(bucket, key, &c.s.query);
        self.core.disk_touches.borrow_mut().push(k);
    }

    /// The memory tier and the request's cache key, when the bucket caches
    /// and the memory tier does not hold the key (a lower tier may).
    fn memory_miss(
        &self,
        c: &Client,
        bucket: usize,
        key: &str,
    ) -> Option<(&crate::cache::store::MemoryStore, String)> {
        let store = self.shared.process.cache.as_ref()?;
        if !self.shared.bucket(bucket).cache.enabled {
            return None;
        }
        let k = self.cache_key(bucket, key, &c.s.query);
        store.get(&k).is_none().then_some((store, k))
    }

    /// Step "redis": a miss in the local tiers asks the Redis tier; an
    /// intact entry is put into memory (and offered to the disk tier) and
    /// handed to the lookup that follows, as a disk entry is. Anything else
    /// (absent, refused, Redis slow or down) is a miss.
    pub(super) async fn promote_from_redis(
        &self,
        c: &Client,
        bucket: usize,
        key: &str,
    ) -> Option<Arc<Object>> {
        let process = &self.shared.process;
        let (Some(tier), Some(reader)) = (&process.redis, &self.core.redis) else {
            return None;
        };
        if conditional_not_answered(c) {
            return None;
        }
        let (store, k) = self.memory_miss(c, bucket, key)?;
        let epoch = store.purge_epoch();
        let crate::cache::redis::Found::Hit(object) = reader.get(tier, &k).await else {
            return None;
        };
        // A purge while Redis answered wins.
        if store.purge_epoch() != epoch {
            return None;
        }
        let copy = store.insert(k.clone(), object);
        if let Some(disk) = &process.disk {
            disk.offer(k, copy.clone(), epoch);
        }
        Some(copy)
    }

    /// Looks the request up: a fresh copy, or a fill under way to stream
    /// from (`Err`), answers it; otherwise (`Ok(None)`) sets `c.s.cache` for
    /// the relay (fill, bypass, or off). `promoted` is the copy this
    /// request just read from disk, if it did.
    pub(super) fn cache_lookup(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        promoted: Option<Arc<Object>>,
    ) -> Result<Option<Arc<Object>>, Arc<SharedFill>> {
        c.s.cache = CacheUse::Off;
        c.s.stale = None;
        let settings = &self.shared.bucket(bucket).cache;
        let store = self
            .shared
            .process
            .cache
            .as_ref()
            .filter(|_| settings.enabled);
        let Some(store) = store else {
            return Ok(None);
        };
        let mid = self.shared.bucket_metric[bucket];
        if conditional_not_answered(c) {
            c.s.cache = CacheUse::Bypass;
            self.core
                .metrics
                .borrow_mut()
                .cache(mid, CacheResult::Bypass);
            return Ok(None);
        }
        let k = self.cache_key(bucket, key, &c.s.query);
        let mut expired = None;
        if let Some(copy) = store.get(&k).or(promoted) {
            let now = crate::clock::now();
            if policy::is_fresh(copy.stored_at, copy.fresh_for, now) {
                self.core.metrics.borrow_mut().cache(mid, CacheResult::Hit);
                return Ok(Some(copy));
            }
            let stale_for = self.shared.config.cache.stale_if_error;
            if policy::usable_when_failing(copy.stored_at, copy.fresh_for, stale_for, now) {
                c.s.stale = Some(copy.clone());
            }
            expired = Some(copy);
        }
        let plain_get = plain_get(c);
        c.s.cache = match (plain_get, expired) {
            (true, Some(copy)) if !copy.etag.is_empty() => CacheUse::Revalidate(k, copy),
            (true, _) => match self.shared.process.fills.join_or_lead(&k) {
                Role::Leader(fill) => {
                    c.s.leading = Some((k.clone(), fill));
                    CacheUse::Fill(k)
                }
                // Counted by `serve_waiter` once the fill's head arrives.
                Role::Waiter(fill) => return Err(fill),
            },
            (false, _) => CacheUse::Bypass,
        };
        // A revalidation or a stale copy in hand: the result is known once
        // the replicas have been tried (`settle`).
        if !self.deferred(c) {
            let result = if plain_get {
                CacheResult::Miss
            } else {
                CacheResult::Bypass
            };
            self.core.metrics.borrow_mut().cache(mid, result);
        }
        Ok(None)
    }

    /// The lookup's result is counted after the replicas were tried.
    fn deferred(&self, c: &Client) -> bool {
        c.s.stale.is_some() || matches!(c.s.cache, CacheUse::Revalidate(..))
    }

    /// When the answer is a 304 to this request's revalidation: the key and
    /// the expired copy it confirms (taken from `c.s.cache`).
    pub(super) fn confirmed_copy(
        &self,
        c: &mut Client,
        answer: &Answer,
    ) -> Option<(String, Arc<Object>)> {
        if answer.resp.status != 304 || !matches!(c.s.cache, CacheUse::Revalidate(..)) {
            return None;
        }
        match std::mem::replace(&mut c.s.cache, CacheUse::Off) {
            CacheUse::Revalidate(key, copy) => Some((key, copy)),
            _ => None,
        }
    }

    /// After a 304 to a revalidation: the expired copy is fresh again (its
    /// body untouched, freshness from the 304's headers) and answers.
    pub(super) fn refresh_copy(
        &self,
        c: &mut Client,
        bucket: usize,
        answer: Answer,
        (key, copy): (String, Arc<Object>),
    ) -> Arc<Object> {
        if upclient::reusable(&answer.resp, &answer.conn, answer.head_len, true) {
            self.pool.put(answer.rid, answer.conn);
        }
        let ttl = self.shared.bucket(bucket).cache.ttl;
        let stored = policy::Stored {
            status: 200,
            cache_control: forwarded_value(&answer.resp.forward, "cache-control"),
            expires: forwarded_value(&answer.resp.forward, "expires"),
            date: forwarded_value(&answer.resp.forward, "date"),
        };
        let fresh = policy::freshness(&stored, ttl, crate::clock::now());
        c.give_response(answer.resp);
        c.s.stale = None;
        let mid = self.shared.bucket_metric[bucket];
        self.core
            .metrics
            .borrow_mut()
            .cache(mid, CacheResult::Revalidated);
        let Some(fresh_for) = fresh else {
            return copy;
        };
        let refreshed = Arc::new(Object {
            stored_at: crate::clock::now(),
            fresh_for,
            etag: copy.etag.clone(),
            last_modified: copy.last_modified.clone(),
            headers: copy.headers.clone(),
            body: copy.body.clone(),
            total: copy.total,
            touched_ms: Default::default(),
        });
        if let Some(store) = &self.shared.process.cache {
            store.insert_shared(key.clone(), refreshed.clone());
            if let Some(disk) = &self.shared.process.disk {
                disk.offer(key, refreshed.clone(), store.purge_epoch());
            }
        }
        refreshed
    }

    /// After the replicas were tried: `Some(copy)` when an expired copy is to
    /// answer because none could (counted `stale`, WARN once a minute per
    /// key); otherwise counts a deferred lookup as the miss or bypass it was.
    pub(super) fn settle(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        replicas_failed: bool,
    ) -> Option<Arc<Object>> {
        if !self.deferred(c) {
            return None;
        }
        let mid = self.shared.bucket_metric[bucket];
        let stale = c.s.stale.take();
        let Some(copy) = stale.filter(|_| replicas_failed) else {
            let result = match c.s.cache {
                CacheUse::Bypass => CacheResult::Bypass,
                _ => CacheResult::Miss,
            };
            self.core.metrics.borrow_mut().cache(mid, result);
            return None;
        };
        self.core
            .metrics
            .borrow_mut()
            .cache(mid, CacheResult::Stale);
        // The store key, whatever role this request had: a waiter whose fill
        // was abandoned falls back here too, and is the same key.
        let key = self.cache_key(bucket, key, &c.s.query);
        let mut warned = match self.shared.process.stale_warned.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let due = warned
            .get(&key)
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            if warned.len() >= 10_000 {
                warned.clear();
            }
            warned.insert(key, Instant::now());
            drop(warned);
            let age = policy::age(copy.stored_at, crate::clock::now());
            log!(
                Level::Warn,
                "No replica could answer; serving a stale copy",
                bucket = self.shared.bucket(bucket).name,
                path = String::from_utf8_lossy(&c.s.req.target)
                    .split('?')
                    .next()
                    .unwrap_or(""),
                age_seconds = age,
                request_id = c.s.req.request_id,
            );
        }
        Some(copy)
    }

    /// Answers from a stored copy: 304, 416, 206 or 200 (HEAD: head only),
    /// with `X-Cache: <x_cache>` (HIT, or STALE when no replica could answer).
    pub(super) async fn serve_cached(
        &self,
        c: &mut Client,
        bucket: usize,
        copy: &Object,
        x_cache: &'static str,
    ) -> Outcome {
        self.answer_stored(c, bucket, copy, x_cache, Source::Memory)
            .await
    }

    /// A disk-tier entry whose pages are all in the page cache answers a
    /// memory miss straight from its file (`Some`), when the client is
    /// plain TCP and `server.zero_copy` sends such a body by reference;
    /// otherwise (`None`) the entry is read and promoted as usual
    /// ([`Self::promote_from_disk`]). The core keeps the file open for the
    /// next hit (`cache::open`).
    pub(super) async fn serve_from_disk(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
    ) -> Option<Outcome> {
        let process = &self.shared.process;
        let (Some(store), Some(disk)) = (&process.cache, &process.disk) else {
            return None;
        };
        let settings = &self.shared.bucket(bucket).cache;
        let zero_copy = self.shared.config.server.zero_copy;
        if !settings.enabled
            || conditional_not_answered(c)
            || !matches!(c.stream, MaybeTls::Plain(_))
        {
            return None;
        }
        let k = self.cache_key(bucket, key, &c.s.query);
        if store.get(&k).is_some() {
            return None;
        }
        // The file's size bounds the body's: an entry too small to be sent
        // by reference is not opened twice (here, then to be read).
        let (size, id) = disk.entry(&k)?;
        if !zero_copy.send_stored(size) {
            return None;
        }
        let kept = self.core.open_entries.borrow_mut().get(&k, id);
        let entry = match kept {
            Some(entry) => entry,
            None => {
                let entry = Rc::new(disk.open_entry(&k).await?);
                let mut open = self.core.open_entries.borrow_mut();
                open.put(&k, entry.id, entry.clone());
                entry
            }
        };
        let copy = &entry.object;
        let fresh = policy::is_fresh(copy.stored_at, copy.fresh_for, crate::clock::now());
        if !(zero_copy.send_stored(copy.total) && fresh && entry.in_page_cache()) {
            return None;
        }
        // The pipe is taken before anything is sent: running out of pipes
        // then can never strand a head already sent. Without one the entry
        // is read instead (and that copy's answer counts any fallback).
        let pipe = self.core.take_pipe().ok()?;
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().cache(mid, CacheResult::Hit);
        let source = Source::File {
            file: &entry.file,
            offset: entry.body_offset,
            pipe,
        };
        Some(self.answer_stored(c, bucket, copy, "HIT", source).await)
    }

    /// Answers from a stored copy whose body is at `source`.
    async fn answer_stored(
        &self,
        c: &mut Client,
        bucket: usize,
        copy: &Object,
        x_cache: &'static str,
        source: Source<'_>,
    ) -> Outcome {
        let len = match &source {
            Source::Memory => copy.body.len() as u64,
            Source::File { .. } => copy.total,
        };
        let pre = policy::precondition(
            c.s.req.header(Forwarded::IfNoneMatch),
            c.s.req.header(Forwarded::IfModifiedSince),
            &copy.etag,
            copy.last_modified.as_deref(),
        );
        let answer = match pre {
            Precondition::NotModified => None,
            Precondition::Serve => Some(policy::range(c.s.req.header(Forwarded::Range), len)),
        };
        let (status, part) = match answer {
            None => (304, None),
            Some(RangeAnswer::Unsatisfiable) => (416, None),
            Some(RangeAnswer::Whole) => (200, Some((0, len))),
            Some(RangeAnswer::Part { first, last }) => (206, Some((first, last + 1 - first))),
        };
        let keep = c.s.req.keep_alive && !self.core.draining.get();
        self.cached_head(c, copy, (status, answer, x_cache), keep);
        let Some((from, n)) = part.filter(|_| c.s.req.method() == Method::Get) else {
            if let Source::File { pipe, .. } = source {
                self.core.keep_pipe(pipe);
            }
            let (Ok(out) | Err(out)) = self.write_cached_head(c, bucket, status, keep).await;
            return out;
        };
        let mut out = cached_outcome(bucket, status, keep);
        let client_timeout = self.shared.config.server.idle_timeout;
        // The head leaves with the body (see send_stored and send_file).
        let sent = match source {
            Source::Memory => {
                let body = copy.body.slice(from as usize..(from + n) as usize);
                self.send_stored(c, body, true, client_timeout).await
            }
            Source::File { file, offset, pipe } => {
                self.send_file(c, file, offset + from, n, pipe, client_timeout)
                    .await
            }
        };
        if sent.is_err() {
            out.keep_alive = false;
            out.abort = true;
            return out;
        }
        out.bytes = n;
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().cache_saved(mid, n);
        out
    }

    /// Writes the head prepared in `c.s.wbuf` by [`Self::cached_head`]; the
    /// outcome so far, `Err` (connection not to be kept) when the write
    /// failed.
    pub(super) async fn write_cached_head(
        &self,
        c: &mut Client,
        bucket: usize,
        status: u16,
        keep: bool,
    ) -> Result<Outcome, Outcome> {
        let mut out = cached_outcome(bucket, status, keep);
        let timeout = self.shared.config.server.idle_timeout;
        match write_all(&mut c.stream, &mut c.s.wbuf, timeout).await {
            Ok(()) => Ok(out),
            Err(_) => {
                out.keep_alive = false;
                Err(out)
            }
        }
    }

    /// The head of an answer from the cache, into `c.s.wbuf`.
    pub(super) fn cached_head(
        &self,
        c: &mut Client,
        copy: &Object,
        (status, answer, x_cache): (u16, Option<RangeAnswer>, &'static str),
        keep: bool,
    ) {
        let len = copy.total;
        // A 416 carries none of the copy's headers: its own Date.
        let unsatisfiable = matches!(answer, Some(RangeAnswer::Unsatisfiable));
        let w = &mut c.s.wbuf;
        head::status_line(w, status);
        match answer {
            None => {
                for line in copy.headers.split_inclusive("\r\n") {
                    let name = line.split(':').next().unwrap_or("");
                    if NOT_MODIFIED_HEADERS
                        .iter()
                        .any(|h| name.eq_ignore_ascii_case(h))
                    {
                        w.extend_from_slice(line.as_bytes());
                    }
                }
            }
            Some(RangeAnswer::Unsatisfiable) => {
                head::header(w, "Content-Range", &format!("bytes */{len}"));
                head::header(w, "Content-Length", "0");
            }
            Some(RangeAnswer::Whole) => {
                w.extend_from_slice(copy.headers.as_bytes());
                head::header(w, "Content-Length", &itoa(len));
            }
            Some(RangeAnswer::Part { first, last }) => {
                w.extend_from_slice(copy.headers.as_bytes());
                head::header(w, "Content-Range", &format!("bytes {first}-{last}/{len}"));
                head::header(w, "Content-Length", &itoa(last - first + 1));
            }
        }
        let age = policy::age(copy.stored_at, crate::clock::now());
        self.end_head(
            c,
            respond::HeadEnd {
                date: unsatisfiable,
                age: Some(age),
                x_cache: Some(x_cache),
                chunked: false,
                keep,
            },
        );
    }

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
            return self.pass_through(c, answer, start, len);
        }
        let fresh_for = self.freshness(resp, settings.ttl)?;
        // The body, and the copy waiters stream, count against the budget
        // of fills in flight until the fill ends; past it the answer is
        // relayed uncached, at the client's pace.
        let reservation = store.reserve_fill(len.saturating_mul(2))?;
        let meta = self.stored_meta(resp, fresh_for, len);
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
            store,
            disk: self.shared.process.disk.as_deref(),
            redis: (self.shared.process.redis.as_deref())
                .map(|r| (r, self.shared.config.cache.stale_if_error)),
            shared,
            epoch: store.purge_epoch(),
            key: key.to_string(),
            len,
            body: Filling::with_capacity(len),
            meta: Some(meta),
            reservation: Some(reservation),
            passthrough: false,
            passed: 0,
        };
        fill.push(&answer.conn.buf[answer.head_len..start]);
        Some(fill)
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
        answer: &Answer,
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
        self.freshness(resp, ttl)?;
        let reservation = store.reserve_fill(PASS_WINDOW as u64)?;
        shared.set_window(PASS_WINDOW);
        shared.set_head(FillHead {
            headers: self.stored_headers(resp),
            len,
            etag: resp.etag.clone(),
            passthrough: true,
        });
        let mut fill = Fill {
            store,
            disk: None,
            redis: None,
            shared: Some(shared.clone()),
            epoch: store.purge_epoch(),
            key: String::new(),
            len,
            body: Filling::Heap(Vec::new()),
            meta: None,
            reservation: Some(reservation),
            passthrough: true,
            passed: 0,
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

/// A conditional the cache does not answer (`If-Match`,
/// `If-Unmodified-Since`, `If-Range`): such a request bypasses it.
fn conditional_not_answered(c: &Client) -> bool {
    [
        Forwarded::IfMatch,
        Forwarded::IfUnmodifiedSince,
        Forwarded::IfRange,
    ]
    .iter()
    .any(|&h| c.s.req.header(h).is_some())
}

/// A GET with no range and no conditional.
pub(super) fn plain_get(c: &Client) -> bool {
    c.s.req.method() == Method::Get
        && c.s.req.header(Forwarded::Range).is_none()
        && no_conditionals(c)
}

/// A request with one byte range and no conditional: what slices answer.
pub(super) fn single_range_only(c: &Client) -> bool {
    c.s.req
        .header(Forwarded::Range)
        .is_some_and(|r| !r.contains(','))
        && no_conditionals(c)
}

fn no_conditionals(c: &Client) -> bool {
    [
        Forwarded::IfMatch,
        Forwarded::IfNoneMatch,
        Forwarded::IfModifiedSince,
        Forwarded::IfUnmodifiedSince,
        Forwarded::IfRange,
    ]
    .iter()
    .all(|&h| c.s.req.header(h).is_none())
}

fn starts_with_ignore_case(line: &str, prefix: &str) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The value of header `name` among formatted `Name: value\r\n` lines.
pub(super) fn forwarded_value<'a>(forward: &'a str, name: &str) -> Option<&'a str> {
    forward.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl CoreGeneration {
    /// Writes the head in `c.s.wbuf` (when `with_head`) and a stored body
    /// within `timeout`:
    /// the body by reference (see `http::zerocopy`, the head sent with
    /// MSG_MORE ahead of it) when `server.zero_copy` says so for its size,
    /// it lives in a mapping of its own and the client is plain TCP; else
    /// head and shared `Bytes` in one vectored write.
    pub(super) async fn send_stored(
        &self,
        c: &mut Client,
        body: Body,
        with_head: bool,
        timeout: Duration,
    ) -> io::Result<()> {
        let plain = match &c.stream {
            MaybeTls::Plain(s) => Some(s),
            MaybeTls::Tls(_) => None,
        };
        let by_reference = self
            .shared
            .config
            .server
            .zero_copy
            .send_stored(body.len() as u64);
        // (A body follows the head there: never an empty one, which would
        // leave the head held back by MSG_MORE.)
        let mapped = body.mapped().filter(|b| !b.is_empty());
        if let (Some(s), Some(bytes), true) = (plain, mapped, by_reference) {
            if let Some(mut pipe) = self.core.pipe_for_splice() {
                let s = zerocopy::NonBlocking::new(s)?;
                if with_head {
                    zerocopy::send_head(&s, &c.s.wbuf, timeout).await?;
                }
                // SAFETY: `bytes` is a mapped body (`Body::mapped`): never
                // written again, its pages never reused while referenced.
                unsafe { zerocopy::send(&s, &mut pipe, bytes, timeout) }.await?;
                self.core.keep_pipe(pipe);
                self.core.metrics.borrow_mut().cache_by_reference += bytes.len() as u64;
                return Ok(());
            }
        }
        let bytes = body.bytes().clone();
        if !with_head {
            return write_bytes(&mut c.stream, bytes, timeout).await;
        }
        let whole = (0, bytes.len());
        write_head_and(&mut c.stream, &mut c.s.wbuf, bytes, whole, timeout)
            .await
            .0
    }

    /// Writes the head in `c.s.wbuf`, then sends `len` bytes of a disk
    /// entry's file from `offset` through the page cache and `pipe` (see
    /// `http::zerocopy::send_file`); only for plain-TCP clients.
    async fn send_file(
        &self,
        c: &mut Client,
        file: &monoio::fs::File,
        offset: u64,
        len: u64,
        mut pipe: zerocopy::Pipe,
        timeout: Duration,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if !matches!(c.stream, MaybeTls::Plain(_)) {
            return Err(io::Error::other("a file is only spliced to plain TCP"));
        }
        // The head goes first, alone: sent with MSG_MORE ahead of the file's
        // pages (which start mid-page, after the entry's metadata) it made
        // disk hits cost 1.6x more CPU (loadtest/disk_hits.sh).
        write_all(&mut c.stream, &mut c.s.wbuf, timeout).await?;
        if len == 0 {
            self.core.keep_pipe(pipe);
            return Ok(());
        }
        let MaybeTls::Plain(s) = &c.stream else {
            return Err(io::Error::other("a file is only spliced to plain TCP"));
        };
        let s = zerocopy::NonBlocking::new(s)?;
        zerocopy::send_file(&s, &mut pipe, file.as_raw_fd(), offset, len, timeout).await?;
        self.core.keep_pipe(pipe);
        self.core.metrics.borrow_mut().cache_by_reference += len;
        Ok(())
    }
}

/// Where a stored copy's body is read from.
enum Source<'a> {
    /// The memory tier's copy (`Object::body`).
    Memory,
    /// A disk-tier file, its body from `offset`, in the page cache, to be
    /// sent through `pipe`.
    File {
        file: &'a monoio::fs::File,
        offset: u64,
        pipe: zerocopy::Pipe,
    },
}

/// The outcome of answering from a stored copy, before any byte is sent.
pub(super) fn cached_outcome(bucket: usize, status: u16, keep: bool) -> Outcome {
    Outcome {
        status,
        bytes: 0,
        keep_alive: keep,
        abort: false,
        replica: None,
        bucket: Some(bucket),
    }
}

/// How often a copy's memory hits refresh its disk-tier entry's recency.
const DISK_TOUCH_EVERY_MS: u64 = 1_000;

/// The bytes of its latest pieces a pass-through fill keeps for its
/// waiters (`CoreGeneration::pass_through`).
pub(super) const PASS_WINDOW: usize = 8 * 1024 * 1024;

/// Writes a whole `Bytes` (shared with the cache: no copy) within `timeout`.
pub(super) async fn write_bytes(
    stream: &mut ClientStream,
    body: Bytes,
    timeout: Duration,
) -> io::Result<()> {
    use monoio::io::AsyncWriteRentExt;
    match monoio::time::timeout(timeout, stream.write_all(body)).await {
        Ok((r, _)) => r.map(|_| ()),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

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
}

impl crate::http::body::Tee for Fill<'_> {
    fn push(&mut self, bytes: &[u8]) {
        if let Some(f) = &self.shared {
            f.push(bytes);
        }
        if self.passthrough {
            // Nothing kept here: the shared pieces are the only copy.
            self.passed += bytes.len() as u64;
            if self.passed == self.len {
                if let Some(f) = &self.shared {
                    f.done(None);
                }
                self.reservation = None;
            }
            return;
        }
        self.body.extend_from_slice(bytes);
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
                    redis.offer(key.clone(), shared.clone(), servable, self.epoch);
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

impl Fill<'_> {
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

    /// The body broke and nothing completed it: waiters abort.
    pub(super) fn fail(&self) {
        if let Some(f) = &self.shared {
            f.end(End::Failed);
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

impl CoreGeneration {
    /// A waiter: streams the leader's fill (head, then bytes as they come).
    /// A fill abandoned before its head sends the request upstream itself;
    /// a fill that fails mid-body aborts this connection too.
    pub(super) async fn serve_waiter(
        &self,
        c: &mut Client,
        bucket: usize,
        fill: Arc<SharedFill>,
        key: &str,
    ) -> Outcome {
        let wait = self.shared.config.server.idle_timeout;
        let head = match monoio::time::timeout(wait, fill.next(false, 0)).await {
            Ok(FillEvent::Head(h)) => h,
            _ => {
                // No shared answer: fetch for ourselves, without caching (a
                // stale copy found by the lookup still answers an outage).
                c.s.cache = CacheUse::Bypass;
                return self.forward(c, bucket, key).await;
            }
        };
        let mid = self.shared.bucket_metric[bucket];
        {
            let mut m = self.core.metrics.borrow_mut();
            m.cache(mid, CacheResult::Hit);
            m.coalesced(mid);
        }
        let keep = c.s.req.keep_alive && !self.core.draining.get();
        let w = &mut c.s.wbuf;
        head::status_line(w, 200);
        w.extend_from_slice(head.headers.as_bytes());
        head::header(w, "Content-Length", &itoa(head.len));
        self.end_head(
            c,
            respond::HeadEnd {
                date: false,
                age: Some(0),
                x_cache: Some("HIT"),
                chunked: false,
                keep,
            },
        );
        let mut out = Outcome {
            status: 200,
            bytes: 0,
            keep_alive: keep,
            abort: false,
            replica: None,
            bucket: Some(bucket),
        };
        if write_all(&mut c.stream, &mut c.s.wbuf, wait).await.is_err() {
            out.keep_alive = false;
            return out;
        }
        match self.stream_fill(c, &fill, &head, 0, None).await {
            (Streamed::Whole, n) => out.bytes = n,
            (Streamed::ClientGone, n) => {
                out.bytes = n;
                out.keep_alive = false;
                return out;
            }
            // Behind a pass-through fill's window, its stored copy gone
            // first, or a fill its leader could not finish: the rest with a
            // range request of our own (the same ETag, or nothing).
            (Streamed::Detached, n) | (Streamed::Broken, n) if !head.etag.is_empty() => {
                let resumed = Box::pin(self.resume_waiter(c, bucket, key, &head, n)).await;
                out.bytes = resumed.sent;
                if !resumed.complete {
                    out.keep_alive = false;
                    out.abort = true;
                }
                return out;
            }
            // Failed, abandoned mid-body, stalled, or the stored copy gone
            // before this reader caught up: never a short body presented
            // as complete.
            (_, n) => {
                out.bytes = n;
                out.keep_alive = false;
                out.abort = true;
                return out;
            }
        }
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().cache_saved(mid, out.bytes);
        out
    }

    /// A waiter that fell behind the fill it streamed (after `sent` body
    /// bytes) asks the replicas for the rest of the same object, as a
    /// broken body is resumed: `Range` from `sent`, `If-Match` its ETag.
    async fn resume_waiter(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        head: &FillHead,
        sent: u64,
    ) -> super::resume::Resumed {
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().detached(mid);
        let mut order_buf = [0usize; crate::config::MAX_REPLICAS];
        let order = self.plan(bucket, &mut order_buf);
        let ctx = RequestCtx { bucket, key, order };
        let mut cursor = Cursor::new(self, order);
        let object = Response {
            status: 200,
            framing: Some(Framing::Length(head.len)),
            etag: head.etag.clone(),
            ..Response::default()
        };
        let timeouts = Timeouts {
            upstream: order
                .first()
                .map_or(Duration::from_secs(30), |&rid| self.replica(rid).timeout),
            client: self.shared.config.server.idle_timeout,
        };
        self.resume(c, &ctx, (None, object), sent, &mut cursor, (timeouts, None))
            .await
    }

    /// Streams a fill's body to the client from byte `sent` (those before
    /// it went out already): its pieces while it fills, then, once it is
    /// stored, chunks copied from the stored object, looked up for each
    /// chunk, so a reader that stalls pins no copy of its own. `stop`: the
    /// leader's own fetch ended early (after which the pieces in hand are
    /// sent and `Stopped` returned). Returns how it ended and the bytes
    /// that went out in all.
    pub(super) async fn stream_fill(
        &self,
        c: &mut Client,
        fill: &Arc<SharedFill>,
        head: &FillHead,
        mut sent: u64,
        stop: Option<&Signal>,
    ) -> (Streamed, u64) {
        let wait = self.shared.config.server.idle_timeout;
        let (mut seen, mut at) = (0usize, 0u64);
        while sent < head.len {
            let event = match stop {
                Some(stop) if stop.fired() => match fill.available(seen) {
                    None => return (Streamed::Detached, sent),
                    Some(pieces) if pieces.is_empty() => return (Streamed::Stopped, sent),
                    Some(pieces) => Some(FillEvent::Body(pieces)),
                },
                Some(stop) => monoio::select! {
                    e = monoio::time::timeout(wait, fill.next(true, seen)) => e.ok(),
                    _ = stop.wait() => continue,
                },
                None => monoio::time::timeout(wait, fill.next(true, seen))
                    .await
                    .ok(),
            };
            match event {
                Some(FillEvent::Body(pieces)) => {
                    seen += pieces.len();
                    for piece in pieces {
                        let n = piece.len() as u64;
                        // Bytes of this piece that went out already.
                        let skip = sent.saturating_sub(at).min(n);
                        at += n;
                        if skip == n {
                            continue;
                        }
                        let rest = piece.slice(skip as usize..);
                        if write_bytes(&mut c.stream, rest, wait).await.is_err() {
                            return (Streamed::ClientGone, sent);
                        }
                        sent += n - skip;
                    }
                }
                Some(FillEvent::Ended(End::Done)) => {
                    return self.stream_stored(c, fill, head.len, sent).await
                }
                // A pass-through fill's window moved past this reader.
                Some(FillEvent::Behind) => return (Streamed::Detached, sent),
                _ => return (Streamed::Broken, sent),
            }
        }
        (Streamed::Whole, sent)
    }

    /// The rest of a completed fill's body from its stored copy, a chunk
    /// at a time: copied, so a slow client pins nothing; the copy is
    /// reached through the fill's weak reference, so it is this fill's
    /// object and no other version, or gone (`Detached`).
    async fn stream_stored(
        &self,
        c: &mut Client,
        fill: &SharedFill,
        len: u64,
        mut sent: u64,
    ) -> (Streamed, u64) {
        /// Bytes copied out of the stored object per write (what a slow
        /// reader holds, beyond its socket's buffers).
        const CHUNK: u64 = 64 * 1024;
        let wait = self.shared.config.server.idle_timeout;
        while sent < len {
            let Some(copy) = fill.stored().filter(|o| o.body.len() as u64 == len) else {
                return (Streamed::Detached, sent);
            };
            let to = (sent + CHUNK).min(len);
            c.s.wbuf.clear();
            c.s.wbuf
                .extend_from_slice(&copy.body[sent as usize..to as usize]);
            drop(copy);
            if write_all(&mut c.stream, &mut c.s.wbuf, wait).await.is_err() {
                return (Streamed::ClientGone, sent);
            }
            sent = to;
        }
        (Streamed::Whole, sent)
    }

    /// The answer will not be shared: waiters stop waiting for it.
    pub(super) fn abandon_fill(&self, c: &Client) {
        if let Some((_, fill)) = &c.s.leading {
            fill.end(End::Abandoned);
        }
    }

    /// After a request: a fill it led ends (abandoned unless it completed or
    /// failed) and leaves the table of fills under way.
    pub(super) fn end_fill(&self, c: &mut Client) {
        if let Some((key, fill)) = c.s.leading.take() {
            self.shared.process.fills.finish(&key, &fill);
        }
    }
}
