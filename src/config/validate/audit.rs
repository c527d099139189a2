//! `audit_log`: the other system's keys, resolved (see `crate::audit`).

use super::super::schema::*;
use super::super::*;
use super::Problems;

/// The other system's defaults.
const DEFAULT_MAX_FILE_MB: u64 = 50;
const DEFAULT_MAX_BACKUPS: u32 = 5;
const DEFAULT_BUFFER_BYTES: usize = 1024 * 1024;
/// Largest `audit_log.file.buffer_size`.
const MAX_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// `audit_log`: `None` when off.
pub(super) fn audit(raw: &RawAuditLog, p: &mut Problems) -> Option<AuditSettings> {
    if raw.s3_export.is_some() {
        p.at(
            "audit_log.s3_export",
            "is not supported here; ship the audit file with your log agent, or use syslog",
        );
    }
    if raw.enabled != Some(true) {
        return None;
    }
    let level = match raw
        .log_level
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("info") | Some("debug") => AuditLevel::All,
        Some("warn") | Some("warning") => AuditLevel::Refusals,
        Some("error") => AuditLevel::Errors,
        Some(other) => {
            p.at(
                "audit_log.log_level",
                format_args!("{other:?} is not one of debug, info, warn, error"),
            );
            AuditLevel::All
        }
    };
    let outputs = raw.outputs.clone().unwrap_or_else(|| vec!["file".into()]);
    let (mut file, mut syslog) = (None, None);
    for (i, output) in outputs.iter().enumerate() {
        let at = format!("audit_log.outputs[{i}]");
        match output.as_str() {
            "file" => match &raw.file {
                Some(f) => file = audit_file(f, p),
                None => p.at(&at, "\"file\" needs audit_log.file.path"),
            },
            "syslog" => match &raw.syslog {
                Some(s) => syslog = audit_syslog(s, p),
                None => p.at(&at, "\"syslog\" needs audit_log.syslog.address"),
            },
            "s3" => p.at(&at, "\"s3\" is not supported here (use file or syslog)"),
            other => p.at(&at, format_args!("{other:?} is not one of file, syslog")),
        }
    }
    if outputs.is_empty() {
        p.at("audit_log.outputs", "lists no output");
    }
    Some(AuditSettings {
        level,
        file,
        syslog,
    })
}

fn audit_file(f: &RawAuditFile, p: &mut Problems) -> Option<AuditFile> {
    if f.path.trim().is_empty() {
        p.at("audit_log.file.path", "must not be empty");
    }
    let mb = f.max_file_size_mb.unwrap_or(DEFAULT_MAX_FILE_MB);
    p.positive("audit_log.file.max_file_size_mb", mb);
    let buffer = f.buffer_size.unwrap_or(DEFAULT_BUFFER_BYTES);
    if buffer > MAX_BUFFER_BYTES {
        p.at(
            "audit_log.file.buffer_size",
            format_args!("must be at most {MAX_BUFFER_BYTES} bytes"),
        );
    }
    let rotation = match f.rotation_policy.as_deref().unwrap_or("size") {
        "size" => Rotation::Size,
        "daily" => Rotation::Daily,
        "hourly" => Rotation::Hourly,
        other => {
            p.at(
                "audit_log.file.rotation_policy",
                format_args!("{other:?} is not one of size, daily, hourly"),
            );
            Rotation::Size
        }
    };
    Some(AuditFile {
        path: f.path.trim().to_string(),
        max_bytes: mb.max(1) * 1024 * 1024,
        max_backups: f.max_backup_files.unwrap_or(DEFAULT_MAX_BACKUPS),
        rotation,
        buffer_bytes: buffer.min(MAX_BUFFER_BYTES),
    })
}

fn audit_syslog(s: &RawAuditSyslog, p: &mut Problems) -> Option<AuditSyslog> {
    let tcp = match s.protocol.as_deref().unwrap_or("udp") {
        "udp" => false,
        "tcp" => true,
        other => {
            p.at(
                "audit_log.syslog.protocol",
                format_args!("{other:?} is not one of udp, tcp"),
            );
            false
        }
    };
    let facility = s.facility.as_deref().unwrap_or("local0");
    let Some(number) = facility_number(facility) else {
        p.at(
            "audit_log.syslog.facility",
            format_args!("{facility:?} is not a syslog facility (kern, user, daemon, auth, local0-local7, ...)"),
        );
        return None;
    };
    if !s.address.contains(':') {
        p.at(
            "audit_log.syslog.address",
            format_args!("{:?} must be host:port", s.address),
        );
        return None;
    }
    Some(AuditSyslog {
        address: s.address.clone(),
        tcp,
        facility: number,
    })
}

/// RFC 5424's facility numbers.
fn facility_number(name: &str) -> Option<u8> {
    const NAMES: [&str; 24] = [
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2",
        "local3", "local4", "local5", "local6", "local7",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}
