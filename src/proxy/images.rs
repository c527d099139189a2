//! Phase "image" (after authorize, before lookup): a GET or HEAD of an
//! image (by its extension) in a bucket with image settings, carrying
//! image parameters or matched by a watermark rule, is answered with a
//! variant; anything else goes on to the lookup unchanged.
//!
//! A variant is an ordinary cache entry whose key is the object's key with
//! the normalized parameters, the format chosen and the rendered
//! watermarks' digest in its query part: purging the object purges its
//! variants, and HEAD, ranges and conditionals are answered as for any
//! stored copy (its ETag derived from the original's and the variant).
//! Concurrent misses of one variant make one transform (collapsed as
//! fills are). The original is fetched whole (a memory copy when there is
//! one), bounded by `max_input_mb`, its header checked here, and decoded
//! on the transform pool only: a core never decodes.

use super::attempt::Resume;
use super::cache::forwarded_value;
use super::session::Phase;
use super::*;
use crate::cache::collapse::{End, FillEvent, Role};
use crate::cache::store::Object;
use crate::images::params::{self, Format, FormatChoice, Params};
use crate::images::transform::{self, Failure, Job};
use crate::images::watermark::{self, Drawn};
use crate::images::ImageSettings;
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Extensions of objects image parameters and watermarks apply to.
const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "gif", "avif", "heic"];

/// Where a variant's part of the cache key's query begins (no forwarded
/// query holds it: the router encodes every control character).
const VARIANT_MARK: &str = "\u{1}img:";

/// Times a request waits on another's transform of its variant, then
/// tries to lead one, before answering 503.
const ROUNDS: usize = 3;

/// One variant asked for.
struct Variant {
    params: Params,
    /// `fmt=auto`: what `Accept` chose (`None`: the fallback, JPEG or PNG
    /// by the original's transparency).
    auto: Option<Format>,
    marks: Vec<Drawn>,
    /// The query part of its cache key: the forwarded query, then
    /// [`VARIANT_MARK`] and the normalized parameters, the format `auto`
    /// chose and the rendered watermarks' digest (its ETag hashes it too).
    query: String,
    settings: Arc<ImageSettings>,
    source_ttl: Duration,
}

/// The original, as fetched (or found in memory).
struct Original {
    body: Bytes,
    etag: String,
    last_modified: Option<String>,
    cache_control: Option<String>,
    /// How long it may be stored (`None`: not at all).
    fresh_for: Option<Duration>,
}

impl CoreGeneration {
    /// Phase "image": `Ok(())` when the request is not for a variant.
    pub(super) async fn image(
        &self,
        c: &mut Client,
        bucket: usize,
        path: &str,
        key: &str,
    ) -> Phase<()> {
        let b = self.shared.bucket(bucket);
        let Some(settings) = b.images.clone() else {
            return Ok(());
        };
        if self.shared.images.is_none() || !is_image_path(path) || c.s.prewarm {
            return Ok(());
        }
        let parsed = if settings.transforms {
            match params::parse(query_of(&c.s.req.target)) {
                Ok(p) => p,
                Err(e) => return Err(self.image_refusal(c, 400, &e.to_string()).await),
            }
        } else {
            None
        };
        let marks = match &b.watermark {
            None => None,
            Some(w) => {
                let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
                let header = |name: &str| head::find_header(head, name).map(str::to_string);
                let ctx = watermark::Context {
                    claims: c.s.claims.as_deref(),
                    ip: c.peer,
                    path,
                    bucket: &b.name,
                    now: crate::clock::now(),
                    header: &header,
                };
                w.render(&ctx)
            }
        };
        let transformed = parsed.is_some();
        if !transformed && marks.is_none() {
            return Ok(());
        }
        let (params, signature) = parsed.unwrap_or_default();
        if let (true, Some(k)) = (transformed, &settings.signing_key) {
            let now = crate::clock::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let target = &c.s.req.target;
            let raw_path = String::from_utf8_lossy(path_of(target));
            let raw_query = String::from_utf8_lossy(query_of(target));
            let checked = crate::images::verify_signature(
                k,
                &raw_path,
                &raw_query,
                signature.sig.as_deref(),
                signature.exp,
                now,
            );
            if let Err(e) = checked {
                return Err(self.image_refusal(c, 403, &e.to_string()).await);
            }
        }
        // Sizes past the limits are refused before anything is fetched.
        let (w, h) = params.pixels_asked();
        if let Err(e) = crate::images::plan::within(w, h, settings.limits) {
            return Err(self.image_refusal(c, 400, &e.0).await);
        }
        if let Err(why) = allowed(&params, &settings) {
            return Err(self.image_refusal(c, 400, &why).await);
        }
        let auto = match params.format {
            Some(FormatChoice::Auto) => {
                let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
                params::negotiate(head::find_header(head, "accept").unwrap_or(""))
            }
            _ => None,
        };
        let marks = marks.unwrap_or_default();
        // The forwarded query, then what names the variant (see `Variant`).
        let mut query = String::with_capacity(c.s.query.len() + 64);
        query.push_str(&c.s.query);
        query.push_str(VARIANT_MARK);
        params.write_canonical(&mut query);
        if params.format == Some(FormatChoice::Auto) {
            query.push_str("&to=");
            query.push_str(auto.map_or("fallback", Format::name));
        }
        if !marks.is_empty() {
            query.push_str("&wm=");
            query.push_str(&watermark::fingerprint(&marks));
        }
        let source_ttl = b
            .watermark
            .as_ref()
            .map_or(Duration::from_secs(3600), |w| w.cache_ttl);
        let v = Variant {
            params,
            auto,
            marks,
            query,
            settings,
            source_ttl,
        };
        Err(Box::pin(self.serve_variant(c, bucket, key, v)).await)
    }

    /// Answers from the stored variant, or the one transform made for it.
    async fn serve_variant(&self, c: &mut Client, bucket: usize, key: &str, v: Variant) -> Outcome {
        let vkey = self.cache_key(bucket, key, &v.query);
        let b = self.shared.bucket(bucket);
        let store = self
            .shared
            .process
            .cache
            .as_ref()
            .filter(|_| b.cache.enabled);
        let mid = self.shared.bucket_metric[bucket];
        if let Some(copy) = store.and_then(|s| s.get(&vkey)) {
            if crate::cache::policy::is_fresh(copy.stored_at, copy.fresh_for, crate::clock::now()) {
                self.core.metrics.borrow_mut().cache(mid, CacheResult::Hit);
                return self.serve_cached(c, bucket, &copy, "HIT").await;
            }
        }
        let fills = &self.shared.process.fills;
        for _ in 0..ROUNDS {
            let fill = match fills.join_or_lead(&vkey) {
                Role::Leader(fill) => fill,
                Role::Waiter(fill) => {
                    let wait = self.shared.config.server.idle_timeout;
                    let ended = monoio::time::timeout(wait, fill.next(true, 0)).await;
                    if let (Ok(FillEvent::Ended(End::Done)), Some(copy)) = (ended, fill.stored()) {
                        self.core.metrics.borrow_mut().coalesced(mid);
                        self.core.metrics.borrow_mut().cache(mid, CacheResult::Hit);
                        return self.serve_cached(c, bucket, &copy, "HIT").await;
                    }
                    continue;
                }
            };
            if store.is_some() {
                self.core.metrics.borrow_mut().cache(mid, CacheResult::Miss);
            }
            let made = self.make_variant(c, bucket, key, &v).await;
            let (object, storable) = match made {
                Ok(made) => made,
                Err(answered) => {
                    fills.finish(&vkey, &fill);
                    return answered;
                }
            };
            let object = Arc::new(object);
            // Variants live in the memory tier only (docs/images.md).
            if let (Some(s), true) = (store, storable) {
                s.insert_shared(vkey.clone(), object.clone());
            }
            fill.done(Some(&object));
            fills.finish(&vkey, &fill);
            let x_cache = if store.is_some() { "MISS" } else { "BYPASS" };
            return self.serve_cached(c, bucket, &object, x_cache).await;
        }
        let extra = [("Retry-After", "1")];
        self.simple_outcome(
            c,
            503,
            "text/plain",
            b"the image variant is being made by another request; retry\n",
            &extra,
        )
        .await
    }

    /// Fetches the original and transforms it on the pool: the variant,
    /// and whether it may be stored; `Err`: answered (the origin's refusal,
    /// a limit, a busy pool, a failed transform).
    async fn make_variant(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        v: &Variant,
    ) -> Result<(Object, bool), Outcome> {
        let original = self
            .original(c, bucket, key, v.settings.max_input_bytes)
            .await?;
        let stats = &self.shared.process.image_stats;
        let info = match transform::inspect(&original.body, v.settings.max_input_pixels) {
            Ok(info) => info,
            Err(f) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(self.transform_failed(c, f).await);
            }
        };
        let format = match v.params.format {
            Some(FormatChoice::Fixed(f)) => f,
            Some(FormatChoice::Auto) => v.auto.unwrap_or(if info.alpha {
                Format::Png
            } else {
                Format::Jpeg
            }),
            None => info.format,
        };
        let job = Job {
            input: original.body.clone(),
            params: v.params.clone(),
            format,
            quality: v.params.quality.unwrap_or(v.settings.quality),
            limits: v.settings.limits,
            marks: v.marks.clone(),
            source_ttl: v.source_ttl,
        };
        let Some(pool) = self.shared.images.as_ref() else {
            return Err(self.image_refusal(c, 503, "image transforms are off").await);
        };
        let Some(reply) = pool.submit(job) else {
            let extra = [("Retry-After", "1")];
            let body = b"image transforms are busy; retry\n";
            return Err(self
                .simple_outcome(c, 503, "text/plain", body, &extra)
                .await);
        };
        let output = match reply.recv_async().await {
            Ok(Ok(out)) => out,
            Ok(Err(f)) => return Err(self.transform_failed(c, f).await),
            Err(_) => {
                let f = Failure::Failed("the transform pool stopped".into());
                return Err(self.transform_failed(c, f).await);
            }
        };
        let mut headers = String::new();
        let mut put = |name: &str, value: &str| {
            for part in [name, ": ", value, "\r\n"] {
                headers.push_str(part);
            }
        };
        put("Content-Type", format.content_type());
        let etag = variant_etag(&original.etag, &v.query);
        put("ETag", &etag);
        if let Some(lm) = &original.last_modified {
            put("Last-Modified", lm);
        }
        if let Some(cc) = &original.cache_control {
            put("Cache-Control", cc);
        }
        if v.params.format == Some(FormatChoice::Auto) {
            put("Vary", "Accept");
        }
        self.core.with_date(|d| put("Date", d));
        let total = output.body.len() as u64;
        let object = Object {
            stored_at: crate::clock::now(),
            fresh_for: original.fresh_for.unwrap_or_default(),
            etag,
            last_modified: original.last_modified,
            headers,
            body: Bytes::from(output.body).into(),
            total,
            touched_ms: Default::default(),
        };
        Ok((object, original.fresh_for.is_some()))
    }

    /// The original's bytes: a fresh whole copy in memory, else a GET to
    /// the replicas in plan order (each failure moves to the next, as any
    /// request does), bounded by `max` bytes. A non-2xx answer (404, 403)
    /// is relayed to the client as it came.
    async fn original(
        &self,
        c: &mut Client,
        bucket: usize,
        key: &str,
        max: u64,
    ) -> Result<Original, Outcome> {
        let b = self.shared.bucket(bucket);
        if let Some(store) = self
            .shared
            .process
            .cache
            .as_ref()
            .filter(|_| b.cache.enabled)
        {
            let k = self.cache_key(bucket, key, &c.s.query);
            let now = crate::clock::now();
            if let Some(copy) = store.get(&k).filter(|o| {
                crate::cache::policy::is_fresh(o.stored_at, o.fresh_for, now)
                    && o.body.len() as u64 == o.total
                    && o.total > 0
            }) {
                let age = now.duration_since(copy.stored_at).unwrap_or_default();
                let remaining = copy.fresh_for.saturating_sub(age);
                return Ok(Original {
                    body: copy.body.bytes().clone(),
                    etag: copy.etag.clone(),
                    last_modified: copy.last_modified.clone(),
                    cache_control: forwarded_value(&copy.headers, "cache-control")
                        .map(str::to_string),
                    fresh_for: Some(remaining),
                });
            }
        }
        if let Some(refused) = self.limit_upstream(c, bucket).await {
            return Err(refused);
        }
        let mut order_buf = [0usize; crate::config::MAX_REPLICAS];
        let order = self.plan(bucket, &mut order_buf);
        let ctx = RequestCtx { bucket, key, order };
        let ask = Resume {
            first: 0,
            last: max.max(1) - 1,
            etag: "",
        };
        // A purge that lands while the original is on its way wins: it is
        // then not kept.
        let epoch = self.purge_epoch();
        let mut cursor = Cursor::new(self, ctx.order);
        let mut last = None;
        while let Some(rid) = cursor.next_replica() {
            let result = self.attempt_timed(c, &ctx, rid, Some(ask)).await;
            let answer = match result {
                Ok(a) => a,
                Err(f) => {
                    c.s.flags.cause = f.cause.label();
                    cursor.failed(f.cause);
                    last = Some((rid, f));
                    continue;
                }
            };
            match self.take_original(c, answer, (key, max, epoch)).await {
                Taken::Got(original) => {
                    cursor.answered_whole();
                    c.s.flags.failovers = cursor.failovers();
                    return Ok(original);
                }
                Taken::Broke(cause) => {
                    c.s.flags.cause = cause.label();
                    cursor.failed(cause);
                }
                Taken::Answer(answer) => {
                    cursor.answered_whole();
                    c.s.cache = super::cache::CacheUse::Off;
                    let mut none = Cursor::new(self, &[]);
                    return Err(self.relay(c, &ctx, answer, &mut none).await);
                }
                Taken::Refused(f) => {
                    cursor.answered_whole();
                    self.shared
                        .process
                        .image_stats
                        .refused
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(self.transform_failed(c, f).await);
                }
            }
        }
        c.s.flags.failovers = cursor.failovers();
        Err(match last {
            Some((rid, failure)) => self.all_failed(c, &ctx, rid, failure).await,
            None => self.all_open(c, bucket).await,
        })
    }

    /// Stores an original fetched for a variant (when the bucket caches it
    /// and no purge came while it was on its way): the next variant of the
    /// same image is made without going to the origin.
    fn keep_original(
        &self,
        c: &Client,
        (bucket, key, epoch): (usize, &str, u64),
        resp: &Response,
        original: &Original,
    ) {
        let b = self.shared.bucket(bucket);
        let Some(store) = self
            .shared
            .process
            .cache
            .as_ref()
            .filter(|_| b.cache.enabled)
        else {
            return;
        };
        let (Some(fresh_for), len) = (original.fresh_for, original.body.len() as u64) else {
            return;
        };
        if len == 0 || len > b.cache.max_item_bytes || store.purge_epoch() != epoch {
            return;
        }
        let mut copy = self.stored_meta(resp, fresh_for, len);
        copy.body = original.body.clone().into();
        store.insert(self.cache_key(bucket, key, &c.s.query), copy);
    }

    /// Reads one replica's answer to the original's GET.
    async fn take_original(
        &self,
        c: &mut Client,
        mut a: Answer,
        (key, max, epoch): (&str, u64, u64),
    ) -> Taken {
        let total = match (a.resp.status, a.resp.content_range) {
            (206, Some(cr)) if cr.first == 0 && !a.resp.multipart => match cr.total {
                Some(t) => t,
                None => {
                    c.give_response(a.resp);
                    return Taken::Broke(Cause::Malformed);
                }
            },
            (200, _) => match a.resp.framing() {
                Framing::Length(n) => n,
                _ => {
                    c.give_response(a.resp);
                    return Taken::Broke(Cause::Malformed);
                }
            },
            (416, _) => {
                c.give_response(a.resp);
                return Taken::Refused(Failure::Unsupported(
                    "the object is empty, not an image".into(),
                ));
            }
            (206, _) => {
                c.give_response(a.resp);
                return Taken::Broke(Cause::Malformed);
            }
            _ => return Taken::Answer(a),
        };
        if total > max {
            c.give_response(a.resp);
            return Taken::Refused(Failure::TooLarge(format!(
                "the original is {total} bytes, above image_optimization.max_input_mb ({} MiB)",
                max / (1024 * 1024)
            )));
        }
        if a.resp.framing() != Framing::Length(total) {
            c.give_response(a.resp);
            return Taken::Broke(Cause::Malformed);
        }
        let want = a.head_len + total as usize;
        a.conn.buf.reserve(want.saturating_sub(a.conn.buf.len()));
        let deadline = Instant::now() + self.replica(a.rid).timeout;
        while a.conn.buf.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match read_more(&mut a.conn.stream, &mut a.conn.buf, left).await {
                Ok(n) if n > 0 => {}
                Ok(_) => {
                    c.give_response(a.resp);
                    return Taken::Broke(Cause::Truncated);
                }
                Err(e) => {
                    c.give_response(a.resp);
                    return Taken::Broke(Cause::of_io(&e));
                }
            }
        }
        let body = Bytes::copy_from_slice(&a.conn.buf[a.head_len..want]);
        let exact = a.conn.buf.len() == want;
        let bucket = self.shared.replicas[a.rid].bucket;
        let ttl = self.shared.bucket(bucket).cache.ttl;
        let original = Original {
            body,
            etag: a.resp.etag.clone(),
            last_modified: forwarded_value(&a.resp.forward, "last-modified").map(str::to_string),
            cache_control: forwarded_value(&a.resp.forward, "cache-control").map(str::to_string),
            fresh_for: self.freshness_as(&a.resp, 200, ttl),
        };
        self.keep_original(c, (bucket, key, epoch), &a.resp, &original);
        if upclient::reusable(&a.resp, &a.conn, a.head_len, exact) {
            self.pool.put(a.rid, a.conn);
        }
        c.give_response(a.resp);
        Taken::Got(original)
    }

    /// A transform that made nothing: 400 (limits), 415 (not an image),
    /// 422 (too large to decode), 500 (codec or watermark source).
    async fn transform_failed(&self, c: &mut Client, f: Failure) -> Outcome {
        let (status, why) = match f {
            Failure::Refused(m) => (400, m),
            Failure::Unsupported(m) => (415, m),
            Failure::TooLarge(m) => (422, m),
            Failure::Failed(m) => {
                log!(
                    Level::Error,
                    "Image transform failed",
                    request_id = c.s.req.request_id,
                    error = m,
                );
                (500, "the image transform failed".to_string())
            }
        };
        self.image_refusal(c, status, &why).await
    }

    /// A plain-text answer about an image request.
    async fn image_refusal(&self, c: &mut Client, status: u16, why: &str) -> Outcome {
        let body = format!("{why}\n");
        self.simple_outcome(c, status, "text/plain", body.as_bytes(), &[])
            .await
    }
}

/// What a replica's answer to the original's GET came to.
enum Taken {
    Got(Original),
    /// The replica failed (a malformed or cut answer): the next is tried.
    Broke(Cause),
    /// Not a 2xx: relayed to the client.
    Answer(Answer),
    /// A well-formed answer the limits refuse.
    Refused(Failure),
}

/// Whether the path names an image by its extension.
fn is_image_path(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)))
}

/// The raw query of a request target (after `?`).
fn query_of(target: &[u8]) -> &[u8] {
    target
        .iter()
        .position(|&b| b == b'?')
        .map_or(&[][..], |i| &target[i + 1..])
}

/// The raw path of a request target (before `?`), as the client sent it.
fn path_of(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    &target[..end]
}

/// The size allowlists (`allowed_widths`, `allowed_heights`): a width
/// (height) asked for must be listed, in pixels after `dpr`.
fn allowed(p: &Params, s: &ImageSettings) -> Result<(), String> {
    let (w, h) = p.pixels_asked();
    for (asked, px, list, name, key) in [
        (p.w.is_some(), w, &s.allowed_widths, "w", "allowed_widths"),
        (p.h.is_some(), h, &s.allowed_heights, "h", "allowed_heights"),
    ] {
        if !asked || list.is_empty() || px.is_some_and(|v| list.contains(&v)) {
            continue;
        }
        return Err(format!(
            "image parameter '{name}' must be one of image_optimization.{key} ({}) in pixels after dpr",
            list.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

/// A variant's ETag: the original's and the variant's parameters, hashed.
fn variant_etag(original: &str, suffix: &str) -> String {
    let mut h = Sha256::new();
    h.update(original.as_bytes());
    h.update(b"\n");
    h.update(suffix.as_bytes());
    format!("\"{}\"", hex::encode(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_known_by_their_extension() {
        assert!(is_image_path("/img/a/b.JPG"));
        assert!(is_image_path("/img/photo.webp"));
        assert!(!is_image_path("/img/doc.pdf"));
        assert!(!is_image_path("/img/jpg"));
        assert!(!is_image_path("/img.jpg/readme"));
    }

    #[test]
    fn variant_etags_follow_the_original_and_the_parameters() {
        let a = variant_etag("\"abc\"", "\u{1}img:w=400&fmt=webp");
        assert_ne!(a, variant_etag("\"abd\"", "\u{1}img:w=400&fmt=webp"));
        assert_ne!(a, variant_etag("\"abc\"", "\u{1}img:w=401&fmt=webp"));
        assert_eq!(a, variant_etag("\"abc\"", "\u{1}img:w=400&fmt=webp"));
    }
}
