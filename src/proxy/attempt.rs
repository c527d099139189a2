//! Step "attempt": one request to one replica. Builds and signs the upstream
//! request, sends it on a pooled or new connection (a pooled one the peer had
//! closed is retried once on a fresh one), reads the final response head
//! within the replica's timeout, and classifies it: an [`Answer`], or a
//! `Error` (`crate::error`: 5xx, a 403 for broken credentials, any transport failure).

use super::*;
use crate::credentials;

/// Largest S3 error body read to classify a 403.
const ERROR_BODY_MAX: u64 = 8 * 1024;

/// Overrides for a request the proxy makes itself (a resumed body, a
/// slice, an image's original): a GET whose `Range` and `If-Match` (when
/// the ETag is known) replace the client's headers.
#[derive(Clone, Copy)]
pub(super) struct Resume<'a> {
    pub first: u64,
    pub last: u64,
    pub etag: &'a str,
}

impl CoreGeneration {
    /// Sends the request to `rid` and reads its final response head.
    pub(super) async fn attempt(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        resume: Option<Resume<'_>>,
    ) -> Result<Answer, Error<Answer>> {
        let start = self.span_start(c);
        c.s.trace.upstream = self.span_id();
        let span = c.s.trace.upstream;
        let result = self.attempt_untraced(c, ctx, rid, resume).await;
        if start != 0 {
            use crate::trace::Attr;
            let mut attrs = vec![(
                "yatagarasu.replica",
                Attr::Str(self.replica(rid).name.clone()),
            )];
            match &result {
                Ok(a) => attrs.push((
                    "http.response.status_code",
                    Attr::Int(i64::from(a.resp.status)),
                )),
                Err(e) => attrs.push(("yatagarasu.cause", Attr::Str(e.cause.label().into()))),
            }
            if let Some(r) = &resume {
                attrs.push(("yatagarasu.range_first", Attr::Int(r.first as i64)));
            }
            let kind = opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client;
            self.span_end_as(c, span, start, ("upstream", kind), attrs, result.is_err());
        }
        result
    }

    /// [`Self::attempt`], its time to the response head recorded in the
    /// replica's upstream duration histogram.
    pub(super) async fn attempt_timed(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        resume: Option<Resume<'_>>,
    ) -> Result<Answer, Error<Answer>> {
        let t0 = Instant::now();
        let result = self.attempt(c, ctx, rid, resume).await;
        let micros = t0.elapsed().as_micros() as u64;
        self.core
            .metrics
            .borrow_mut()
            .upstream(self.mid(rid), micros);
        result
    }

    /// [`Self::attempt`] without its span.
    async fn attempt_untraced(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        resume: Option<Resume<'_>>,
    ) -> Result<Answer, Error<Answer>> {
        let deadline = Instant::now() + self.replica(rid).timeout;
        self.pay_upstream(c, ctx.bucket, deadline).await?;
        let cell = &self.shared.replicas[rid].credentials;
        if !credentials::wait_for_first(cell, deadline).await {
            return Err(Error::upstream(
                Cause::Credentials,
                format!(
                    "no credentials from {} within the replica timeout",
                    cell.source.describe()
                ),
            ));
        }
        match self.attempt_once(c, ctx, rid, resume, deadline).await {
            // Temporary keys refused: refresh now and try this replica once
            // more before it counts as failed.
            Err(f) if f.cause == Cause::Credentials && f.answer.is_some() && cell.refreshable() => {
                log!(
                    Level::Info,
                    "Replica refused our credentials; refreshing and retrying",
                    replica = self.replica(rid).name,
                    detail = f.detail,
                    request_id = c.s.req.request_id,
                );
                if let Some(a) = f.answer {
                    c.give_response(a.resp);
                }
                let deadline = Instant::now() + self.replica(rid).timeout;
                credentials::refresh_now(cell, deadline).await;
                self.attempt_once(c, ctx, rid, resume, deadline).await
            }
            other => other,
        }
    }

    /// One try of [`Self::attempt`].
    async fn attempt_once(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        resume: Option<Resume<'_>>,
        deadline: Instant,
    ) -> Result<Answer, Error<Answer>> {
        let mut resp = c.take_response();
        let result = self
            .exchange(c, ctx, rid, resume, deadline, &mut resp)
            .await;
        let (conn, head_len) = match result {
            Ok(done) => done,
            Err(f) => {
                c.give_response(resp);
                return Err(f);
            }
        };
        let status = resp.status;
        let answer = Answer {
            rid,
            conn,
            head_len,
            resp,
        };
        match status {
            500.. => {
                c.give_response(answer.resp);
                Err(Error::upstream(
                    Cause::Http(status),
                    format!("HTTP {status} from upstream"),
                ))
            }
            403 => self.check_credentials(answer, deadline).await,
            // A single-part 206 must say where its bytes go (RFC 9110
            // §15.3.7); relayed without it, a client could not place them.
            206 if !answer.resp.multipart && answer.resp.content_range.is_none() => {
                c.give_response(answer.resp);
                Err(Error::upstream(
                    Cause::Malformed,
                    "206 without a Content-Range from upstream",
                ))
            }
            _ => Ok(answer),
        }
    }

    /// Request out, final head in; retries once when a pooled connection
    /// turns out to be closed before any response byte.
    async fn exchange(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        rid: usize,
        resume: Option<Resume<'_>>,
        deadline: Instant,
        resp: &mut Response,
    ) -> Result<(UpConn, usize), Error<Answer>> {
        let head_request = resume.is_none() && c.s.req.method() == Method::Head;
        self.build_request(c, ctx.key, rid, resume)?;
        let mut conn = self.upstream_conn(rid, deadline, false).await?;
        let first =
            upclient::exchange(&mut conn, &mut c.s.wbuf, head_request, deadline, resp).await;
        match first {
            Ok(n) => Ok((conn, n)),
            Err(e) if conn.reused && !e.got_bytes => {
                log!(
                    Level::Debug,
                    "stale pooled connection, retrying",
                    replica = self.replica(rid).name,
                    cause = e.detail
                );
                drop(conn); // its budget slot goes to the fresh one
                self.build_request(c, ctx.key, rid, resume)?;
                let mut conn = self.upstream_conn(rid, deadline, true).await?;
                upclient::exchange(&mut conn, &mut c.s.wbuf, head_request, deadline, resp)
                    .await
                    .map(|n| (conn, n))
                    .map_err(Error::carrying)
            }
            Err(e) => Err(e.carrying()),
        }
    }

    /// Writes the signed upstream request head for `rid` into `c.s.wbuf`.
    fn build_request(
        &self,
        c: &mut Client,
        key: &str,
        rid: usize,
        resume: Option<Resume<'_>>,
    ) -> Result<(), Error<Answer>> {
        let replica = self.replica(rid);
        let method = match c.s.req.method() {
            Method::Head if resume.is_none() => "HEAD",
            _ => "GET",
        };
        let mut target = std::mem::take(&mut c.s.upstream_target);
        replica.object_path(key, &mut target);
        if !c.s.query.is_empty() {
            target.push('?');
            target.push_str(&c.s.query);
        }
        let w = &mut c.s.wbuf;
        w.clear();
        for part in [method, " ", &target, " HTTP/1.1\r\n"] {
            w.extend_from_slice(part.as_bytes());
        }
        head::header(w, "Host", &replica.endpoint.authority);
        match resume {
            None => {
                for (name, value) in &c.s.req.forwarded {
                    head::header(w, name.name(), value);
                }
                if let super::cache::CacheUse::Revalidate(_, copy) = &c.s.cache {
                    head::header(w, "If-None-Match", &copy.etag);
                }
            }
            Some(r) => {
                head::header(w, "Range", &format!("bytes={}-{}", r.first, r.last));
                // A first slice fetch knows no ETag yet.
                if !r.etag.is_empty() {
                    head::header(w, "If-Match", r.etag);
                }
            }
        }
        head::header(w, "X-Request-ID", &c.s.req.request_id);
        if let Some(tp) = self.upstream_traceparent(c, c.s.trace.upstream) {
            head::header(&mut c.s.wbuf, "traceparent", &tp);
        }
        let w = &mut c.s.wbuf;
        let signed = self.sign(rid, method, &replica.endpoint.authority, &target, w);
        w.extend_from_slice(b"\r\n");
        c.s.upstream_target = target;
        signed
    }

    /// A 403 is an answer unless S3's error code says this replica refuses
    /// our credentials (`InvalidAccessKeyId`, `SignatureDoesNotMatch`,
    /// `ExpiredToken`, `InvalidToken`, `TokenRefreshRequired`).
    async fn check_credentials(
        &self,
        mut a: Answer,
        deadline: Instant,
    ) -> Result<Answer, Error<Answer>> {
        let Framing::Length(len) = a.resp.framing() else {
            return Ok(a);
        };
        if len > ERROR_BODY_MAX {
            return Ok(a);
        }
        let want = a.head_len + len as usize;
        while a.conn.buf.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match read_more(&mut a.conn.stream, &mut a.conn.buf, left).await {
                Ok(0) => return Err(Error::upstream(Cause::Truncated, "403 body cut short")),
                Ok(_) => {}
                Err(e) => return Err(Error::upstream(Cause::of_io(&e), e.to_string())),
            }
        }
        match s3::error_code(&a.conn.buf[a.head_len..want]) {
            Some(code) if s3::is_broken_replica_code(code) => {
                let mut f = Error::upstream(Cause::Credentials, format!("HTTP 403 {code}"));
                f.answer = Some(Box::new(a));
                Err(f)
            }
            _ => Ok(a),
        }
    }

    /// A pooled connection to `rid` (unless `fresh`), or a new one within
    /// the worker's upstream budget. Waiting for room until `deadline` in
    /// vain is the proxy's own exhaustion (`local_resources`), not the
    /// replica's failure.
    async fn upstream_conn(
        &self,
        rid: usize,
        deadline: Instant,
        fresh: bool,
    ) -> Result<UpConn, Error<Answer>> {
        let slot = match self.pool.acquire(rid, deadline, fresh).await {
            Ok(Acquired::Pooled(conn)) => return Ok(conn),
            Ok(Acquired::New(slot)) => slot,
            Err(()) => {
                return Err(Error::upstream(
                    Cause::LocalResources,
                    "no upstream connection free before the replica timeout (server.max_upstream_connections)",
                ))
            }
        };
        let r = &self.shared.replicas[rid];
        let left = deadline.saturating_duration_since(Instant::now());
        // Boxed: connecting (DNS answer, TCP, a TLS handshake) is the rare
        // path next to a pooled connection and the largest state in it.
        Box::pin(
            self.pool
                .connect(rid, &r.config.endpoint, r.tls.as_ref(), left, slot),
        )
        .await
        .map_err(|(cause, detail)| Error::upstream(cause, detail))
    }
}
