//! Step "limits": rate limits before a request costs anything. Client limits
//! (`server.rate_limit`: global and per address) run right after routing; the
//! bucket's upstream limit (`s3.rate_limit`, an S3 bill guard) runs only when
//! a request is about to go upstream, so cache hits never count. Excess gets
//! 429 with `Retry-After`. Each worker holds its share of every limit
//! (`access::rate`); a `scope: fleet` limit is one allowance in Redis for
//! every instance (`cache::redis::limit`), the share its fallback.

use super::*;
use crate::access::rate::{PerAddress, TokenBucket};
use crate::config::Rate;

/// Addresses tracked per worker for `per_ip` (least recently seen dropped).
const PER_IP_ADDRESSES: usize = 65_536;

/// One worker's token buckets for one configuration generation.
pub(super) struct Limiters {
    global: Option<TokenBucket>,
    per_ip: Option<PerAddress>,
    /// By bucket index.
    upstream: Vec<Option<TokenBucket>>,
}

/// This worker's share of a process-wide rate.
fn share(r: Rate, workers: usize) -> (f64, f64) {
    let w = workers.max(1) as f64;
    (r.per_second / w, (r.burst / w).max(1.0))
}

impl Limiters {
    pub(super) fn new(config: &crate::config::Config) -> Limiters {
        let w = config.server.workers;
        let now = now_ms();
        let bucket = |r: Rate| {
            let (rate, burst) = share(r, w);
            TokenBucket::new(rate, burst, now)
        };
        let limits = &config.server.rate_limit;
        Limiters {
            global: limits.global.map(bucket),
            per_ip: limits.per_ip.map(|r| {
                let (rate, burst) = share(r, w);
                PerAddress::new(rate, burst, PER_IP_ADDRESSES)
            }),
            upstream: config
                .buckets
                .iter()
                .map(|b| b.upstream_rate.map(bucket))
                .collect(),
        }
    }
}

impl CoreGeneration {
    /// Client limits: `Some(outcome)` (a 429) when the request is refused.
    pub(super) async fn limit_client(
        &self,
        c: &mut Client,
        client: std::net::IpAddr,
    ) -> Option<Outcome> {
        let limits = self.shared.config.server.rate_limit;
        if let Some(r) = limits.per_ip {
            let local =
                |l: &mut Limiters, now| l.per_ip.as_mut().map_or(Ok(()), |t| t.take(client, now));
            if let Err(wait) = self
                .limit_verdict(r, || format!("ip:{client}"), local)
                .await
            {
                return Some(self.too_many(c, LimitScope::PerIp, wait).await);
            }
        }
        if let Some(r) = limits.global {
            let local = |l: &mut Limiters, now| l.global.as_mut().map_or(Ok(()), |g| g.take(now));
            if let Err(wait) = self.limit_verdict(r, || "global".into(), local).await {
                return Some(self.too_many(c, LimitScope::Global, wait).await);
            }
        }
        None
    }

    /// One limit's verdict (`Err`: the milliseconds until a request would
    /// be admitted): the fleet's, for a `scope: fleet` limit Redis answers
    /// for; otherwise this core's share of it (`local`), which is also the
    /// fallback when Redis cannot answer.
    async fn limit_verdict(
        &self,
        r: Rate,
        name: impl FnOnce() -> String,
        local: impl FnOnce(&mut Limiters, u64) -> Result<(), u64>,
    ) -> Result<(), u64> {
        if r.fleet {
            if let Some(verdict) = self.fleet(&name(), r).await {
                return verdict;
            }
        }
        local(&mut self.limits.borrow_mut(), now_ms())
    }

    /// The fleet's verdict on limit `name`, or `None` when Redis cannot
    /// give one (a WARN at most once per 10 s per core: the instance then
    /// limits alone).
    async fn fleet(&self, name: &str, r: Rate) -> Option<Result<(), u64>> {
        use crate::cache::redis::limit::Taken;
        let (Some(tier), Some(reader)) = (&self.shared.process.redis, &self.core.redis) else {
            return None;
        };
        match reader.take(tier, name, r.per_second, r.burst).await {
            Ok(Taken::Yes) => Some(Ok(())),
            Ok(Taken::Wait(ms)) => Some(Err(ms)),
            Err(e) => {
                let now = now_ms().max(1);
                let last = self.core.fleet_limit_warned.get();
                if last == 0 || now.saturating_sub(last) >= 10_000 {
                    self.core.fleet_limit_warned.set(now);
                    log!(
                        Level::Warn,
                        "Fleet rate limit unavailable; this instance limits alone (its share) until Redis answers",
                        limit = name,
                        error = e,
                    );
                }
                None
            }
        }
    }

    /// The bucket's upstream limit, before a client request's first
    /// upstream request: `Some(outcome)` (a 429) when refused. The token
    /// taken pays for that first request (`Client::upstream_prepaid`);
    /// every further one (slices, failovers, resumes) pays in
    /// [`Self::pay_upstream`].
    pub(super) async fn limit_upstream(&self, c: &mut Client, bucket: usize) -> Option<Outcome> {
        let r = self.shared.bucket(bucket).upstream_rate?;
        let taken = self.take_upstream(bucket, r).await;
        c.s.upstream_prepaid = taken.is_ok();
        let wait_ms = taken.err()?;
        Some(self.too_many(c, LimitScope::Bucket, wait_ms).await)
    }

    /// One token of bucket `bucket`'s upstream limit `r`.
    async fn take_upstream(&self, bucket: usize, r: Rate) -> Result<(), u64> {
        let local = |l: &mut Limiters, now| match l.upstream.get_mut(bucket) {
            Some(Some(t)) => t.take(now),
            _ => Ok(()),
        };
        let name = || format!("bucket:{}", self.shared.bucket(bucket).name);
        self.limit_verdict(r, name, local).await
    }

    /// Charges one request sent to S3 to the bucket's upstream limit: the
    /// token prepaid by [`Self::limit_upstream`], else a new one, waited
    /// for while it comes before `deadline`; else the request is not sent
    /// (`Cause::RateLimited`).
    pub(super) async fn pay_upstream(
        &self,
        c: &mut Client,
        bucket: usize,
        deadline: Instant,
    ) -> Result<(), Error<Answer>> {
        if std::mem::take(&mut c.s.upstream_prepaid) {
            return Ok(());
        }
        let Some(r) = self.shared.bucket(bucket).upstream_rate else {
            return Ok(());
        };
        loop {
            let wait_ms = match self.take_upstream(bucket, r).await {
                Ok(()) => return Ok(()),
                Err(w) => w,
            };
            let wait = Duration::from_millis(wait_ms);
            if Instant::now() + wait > deadline {
                self.core
                    .metrics
                    .borrow_mut()
                    .rate_limited(LimitScope::Bucket);
                return Err(Error::upstream(
                    Cause::RateLimited,
                    format!("bucket's upstream rate limit: next request allowed in {wait_ms} ms"),
                ));
            }
            monoio::time::sleep(wait).await;
        }
    }

    async fn too_many(&self, c: &mut Client, scope: LimitScope, wait_ms: u64) -> Outcome {
        c.s.refusal = Some("rate_limit");
        self.core.metrics.borrow_mut().rate_limited(scope);
        let secs = itoa(wait_ms.div_ceil(1000).max(1));
        let extra = [("Retry-After", secs.as_str())];
        self.simple_outcome(c, 429, "text/plain", b"too many requests\n", &extra)
            .await
    }
}
