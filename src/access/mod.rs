//! Who may read (issue #11), landing in steps. What is here, pure: IP
//! filters per bucket and the client address behind trusted proxies
//! ([`ip`]); token buckets for rate limits ([`rate`]); JWT verification and
//! claims ([`jwt`]); JWKS keys fetched off the cores ([`jwks`]).

pub mod ip;
pub mod jwks;
pub mod jwt;
pub mod rate;
