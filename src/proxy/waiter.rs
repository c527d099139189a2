//! Step "lookup", a fill under way: a request for a key another request
//! is fetching streams that fetch's bytes as they arrive (collapsed
//! forwarding, `crate::cache::collapse`), then the stored copy; a waiter
//! that falls behind a pass-through fill's window, or whose copy is gone,
//! resumes with a range of its own.

use super::cache::{write_bytes, CacheUse};
use super::fill::{Signal, Streamed};
use super::*;
use crate::cache::collapse::{End, FillEvent, FillHead, SharedFill};

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
                // The copy may have come another way (the fleet's, from
                // Redis): look again.
                let k = self.cache_key(bucket, key, &c.s.query);
                let now = crate::clock::now();
                let copy = self.shared.process.cache.as_ref().and_then(|s| s.get(&k));
                if let Some(copy) =
                    copy.filter(|o| crate::cache::policy::is_fresh(o.stored_at, o.fresh_for, now))
                {
                    return self.serve_cached(c, bucket, &copy, "HIT").await;
                }
                // No shared answer: fetch for ourselves, without caching (a
                // stale copy found by the lookup still answers an outage).
                c.s.cache = CacheUse::Bypass;
                return self.forward(c, bucket, key).await;
            }
        };
        let mut out = match self.send_fill_head(c, bucket, &head, true).await {
            Ok(out) => out,
            Err(out) => return out,
        };
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

    /// The head of an answer streamed as its body comes (a fill's, or
    /// chunks from Redis): 200, the object's headers and length, `X-Cache:
    /// HIT`, counted as a hit (and `coalesced`: one that waited on another
    /// request's fetch). `Err`: the client could not take it.
    pub(super) async fn send_fill_head(
        &self,
        c: &mut Client,
        bucket: usize,
        head: &FillHead,
        coalesced: bool,
    ) -> Result<Outcome, Outcome> {
        let wait = self.shared.config.server.idle_timeout;
        let mid = self.shared.bucket_metric[bucket];
        {
            let mut m = self.core.metrics.borrow_mut();
            m.cache(mid, CacheResult::Hit);
            if coalesced {
                m.coalesced(mid);
            }
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
            return Err(out);
        }
        Ok(out)
    }

    /// A waiter that fell behind the fill it streamed (after `sent` body
    /// bytes) asks the replicas for the rest of the same object, as a
    /// broken body is resumed: `Range` from `sent`, `If-Match` its ETag.
    pub(super) async fn resume_waiter(
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
