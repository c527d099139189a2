//! Phase "access": who may ask. Before routing, the client's address (the
//! peer, or behind `server.trusted_proxies` its `X-Forwarded-For`) and the
//! global and per-address rate limits (`admit_client`); after routing, the
//! bucket's IP filter and its JWT (`access`). Each refusal is answered here
//! (400, 403, 401, 429) and ends the request.

use super::session::Phase;
use super::*;

impl CoreGeneration {
    /// Phase "access", first half: the client's address, and the global
    /// and per-address rate limits.
    pub(super) async fn admit_client(&self, c: &mut Client) -> Phase<std::net::IpAddr> {
        let Ok(client) = self.client_ip(c) else {
            log!(
                Level::Info,
                "Request refused: a trusted proxy's X-Forwarded-For names no address",
                x_forwarded_for = c.s.req.forwarded_for,
                request_id = c.s.req.request_id,
            );
            return Err(self
                .simple_outcome(c, 400, "text/plain", b"malformed X-Forwarded-For\n", &[])
                .await);
        };
        if c.s.prewarm {
            // The task paces itself (`cache.warming.rate_limit`).
            return Ok(client);
        }
        match self.limit_client(c, client).await {
            Some(refused) => Err(refused),
            None => Ok(client),
        }
    }

    /// Phase "access", second half: the bucket's IP filter, then its JWT.
    pub(super) async fn access(
        &self,
        c: &mut Client,
        client: std::net::IpAddr,
        bucket: usize,
    ) -> Phase<()> {
        if c.s.prewarm {
            // The operator asked for it through the admin API's guard.
            c.s.subject.clear();
            c.s.subject.push_str("(prewarm)");
            c.s.claims = None;
            c.s.token.clear();
            return Ok(());
        }
        if !self.ip_allowed(c, client, bucket) {
            c.s.refusal = Some("ip_filter");
            return Err(self
                .simple_outcome(c, 403, "text/plain", b"forbidden\n", &[])
                .await);
        }
        match self.authenticate(c, bucket).await {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
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

    /// The bucket's IP filter on the client's address (the peer, or behind
    /// `server.trusted_proxies` its `X-Forwarded-For`).
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

    /// A bucket with `auth.enabled` needs a valid JWT whose claims hold,
    /// before any cache lookup or upstream request.
    async fn authenticate(&self, c: &mut Client, bucket: usize) -> Option<Outcome> {
        c.s.subject.clear();
        c.s.claims = None;
        c.s.token.clear();
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
        let fetched = self.jwks.borrow_mut().get(&published.keys);
        let unknown_kid = || published.want_refresh();
        c.s.token.clear();
        let verdict = match crate::access::jwt::find_token(&jwt.sources, &header, query) {
            None => Err(crate::access::jwt::Refusal::Missing),
            Some(token) => {
                // Kept only where a policy's decision cache needs it.
                if b.authorization.is_some() {
                    c.s.token.push_str(token);
                }
                self.verify_token(jwt, &fetched, &unknown_kid, token)
            }
        };
        let mid = self.shared.bucket_metric[bucket];
        let refusal = match verdict {
            Ok(ok) => {
                c.s.subject = ok.sub;
                c.s.claims = Some(ok.claims);
                self.core.metrics.borrow_mut().auth(mid, AuthResult::Ok);
                return None;
            }
            Err(r) => r,
        };
        self.core.metrics.borrow_mut().auth(mid, refusal.result());
        c.s.refusal = Some(refusal.result().label());
        log!(
            Level::Info,
            "Request refused by authentication",
            bucket = b.name,
            result = refusal.result().label(),
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
}
