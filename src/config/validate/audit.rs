//! `audit_log` and `observability.tracing`: the other system's keys,
//! resolved (see `crate::audit` and `crate::trace`).

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

/// `observability.tracing`: `None` when off.
pub(super) fn tracing(raw: &RawTracing, p: &mut Problems) -> Option<Tracing> {
    if raw.enabled != Some(true) {
        return None;
    }
    let exporter = raw.exporter.as_deref().unwrap_or("otlp");
    match exporter {
        "otlp" => {}
        "none" => return None,
        other => {
            p.at(
                "observability.tracing.exporter",
                format_args!("{other:?} is not supported here: otlp (OTLP/HTTP) or none; Jaeger and Zipkin take OTLP directly"),
            );
            return None;
        }
    }
    let ratio = raw.sampling_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        p.at(
            "observability.tracing.sampling_ratio",
            "must be between 0 and 1",
        );
    }
    for (key, value) in [
        ("jaeger_endpoint", &raw.jaeger_endpoint),
        ("zipkin_endpoint", &raw.zipkin_endpoint),
    ] {
        if value.is_some() {
            p.warn(
                &format!("observability.tracing.{key}"),
                "has no effect: spans go to otlp_endpoint (OTLP/HTTP)",
            );
        }
    }
    let Some(url) = raw
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        p.at(
            "observability.tracing.otlp_endpoint",
            "is required (the collector's OTLP/HTTP address, as http://collector:4318)",
        );
        return None;
    };
    // `scheme://host[:port]`, and the signal's path unless one is given.
    let scheme_len = url.find("://").map_or(0, |i| i + 3);
    let (base, path) = match url[scheme_len..].find('/') {
        Some(i) => url.split_at(scheme_len + i),
        None => (url, ""),
    };
    let endpoint = match super::parse_endpoint(base) {
        Ok(e) => e,
        Err(why) => {
            p.at(
                "observability.tracing.otlp_endpoint",
                format_args!("{url:?} {why}"),
            );
            return None;
        }
    };
    if endpoint.port == 4317 {
        p.warn(
            "observability.tracing.otlp_endpoint",
            "4317 is OTLP/gRPC's port; this exporter speaks OTLP/HTTP (usually 4318)",
        );
    }
    let full = match path.trim_end_matches('/') {
        "" => format!("{}/v1/traces", base.trim_end_matches('/')),
        _ => url.to_string(),
    };
    Some(Tracing {
        endpoint: full,
        service_name: raw
            .service_name
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "yatagarasu".into()),
        ratio: ratio.clamp(0.0, 1.0),
        propagate: raw.propagate_context.unwrap_or(true),
    })
}
