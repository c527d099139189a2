//! Rate limits across the fleet (`scope: fleet` on `server.rate_limit` and
//! a bucket's `s3.rate_limit`): one GCRA state per limit in Redis, updated
//! by one Lua script on Redis's own clock, so every instance draws from the
//! same allowance whatever their clocks say. A core asks over its own
//! connections (the Redis tier's reader); when Redis cannot answer, the
//! caller falls back to its per-instance share (`proxy::limits`).

use super::{Reader, RedisTier};
use redis_protocol::resp2::types::OwnedFrame;

/// GCRA: KEYS[1] the limit's state (its theoretical arrival time, ms on
/// Redis's clock); ARGV[1] the interval between requests (ms), ARGV[2] the
/// burst. 0: admitted; otherwise the milliseconds until the next request
/// would be. Exactly `burst` requests are admitted at once, then one per
/// interval.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - tolerance - interval
if allowed_at > now then
  return math.max(1, math.ceil(allowed_at - now))
end
redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.max(1, math.ceil(next_tat - now)))
return 0
"#;

/// A fleet limit's answer.
pub enum Taken {
    /// Admitted.
    Yes,
    /// Refused: the next request is admitted in this many milliseconds.
    Wait(u64),
}

impl Reader {
    /// Takes one request from the fleet's limit `name` (`per_second`,
    /// `burst`): `Err` when Redis cannot say (down, slow, its breaker
    /// open), and the caller decides alone.
    pub async fn take(
        &self,
        tier: &RedisTier,
        name: &str,
        per_second: f64,
        burst: f64,
    ) -> Result<Taken, String> {
        let key = format!("{}:limit:{name}", tier.settings.prefix);
        let interval = format!("{:.3}", 1000.0 / per_second.max(0.000_001));
        let burst = format!("{}", burst.max(1.0).floor());
        let args: [&[u8]; 6] = [
            b"EVAL",
            GCRA.as_bytes(),
            b"1",
            key.as_bytes(),
            interval.as_bytes(),
            burst.as_bytes(),
        ];
        match self.call(tier, key.as_bytes(), &args).await? {
            OwnedFrame::Integer(0) => Ok(Taken::Yes),
            OwnedFrame::Integer(wait) => Ok(Taken::Wait(wait.max(1) as u64)),
            other => Err(format!("the limit script answered {other:?}")),
        }
    }
}
