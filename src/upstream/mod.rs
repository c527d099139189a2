//! Upstream replicas: breaker and selection logic (pure), cross-core breaker
//! publication, the per-core connection pool and active health checks.

pub mod breaker;
pub mod health;
pub mod pool;
pub mod select;
pub mod snapshot;
pub mod tls;
