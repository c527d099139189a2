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
//! every waiter streams (`waiter.rs`); the copy is made while the answer is
//! relayed (`fill.rs`). A memory miss asks the disk and Redis tiers in
//! `cache.cache_layers`' order (`tiers.rs`). Single-range requests may be
//! answered from slices first (`slices.rs`).

use super::session::Phase;
use super::*;
use crate::cache::collapse::{Role, SharedFill};
use crate::cache::policy::{self, Precondition, RangeAnswer};
use crate::cache::region::Body;
use crate::cache::store::{self, Object};
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
    pub(super) fn fill_key(&self) -> Option<&str> {
        match self {
            CacheUse::Fill(k) | CacheUse::Revalidate(k, _) => Some(k),
            _ => None,
        }
    }
}

impl CoreGeneration {
    /// Phase "lookup": the tiers below memory (unless this instance is
    /// fetching the object already), then slices (a large object's
    /// ranges), then the memory tier, which may hand this request a fill
    /// in flight to follow. `Err(outcome)`: a copy answered; `Ok(())`: a
    /// miss, to forward (this request may lead the fill).
    pub(super) async fn lookup(&self, c: &mut Client, bucket: usize, key: &str) -> Phase<()> {
        // The tiers below memory, in `cache.cache_layers`' order, until
        // one has the object (none while this instance fetches it already:
        // `memory_miss`).
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
                    promoted = self.promote_from_redis(c, bucket, key).await?;
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

    /// The memory tier's purge count now (0 without a cache): a copy
    /// fetched while it moved is not stored (a purge that lands while an
    /// object is on its way wins).
    pub(super) fn purge_epoch(&self) -> u64 {
        self.shared
            .process
            .cache
            .as_ref()
            .map_or(0, |s| s.purge_epoch())
    }

    /// The cache key of `key` (URI-encoded) in `bucket`, with the forwarded
    /// query and the bucket's origin (see `cache::store::key`).
    pub(super) fn cache_key(&self, bucket: usize, key: &str, query: &str) -> String {
        let b = self.shared.bucket(bucket);
        store::key(&b.name, &b.origin, key, query)
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
        let found = {
            let mut k = self.core.key_scratch.borrow_mut();
            let b = self.shared.bucket(bucket);
            store::write_key(&mut k, &b.name, &b.origin, key, &c.s.query);
            store.get(&k)
        };
        let mut expired = None;
        if let Some(copy) = found.or(promoted) {
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
            (true, Some(copy)) if !copy.etag.is_empty() => {
                CacheUse::Revalidate(self.cache_key(bucket, key, &c.s.query), copy)
            }
            // The scratch buffer still holds this request's key (nothing
            // has run since the lookup).
            (true, _) => match self
                .shared
                .process
                .fills
                .join_or_lead(&self.core.key_scratch.borrow())
            {
                Role::Leader(fill) => {
                    let k = self.cache_key(bucket, key, &c.s.query);
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
        self.answer_stored(c, bucket, copy, x_cache, StoredBody::Memory)
            .await
    }

    /// Answers from a stored copy whose body is at `source`.
    pub(super) async fn answer_stored(
        &self,
        c: &mut Client,
        bucket: usize,
        copy: &Object,
        x_cache: &'static str,
        source: StoredBody<'_>,
    ) -> Outcome {
        let len = match &source {
            StoredBody::Memory => copy.body.len() as u64,
            StoredBody::Part { .. } | StoredBody::File { .. } => copy.total,
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
            if let StoredBody::File { pipe, .. } = source {
                self.core.keep_pipe(pipe);
            }
            let (Ok(out) | Err(out)) = self.write_cached_head(c, bucket, status, keep).await;
            return out;
        };
        let mut out = cached_outcome(bucket, status, keep);
        let client_timeout = self.shared.config.server.idle_timeout;
        // The head leaves with the body (see send_stored and send_file).
        let sent = match source {
            StoredBody::Memory => {
                let body = copy.body.slice(from as usize..(from + n) as usize);
                self.send_stored(c, body, true, client_timeout).await
            }
            StoredBody::Part { offset } => {
                // The part was read for this range; bytes outside it are
                // never made up: the connection ends instead.
                let held = offset..offset + copy.body.len() as u64;
                if held.start <= from && from + n <= held.end {
                    let at = (from - offset) as usize;
                    let body = copy.body.slice(at..at + n as usize);
                    self.send_stored(c, body, true, client_timeout).await
                } else {
                    Err(io::Error::other("the range is outside the part read"))
                }
            }
            StoredBody::File { file, offset, pipe } => {
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
}

/// A conditional the cache does not answer (`If-Match`,
/// `If-Unmodified-Since`, `If-Range`): such a request bypasses it.
pub(super) fn conditional_not_answered(c: &Client) -> bool {
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

pub(super) fn starts_with_ignore_case(line: &str, prefix: &str) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The value of header `name` among formatted `Name: value\r\n` lines.
pub(super) fn forwarded_value<'a>(forward: &'a str, name: &str) -> Option<&'a str> {
    forward.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
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

/// Where a stored copy's body is read from.
pub(super) enum StoredBody<'a> {
    /// The memory tier's copy (`Object::body`).
    Memory,
    /// Part of the object (`Object::body`, its bytes from `offset` on),
    /// read for a range from a lower tier.
    Part { offset: u64 },
    /// A disk-tier file, its body from `offset`, in the page cache, to be
    /// sent through `pipe`.
    File {
        file: &'a monoio::fs::File,
        offset: u64,
        pipe: zerocopy::Pipe,
    },
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
