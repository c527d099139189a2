//! Step "limits": rate limits before a request costs anything. Client limits
//! (`server.rate_limit`: global and per address) run right after routing; the
//! bucket's upstream limit (`s3.rate_limit`, an S3 bill guard) runs only when
//! a request is about to go upstream, so cache hits never count. Excess gets
//! 429 with `Retry-After`. Each worker holds its share of every limit
//! (`access::rate`).

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
        let now = now_ms();
        let verdict = {
            let mut l = self.limits.borrow_mut();
            let per_ip = l
                .per_ip
                .as_mut()
                .and_then(|t| t.take(client, now).err().map(|w| (LimitScope::PerIp, w)));
            per_ip.or_else(|| {
                l.global
                    .as_mut()
                    .and_then(|g| g.take(now).err().map(|w| (LimitScope::Global, w)))
            })
        };
        let (scope, wait_ms) = verdict?;
        Some(self.too_many(c, scope, wait_ms).await)
    }

    /// The bucket's upstream limit, before a client request's first
    /// upstream request: `Some(outcome)` (a 429) when refused. The token
    /// taken pays for that first request (`Client::upstream_prepaid`);
    /// every further one (slices, failovers, resumes) pays in
    /// [`Self::pay_upstream`].
    pub(super) async fn limit_upstream(&self, c: &mut Client, bucket: usize) -> Option<Outcome> {
        let wait_ms = {
            let mut l = self.limits.borrow_mut();
            let taken = l.upstream.get_mut(bucket)?.as_mut()?.take(now_ms());
            c.s.upstream_prepaid = taken.is_ok();
            taken.err()?
        };
        Some(self.too_many(c, LimitScope::Bucket, wait_ms).await)
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
        loop {
            let wait_ms = {
                let mut l = self.limits.borrow_mut();
                let Some(Some(limit)) = l.upstream.get_mut(bucket) else {
                    return Ok(());
                };
                match limit.take(now_ms()) {
                    Ok(()) => return Ok(()),
                    Err(w) => w,
                }
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
