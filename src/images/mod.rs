//! Image variants: resize, convert, effects and per-viewer watermarks of
//! the images a bucket serves (`image_optimization`, `buckets[].watermark`).
//!
//! ```text
//! params.rs     the query's image parameters, checked and normalized
//! plan.rs       the geometry: scale, crop, pad, within the limits
//! watermark.rs  rules, templates, the rendered marks that key a variant
//! transform.rs  the header check (on the core), the pipeline (pool thread)
//! vips.rs       libvips, loaded at run time
//! mod.rs        the settings, URL signatures, the bounded transform pool
//! ```
//!
//! A core never decodes: it checks the original's header, then queues a
//! job on the [`Pool`] and awaits its answer. A variant is an ordinary
//! cache entry (see `proxy::images`).

pub mod params;
pub mod plan;
pub mod transform;
pub mod vips;
pub mod watermark;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use transform::{Failure, Job, Output, Sources};

/// A bucket's image settings (`image_optimization`, its own over the
/// top level's).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSettings {
    /// Query parameters transform (off: only watermarks apply).
    pub transforms: bool,
    /// Largest output (`max_width`, `max_height`).
    pub limits: plan::Limits,
    /// `default_quality`.
    pub quality: u8,
    /// Largest original decoded, in pixels (from its header).
    pub max_input_pixels: u64,
    /// Largest original fetched to transform, in bytes.
    pub max_input_bytes: u64,
    /// Transforms need `sig` (HMAC-SHA256 with this key).
    pub signing_key: Option<Vec<u8>>,
    /// When not empty, the only widths (`h`: heights) served, in pixels
    /// after `dpr`.
    pub allowed_widths: Vec<u32>,
    /// See `allowed_widths`.
    pub allowed_heights: Vec<u32>,
}

/// Why a signed URL is refused (403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// No `sig`.
    Missing,
    /// A `sig` that is not the URL's.
    Wrong,
    /// Past `exp`.
    Expired,
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignatureError::Missing => "this image transform needs a signature (sig)",
            SignatureError::Wrong => "the image transform's signature (sig) does not match",
            SignatureError::Expired => "the image transform's signed URL has expired (exp)",
        })
    }
}

/// Checks a transform URL's signature: `sig` is the hex HMAC-SHA256, with
/// `key`, of the path and the query as sent with `sig=...` taken out
/// (`/img/a.jpg?w=400&exp=1767225600`); `exp`, when given, is a Unix time
/// after which the URL is refused.
pub fn verify_signature(
    key: &[u8],
    path: &str,
    raw_query: &str,
    sig: Option<&str>,
    exp: Option<u64>,
    now_secs: u64,
) -> Result<(), SignatureError> {
    let sig = sig.ok_or(SignatureError::Missing)?;
    let unsigned: Vec<&str> = raw_query
        .split('&')
        .filter(|p| !p.is_empty() && *p != "sig" && !p.starts_with("sig="))
        .collect();
    let message = if unsigned.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", unsigned.join("&"))
    };
    let given = hex::decode(sig).map_err(|_| SignatureError::Wrong)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| SignatureError::Wrong)?;
    mac.update(message.as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Wrong)?;
    if exp.is_some_and(|e| now_secs > e) {
        return Err(SignatureError::Expired);
    }
    Ok(())
}

/// Transform counts, for the metrics scrape.
#[derive(Default)]
pub struct Stats {
    /// Transforms that made a variant.
    pub ok: AtomicU64,
    /// Transforms the codec or a watermark source failed.
    pub failed: AtomicU64,
    /// Refused by the limits or the header check.
    pub refused: AtomicU64,
    /// Turned away: the queue was full (503).
    pub busy: AtomicU64,
    /// Jobs waiting or running now.
    pub queued: AtomicU64,
    /// Time spent transforming, in microseconds (wall clock, pool side).
    pub micros: AtomicU64,
}

/// The answer to a queued job.
pub type Reply = flume::Receiver<Result<Output, Failure>>;

struct Task {
    job: Job,
    reply: flume::Sender<Result<Output, Failure>>,
}

/// A bounded pool of threads running transforms: `threads` at once, at
/// most `queue` waiting; beyond that a job is turned away.
pub struct Pool {
    tx: flume::Sender<Task>,
    /// Its counts.
    pub stats: Arc<Stats>,
}

impl Pool {
    /// Loads libvips and starts the threads (they end when the pool is
    /// dropped and the queue drained).
    pub fn start(threads: usize, queue: usize, stats: Arc<Stats>) -> Result<Pool, String> {
        vips::load()?;
        let (tx, rx) = flume::bounded::<Task>(queue.max(1));
        let sources = Arc::new(Sources::default());
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let stats = stats.clone();
            let sources = sources.clone();
            std::thread::Builder::new()
                .name(format!("image-{i}"))
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        let t0 = std::time::Instant::now();
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            transform::run(&task.job, &sources)
                        }));
                        let result = run.unwrap_or_else(|_| {
                            Err(Failure::Failed("the image transform panicked".into()))
                        });
                        stats
                            .micros
                            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                        let counter = match &result {
                            Ok(_) => &stats.ok,
                            Err(Failure::Failed(_)) => &stats.failed,
                            Err(_) => &stats.refused,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        stats.queued.fetch_sub(1, Ordering::Relaxed);
                        let _ = task.reply.send(result);
                    }
                })
                .map_err(|e| format!("cannot start an image thread: {e}"))?;
        }
        Ok(Pool { tx, stats })
    }

    /// Queues `job`; `None` when the queue is full (the caller answers 503).
    pub fn submit(&self, job: Job) -> Option<Reply> {
        let (reply, rx) = flume::bounded(1);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Task { job, reply }) {
            Ok(()) => Some(rx),
            Err(_) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &[u8], message: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("key");
        mac.update(message.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn signatures_cover_path_and_query_and_expire() {
        let key = b"k3y";
        let sig = sign(key, "/img/a.jpg?w=400&exp=100");
        let q = format!("w=400&sig={sig}&exp=100");
        assert_eq!(
            verify_signature(key, "/img/a.jpg", &q, Some(&sig), Some(100), 50),
            Ok(())
        );
        assert_eq!(
            verify_signature(key, "/img/a.jpg", &q, Some(&sig), Some(100), 101),
            Err(SignatureError::Expired)
        );
        let other = format!("w=401&sig={sig}&exp=100");
        assert_eq!(
            verify_signature(key, "/img/a.jpg", &other, Some(&sig), Some(100), 50),
            Err(SignatureError::Wrong)
        );
        assert_eq!(
            verify_signature(key, "/img/b.jpg", &q, Some(&sig), Some(100), 50),
            Err(SignatureError::Wrong)
        );
        assert_eq!(
            verify_signature(key, "/img/a.jpg", "w=400", None, None, 50),
            Err(SignatureError::Missing)
        );
    }
}
