//! One request, start to end: the phases it runs, in order, in one place.
//!
//! ```text
//! read     connection.rs  a request head within limits (keep-alive, parking)
//! route    route.rs       method, decoded path, /health and /ready, the
//!                         bucket by prefix, the key and forwarded query
//! access   access.rs      client address and rate limits (before routing);
//!                         the bucket's IP filter and JWT (after)
//! authorize authorize.rs  the bucket's policy (OPA, OpenFGA, Rego)
//! image    images.rs      an image variant (parameters, watermarks):
//!                         answered from its cache entry or one transform
//! lookup   cache.rs       the memory tier, then the tiers below it
//!          tiers.rs       (disk, Redis, in cache_layers' order), slices
//!          waiter.rs      (slices.rs), or a fill under way to stream
//! forward  forward.rs     plan the replicas, try them through one
//!                         `upstream::cursor::ReplicaCursor`; attempt.rs
//!                         sends one request to one replica
//! respond  relay.rs       the answer's head and body to the client (copy or
//!                         splice), a broken body resumed (resume.rs), the
//!          fill.rs        cache filled on the way; every head ends in
//!          respond.rs     one writer
//! log      connection.rs  metrics and the access line (`finish`)
//! ```
//!
//! Every phase either hands the request on or answers it ([`Phase`]);
//! nothing after a phase that answered runs, but the log phase always does.

use super::*;

/// What a phase came to: `Ok(value)` hands the request to the next phase;
/// `Err(outcome)` means this phase answered it (a refusal, a local endpoint,
/// a cache hit) and the request goes straight to the log phase.
pub(super) type Phase<T> = Result<T, Outcome>;

impl CoreGeneration {
    /// Runs one parsed request's phases (read before, log after: see
    /// `connection.rs`).
    pub(super) async fn handle(&self, c: &mut Client) -> Outcome {
        self.begin(c);
        let mut path = std::mem::take(&mut c.s.decoded_path);
        let mut key = std::mem::take(&mut c.s.encoded_key);
        let outcome = match self.phases(c, &mut path, &mut key).await {
            Ok(answered) | Err(answered) => answered,
        };
        c.s.decoded_path = path;
        c.s.encoded_key = key;
        outcome
    }

    /// route -> access -> authorize -> image -> lookup -> forward (-> respond).
    async fn phases(&self, c: &mut Client, path: &mut String, key: &mut String) -> Phase<Outcome> {
        self.decode(c, path).await?;
        let span = self.span_start(c);
        let admitted = self.admission(c, path, key).await;
        let refused = admitted.is_err();
        self.span_end(c, span, "access", Vec::new, refused);
        let bucket = admitted?;
        self.image(c, bucket, path, key).await?;
        let span = self.span_start(c);
        let looked_up = self.lookup(c, bucket, key).await;
        let cache = c.s.flags.x_cache;
        self.span_end(
            c,
            span,
            "cache lookup",
            || vec![("yatagarasu.cache", crate::trace::Attr::Str(cache.into()))],
            false,
        );
        looked_up?;
        Ok(self.forward(c, bucket, key).await)
    }

    /// Whether the request is this process's own pre-warming fetch: only
    /// while a task runs (one atomic load otherwise), from a loopback peer,
    /// carrying the process's secret.
    fn is_prewarm(&self, c: &Client) -> bool {
        let tasks = &self.shared.process.prewarm;
        if tasks.running() == 0 || !c.peer.is_loopback() {
            return false;
        }
        let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
        head::find_header(head, crate::prewarm::HEADER).is_some_and(|v| tasks.admits(v))
    }

    /// route -> access -> authorize: who may ask for what; the bucket.
    async fn admission(&self, c: &mut Client, path: &str, key: &mut String) -> Phase<usize> {
        let client = self.admit_client(c).await?;
        let bucket = self.route(c, path, key).await?;
        c.s.routed = Some(bucket);
        self.access(c, client, bucket).await?;
        self.authorize(c, client, bucket, path, key).await?;
        Ok(bucket)
    }

    /// Resets what one request keeps between phases; names the request.
    fn begin(&self, c: &mut Client) {
        c.s.upstream_prepaid = false;
        c.s.flags = Flags::default();
        c.s.prewarm = self.is_prewarm(c);
        c.s.refusal = None;
        c.s.routed = None;
        self.trace_begin(c);
        if c.s.req.request_id.is_empty() {
            let mut id = std::mem::take(&mut c.s.req.request_id);
            self.next_request_id(&mut id);
            c.s.req.request_id = id;
        }
    }
}
