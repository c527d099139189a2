//! The audit writer thread: takes the cores' batches of JSON lines and
//! writes each line to the file (buffered up to `buffer_size`, flushed at
//! least once a second, rotated by size and time with at most
//! `max_backup_files` kept as `path.1` .. `path.N`) and to syslog.

use super::{rotate_due, syslog_line, Audit, Message};
use crate::config::{AuditFile, AuditSyslog};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

/// Buffered records reach the file at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub(super) fn run(audit: &Audit, rx: Receiver<Message>) {
    let mut file = audit.settings.file.clone().map(FileSink::new);
    let mut syslog = audit.settings.syslog.clone().map(SyslogSink::new);
    loop {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(Message::Flush(done)) => {
                if let Some(f) = &mut file {
                    f.flush(audit);
                }
                let _ = done.send(());
            }
            Ok(Message::Batch(batch, _count)) => {
                for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    if let Some(f) = &mut file {
                        f.record(line, audit);
                    }
                    if let Some(s) = &mut syslog {
                        s.send(line, audit);
                    }
                }
                if let Some(f) = &mut file {
                    if f.pending.len() >= f.settings.buffer_bytes {
                        f.flush(audit);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(f) = &mut file {
                    f.flush(audit);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(f) = &mut file {
                    f.flush(audit);
                }
                return;
            }
        }
    }
}

fn now_secs() -> u64 {
    crate::clock::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The audit file, its size, when it was opened, and records not yet written.
struct FileSink {
    settings: AuditFile,
    file: Option<std::fs::File>,
    size: u64,
    opened_secs: u64,
    pending: Vec<u8>,
    pending_records: u64,
    /// When a file that could not be opened is tried again.
    retry_at: Option<Instant>,
}

impl FileSink {
    fn new(settings: AuditFile) -> FileSink {
        let mut sink = FileSink {
            settings,
            file: None,
            size: 0,
            opened_secs: now_secs(),
            pending: Vec::new(),
            pending_records: 0,
            retry_at: None,
        };
        sink.open();
        sink
    }

    fn open(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.settings.path);
        match opened {
            Ok(f) => {
                self.size = f.metadata().map_or(0, |m| m.len());
                self.file = Some(f);
                self.opened_secs = now_secs();
                self.retry_at = None;
            }
            Err(e) => {
                self.file = None;
                self.retry_at = Some(Instant::now() + FLUSH_EVERY);
                crate::log!(
                    crate::config::Level::Error,
                    "Audit file cannot be opened; records are dropped until it can",
                    path = self.settings.path,
                    error = e,
                );
            }
        }
    }

    /// Queues one record, rotating first when it is due.
    fn record(&mut self, line: &[u8], audit: &Audit) {
        let incoming = line.len() as u64 + 1;
        let held = self.size + self.pending.len() as u64;
        let s = &self.settings;
        if rotate_due(
            s.rotation,
            self.opened_secs,
            now_secs(),
            held,
            incoming,
            s.max_bytes,
        ) {
            self.flush(audit);
            self.rotate();
        }
        self.pending.extend_from_slice(line);
        self.pending.push(b'\n');
        self.pending_records += 1;
    }

    /// Writes what is pending; a failed write drops it, counted.
    fn flush(&mut self, audit: &Audit) {
        if self.pending.is_empty() {
            return;
        }
        if self.file.is_none() && self.retry_at.is_some_and(|t| Instant::now() >= t) {
            self.open();
        }
        let written = match &mut self.file {
            Some(f) => f.write_all(&self.pending).map_err(|e| e.to_string()),
            None => Err("the file is not open".to_string()),
        };
        let n = std::mem::take(&mut self.pending_records);
        match written {
            Ok(()) => {
                self.size += self.pending.len() as u64;
                audit.written_file.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                let before = audit.dropped_file.fetch_add(n, Ordering::Relaxed);
                if before == 0 {
                    crate::log!(
                        crate::config::Level::Error,
                        "Audit records could not be written and were dropped (counted in yatagarasu_audit_records_dropped_total)",
                        path = self.settings.path,
                        error = e,
                    );
                }
            }
        }
        self.pending.clear();
    }

    /// `path` becomes `path.1`, `path.1` becomes `path.2`, ... at most
    /// `max_backup_files` kept; a fresh file is opened.
    fn rotate(&mut self) {
        self.file = None;
        let path = &self.settings.path;
        let keep = self.settings.max_backups;
        let name = |i: u32| format!("{path}.{i}");
        if keep == 0 {
            let _ = std::fs::remove_file(path);
        } else {
            let _ = std::fs::remove_file(name(keep));
            for i in (1..keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(path, name(1));
        }
        self.open();
    }
}

/// Syslog over UDP (a datagram a record) or TCP (RFC 6587 octet counting).
struct SyslogSink {
    settings: AuditSyslog,
    udp: Option<UdpSocket>,
    tcp: Option<TcpStream>,
    /// When a lost TCP connection is tried again.
    retry_at: Option<Instant>,
    host: String,
    pid: u32,
}

impl SyslogSink {
    fn new(settings: AuditSyslog) -> SyslogSink {
        SyslogSink {
            settings,
            udp: None,
            tcp: None,
            retry_at: None,
            host: hostname(),
            pid: std::process::id(),
        }
    }

    fn send(&mut self, record: &[u8], audit: &Audit) {
        let msg = String::from_utf8_lossy(record);
        let decision = serde_json::from_slice::<serde_json::Value>(record)
            .ok()
            .and_then(|v| {
                v.get("decision")
                    .and_then(|d| d.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let mut timestamp = String::new();
        let now = crate::clock::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        crate::log::timestamp(&mut timestamp, now.as_secs(), now.subsec_millis());
        let line = syslog_line(
            self.settings.facility,
            &decision,
            &timestamp,
            &self.host,
            self.pid,
            &msg,
        );
        let sent = if self.settings.tcp {
            self.send_tcp(&line)
        } else {
            self.send_udp(&line)
        };
        match sent {
            Ok(()) => audit.written_syslog.fetch_add(1, Ordering::Relaxed),
            Err(()) => audit.dropped_syslog.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The receiver's address (resolved on each connect: a name may move).
    fn target(&self) -> Result<std::net::SocketAddr, ()> {
        self.settings
            .address
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or(())
    }

    fn send_udp(&mut self, line: &str) -> Result<(), ()> {
        if self.udp.is_none() {
            let target = self.target()?;
            let local = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let socket = UdpSocket::bind(local).map_err(|_| ())?;
            socket.connect(target).map_err(|_| ())?;
            self.udp = Some(socket);
        }
        let socket = self.udp.as_ref().ok_or(())?;
        socket.send(line.as_bytes()).map(|_| ()).map_err(|_| ())
    }

    fn send_tcp(&mut self, line: &str) -> Result<(), ()> {
        if self.tcp.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(());
            }
            let target = self.target()?;
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(s) => {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                    self.tcp = Some(s);
                    self.retry_at = None;
                }
                Err(_) => {
                    self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                    return Err(());
                }
            }
        }
        let framed = format!("{} {line}", line.len());
        let stream = self.tcp.as_mut().ok_or(())?;
        if stream.write_all(framed.as_bytes()).is_err() {
            self.tcp = None;
            return Err(());
        }
        Ok(())
    }
}

/// This machine's name (for the syslog header), `-` when unknown.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer,
    // which lives for the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "-".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() || name.contains(' ') {
        "-".into()
    } else {
        name
    }
}
