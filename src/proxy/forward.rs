//! Phase "forward": a request the cache did not answer goes to its bucket's
//! replicas. `forward` plans them (priority, weight, breakers), tries them
//! in order through one `ReplicaCursor` and hands the first answer to the
//! relay; when nothing answers, `all_failed` (502) or `all_open` (503 +
//! `Retry-After`) says so, or an expired copy does (stale-if-error).

use super::*;

/// How trying a request's replicas ended. Moved once per request; boxing
/// the answer would cost an allocation on every request.
#[allow(clippy::large_enum_variant)]
enum Tried<'a> {
    /// A replica answered; the cursor goes on where the plan continues
    /// (for a body that breaks and is resumed).
    Answered { answer: Answer, cursor: Cursor<'a> },
    /// Every breaker was open: nothing was tried.
    AllOpen,
    /// Every replica tried failed; the last one and why.
    AllFailed { rid: usize, failure: Error<Answer> },
}

impl CoreGeneration {
    /// Phase "forward": plan, try replicas, then "relay" or the error answers.
    pub(super) async fn forward(&self, c: &mut Client, bucket: usize, key: &str) -> Outcome {
        if let Some(refused) = self.limit_upstream(c, bucket).await {
            return refused;
        }
        c.s.fleet_hold = None;
        c.s.fleet_published.set(false);
        // Only with a Redis tier: the boxed future is not paid for otherwise.
        if c.s.leading.is_some() && self.shared.process.redis.is_some() {
            if let Some(served) = Box::pin(self.fleet_lead(c, bucket, key)).await {
                return served;
            }
        }
        let mut order_buf = [0usize; crate::config::MAX_REPLICAS];
        let order = self.plan(bucket, &mut order_buf);
        let ctx = RequestCtx { bucket, key, order };
        let failed = match self.try_replicas(c, &ctx).await {
            Tried::Answered { answer, mut cursor } => {
                let Some(confirmed) = self.confirmed_copy(c, &answer) else {
                    self.settle(c, bucket, key, false);
                    let out = self.relay(c, &ctx, answer, &mut cursor).await;
                    c.s.flags.failovers = cursor.failovers();
                    self.fill_span_end(c, out.bytes, !out.abort);
                    self.fleet_release(c).await;
                    return out;
                };
                // A 304: nothing more to come.
                cursor.body_whole();
                let copy = self.refresh_copy(c, bucket, answer, confirmed);
                return self.serve_cached(c, bucket, &copy, "REVALIDATED").await;
            }
            Tried::AllOpen => None,
            Tried::AllFailed { rid, failure } => Some((rid, failure)),
        };
        // No answer to share: the fill leaves the table before the error or
        // stale answer goes out, so the client's next request leads its own
        // instead of joining one already lost.
        self.end_fill(c);
        if let Some(copy) = self.settle(c, bucket, key, true) {
            // Stale-if-error: an expired copy rather than a 502 or 503.
            return self.serve_cached(c, bucket, &copy, "STALE").await;
        }
        match failed {
            Some((rid, failure)) => self.all_failed(c, &ctx, rid, failure).await,
            None => self.all_open(c, bucket).await,
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
    /// answers (`upstream::cursor` records or blames each attempt).
    async fn try_replicas<'a>(&'a self, c: &mut Client, ctx: &RequestCtx<'a>) -> Tried<'a> {
        let mut cursor = Cursor::new(self, ctx.order);
        let mut last: Option<(usize, Error<Answer>)> = None;
        while let Some(rid) = cursor.next_replica() {
            let result = self.attempt_timed(c, ctx, rid, None).await;
            match result {
                Ok(answer) => {
                    cursor.answered_head();
                    return Tried::Answered { answer, cursor };
                }
                Err(f) => {
                    c.s.flags.cause = f.cause.label();
                    cursor.failed(f.cause);
                    self.log_failover(c, ctx, rid, cursor.rest(), &f);
                    last = Some((rid, f));
                }
            }
        }
        c.s.flags.failovers = cursor.failovers();
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
        f: &Error<Answer>,
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
    pub(super) async fn all_failed(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        failure: Error<Answer>,
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
        if let Some(captured) = failure.answer {
            // Relayed as it is: no replica is left to resume it from, and
            // its breaker already counted the failure.
            let mut none = Cursor::new(self, &[]);
            return self.relay(c, ctx, *captured, &mut none).await;
        }
        let body = format!("bucket '{bucket_name}': all replicas failed\n");
        self.simple_outcome(c, 502, "text/plain", body.as_bytes(), &[])
            .await
    }

    /// The proxy ran out of its own resources (file descriptors) reaching
    /// the replicas: 503 with `Retry-After: 1`, the breakers untouched, one
    /// WARN a second per worker at most (a flood must not flood the log).
    async fn overloaded(
        &self,
        c: &mut Client,
        bucket_name: &str,
        failure: &Error<Answer>,
    ) -> Outcome {
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
    pub(super) async fn all_open(&self, c: &mut Client, bucket: usize) -> Outcome {
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
