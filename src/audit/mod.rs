//! The audit log (`audit_log`, the other system's keys): one JSON record
//! per access decision (who asked for what, what was decided and why,
//! what was sent), to a file rotated by size and time and/or to syslog
//! (RFC 5424 over UDP, or TCP with octet counting).
//!
//! Off the cores: a core appends its records to a buffer of its own and
//! hands the buffer over once per tick, never waiting; the writer thread
//! (`writer.rs`) writes and rotates. Records the writer cannot take (its
//! queue full) or cannot write (a full disk, syslog unreachable) are
//! dropped and counted, so a slow or broken sink never slows a request.
//! Secrets never appear: the path is the decoded request path without its
//! query, and no header is recorded.
//!
//! This file holds the pure parts: the record, which records a level
//! keeps, the syslog line, the rotation decision.

mod writer;

use crate::config::{AuditLevel, AuditSettings, Rotation};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

/// Batches (one per core per tick) the writer may have queued.
const QUEUE: usize = 256;

/// One access decision.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub timestamp: &'a str,
    /// The request's `X-Request-ID`.
    pub request_id: &'a str,
    /// The client's address (behind trusted proxies, X-Forwarded-For's).
    pub client_ip: &'a str,
    /// The authenticated token's `sub`, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<&'a str>,
    /// The bucket's name.
    pub bucket: &'a str,
    /// The object key asked for (decoded).
    pub key: &'a str,
    /// `GET` or `HEAD`.
    pub method: &'a str,
    /// `allow`, `deny` or `error`.
    pub decision: &'static str,
    /// Why a request was refused (`ip_filter`, `missing`, `invalid`,
    /// `expired`, `forbidden`, `rate_limit`, `policy`, ...), or the
    /// policy's own reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// The status answered.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// Time to the last byte, in milliseconds.
    pub duration_ms: f64,
    /// The `X-Cache` sent, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
}

/// `allow`, `deny` or `error` for an answer with `status` to a request
/// whose access phases refused it for `refusal` (if they did).
pub fn decision(status: u16, refusal: Option<&str>) -> &'static str {
    match (refusal, status) {
        (Some(_), _) => "deny",
        (None, 500..) => "error",
        (None, _) => "allow",
    }
}

/// Whether `level` keeps a record with this decision and status.
pub fn keeps(level: AuditLevel, decision: &str, status: u16) -> bool {
    match level {
        AuditLevel::All => true,
        AuditLevel::Refusals => decision != "allow",
        AuditLevel::Errors => status >= 500,
    }
}

/// An RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP PROCID MSGID - MSG`.
/// Severity: informational (6) for an allowed request, warning (4) for a
/// refusal, error (3) for a 5xx.
pub fn syslog_line(
    facility: u8,
    decision: &str,
    timestamp: &str,
    host: &str,
    pid: u32,
    msg: &str,
) -> String {
    let severity = match decision {
        "allow" => 6,
        "deny" => 4,
        _ => 3,
    };
    let pri = u32::from(facility) * 8 + severity;
    format!("<{pri}>1 {timestamp} {host} yatagarasu {pid} audit - {msg}")
}

/// Whether the file must be rotated before `incoming` more bytes: past its
/// size, or (daily, hourly) in another UTC day or hour than the one it was
/// opened in. Times are seconds since the Unix epoch.
pub fn rotate_due(
    rotation: Rotation,
    opened_secs: u64,
    now_secs: u64,
    size: u64,
    incoming: u64,
    max_bytes: u64,
) -> bool {
    if size > 0 && size + incoming > max_bytes {
        return true;
    }
    let period = match rotation {
        Rotation::Size => return false,
        Rotation::Daily => 86_400,
        Rotation::Hourly => 3_600,
    };
    size > 0 && now_secs / period != opened_secs / period
}

/// What the writer is sent.
enum Message {
    /// A core's records (JSON lines) and how many there are.
    Batch(Vec<u8>, u64),
    /// Write everything buffered, then say so.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The audit log of a process: the writer's queue and the counters.
pub struct Audit {
    /// What it was configured with.
    pub settings: AuditSettings,
    queue: SyncSender<Message>,
    /// Records written, by output.
    pub written_file: AtomicU64,
    /// Records sent to syslog.
    pub written_syslog: AtomicU64,
    /// Records dropped because the writer's queue was full.
    pub dropped_queue: AtomicU64,
    /// Records dropped because the file could not be written.
    pub dropped_file: AtomicU64,
    /// Records dropped because syslog could not be reached.
    pub dropped_syslog: AtomicU64,
}

impl Audit {
    /// Starts the writer thread.
    pub fn start(settings: AuditSettings) -> Result<std::sync::Arc<Audit>, String> {
        let (tx, rx) = sync_channel(QUEUE);
        let audit = std::sync::Arc::new(Audit {
            settings,
            queue: tx,
            written_file: AtomicU64::new(0),
            written_syslog: AtomicU64::new(0),
            dropped_queue: AtomicU64::new(0),
            dropped_file: AtomicU64::new(0),
            dropped_syslog: AtomicU64::new(0),
        });
        let mine = audit.clone();
        std::thread::Builder::new()
            .name("yatagarasu-audit".into())
            .spawn(move || writer::run(&mine, rx))
            .map_err(|e| format!("audit writer thread: {e}"))?;
        Ok(audit)
    }

    /// Hands a core's batch (`count` JSON lines) to the writer; never
    /// waits: a full queue drops it, counted.
    pub fn submit(&self, batch: Vec<u8>, count: u64) {
        match self.queue.try_send(Message::Batch(batch, count)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped_queue.fetch_add(count, Ordering::Relaxed);
            }
        }
    }
}

impl Audit {
    /// Asks the writer to write what it buffers, and waits for it at most
    /// `wait` (at shutdown).
    pub fn flush(&self, wait: std::time::Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.queue.send(Message::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_and_levels() {
        assert_eq!(decision(200, None), "allow");
        assert_eq!(decision(401, Some("missing")), "deny");
        assert_eq!(decision(503, None), "error");
        assert_eq!(decision(404, None), "allow");
        assert!(keeps(AuditLevel::All, "allow", 200));
        assert!(!keeps(AuditLevel::Refusals, "allow", 200));
        assert!(keeps(AuditLevel::Refusals, "deny", 403));
        assert!(!keeps(AuditLevel::Errors, "deny", 403));
        assert!(keeps(AuditLevel::Errors, "error", 502));
    }

    #[test]
    fn syslog_lines_follow_rfc_5424() {
        let line = syslog_line(16, "deny", "2026-12-06T07:00:00.000Z", "h", 42, "{}");
        assert_eq!(
            line,
            "<132>1 2026-12-06T07:00:00.000Z h yatagarasu 42 audit - {}"
        );
        assert!(syslog_line(16, "allow", "t", "h", 1, "m").starts_with("<134>1 "));
        assert!(syslog_line(1, "error", "t", "h", 1, "m").starts_with("<11>1 "));
    }

    #[test]
    fn rotation_by_size_and_by_the_clock() {
        let day = 86_400;
        // Size: a record that would pass the bound rotates a non-empty file.
        assert!(rotate_due(Rotation::Size, 0, 10, 90, 20, 100));
        assert!(!rotate_due(Rotation::Size, 0, 10, 80, 20, 100));
        assert!(
            !rotate_due(Rotation::Size, 0, 10, 0, 200, 100),
            "an empty file takes any record"
        );
        // Daily: a new UTC day rotates; the same day does not.
        assert!(rotate_due(
            Rotation::Daily,
            5 * day + 10,
            6 * day + 1,
            10,
            1,
            100
        ));
        assert!(!rotate_due(
            Rotation::Daily,
            5 * day + 10,
            5 * day + 80_000,
            10,
            1,
            100
        ));
        assert!(!rotate_due(Rotation::Size, 5 * day, 9 * day, 10, 1, 100));
        assert!(rotate_due(Rotation::Hourly, 3_599, 3_600, 10, 1, 100));
    }
}
