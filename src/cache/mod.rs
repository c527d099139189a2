//! The origin cache (issue #10), landing in steps. What is here:
//!
//! - [`policy`]: the pure decisions a cache makes (is a response storable and
//!   for how long, how old is a copy, does a stored copy answer a
//!   conditional or a `Range` request), unit-tested with a fake clock;
//! - the configuration section (`cache:` and `buckets[].cache`, in the
//!   tutorial system's key names), parsed and checked with YAML paths.
//!
//! Not yet here: the memory and disk tiers, collapsed forwarding and
//! stale-if-error. Until they are, `cache.enabled: true` is refused by the
//! configuration check rather than silently ignored.

pub mod policy;
pub mod store;
