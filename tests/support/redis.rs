//! A real `redis-server` on a loopback port, started and stopped by PID,
//! and `redis-cli` for what a test does to it behind the proxy's back.

use super::{free_port, kill_pid};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    password: Option<String>,
    /// Serves TLS only (`--tls-port`), with this certificate and key.
    tls: Option<(String, String)>,
    /// More `redis-server` arguments (a Cluster node's).
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// A server on a free port, no persistence.
    pub fn start() -> Redis {
        Self::start_on(free_port(), None)
    }

    /// A server on `port` that wants `password` (when given).
    pub fn start_on(port: u16, password: Option<&str>) -> Redis {
        let mut r = Redis {
            port,
            password: password.map(str::to_string),
            tls: None,
            extra: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        r.restart();
        r
    }

    /// A replica of the server on `primary`'s port.
    pub fn start_replica_of(primary: u16) -> Redis {
        let mut r = Redis {
            port: free_port(),
            password: None,
            tls: None,
            extra: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.to_string(),
            ],
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        r.restart();
        r
    }

    /// A server speaking TLS only, with this certificate and key (PEM
    /// files); clients are not asked for certificates.
    pub fn start_tls(cert_file: &str, key_file: &str) -> Redis {
        let mut r = Redis {
            port: free_port(),
            password: None,
            tls: Some((cert_file.to_string(), key_file.to_string())),
            extra: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        r.restart();
        r
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", cert, "--tls-key-file", key])
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        cmd.args(&self.extra);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_pid(&mut c, libc::SIGKILL);
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` with `args`; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Every key (the test servers hold only the proxy's).
    pub fn keys(&self) -> Vec<String> {
        self.cli(&["--scan"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster on loopback: three primaries, each with one replica,
/// made by `redis-cli --cluster create`, its nodes started and stopped by
/// PID. Nodes fail over one second after a primary stops answering.
pub struct Cluster {
    /// Every node, primaries first as created (a failover changes roles).
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                let mut r = Redis {
                    port: free_port(),
                    password: None,
                    tls: None,
                    extra: Vec::new(),
                    dir: tempfile::tempdir().expect("temp dir"),
                    child: None,
                };
                r.extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-port",
                    &free_port().to_string(),
                    "--cluster-config-file",
                    &r.dir.path().join("nodes.conf").display().to_string(),
                ]
                .map(str::to_string)
                .to_vec();
                r.restart();
                r
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                && n.cli(&["CLUSTER", "SLOTS"]).lines().count() > 0
        }) || !cluster.replicas_synced()
        {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn replicas_synced(&self) -> bool {
        self.nodes.iter().all(|n| {
            let role = n.cli(&["ROLE"]);
            !role.starts_with("slave") || role.contains("connected")
        })
    }

    /// The URL of the first node: the proxy learns the rest.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The nodes that are primaries now.
    pub fn primaries(&self) -> Vec<&Redis> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some() && n.cli(&["ROLE"]).starts_with("master"))
            .collect()
    }

    /// The node whose replica is `primary` (by port), once it is one.
    pub fn replica_of(&self, primary: u16) -> Option<&Redis> {
        self.nodes.iter().find(|n| {
            n.child.is_some() && n.cli(&["ROLE"]).lines().nth(2) == Some(&primary.to_string())
        })
    }

    /// Whether every running node's slot map has left `port` (a lost
    /// primary's slots moved to its promoted replica everywhere).
    pub fn forgot(&self, port: u16) -> bool {
        let port = port.to_string();
        self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
            !n.cli(&["CLUSTER", "SLOTS"])
                .lines()
                .any(|l| l.trim() == port)
        })
    }

    /// Every key on every running primary.
    pub fn keys(&self) -> Vec<String> {
        self.primaries().iter().flat_map(|n| n.keys()).collect()
    }
}

/// A Redis Sentinel on a loopback port watching the primary on one port
/// under the name "mymaster" (quorum 1): it fails the primary over to a
/// replica one second after it stops answering.
pub struct Sentinel {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Sentinel {
    pub fn start(primary: u16) -> Sentinel {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        // Sentinel rewrites its file as it learns: one of its own.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {primary} 1\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
                dir.path().display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Sentinel mode)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the Sentinel did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sentinel {
            port,
            _dir: dir,
            child: Some(child),
        }
    }

    /// The port of the primary it names now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_pid(&mut c, libc::SIGKILL);
        }
    }
}
