//! yatagarasu: a read-only S3 origin proxy that keeps serving when an S3
//! endpoint dies. See README.md for the tour; `proxy/session.rs` lists the
//! request's phases in order.

#![warn(missing_docs)]

pub mod access;
pub mod audit;
pub mod authz;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod error;
pub mod http;
pub mod images;
pub mod log;
pub mod metrics;
pub mod prewarm;
pub mod proxy;
pub mod published;
pub mod reuse;
pub mod router;
pub mod s3;
pub mod server;
pub mod shared;
pub mod stream;
pub mod tls;
pub mod trace;
pub mod upstream;

#[cfg(test)]
pub(crate) mod testing;
