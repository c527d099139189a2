//! Phase "authorize": a bucket with `authorization` asks its policy engine
//! whether this request may read (`authz`), after authentication and before
//! the cache lookup.
//!
//! - Decisions are remembered per core for `cache_ttl_seconds`, keyed by
//!   everything the engine is asked (allow and deny alike); concurrent
//!   identical questions on one core share one call.
//! - OPA and OpenFGA are called on this core's runtime over its own pooled
//!   keep-alive connections (TLS for `https://`), within `timeout_ms`.
//! - A call that fails (refused, slow, 5xx, an answer that is not one)
//!   follows the fail mode: closed answers 503 with `Retry-After` (the
//!   client did nothing wrong), open allows with a WARN at most once a
//!   second per core. After three failures in a row a core's breaker stops
//!   calling for five seconds, so a dead engine costs no request its
//!   timeout.
//! - Rego runs in process: the policy compiled at load, cloned per core.

use super::session::Phase;
use super::*;
use crate::authz::{self, Verdict};
use crate::config::{Authorization, AuthzEngine};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Largest engine answer read.
const ANSWER_MAX: usize = 64 * 1024;

/// One core's policy state for one generation.
#[derive(Default)]
pub(super) struct Authz {
    cache: RefCell<authz::DecisionCache>,
    /// Per bucket: the breaker of its decision service.
    breakers: RefCell<Vec<Option<Breaker>>>,
    /// Per bucket: this core's copy of its compiled Rego policy.
    rego: RefCell<Vec<Option<regorus::Engine>>>,
    /// Calls under way, by question: identical ones wait for the first.
    inflight: RefCell<std::collections::HashMap<String, Rc<InFlight>>>,
    /// TLS client for `https://` decision services (made on first use).
    tls: RefCell<Option<crate::tls::TlsConnector>>,
    /// When (ms) this core last warned of a decision allowed by fail-open.
    warned_ms: Cell<u64>,
}

/// A decision being fetched; waiters are woken with its result.
#[derive(Default)]
struct InFlight {
    result: RefCell<Option<Result<Verdict, String>>>,
    wakers: RefCell<Vec<Waker>>,
}

impl InFlight {
    fn settle(&self, r: Result<Verdict, String>) {
        *self.result.borrow_mut() = Some(r);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// Waits for an [`InFlight`] decision.
struct Settled(Rc<InFlight>);

impl Future for Settled {
    type Output = Result<Verdict, String>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.0.result.borrow().as_ref() {
            return Poll::Ready(r.clone());
        }
        self.0.wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Settles an in-flight decision as failed if its caller went away first,
/// so the core's waiters never wait forever.
struct SettleOnDrop<'a> {
    authz: &'a Authz,
    key: &'a str,
    flight: Rc<InFlight>,
}

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        if self.flight.result.borrow().is_none() {
            self.flight
                .settle(Err("the deciding request went away".into()));
        }
        self.authz.inflight.borrow_mut().remove(self.key);
    }
}

/// Three failures in a row stop a core calling a decision service for five
/// seconds.
fn breaker() -> Breaker {
    Breaker::new(&crate::config::BreakerSettings {
        failure_threshold: 3,
        success_threshold: 1,
        open_for: Duration::from_secs(5),
        half_open_requests: 1,
    })
}

/// What a request asks a policy about (with its token and claims in the
/// request state).
struct Ask<'a> {
    bucket: usize,
    client: std::net::IpAddr,
    /// The request path, decoded.
    path: &'a str,
    /// The object key, URI-encoded.
    key: &'a str,
}

impl CoreGeneration {
    /// Phase "authorize": `Ok` when the bucket has no policy or its policy
    /// allows; otherwise the 403 (denied) or 503 (no decision, fail mode
    /// closed) is answered here.
    pub(super) async fn authorize(
        &self,
        c: &mut Client,
        client: std::net::IpAddr,
        bucket: usize,
        path: &str,
        key: &str,
    ) -> Phase<()> {
        c.s.authz = None;
        c.s.authz_reason.clear();
        if c.s.prewarm {
            return Ok(());
        }
        let Some(settings) = self.shared.bucket(bucket).authorization.clone() else {
            return Ok(());
        };
        let b = self.shared.bucket(bucket);
        let engine = settings.engine.kind();
        let ask = Ask {
            bucket,
            client,
            path,
            key,
        };
        let Some(question) = self.question(c, &settings, &ask) else {
            // OpenFGA with no user in the token: nothing to ask about.
            return Err(self
                .refused(
                    c,
                    bucket,
                    engine,
                    Verdict::Deny(Some("no user claim".into())),
                )
                .await);
        };
        let now = now_ms();
        let cached = self.authz.cache.borrow_mut().get(&question, now);
        let mid = self.shared.bucket_metric[bucket];
        self.core.metrics.borrow_mut().authz_cache(
            mid,
            if cached.is_some() {
                Lookup::Hit
            } else {
                Lookup::Miss
            },
        );
        let decided = match cached {
            Some(v) => Ok(v),
            None => {
                let t0 = Instant::now();
                let body = self.body(c, &settings, &ask);
                let r = self.decide(&settings, bucket, &question, body).await;
                let micros = t0.elapsed().as_micros() as u64;
                self.core
                    .metrics
                    .borrow_mut()
                    .authz_duration(engine, micros);
                if let Ok(v) = &r {
                    if !settings.cache_ttl.is_zero() {
                        let until = now_ms() + settings.cache_ttl.as_millis() as u64;
                        self.authz
                            .cache
                            .borrow_mut()
                            .put(question, v.clone(), until);
                    }
                }
                r
            }
        };
        match decided {
            Ok(Verdict::Allow) => {
                c.s.authz = Some(Decision::Allow);
                self.core
                    .metrics
                    .borrow_mut()
                    .authz(mid, engine, Decision::Allow);
                Ok(())
            }
            Ok(deny) => Err(self.refused(c, bucket, engine, deny).await),
            Err(why) => {
                // The fail mode decides; a WARN each time it refuses, at
                // most once a second per core when it allows.
                let open = settings.fail_open;
                let decision = if open {
                    Decision::ErrorOpen
                } else {
                    Decision::ErrorClosed
                };
                c.s.authz = Some(decision);
                if !open {
                    c.s.refusal = Some("policy_unavailable");
                }
                self.core.metrics.borrow_mut().authz(mid, engine, decision);
                let (now, last) = (now_ms().max(1), self.authz.warned_ms.get());
                if !open || last == 0 || now.saturating_sub(last) >= 1000 {
                    if open {
                        self.authz.warned_ms.set(now);
                    }
                    let message = match open {
                        true => "Authorization failed; allowing (fail_mode: open)",
                        false => "Authorization failed; refusing with 503 (fail_mode: closed)",
                    };
                    log!(
                        Level::Warn,
                        message,
                        bucket = b.name,
                        engine = engine,
                        error = why,
                        request_id = c.s.req.request_id,
                    );
                }
                if open {
                    return Ok(());
                }
                let body = b"authorization service unavailable, retry\n";
                Err(self
                    .simple_outcome(c, 503, "text/plain", body, &[("Retry-After", "1")])
                    .await)
            }
        }
    }

    /// A 403 for a denied request, its reason logged and kept for the
    /// access line.
    async fn refused(&self, c: &mut Client, bucket: usize, engine: Engine, v: Verdict) -> Outcome {
        let mid = self.shared.bucket_metric[bucket];
        c.s.authz = Some(Decision::Deny);
        c.s.refusal = Some("policy");
        if let Verdict::Deny(Some(reason)) = &v {
            c.s.authz_reason = reason.clone();
        }
        self.core
            .metrics
            .borrow_mut()
            .authz(mid, engine, Decision::Deny);
        log!(
            Level::Info,
            "Request refused by policy",
            bucket = self.shared.bucket(bucket).name,
            engine = engine,
            reason = if c.s.authz_reason.is_empty() {
                "-"
            } else {
                c.s.authz_reason.as_str()
            },
            request_id = c.s.req.request_id,
        );
        self.simple_outcome(c, 403, "text/plain", b"forbidden by policy\n", &[])
            .await
    }

    /// The question, as the decision cache's key: everything the engine's
    /// answer depends on, cheap to build on every request. For OPA and Rego
    /// the input's fields, with the token standing for its claims (the
    /// claims are the verified token's); for OpenFGA the user and object.
    /// `None` when there is no question (OpenFGA without its user claim).
    fn question(&self, c: &Client, settings: &Authorization, ask: &Ask<'_>) -> Option<String> {
        use std::fmt::Write;
        let Ask {
            bucket,
            client,
            path,
            key,
        } = ask;
        let mut q = String::with_capacity(64 + path.len() + c.s.token.len());
        match &settings.engine {
            AuthzEngine::OpenFga { user_claim, .. } => {
                let claims = c.s.claims.as_deref()?;
                let user = authz::openfga_user(claims, user_claim)?;
                let _ = write!(q, "{user}\0{bucket}\0{key}");
            }
            AuthzEngine::Opa { .. } | AuthzEngine::Rego { .. } => {
                let head = c.s.req.method() == Method::Head;
                let _ = write!(q, "{head}\0{bucket}\0{client}\0{path}\0{}", c.s.token);
            }
        }
        Some(q)
    }

    /// What the engine is sent (built on a miss only): OpenFGA's Check body,
    /// or `{"input": ...}` for OPA and Rego.
    fn body(&self, c: &Client, settings: &Authorization, ask: &Ask<'_>) -> Vec<u8> {
        let Ask {
            bucket,
            client,
            path,
            key,
        } = ask;
        let name = &self.shared.bucket(*bucket).name;
        let claims = c.s.claims.as_deref();
        match &settings.engine {
            AuthzEngine::OpenFga {
                model,
                user_claim,
                relation,
                object_prefix,
                ..
            } => {
                let user = claims
                    .and_then(|cl| authz::openfga_user(cl, user_claim))
                    .unwrap_or_default();
                let mut decoded = String::new();
                let _ = router::decode_path(format!("/{key}").as_bytes(), &mut decoded);
                let object = authz::openfga_object(name, &decoded, object_prefix.as_deref());
                authz::openfga_check(&user, relation, &object, model.as_deref())
                    .to_string()
                    .into_bytes()
            }
            AuthzEngine::Opa { .. } | AuthzEngine::Rego { .. } => {
                let method = if c.s.req.method() == Method::Head {
                    "HEAD"
                } else {
                    "GET"
                };
                let input = authz::input(claims, name, path, method, &client.to_string());
                serde_json::json!({ "input": input })
                    .to_string()
                    .into_bytes()
            }
        }
    }

    /// Asks the engine (or joins the same question already asked on this
    /// core).
    async fn decide(
        &self,
        settings: &Authorization,
        bucket: usize,
        question: &str,
        body: Vec<u8>,
    ) -> Result<Verdict, String> {
        if let AuthzEngine::Rego { engine, rule, file } = &settings.engine {
            return self
                .evaluate(bucket, engine, rule, &body)
                .map_err(|e| format!("{file}: {e}"));
        }
        let joined = self.authz.inflight.borrow().get(question).cloned();
        if let Some(flight) = joined {
            return Settled(flight).await;
        }
        let flight = Rc::new(InFlight::default());
        self.authz
            .inflight
            .borrow_mut()
            .insert(question.to_string(), flight.clone());
        let guard = SettleOnDrop {
            authz: &self.authz,
            key: question,
            flight: flight.clone(),
        };
        let r = self.call(settings, bucket, body).await;
        flight.settle(r.clone());
        drop(guard);
        r
    }

    /// Evaluates the bucket's Rego policy on this core's copy of it, for
    /// `body` (`{"input": ...}`).
    fn evaluate(
        &self,
        bucket: usize,
        compiled: &regorus::Engine,
        rule: &str,
        body: &[u8],
    ) -> Result<Verdict, String> {
        let mut all = self.authz.rego.borrow_mut();
        if all.len() <= bucket {
            all.resize_with(bucket + 1, || None);
        }
        let engine = all[bucket].get_or_insert_with(|| compiled.clone());
        let asked: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let input = regorus::Value::from_json_str(&asked["input"].to_string())
            .map_err(|e| e.to_string())?;
        engine.set_input(input);
        let result = engine
            .eval_rule(rule.to_string())
            .map_err(|e| e.to_string())?;
        let json = result.to_json_str().map_err(|e| e.to_string())?;
        let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        Ok(authz::policy_result(&value))
    }

    /// One call to the decision service, through the bucket's breaker.
    async fn call(
        &self,
        settings: &Authorization,
        bucket: usize,
        body: Vec<u8>,
    ) -> Result<Verdict, String> {
        let admit = {
            let mut all = self.authz.breakers.borrow_mut();
            if all.len() <= bucket {
                all.resize_with(bucket + 1, || None);
            }
            all[bucket].get_or_insert_with(breaker).admit(now_ms()).0
        };
        if admit == Admit::Rejected {
            return Err("decision service failing; not called for a while (breaker open)".into());
        }
        let r = self.exchange_json(settings, bucket, body).await;
        if let Some(b) = self.authz.breakers.borrow_mut()[bucket].as_mut() {
            b.record(admit, r.is_ok(), now_ms());
        }
        r
    }

    /// POSTs `body` to the bucket's decision service within its timeout
    /// and reads the verdict.
    async fn exchange_json(
        &self,
        settings: &Authorization,
        bucket: usize,
        body: Vec<u8>,
    ) -> Result<Verdict, String> {
        let (endpoint, target, token) = match &settings.engine {
            AuthzEngine::Opa { endpoint, path } => (endpoint, path.clone(), None),
            AuthzEngine::OpenFga {
                endpoint,
                store,
                token,
                ..
            } => (endpoint, format!("/stores/{store}/check"), token.as_deref()),
            AuthzEngine::Rego { .. } => return Err("not an HTTP engine".into()),
        };
        let deadline = Instant::now() + settings.timeout;
        let call = async {
            let tls = if endpoint.tls {
                Some(self.authz_tls()?)
            } else {
                None
            };
            let pooled = self.authz_pool.take(bucket);
            let mut conn = match pooled {
                Some(c) => c,
                None => self
                    .authz_pool
                    .connect(
                        bucket,
                        endpoint,
                        tls.as_ref(),
                        settings.timeout,
                        crate::upstream::pool::BudgetSlot::unbudgeted(),
                    )
                    .await
                    .map_err(|(cause, detail)| format!("{}: {detail}", cause.label()))?,
            };
            let mut req = Vec::with_capacity(256 + body.len());
            for part in ["POST ", &target, " HTTP/1.1\r\n"] {
                req.extend_from_slice(part.as_bytes());
            }
            head::header(&mut req, "Host", &endpoint.authority);
            head::header(&mut req, "Content-Type", "application/json");
            head::header(&mut req, "Content-Length", &body.len().to_string());
            if let Some(t) = token {
                head::header(&mut req, "Authorization", &format!("Bearer {t}"));
            }
            req.extend_from_slice(b"\r\n");
            req.extend_from_slice(&body);
            let mut resp = Response::default();
            let head_len = upclient::exchange(&mut conn, &mut req, false, deadline, &mut resp)
                .await
                .map_err(|e| format!("{}: {}", e.cause.label(), e.detail))?;
            let Framing::Length(len) = resp.framing() else {
                return Err(format!("HTTP {} without a Content-Length", resp.status));
            };
            if len as usize > ANSWER_MAX {
                return Err(format!("answer of {len} bytes (at most {ANSWER_MAX})"));
            }
            let end = head_len + len as usize;
            while conn.buf.len() < end {
                let left = deadline.saturating_duration_since(Instant::now());
                conn.buf.reserve(end - conn.buf.len());
                match read_more(&mut conn.stream, &mut conn.buf, left).await {
                    Ok(0) => return Err("answer cut short".into()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading the answer: {e}")),
                }
            }
            let answer = conn.buf[head_len..end].to_vec();
            if resp.keep_alive && conn.buf.len() == end {
                conn.buf.clear();
                self.authz_pool.put(bucket, conn);
            }
            if resp.status != 200 {
                return Err(format!("HTTP {}", resp.status));
            }
            match &settings.engine {
                AuthzEngine::OpenFga { .. } => authz::openfga_verdict(&answer),
                _ => authz::opa_verdict(&answer),
            }
        };
        match monoio::time::timeout(settings.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {} ms",
                settings.timeout.as_millis()
            )),
        }
    }

    /// The TLS client for `https://` decision services.
    fn authz_tls(&self) -> Result<crate::tls::TlsConnector, String> {
        let mut tls = self.authz.tls.borrow_mut();
        if let Some(t) = tls.as_ref() {
            return Ok(t.clone());
        }
        let made = crate::tls::connector(None, false)?;
        *tls = Some(made.clone());
        Ok(made)
    }
}
