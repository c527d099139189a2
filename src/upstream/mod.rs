//! Upstream replicas: breaker and selection logic (pure), cross-core breaker
//! publication, the per-core connection pool and active health checks.

pub mod blame;
pub mod breaker;
pub mod client;
pub mod cursor;
pub mod health;
pub mod pool;
pub mod select;
pub mod snapshot;
