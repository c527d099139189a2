//! Phase "route": the request's method and path decide where it goes. A
//! method other than GET or HEAD is refused (405); the path is decoded
//! (`router::decode_path`); `/health` and `/ready` are answered here; any
//! other path names a bucket by its prefix, the object key (URI-encoded for
//! S3) and the query forwarded upstream, or is answered 400 or 404.

use super::session::Phase;
use super::*;

impl CoreGeneration {
    /// Phase "route", first half: the decoded path (into `path`), the
    /// admin API, the method, and the proxy's own endpoints.
    pub(super) async fn decode(&self, c: &mut Client, path: &mut String) -> Phase<()> {
        if let Err(e) = router::decode_path(&c.s.req.target, path) {
            return Err(self.route_error(c, e).await);
        }
        // The admin API takes POST too.
        self.admin(c, path).await?;
        if c.s.req.method() == Method::Other {
            return Err(self.method_not_allowed(c).await);
        }
        match path.as_str() {
            "/health" => Err(self
                .simple_outcome(c, 200, "application/json", b"{\"status\":\"ok\"}", &[])
                .await),
            "/ready" => {
                // Status only: bucket and replica names and credential state
                // are on the metrics listener's `/ready`.
                let (ready, _) = readiness(&self.shared);
                let (status, body): (u16, &[u8]) = match ready {
                    true => (200, b"{\"status\":\"ready\"}"),
                    false => (503, b"{\"status\":\"unavailable\"}"),
                };
                Err(self
                    .simple_outcome(c, status, "application/json", body, &[])
                    .await)
            }
            _ => Ok(()),
        }
    }

    /// The admin API on the main port too (where the other system serves
    /// it), when `admin.main_port` is on and no bucket routes the path:
    /// answered on the blocking pool, so a reload, a purge or a stats scan
    /// never runs on a core. The metrics listener serves the same API.
    pub(super) async fn admin(&self, c: &mut Client, path: &str) -> Phase<()> {
        if !path.starts_with("/admin/") {
            return Ok(());
        }
        // Only where the operator asked for it (`admin.main_port`; its
        // guards are checked at load), and never over a bucket's path.
        if !self.shared.config.admin_main_port || self.shared.router.route(path).is_ok() {
            return Ok(());
        }
        let process = self.shared.process.clone();
        let method = c.s.req.method_text.clone();
        let target = String::from_utf8_lossy(&c.s.req.target).into_owned();
        let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
        let authorization = head::find_header(head, "authorization").map(str::to_string);
        let body = self.admin_body(c).await?;
        let answered = monoio::spawn_blocking(move || {
            crate::server::admin::handle(
                &process,
                &method,
                &target,
                authorization.as_deref(),
                &body,
            )
        })
        .await;
        let (status, ctype, body) = answered
            .unwrap_or_else(|_| (500, "text/plain", "the admin request failed\n".to_string()));
        Err(self
            .simple_outcome(c, status, ctype, body.as_bytes(), &[])
            .await)
    }

    /// An admin request's body (pre-warming's JSON), by its Content-Length,
    /// at most 64 KiB. The connection closes after the answer (a request
    /// with a body always does), so nothing is left to frame.
    async fn admin_body(&self, c: &mut Client) -> Phase<Vec<u8>> {
        const MAX: usize = 64 * 1024;
        if !c.s.req.has_body {
            return Ok(Vec::new());
        }
        let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
        let Some(len) =
            head::find_header(head, "content-length").and_then(|v| v.trim().parse::<usize>().ok())
        else {
            return Err(self
                .simple_outcome(
                    c,
                    411,
                    "text/plain",
                    b"admin requests need a Content-Length\n",
                    &[],
                )
                .await);
        };
        if len > MAX {
            return Err(self
                .simple_outcome(c, 413, "text/plain", b"request body too large\n", &[])
                .await);
        }
        let mut body = Vec::with_capacity(len);
        let have = c.s.rbuf.get(c.s.req.head_len..).unwrap_or_default();
        body.extend_from_slice(&have[..have.len().min(len)]);
        let deadline = std::time::Instant::now() + self.shared.config.server.request_head_timeout;
        while body.len() < len {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match read_more(&mut c.stream, &mut body, left).await {
                Ok(n) if n > 0 => {}
                _ => {
                    return Err(self
                        .simple_outcome(c, 400, "text/plain", b"request body cut short\n", &[])
                        .await)
                }
            }
        }
        Ok(body)
    }

    /// Phase "route", second half: the decoded `path` -> its bucket; the
    /// object key, URI-encoded for S3, into `key`; the forwarded query into
    /// the request state.
    pub(super) async fn route(&self, c: &mut Client, path: &str, key: &mut String) -> Phase<usize> {
        let (bucket, decoded) = match self.shared.router.route(path) {
            Ok(found) => found,
            Err(e) => return Err(self.route_error(c, e).await),
        };
        c.s.query.clear();
        if let Err(e) = router::upstream_query(&c.s.req.target, &mut c.s.query) {
            return Err(self.route_error(c, e).await);
        }
        key.clear();
        router::encode_key(decoded, key);
        Ok(bucket)
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
}
