//! One thread's way to Redis, a single server or a Cluster: per node, its
//! idle connections, a cap on how many it opens, and a breaker; and the
//! routing of each command to the node serving its key's slot.
//!
//! Every core has one ([`Reader`]), and so do the writer, the purge and the
//! fleet threads. It starts by sending everything to `redis_url`'s server
//! (or the first of `cluster.nodes`). A node that answers `MOVED` is a
//! Cluster's: the slot map is read (`CLUSTER SLOTS`, from the first node
//! known that answers) and commands go to the node serving their key's
//! slot from then on. `ASK` (a slot being migrated) is followed once, after
//! `ASKING`. A node that fails makes the map be read again (at most once a
//! second): that is how a Cluster's failover is found. Three failures in a
//! row open a node's breaker, and it is not asked for five seconds: a dead
//! Redis costs no request its timeout.
//!
//! With `cache.redis.sentinel`, commands go to the primary the Sentinels
//! name (`SENTINEL get-master-addr-by-name`, asked before the first
//! command); a primary that fails, or answers `READONLY` (it was demoted),
//! makes them be asked again, at most once a second: that is how a
//! Sentinel failover is found.

use super::batch::{self, Batch, Deferred, Member, Waited};
use super::cluster::{self, Redirect, SlotMap};
use super::conn::Conn;
use super::RedisTier;
use crate::config::{BreakerSettings, Level, RedisCache, RedisSentinel};
use crate::log;
use crate::upstream::breaker::{Admit, Breaker};
use redis_protocol::resp2::types::OwnedFrame;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Redirections followed for one command before giving up.
const MAX_REDIRECTS: usize = 5;
/// The slot map is read again at most this often after a node failed.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Three failures in a row stop a core asking a node for five seconds.
fn breaker_settings() -> BreakerSettings {
    BreakerSettings {
        failure_threshold: 3,
        success_threshold: 1,
        open_for: Duration::from_secs(5),
        half_open_requests: 1,
    }
}

/// One node: its connections, its breaker, and the batch of reads being
/// gathered for it.
struct Node {
    address: String,
    idle: RefCell<Vec<Conn>>,
    /// Reads gathered to be sent together (`batch.rs`), until its leader
    /// closes it.
    batch: RefCell<Option<Rc<Batch>>>,
    /// Batches sent and not yet answered, and the leaders waiting for one
    /// to land.
    flights: Cell<usize>,
    landed: RefCell<Vec<std::task::Waker>>,
    /// How large its replies to plain reads have been of late.
    sizes: batch::ReplySizes,
    open: Cell<usize>,
    /// Commands waiting for a connection: woken when one is freed.
    waiting: RefCell<Vec<std::task::Waker>>,
    /// The last command failed (timed out, connection lost): nobody waits
    /// for a connection until one succeeds again.
    failing: Cell<bool>,
    breaker: RefCell<Breaker>,
}

impl Node {
    fn new(address: &str) -> Node {
        Node {
            address: address.to_string(),
            idle: RefCell::new(Vec::new()),
            batch: RefCell::new(None),
            flights: Cell::new(0),
            landed: RefCell::new(Vec::new()),
            sizes: batch::ReplySizes::default(),
            open: Cell::new(0),
            waiting: RefCell::new(Vec::new()),
            failing: Cell::new(false),
            breaker: RefCell::new(Breaker::new(&breaker_settings())),
        }
    }
}

/// One thread's connections to Redis.
pub struct Reader {
    /// Connections per node.
    max: usize,
    /// Every node known, `redis_url`'s first.
    nodes: RefCell<Vec<Rc<Node>>>,
    /// The Cluster's slot map, once a node said `MOVED`.
    map: RefCell<Option<SlotMap>>,
    /// A node failed or moved a slot: read the map again.
    stale: Cell<bool>,
    last_refresh: Cell<Option<Instant>>,
    /// When this reader last said Redis was unavailable (WARN once per 10 s).
    warned: Cell<Option<Instant>>,
    /// It looked for the slot map among the nodes other readers learnt.
    seeded: Cell<bool>,
    /// The primary the Sentinels last named (`cache.redis.sentinel`).
    primary: RefCell<Option<String>>,
}

impl Reader {
    /// A reader holding at most `max` connections to each node.
    pub fn new(max: usize) -> Reader {
        Reader {
            max: max.max(1),
            nodes: RefCell::new(Vec::new()),
            map: RefCell::new(None),
            stale: Cell::new(false),
            last_refresh: Cell::new(None),
            warned: Cell::new(None),
            seeded: Cell::new(false),
            primary: RefCell::new(None),
        }
    }

    /// Whether Redis answered as a Cluster (a node said `MOVED`).
    pub fn is_cluster(&self) -> bool {
        self.map.borrow().is_some()
    }

    /// The addresses of every node known: the Sentinels' primary or
    /// `redis_url`'s, then `cluster.nodes`, then a Cluster's primaries
    /// (from this reader's map, and as other readers last read them).
    pub fn known_nodes(&self, tier: &RedisTier) -> Vec<String> {
        let first = self.primary.borrow().clone();
        let mut all = vec![first.unwrap_or_else(|| tier.settings.address.clone())];
        all.retain(|a| !a.is_empty());
        let mapped = self.map.borrow().as_ref().map(|m| m.nodes.clone());
        for n in tier
            .settings
            .seeds
            .iter()
            .cloned()
            .chain(mapped.unwrap_or_default())
            .chain(tier.cluster_nodes())
        {
            if !all.contains(&n) {
                all.push(n);
            }
        }
        all
    }

    /// Sends `args`, whose key is `key`, to the node serving the key, and
    /// reads its reply; redirections are followed. An error reply is `Err`
    /// (naming what Redis said), as is a failure or a breaker open.
    pub async fn call(
        &self,
        tier: &RedisTier,
        key: &[u8],
        args: &[&[u8]],
    ) -> Result<OwnedFrame, String> {
        match self.pipeline(tier, key, &[args]).await?.pop() {
            Some(OwnedFrame::Error(e)) => Err(format!("Redis said: {e}")),
            Some(reply) => Ok(reply),
            None => Err("no reply".into()),
        }
    }

    /// Sends `commands`, whose keys all share `key`'s slot, to its node in
    /// one write, and reads their replies in order (an error reply is one
    /// of them). A `MOVED` or `ASK` in any reply sends them all again to
    /// the node named (each command must bear repeating).
    pub async fn pipeline(
        &self,
        tier: &RedisTier,
        key: &[u8],
        commands: &[&[&[u8]]],
    ) -> Result<Vec<OwnedFrame>, String> {
        let s = &tier.settings;
        let slot = cluster::slot(key);
        // A reader new to a Cluster other readers have mapped reads the
        // map first: `redis_url`'s node may be the one that is gone.
        if self.map.borrow().is_none()
            && tier
                .knows_cluster
                .load(std::sync::atomic::Ordering::Relaxed)
            && !self.seeded.replace(true)
        {
            self.stale.set(true);
        }
        if s.sentinel.is_some() && self.primary.borrow().is_none() {
            self.stale.set(true);
        }
        self.refresh_if_stale(tier).await;
        let mut target = self.route(s, slot);
        if target.is_empty() {
            return Err("no Sentinel has named the primary yet".into());
        }
        let mut asking = false;
        for _ in 0..=MAX_REDIRECTS {
            let node = self.node(&target);
            let replies = self.on_node(s, &node, commands, asking).await?;
            if s.sentinel.is_some() && replies.iter().any(is_readonly) {
                // A demoted primary: the Sentinels are asked again.
                self.stale.set(true);
            }
            let redirect = replies.iter().find_map(|r| match r {
                OwnedFrame::Error(e) => cluster::redirect(e, host_of(&target)),
                _ => None,
            });
            match redirect {
                None => return Ok(replies),
                Some(Redirect::Moved(slot, to)) => {
                    self.map
                        .borrow_mut()
                        .get_or_insert_with(|| SlotMap::single(&s.address))
                        .moved(slot, &to);
                    self.stale.set(true);
                    (target, asking) = (to, false);
                }
                Some(Redirect::Ask(_, to)) => (target, asking) = (to, true),
            }
        }
        Err(format!("more than {MAX_REDIRECTS} Cluster redirections"))
    }

    /// Where `slot`'s commands go: its node in the map, else the primary
    /// the Sentinels named, else the server of `redis_url`.
    fn route(&self, s: &RedisCache, slot: u16) -> String {
        self.map
            .borrow()
            .as_ref()
            .and_then(|m| m.node_of(slot).map(str::to_string))
            .or_else(|| self.primary.borrow().clone())
            .unwrap_or_else(|| s.address.clone())
    }

    /// The node at `address`, known from now on.
    fn node(&self, address: &str) -> Rc<Node> {
        let mut nodes = self.nodes.borrow_mut();
        if let Some(n) = nodes.iter().find(|n| n.address == address) {
            return n.clone();
        }
        let n = Rc::new(Node::new(address));
        nodes.push(n.clone());
        n
    }

    /// `commands` on one of `node`'s connections (after `ASKING` when
    /// `asking`), through its breaker.
    async fn on_node(
        &self,
        s: &RedisCache,
        node: &Node,
        commands: &[&[&[u8]]],
        asking: bool,
    ) -> Result<Vec<OwnedFrame>, String> {
        let (admit, _) = node.breaker.borrow_mut().admit(crate::clock::now_ms());
        if admit == Admit::Rejected {
            self.node_failed(s);
            return Err(format!(
                "Redis at {} failing; not asked for a while (breaker open)",
                node.address
            ));
        }
        let deadline = Instant::now() + s.operation_timeout;
        let result = match commands {
            [read] if !asking && batch::batchable(commands) && node.sizes.small() => {
                self.batched(s, node, read, deadline).await
            }
            _ => self.alone(s, node, commands, asking, deadline).await,
        };
        // A node that answers at all is up, whatever it answered.
        node.breaker
            .borrow_mut()
            .record(admit, result.is_ok(), crate::clock::now_ms());
        if result.is_err() {
            self.node_failed(s);
        }
        result
    }

    /// `read` sent with the other reads of this core that reach `node` in
    /// the same pass of its run queue (`batch.rs`): joined to the batch
    /// being gathered, or leading a new one.
    async fn batched(
        &self,
        s: &RedisCache,
        node: &Node,
        read: &[&[u8]],
        deadline: Instant,
    ) -> Result<Vec<OwnedFrame>, String> {
        loop {
            let open = node.batch.borrow().clone().filter(|b| b.has_room());
            if let Some(batch) = open {
                let me = batch.join(read);
                let left = deadline.saturating_duration_since(Instant::now());
                match monoio::time::timeout(left, Member { batch: &batch, me }).await {
                    Ok(Waited::Done(outcome)) => return outcome,
                    Ok(Waited::Abandoned) => continue,
                    Err(_) => {
                        return Err(format!(
                            "{}: no reply within operation_timeout_ms",
                            node.address
                        ))
                    }
                }
            }
            let batch = Rc::new(Batch::default());
            let me = batch.join(read);
            *node.batch.borrow_mut() = Some(batch.clone());
            let mut leading = Leading {
                node,
                batch: &batch,
                flying: false,
                done: false,
            };
            // Gathered for one pass of the run queue, and for as long as
            // every flight is out: the busier Redis is, the deeper the batch.
            Deferred::default().await;
            while node.flights.get() >= batch::FLIGHTS && batch.has_room() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero()
                    || monoio::time::timeout(left, Freed::new(&node.landed))
                        .await
                        .is_err()
                {
                    break;
                }
            }
            // And while no connection is free.
            let replies = match self.checkout(s, node, deadline).await {
                Ok(conn) => {
                    leading.close();
                    let commands = batch.close();
                    let args: Vec<Vec<&[u8]>> = commands
                        .iter()
                        .map(|c| c.iter().map(Vec::as_slice).collect())
                        .collect();
                    let sent: Vec<&[&[u8]]> = args.iter().map(Vec::as_slice).collect();
                    node.flights.set(node.flights.get() + 1);
                    leading.flying = true;
                    self.on_conn(node, conn, &sent, false, deadline).await
                }
                Err(e) => {
                    leading.close();
                    batch.close();
                    Err(e)
                }
            };
            batch.finish(replies);
            leading.done = true;
            return batch.take(me).unwrap_or_else(|| Err("no reply".into()));
        }
    }

    /// `commands` on a connection of `node`'s own (after `ASKING` when
    /// `asking`), by `deadline`.
    async fn alone(
        &self,
        s: &RedisCache,
        node: &Node,
        commands: &[&[&[u8]]],
        asking: bool,
        deadline: Instant,
    ) -> Result<Vec<OwnedFrame>, String> {
        let conn = self.checkout(s, node, deadline).await?;
        self.on_conn(node, conn, commands, asking, deadline).await
    }

    /// `commands` on `conn`, a connection to `node` (after `ASKING` when
    /// `asking`), by `deadline`; the connection is idle again after, or
    /// dropped if it failed.
    async fn on_conn(
        &self,
        node: &Node,
        mut conn: Conn,
        commands: &[&[&[u8]]],
        asking: bool,
        deadline: Instant,
    ) -> Result<Vec<OwnedFrame>, String> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        const ASKING: &[&[u8]] = &[b"ASKING"];
        // Only a command sent after `ASKING` is copied into a new list.
        let with_asking: Vec<&[&[u8]]>;
        let sent = if asking {
            with_asking = std::iter::once(ASKING)
                .chain(commands.iter().copied())
                .collect();
            &with_asking[..]
        } else {
            commands
        };
        match conn.pipeline(sent, left).await {
            Ok(mut replies) => {
                node.failing.set(false);
                node.idle.borrow_mut().push(conn);
                wake(node);
                if asking {
                    replies.remove(0);
                }
                // Plain reads (one, or a batch of them): their sizes
                // decide whether the next are batched.
                if commands.first().is_some_and(|&c| batch::batchable(&[c])) {
                    node.sizes.record(&replies);
                }
                Ok(replies)
            }
            Err(e) => {
                node.failing.set(true);
                closed_one(node);
                Err(format!("{}: {e}", node.address))
            }
        }
    }

    /// A connection to `node` for one command: idle, new, or the next
    /// freed (not waited for while the node is failing).
    async fn checkout(
        &self,
        s: &RedisCache,
        node: &Node,
        deadline: Instant,
    ) -> Result<Conn, String> {
        loop {
            if let Some(c) = node.idle.borrow_mut().pop() {
                return Ok(c);
            }
            if node.open.get() < self.max {
                node.open.set(node.open.get() + 1);
                return Conn::open_at(s, &node.address).await.inspect_err(|_| {
                    node.failing.set(true);
                    closed_one(node);
                });
            }
            // A failing node is not waited for: a miss at once.
            if node.failing.get() {
                return Err("Redis is failing; not waiting for a busy connection".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || monoio::time::timeout(left, Freed::new(&node.waiting))
                    .await
                    .is_err()
            {
                return Err("every connection of this core stayed busy".into());
            }
        }
    }

    /// In a Cluster, a node that failed may have been replaced: the map is
    /// read again (from the nodes known, `cluster.nodes` among them) before
    /// the next command; under Sentinel, the primary is asked for again.
    fn node_failed(&self, s: &RedisCache) {
        if self.is_cluster() || s.sentinel.is_some() || !s.seeds.is_empty() {
            self.stale.set(true);
        }
    }

    /// Reads the slot map again when a node moved a slot or failed, at most
    /// once per [`REFRESH_EVERY`], from the first node that answers.
    async fn refresh_if_stale(&self, tier: &RedisTier) {
        let s = &tier.settings;
        if !self.stale.get()
            || self
                .last_refresh
                .get()
                .is_some_and(|t| t.elapsed() < REFRESH_EVERY)
        {
            return;
        }
        self.stale.set(false);
        self.last_refresh.set(Some(Instant::now()));
        if let Some(sentinel) = &s.sentinel {
            if !self.ask_sentinels(s, sentinel).await {
                self.stale.set(true);
            }
            return;
        }
        for address in self.known_nodes(tier) {
            let node = self.node(&address);
            if node.breaker.borrow_mut().admit(crate::clock::now_ms()).0 == Admit::Rejected {
                continue;
            }
            let Ok(mut replies) = self
                .on_node(s, &node, &[&[b"CLUSTER", b"SLOTS"]], false)
                .await
            else {
                continue;
            };
            match replies
                .pop()
                .map(|r| SlotMap::from_reply(&r, host_of(&address)))
            {
                Some(Ok(map)) => {
                    tier.learn_nodes(&map.nodes);
                    *self.map.borrow_mut() = Some(map);
                    return;
                }
                Some(Err(e)) => self.say(s, &format!("{address}: {e}")),
                None => {}
            }
        }
        // Nobody answered: try again on the next command after the pause.
        self.stale.set(true);
    }

    /// Asks the Sentinels, in order, which node is the primary; the first
    /// answer is where commands go from now on. Whether one answered.
    async fn ask_sentinels(&self, s: &RedisCache, sentinel: &RedisSentinel) -> bool {
        let ask: &[&[u8]] = &[
            b"SENTINEL",
            b"get-master-addr-by-name",
            sentinel.master.as_bytes(),
        ];
        let mut failed = Vec::new();
        for at in &sentinel.nodes {
            // One Sentinel costs a request at most the operation timeout,
            // however slow its connection is to open.
            let asked = async {
                let mut c = Conn::open_sentinel(s, at).await?;
                c.call(ask, s.operation_timeout).await
            };
            let reply = monoio::time::timeout(s.operation_timeout, asked)
                .await
                .unwrap_or_else(|_| Err("no answer within operation_timeout_ms".into()));
            match reply.map(|r| primary_of(&r)) {
                Ok(Some(primary)) => {
                    let before = self.primary.replace(Some(primary.clone()));
                    if before.as_deref() != Some(primary.as_str()) {
                        log!(
                            Level::Info,
                            "Redis primary named by Sentinel",
                            master = sentinel.master,
                            primary = primary,
                            sentinel = at,
                        );
                    }
                    return true;
                }
                Ok(None) => failed.push(format!("{at}: does not know {:?}", sentinel.master)),
                Err(e) => failed.push(format!("{at}: {e}")),
            }
        }
        self.say(
            s,
            &format!("no Sentinel named the primary ({})", failed.join("; ")),
        );
        false
    }

    /// Counts a failed command and says (at most once per 10 s) that
    /// Redis is unavailable.
    pub fn unavailable(&self, tier: &RedisTier, why: &str) {
        tier.errors.fetch_add(1, Ordering::Relaxed);
        self.say(&tier.settings, why);
    }

    fn say(&self, s: &RedisCache, why: &str) {
        let due = self
            .warned
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.warned.set(Some(Instant::now()));
            log!(
                Level::Warn,
                "Redis cache unavailable; serving from the other tiers and the origin",
                redis = s.shown(),
                error = why,
            );
        }
    }
}

/// The `host:port` in a `SENTINEL get-master-addr-by-name` reply (`None`:
/// the Sentinel does not know the name, or said something else).
fn primary_of(reply: &OwnedFrame) -> Option<String> {
    let OwnedFrame::Array(parts) = reply else {
        return None;
    };
    let [OwnedFrame::BulkString(host), OwnedFrame::BulkString(port)] = parts.as_slice() else {
        return None;
    };
    let host = std::str::from_utf8(host).ok()?;
    let port: u16 = std::str::from_utf8(port).ok()?.parse().ok()?;
    Some(match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    })
}

/// An error reply from a replica refusing a write.
fn is_readonly(reply: &OwnedFrame) -> bool {
    matches!(reply, OwnedFrame::Error(e) if e.starts_with("READONLY"))
}

/// A connection was closed (failed, or never opened): room for another.
fn closed_one(node: &Node) {
    node.open.set(node.open.get().saturating_sub(1));
    wake(node);
}

/// Wakes every command waiting for one of `node`'s connections: each looks
/// again (on one thread, in turn; the losers wait again).
fn wake(node: &Node) {
    for w in node.waiting.borrow_mut().drain(..) {
        w.wake();
    }
}

/// A batch being led: closed to new members once its leader sends it, and
/// abandoned (its members try again) if the leader's lookup is dropped
/// before the replies are handed out.
struct Leading<'a> {
    node: &'a Node,
    batch: &'a Rc<Batch>,
    /// Sent: one of the node's flights.
    flying: bool,
    done: bool,
}

impl Leading<'_> {
    /// No longer the node's batch being gathered.
    fn close(&self) {
        let mut open = self.node.batch.borrow_mut();
        if open.as_ref().is_some_and(|b| Rc::ptr_eq(b, self.batch)) {
            *open = None;
        }
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.flying {
            self.node.flights.set(self.node.flights.get() - 1);
            for w in self.node.landed.borrow_mut().drain(..) {
                w.wake();
            }
        }
        if !self.done {
            self.close();
            self.batch.abandon();
        }
    }
}

/// The host of `host:port` (brackets kept off an IPv6 address).
fn host_of(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Ready once woken (a connection was freed), after queueing its waker.
struct Freed<'a> {
    queue: &'a RefCell<Vec<std::task::Waker>>,
    queued: bool,
}

impl<'a> Freed<'a> {
    fn new(queue: &'a RefCell<Vec<std::task::Waker>>) -> Freed<'a> {
        Freed {
            queue,
            queued: false,
        }
    }
}

impl std::future::Future for Freed<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.queued {
            return std::task::Poll::Ready(());
        }
        self.queue.borrow_mut().push(cx.waker().clone());
        self.queued = true;
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_sentinel_reply_names_the_primary_or_nothing() {
        let reply = OwnedFrame::Array(vec![bulk("127.0.0.1"), bulk("6380")]);
        assert_eq!(primary_of(&reply).as_deref(), Some("127.0.0.1:6380"));
        let v6 = OwnedFrame::Array(vec![bulk("::1"), bulk("6380")]);
        assert_eq!(primary_of(&v6).as_deref(), Some("[::1]:6380"));
        // An unknown master name, a bad port, anything else: nothing.
        assert_eq!(primary_of(&OwnedFrame::Null), None);
        let bad = OwnedFrame::Array(vec![bulk("h"), bulk("port")]);
        assert_eq!(primary_of(&bad), None);
        assert_eq!(primary_of(&OwnedFrame::Error("ERR".into())), None);
    }

    #[test]
    fn only_a_replica_refusing_a_write_reads_as_demoted() {
        let readonly =
            OwnedFrame::Error("READONLY You can't write against a read only replica.".into());
        assert!(is_readonly(&readonly));
        assert!(!is_readonly(&OwnedFrame::Error(
            "OOM command not allowed".into()
        )));
        assert!(!is_readonly(&bulk("READONLY")));
    }
}
