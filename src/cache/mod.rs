//! The origin cache (issue #10): the parts that know nothing of sockets.
//!
//! - [`policy`]: the pure decisions (is a response storable and for how
//!   long, how old is a copy, may an expired copy serve when no replica can,
//!   does a stored copy answer a conditional or a `Range` request),
//!   unit-tested with a fake clock;
//! - [`store`]: the process-wide memory tier, bounded by bytes;
//! - [`collapse`]: fills under way, which concurrent misses stream from;
//! - [`region`]: stored bodies, large ones in mappings of their own (sent
//!   by reference);
//! - [`disk`]: the disk tier; [`open`]: a core's disk-tier files kept open
//!   between hits; [`mod@slice`]: large objects cached in slices.
//!
//! The request-path steps are `proxy/cache.rs` and `proxy/slices.rs`.

pub mod collapse;
pub mod disk;
pub mod open;
pub mod policy;
pub mod redis;
pub mod region;
pub mod slice;
pub mod store;
