//! Structured logging: one line per event, `text` or `json`, to stderr.
//!
//! Core threads buffer INFO/DEBUG lines (access logs) and flush them on their
//! periodic tick or when the buffer fills; WARN and ERROR are written at once,
//! and every other thread writes unbuffered. The level comes from the config
//! and can be overridden with `RUST_LOG` (`error|warn|info|debug`).
//!
//! Events of the libraries (rustls through the `log` facade; the AWS crates'
//! `tracing` events, which reach `log` when no tracing subscriber is set)
//! come out through the same writer, with a `target` field naming their
//! origin: [`install_bridge`].

use crate::config::{Level, LogFormat};
use std::cell::{Cell, RefCell};
use std::fmt::{Display, Write as _};
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static LEVEL: AtomicU8 = AtomicU8::new(2);
static FORMAT: AtomicU8 = AtomicU8::new(0);
const FLUSH_AT: usize = 16 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(FLUSH_AT * 2));
    static BUFFERED: Cell<bool> = const { Cell::new(false) };
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
    static FIELD: RefCell<String> = RefCell::new(String::with_capacity(128));
}

fn level_code(l: Level) -> u8 {
    match l {
        Level::Error => 0,
        Level::Warn => 1,
        Level::Info => 2,
        Level::Debug => 3,
    }
}

/// Sets level and format; `RUST_LOG` wins over the config's level.
pub fn init(level: Level, format: LogFormat) {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| Level::parse(v.trim()))
        .unwrap_or(level);
    LEVEL.store(level_code(level), Ordering::Relaxed);
    FORMAT.store(matches!(format, LogFormat::Json) as u8, Ordering::Relaxed);
    set_bridge_level();
}

/// Routes the `log` facade (rustls, monoio, and the AWS crates' `tracing`
/// events) into this logger, at the configured level. Call once at start.
pub fn install_bridge() {
    static BRIDGE: Bridge = Bridge;
    if ::log::set_logger(&BRIDGE).is_ok() {
        set_bridge_level();
    }
}

/// Keeps the facade's level filter in step with ours (after `init`).
fn set_bridge_level() {
    ::log::set_max_level(match LEVEL.load(Ordering::Relaxed) {
        0 => ::log::LevelFilter::Error,
        1 => ::log::LevelFilter::Warn,
        2 => ::log::LevelFilter::Info,
        _ => ::log::LevelFilter::Debug,
    });
}

/// The `log::Log` implementation behind [`install_bridge`].
struct Bridge;

impl ::log::Log for Bridge {
    fn enabled(&self, metadata: &::log::Metadata<'_>) -> bool {
        admitted(metadata) && enabled(facade_level(metadata))
    }

    fn log(&self, record: &::log::Record<'_>) {
        let level = facade_level(record.metadata());
        if admitted(record.metadata()) && enabled(level) {
            let msg = record.args().to_string();
            log(level, &msg, &[("target", &record.target())]);
        }
    }

    fn flush(&self) {}
}

/// Library events that may carry key material stay out of the log: TRACE
/// from anyone (the AWS runtime traces response bodies, and an STS or
/// metadata response body holds keys), and DEBUG from the crates on the
/// credentials path (their debug events name access key ids; span
/// enter/exit lines carry nothing).
fn admitted(m: &::log::Metadata<'_>) -> bool {
    const CREDENTIAL_PATH: [&str; 5] = ["aws_", "hyper", "h2", "tower", "tracing::span"];
    match m.level() {
        ::log::Level::Trace => false,
        ::log::Level::Debug => !CREDENTIAL_PATH.iter().any(|p| m.target().starts_with(p)),
        _ => true,
    }
}

/// The level a library event is written at: its own, except rustls's,
/// which are all DEBUG. rustls's warnings are about what a peer sent (an
/// IP address as SNI, a bad alert), so a client could have one written per
/// handshake, and log lines as fast as it can connect; a handshake that
/// fails is the proxy's to report (and count), once.
fn facade_level(m: &::log::Metadata<'_>) -> Level {
    if m.target().starts_with("rustls") {
        return Level::Debug;
    }
    from_facade(m.level())
}

fn from_facade(l: ::log::Level) -> Level {
    match l {
        ::log::Level::Error => Level::Error,
        ::log::Level::Warn => Level::Warn,
        ::log::Level::Info => Level::Info,
        ::log::Level::Debug | ::log::Level::Trace => Level::Debug,
    }
}

/// Makes this thread buffer INFO/DEBUG lines until `flush`.
pub fn buffer_this_thread() {
    BUFFERED.with(|b| b.set(true));
}

/// Whether events at `level` are written.
pub fn enabled(level: Level) -> bool {
    level_code(level) <= LEVEL.load(Ordering::Relaxed)
}

/// Writes out this thread's buffered lines.
pub fn flush() {
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        if !b.is_empty() {
            let _ = std::io::stderr().write_all(&b);
            b.clear();
        }
    });
}

/// Logs `msg` with `fields` at `level`.
pub fn log(level: Level, msg: &str, fields: &[(&str, &dyn Display)]) {
    if !enabled(level) {
        return;
    }
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        FIELD.with(|tmp| {
            let json = FORMAT.load(Ordering::Relaxed) == 1;
            format_line(&mut line, &mut tmp.borrow_mut(), level, msg, fields, json);
        });
        let urgent = level <= Level::Warn || !BUFFERED.with(|b| b.get());
        BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            b.extend_from_slice(line.as_bytes());
            if urgent || b.len() >= FLUSH_AT {
                let _ = std::io::stderr().write_all(&b);
                b.clear();
            }
        });
    });
}

fn format_line(
    out: &mut String,
    tmp: &mut String,
    level: Level,
    msg: &str,
    fields: &[(&str, &dyn Display)],
    json: bool,
) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if json {
        out.push_str("{\"ts\":\"");
        timestamp(out, now.as_secs(), now.subsec_millis());
        out.push_str("\",\"level\":\"");
        out.push_str(level.as_str());
        out.push_str("\",\"msg\":");
        json_str(out, msg);
        for (k, v) in fields {
            out.push(',');
            json_str(out, k);
            out.push(':');
            tmp.clear();
            let _ = write!(tmp, "{v}");
            json_str(out, tmp);
        }
        out.push_str("}\n");
    } else {
        timestamp(out, now.as_secs(), now.subsec_millis());
        out.push(' ');
        out.push_str(level.as_str());
        out.push(' ');
        // A message may quote a name from the config or a request: no
        // control character goes out raw (CWE-117: a forged line).
        if msg.chars().any(char::is_control) {
            let _ = write!(out, "{msg:?}");
        } else {
            out.push_str(msg);
        }
        for (k, v) in fields {
            out.push(' ');
            out.push_str(k);
            out.push('=');
            tmp.clear();
            let _ = write!(tmp, "{v}");
            if needs_quoting(tmp) {
                // Debug escapes control characters (`\n`, `\t`, `\u{1b}`)
                // and quotes: a value never ends the line or fakes a field.
                let _ = write!(out, "{tmp:?}");
            } else {
                out.push_str(tmp);
            }
        }
        out.push('\n');
    }
}

/// Whether a text-format value must be written quoted and escaped: empty,
/// or holding whitespace, a quote, `=`, or any control character.
fn needs_quoting(v: &str) -> bool {
    v.is_empty()
        || v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// RFC 3339 UTC timestamp with milliseconds.
pub(crate) fn timestamp(out: &mut String, secs: u64, millis: u32) {
    let (y, m, d, h, mi, s) = crate::clock::civil(secs);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{millis:03}Z"
    );
}

/// `log!(Level::Warn, "message", key = value, ...)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $msg:expr $(, $k:ident = $v:expr)* $(,)?) => {
        if $crate::log::enabled($level) {
            $crate::log::log($level, $msg, &[$((stringify!($k), &$v as &dyn ::std::fmt::Display)),*]);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_events_are_debug_and_others_keep_their_level() {
        let event = |level, target| {
            facade_level(
                &::log::Metadata::builder()
                    .level(level)
                    .target(target)
                    .build(),
            )
        };
        let warn = ::log::Level::Warn;
        assert_eq!(event(warn, "rustls::msgs::handshake"), Level::Debug);
        assert_eq!(event(::log::Level::Error, "rustls::conn"), Level::Debug);
        assert_eq!(event(warn, "aws_config::imds"), Level::Warn);
        assert_eq!(event(::log::Level::Info, "monoio"), Level::Info);
    }

    #[test]
    fn timestamps_are_civil() {
        let mut s = String::new();
        timestamp(&mut s, 1_795_647_737, 5);
        assert_eq!(s, "2026-11-25T23:02:17.005Z");
    }

    #[test]
    fn no_value_or_message_can_forge_a_line_or_a_field() {
        let forged = "alice\n2026-12-06T00:00:00.000Z\tERROR\tforged";
        for json in [false, true] {
            let mut s = String::new();
            format_line(
                &mut s,
                &mut String::new(),
                Level::Info,
                "Request\rserved",
                &[("sub", &forged), ("k", &"a\u{1b}[31mb")],
                json,
            );
            assert_eq!(s.matches('\n').count(), 1, "{s}");
            assert!(
                !s.contains('\t') && !s.contains('\r') && !s.contains('\u{1b}'),
                "{s}"
            );
        }
        let mut s = String::new();
        format_line(
            &mut s,
            &mut String::new(),
            Level::Info,
            "m",
            &[("sub", &"x\tlevel=ERROR")],
            false,
        );
        assert!(s.ends_with(" m sub=\"x\\tlevel=ERROR\"\n"), "{s}");
    }

    #[test]
    fn text_and_json_lines() {
        let mut s = String::new();
        format_line(
            &mut s,
            &mut String::new(),
            Level::Warn,
            "Replica 'primary' failed, trying 'backup'",
            &[("cause", &"connect refused")],
            false,
        );
        assert!(
            s.contains(
                " WARN Replica 'primary' failed, trying 'backup' cause=\"connect refused\"\n"
            ),
            "{s}"
        );
        s.clear();
        format_line(
            &mut s,
            &mut String::new(),
            Level::Info,
            "a\"b",
            &[("n", &5)],
            true,
        );
        assert!(
            s.ends_with(",\"level\":\"INFO\",\"msg\":\"a\\\"b\",\"n\":\"5\"}\n"),
            "{s}"
        );
    }
}
