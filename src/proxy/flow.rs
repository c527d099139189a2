//! The request flow, top to bottom: `handle` routes a request, checks the
//! client's access (rate limits, the bucket's IP filter, its JWT), looks it
//! up in the cache (`cache.rs`), plans its replicas, tries them in order
//! and relays the first answer; when nothing answers, `all_failed` (502) or
//! `all_open` (503 + `Retry-After`) says so.

use super::*;

/// How trying a request's replicas ended. Moved once per request; boxing
/// the answer would cost an allocation on every request.
#[allow(clippy::large_enum_variant)]
enum Tried {
    /// A replica answered; `next` is where the plan continues (for resume).
    Answered { answer: Answer, next: usize },
    /// Every breaker was open: nothing was tried.
    AllOpen,
    /// Every replica tried failed; the last one and why.
    AllFailed { rid: usize, failure: Failure },
}

impl WorkerGeneration {
    /// Serves one parsed request.
    pub(super) async fn handle(&self, c: &mut Client) -> Outcome {
        c.s.upstream_prepaid = false;
        if c.s.req.request_id.is_empty() {
            let mut id = std::mem::take(&mut c.s.req.request_id);
            self.next_request_id(&mut id);
            c.s.req.request_id = id;
        }
        if c.s.req.method() == Method::Other {
            return self.method_not_allowed(c).await;
        }
        let mut path = std::mem::take(&mut c.s.path);
        let outcome = match router::decode_path(&c.s.req.target, &mut path) {
            Err(e) => self.route_error(c, e).await,
            Ok(()) if path == "/health" => {
                self.simple_outcome(c, 200, "application/json", b"{\"status\":\"ok\"}", &[])
                    .await
            }
            Ok(()) if path == "/ready" => {
                // Status only: bucket and replica names and credential state
                // are on the metrics listener's `/ready`.
                let (ready, _) = readiness(&self.shared);
                let (status, body): (u16, &[u8]) = match ready {
                    true => (200, b"{\"status\":\"ready\"}"),
                    false => (503, b"{\"status\":\"unavailable\"}"),
                };
                self.simple_outcome(c, status, "application/json", body, &[])
                    .await
            }
            Ok(()) => self.route_and_proxy(c, &path).await,
        };
        c.s.path = path;
        outcome
    }

    /// A read-only proxy: 405. A body it will not read means the connection
    /// cannot carry another request.
    async fn method_not_allowed(&self, c: &mut Client) -> Outcome {
        if c.s.req.has_body {
            c.s.req.keep_alive = false;
        }
        self.simple_outcome(
            c,
            405,
            "text/plain",
            b"only GET and HEAD are supported",
            &[("Allow", "GET, HEAD")],
        )
        .await
    }

    /// Step "route": decoded path -> bucket and key; the forwarded query.
    async fn route_and_proxy(&self, c: &mut Client, path: &str) -> Outcome {
        let Ok(client) = self.client_ip(c) else {
            log!(
                Level::Info,
                "Request refused: a trusted proxy's X-Forwarded-For names no address",
                x_forwarded_for = c.s.req.forwarded_for,
                request_id = c.s.req.request_id,
            );
            return self
                .simple_outcome(c, 400, "text/plain", b"malformed X-Forwarded-For\n", &[])
                .await;
        };
        if let Some(refused) = self.limit_client(c, client).await {
            return refused;
        }
        let (bucket, key) = match self.shared.router.route(path) {
            Ok(found) => found,
            Err(e) => return self.route_error(c, e).await,
        };
        if !self.ip_allowed(c, client, bucket) {
            return self
                .simple_outcome(c, 403, "text/plain", b"forbidden\n", &[])
                .await;
        }
        if let Some(refused) = self.authenticate(c, bucket).await {
            return refused;
        }
        c.s.query.clear();
        if let Err(e) = router::upstream_query(&c.s.req.target, &mut c.s.query) {
            return self.route_error(c, e).await;
        }
        let mut encoded = std::mem::take(&mut c.s.upath);
        encoded.clear();
        router::encode_key(key, &mut encoded);
        let mut promoted = None;
        if self.shared.process.disk.is_some() {
            if let Some(o) = self.serve_from_disk(c, bucket, &encoded).await {
                c.s.upath = encoded;
                return o;
            }
            promoted = self.promote_from_disk(c, bucket, &encoded).await;
        }
        if self.wants_slices(c, bucket) {
            if let Some(o) = Box::pin(self.serve_sliced(c, bucket, &encoded)).await {
                c.s.upath = encoded;
                return o;
            }
        }
        let o = match self.cache_lookup(c, bucket, &encoded, promoted) {
            Ok(Some(copy)) => self.serve_cached(c, bucket, &copy, "HIT").await,
            Ok(None) => self.proxy(c, bucket, &encoded).await,
            Err(fill) => Box::pin(self.serve_waiter(c, bucket, fill, &encoded)).await,
        };
        c.s.upath = encoded;
        o
    }

    /// The client's address: the peer, or behind `server.trusted_proxies`
    /// its `X-Forwarded-For` (see `access::ip`). One rule for the IP filter
    /// and the per-address rate limit; an entry that cannot be read fails
    /// closed.
    pub(super) fn client_ip(
        &self,
        c: &Client,
    ) -> Result<std::net::IpAddr, crate::access::ip::BadForwardedFor> {
        let xff = (!c.s.req.forwarded_for.is_empty()).then_some(c.s.req.forwarded_for.as_str());
        let trusted = &self.shared.config.server.trusted_proxies;
        crate::access::ip::client_address(c.peer, xff, trusted)
    }

    /// Step "access": the bucket's IP filter on the client's address (the
    /// peer, or behind `server.trusted_proxies` its `X-Forwarded-For`).
    fn ip_allowed(&self, c: &Client, client: std::net::IpAddr, bucket: usize) -> bool {
        let b = self.shared.bucket(bucket);
        if b.allowlist.is_empty() && b.blocklist.is_empty() {
            return true;
        }
        if crate::access::ip::allowed(client, &b.allowlist, &b.blocklist) {
            return true;
        }
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().ip_filtered(mid);
        log!(
            Level::Info,
            "Request refused by the bucket's IP filter",
            bucket = b.name,
            client = client,
            request_id = c.s.req.request_id,
        );
        false
    }

    /// Step "authenticate": a bucket with `auth.enabled` needs a valid JWT
    /// whose claims hold, before any cache lookup or upstream request.
    async fn authenticate(&self, c: &mut Client, bucket: usize) -> Option<Outcome> {
        c.s.subject.clear();
        let b = self.shared.bucket(bucket);
        // The bucket's own settings (`auth.jwt`), else the top-level ones.
        let jwt = b
            .jwt
            .as_ref()
            .or(self.shared.config.jwt.as_ref())
            .filter(|_| b.auth)?;
        // This request's head only: pipelined bytes after it are another's.
        let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
        let query =
            c.s.req
                .target
                .iter()
                .position(|&x| x == b'?')
                .and_then(|q| std::str::from_utf8(&c.s.req.target[q + 1..]).ok())
                .unwrap_or("");
        let header = |name: &str| head::find_header(head, name);
        let published = &self.shared.process.jwks;
        let fetched = {
            let mut mine = self.jwks.borrow_mut();
            let v = published.version();
            if mine.0 != v {
                *mine = (v, published.keys());
            }
            mine.1.clone()
        };
        let unknown_kid = || published.want_refresh();
        let verdict = match crate::access::jwt::find_token(&jwt.sources, &header, query) {
            None => Err(crate::access::jwt::Refusal::Missing),
            Some(token) => self.verify_token(jwt, &fetched, &unknown_kid, token),
        };
        let mid = self.shared.bucket_metric[bucket];
        let refusal = match verdict {
            Ok(ok) => {
                c.s.subject = ok.sub;
                self.core.metrics.borrow_mut().auth(mid, "ok");
                return None;
            }
            Err(r) => r,
        };
        self.core.metrics.borrow_mut().auth(mid, refusal.label());
        log!(
            Level::Info,
            "Request refused by authentication",
            bucket = b.name,
            result = refusal.label(),
            reason = format_args!("{refusal:?}"),
            request_id = c.s.req.request_id,
        );
        use crate::access::jwt::Refusal;
        let outcome = match refusal {
            Refusal::Forbidden(_) => {
                self.simple_outcome(c, 403, "text/plain", b"forbidden\n", &[])
                    .await
            }
            Refusal::Missing => {
                let www = [("WWW-Authenticate", "Bearer realm=\"yatagarasu\"")];
                self.simple_outcome(c, 401, "text/plain", b"unauthorized\n", &www)
                    .await
            }
            Refusal::Invalid(_) | Refusal::Expired => {
                let www = [(
                    "WWW-Authenticate",
                    "Bearer realm=\"yatagarasu\", error=\"invalid_token\"",
                )];
                self.simple_outcome(c, 401, "text/plain", b"unauthorized\n", &www)
                    .await
            }
        };
        Some(outcome)
    }

    /// A token verified before (and not yet past its `exp` plus the
    /// leeway) is not verified again; otherwise `access::jwt::authorize`.
    fn verify_token(
        &self,
        jwt: &crate::access::jwt::JwtSettings,
        fetched: &crate::access::jwks::KeyMap,
        unknown_kid: &dyn Fn(),
        token: &str,
    ) -> Result<crate::access::jwt::Authorized, crate::access::jwt::Refusal> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Remembered with the settings that verified it: a token good for
        // one bucket's key is never taken for another bucket's.
        let by = jwt as *const crate::access::jwt::JwtSettings as usize;
        let mut verified = self.verified.borrow_mut();
        if let Some((seen_by, ok)) = verified.get(token) {
            if *seen_by == by && now <= ok.exp.saturating_add(jwt.leeway) {
                return Ok(ok.clone());
            }
        }
        let ok = crate::access::jwt::authorize(jwt, fetched, unknown_kid, token)?;
        verified.insert(token.to_string(), (by, ok.clone()));
        Ok(ok)
    }

    async fn route_error(&self, c: &mut Client, e: RouteError) -> Outcome {
        let (status, body) = match e {
            RouteError::BadPath(why) => (400, why.to_string()),
            RouteError::NoBucket => (404, "no bucket is configured for this path".into()),
            RouteError::NoKey => (404, "no object key in path".into()),
            RouteError::BadQuery(name) => (
                400,
                format!("query parameter '{name}' is not supported by this read-only proxy"),
            ),
        };
        self.simple_outcome(c, status, "text/plain", body.as_bytes(), &[])
            .await
    }

    /// Steps "plan", "try replicas", then "relay" or the error answers.
    pub(super) async fn proxy(&self, c: &mut Client, bucket: usize, key: &str) -> Outcome {
        if let Some(refused) = self.limit_upstream(c, bucket).await {
            return refused;
        }
        let mut order_buf = [0usize; crate::config::MAX_REPLICAS];
        let order = self.plan(bucket, &mut order_buf);
        let ctx = RequestCtx { bucket, key, order };
        let tried = match self.try_replicas(c, &ctx).await {
            Tried::Answered { answer, next } => match self.confirmed_copy(c, &answer) {
                Some(confirmed) => {
                    // A 304: nothing more to come.
                    self.record_body_whole(answer.rid);
                    let copy = self.refresh_copy(c, bucket, answer, confirmed);
                    return self.serve_cached(c, bucket, &copy, "REVALIDATED").await;
                }
                None => Tried::Answered { answer, next },
            },
            other => other,
        };
        let failed = !matches!(tried, Tried::Answered { .. });
        if failed {
            // No answer to share: the fill leaves the table before the error
            // or stale answer goes out, so the client's next request leads
            // its own instead of joining one already lost.
            self.end_fill(c);
        }
        if let Some(copy) = self.settle(c, bucket, key, failed) {
            // Stale-if-error: an expired copy rather than a 502 or 503.
            return self.serve_cached(c, bucket, &copy, "STALE").await;
        }
        match tried {
            Tried::Answered { answer, next } => self.relay(c, &ctx, answer, next).await,
            Tried::AllOpen => self.all_open(c, bucket).await,
            Tried::AllFailed { rid, failure } => self.all_failed(c, &ctx, rid, failure).await,
        }
    }

    /// Step "plan": the bucket's replicas in the order to try them (global
    /// replica ids, written into `buf`).
    pub(super) fn plan<'b>(&self, bucket: usize, buf: &'b mut [usize]) -> &'b [usize] {
        let now = now_ms();
        let ids = &self.shared.bucket_replicas[bucket];
        let mut plan = Plan::default();
        self.selectors.borrow_mut()[bucket].plan(|i| self.usable(ids[i], now), &mut plan);
        for (slot, &i) in buf.iter_mut().zip(plan.as_slice()) {
            *slot = ids[i as usize];
        }
        &buf[..plan.as_slice().len()]
    }

    /// Step "try replicas": each admitted replica in plan order until one
    /// answers. 5xx answers are judged once the outcome is known (see
    /// `upstream::blame`); every other failure is recorded at once.
    async fn try_replicas(&self, c: &mut Client, ctx: &RequestCtx<'_>) -> Tried {
        let mut answered_5xx: Vec<(usize, Admit, Cause)> = Vec::new();
        let mut last: Option<(usize, Failure)> = None;
        for (pos, &rid) in ctx.order.iter().enumerate() {
            let admit = self.admit(rid, now_ms());
            if admit == Admit::Rejected {
                continue;
            }
            if let Some((prev, _)) = &last {
                let (from, to) = (self.mid(*prev), self.mid(rid));
                self.core.metrics.borrow_mut().failover(from, to);
            }
            let t0 = Instant::now();
            let result = self.attempt(c, ctx, rid, None).await;
            let micros = t0.elapsed().as_micros() as u64;
            self.core
                .metrics
                .borrow_mut()
                .upstream(self.mid(rid), micros);
            match result {
                Ok(answer) => {
                    self.record_head(rid, admit);
                    self.judge_5xx(&answered_5xx, true);
                    return Tried::Answered {
                        answer,
                        next: pos + 1,
                    };
                }
                Err(f) => {
                    if f.cause.is_http_status() {
                        answered_5xx.push((rid, admit, f.cause));
                    } else {
                        self.record_failure(rid, admit, f.cause);
                    }
                    self.log_failover(c, ctx, rid, &ctx.order[pos + 1..], &f);
                    last = Some((rid, f));
                }
            }
        }
        self.judge_5xx(&answered_5xx, false);
        match last {
            Some((rid, failure)) => Tried::AllFailed { rid, failure },
            None => Tried::AllOpen,
        }
    }

    /// Logs "Replica 'a' failed, trying 'b'" when a usable replica is left.
    fn log_failover(
        &self,
        c: &Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        rest: &[usize],
        f: &Failure,
    ) {
        if f.cause.is_local() {
            return; // logged once a second by `overloaded`, or a 429
        }
        let Some(next) = rest.iter().copied().find(|&n| self.usable(n, now_ms())) else {
            return;
        };
        log!(
            Level::Warn,
            &format!(
                "Replica '{}' failed, trying '{}'",
                self.replica(rid).name,
                self.replica(next).name
            ),
            bucket = self.shared.bucket(ctx.bucket).name,
            request_id = c.s.req.request_id,
            cause = format_args!("{}: {}", f.cause.label(), f.detail),
        );
    }

    /// Every replica tried failed: 502 naming the bucket, or S3's own 403
    /// when every replica refused the credentials.
    async fn all_failed(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        failure: Failure,
    ) -> Outcome {
        let bucket_name = &self.shared.bucket(ctx.bucket).name;
        if failure.cause == Cause::LocalResources {
            return self.overloaded(c, bucket_name, &failure).await;
        }
        if failure.cause == Cause::RateLimited {
            let extra = [("Retry-After", "1")];
            return self
                .simple_outcome(c, 429, "text/plain", b"too many requests\n", &extra)
                .await;
        }
        log!(
            Level::Error,
            "All replicas failed",
            bucket = bucket_name,
            request_id = c.s.req.request_id,
            last_replica = self.replica(rid).name,
            cause = format_args!("{}: {}", failure.cause.label(), failure.detail),
        );
        if let Some(captured) = failure.captured {
            return self.relay(c, ctx, *captured, ctx.order.len()).await;
        }
        let body = format!("bucket '{bucket_name}': all replicas failed\n");
        self.simple_outcome(c, 502, "text/plain", body.as_bytes(), &[])
            .await
    }

    /// The proxy ran out of its own resources (file descriptors) reaching
    /// the replicas: 503 with `Retry-After: 1`, the breakers untouched, one
    /// WARN a second per worker at most (a flood must not flood the log).
    async fn overloaded(&self, c: &mut Client, bucket_name: &str, failure: &Failure) -> Outcome {
        let (now, last) = (now_ms().max(1), self.core.overload_logged.get());
        if last == 0 || now.saturating_sub(last) >= 1000 {
            self.core.overload_logged.set(now);
            log!(
                Level::Warn,
                "Out of local resources reaching the replicas; answering 503 (raise the file-descriptor limit or lower server.max_connections)",
                bucket = bucket_name,
                request_id = c.s.req.request_id,
                cause = failure.detail,
            );
        }
        let body = format!("bucket '{bucket_name}': proxy overloaded, retry\n");
        self.simple_outcome(
            c,
            503,
            "text/plain",
            body.as_bytes(),
            &[("Retry-After", "1")],
        )
        .await
    }

    /// Every breaker of the bucket is open: 503 with `Retry-After`.
    async fn all_open(&self, c: &mut Client, bucket: usize) -> Outcome {
        let wait_ms = self.shared.bucket_replicas[bucket]
            .iter()
            .map(|&rid| {
                let p = self.shared.replicas[rid].breaker.load();
                if p.state == State::Open {
                    p.open_until.saturating_sub(now_ms())
                } else {
                    1000
                }
            })
            .min()
            .unwrap_or(1000);
        let secs = itoa(wait_ms.div_ceil(1000).max(1));
        let bucket_name = &self.shared.bucket(bucket).name;
        log!(
            Level::Error,
            "No replica available: every circuit breaker is open",
            bucket = bucket_name,
            request_id = c.s.req.request_id,
            retry_after = secs,
        );
        let body =
            format!("bucket '{bucket_name}': no replica available (all circuit breakers open)\n");
        let extra = [("Retry-After", secs.as_str())];
        self.simple_outcome(c, 503, "text/plain", body.as_bytes(), &extra)
            .await
    }
}
