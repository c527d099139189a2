//! Redis Cluster, the pure parts: which of the 16384 slots a key hashes to
//! (CRC16 of its hash tag), the slot map read from `CLUSTER SLOTS`, and the
//! redirections a node answers with (`MOVED`, `ASK`). The I/O that follows
//! them is the reader's (`mod.rs`).
//!
//! Every key of one object (its entries, their chunks and leases, its index
//! set) shares one hash tag, so they live on one slot: one node answers a
//! whole lookup, and a write's script touches one slot only.

use redis_protocol::resp2::types::OwnedFrame;

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// CRC16/XMODEM (polynomial 0x1021, no reflection, initial 0), the hash
/// Redis Cluster maps keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: the CRC16 of its hash tag (what lies between the
/// first `{` and the next `}`, when that is not empty), else of the key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// Which node serves each slot, as one node said (`CLUSTER SLOTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The primaries' addresses (`host:port`).
    pub nodes: Vec<String>,
    /// For each slot, its primary's index in `nodes`; `u16::MAX` where no
    /// node serves it.
    owner: Vec<u16>,
}

/// No node serves the slot.
const NOBODY: u16 = u16::MAX;

impl SlotMap {
    /// Every slot on `address` (until the real map is read).
    pub fn single(address: &str) -> SlotMap {
        SlotMap {
            nodes: vec![address.to_string()],
            owner: vec![0; SLOTS],
        }
    }

    /// The map in a `CLUSTER SLOTS` reply: for each range, its first and
    /// last slot, then its primary (`[host, port, id, ...]`) and replicas.
    /// A node that names no host (`""` or `"?"`) is reached at
    /// `fallback_host`, the host the reply came from.
    pub fn from_reply(reply: &OwnedFrame, fallback_host: &str) -> Result<SlotMap, String> {
        let OwnedFrame::Array(ranges) = reply else {
            return Err(format!("CLUSTER SLOTS answered {reply:?}"));
        };
        let mut map = SlotMap {
            nodes: Vec::new(),
            owner: vec![NOBODY; SLOTS],
        };
        for range in ranges {
            let OwnedFrame::Array(parts) = range else {
                return Err("a CLUSTER SLOTS range is not an array".into());
            };
            let (Some(OwnedFrame::Integer(first)), Some(OwnedFrame::Integer(last))) =
                (parts.first(), parts.get(1))
            else {
                return Err("a CLUSTER SLOTS range has no bounds".into());
            };
            let Some(OwnedFrame::Array(primary)) = parts.get(2) else {
                return Err("a CLUSTER SLOTS range names no primary".into());
            };
            let host = match primary.first() {
                Some(OwnedFrame::BulkString(h)) if !h.is_empty() && h.as_slice() != b"?" => {
                    String::from_utf8_lossy(h).into_owned()
                }
                _ => fallback_host.to_string(),
            };
            let Some(OwnedFrame::Integer(port)) = primary.get(1) else {
                return Err("a CLUSTER SLOTS primary has no port".into());
            };
            let address = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let index = match map.nodes.iter().position(|n| *n == address) {
                Some(i) => i,
                None => {
                    map.nodes.push(address);
                    map.nodes.len() - 1
                }
            } as u16;
            let (first, last) = (*first as usize, *last as usize);
            if first > last || last >= SLOTS {
                return Err(format!(
                    "CLUSTER SLOTS range {first}-{last} is out of bounds"
                ));
            }
            map.owner[first..=last].fill(index);
        }
        Ok(map)
    }

    /// The address of the primary serving `slot`, if one does.
    pub fn node_of(&self, slot: u16) -> Option<&str> {
        let i = *self.owner.get(slot as usize)?;
        self.nodes.get(i as usize).map(String::as_str)
    }

    /// Learns that `slot` moved to `address` (a `MOVED` answer), until the
    /// map is read again.
    pub fn moved(&mut self, slot: u16, address: &str) {
        let index = match self.nodes.iter().position(|n| n == address) {
            Some(i) => i,
            None => {
                self.nodes.push(address.to_string());
                self.nodes.len() - 1
            }
        };
        if let Some(o) = self.owner.get_mut(slot as usize) {
            *o = index as u16;
        }
    }
}

/// A node's answer that the key lives elsewhere.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED <slot> <host:port>`: the slot lives there now.
    Moved(u16, String),
    /// `ASK <slot> <host:port>`: this key, this once, is asked there
    /// (after `ASKING`): the slot is being migrated.
    Ask(u16, String),
}

/// The redirection in an error reply, if it is one. A node that names no
/// host (`:port`) is on `fallback_host`.
pub fn redirect(error: &str, fallback_host: &str) -> Option<Redirect> {
    let mut words = error.split_ascii_whitespace();
    let kind = words.next()?;
    let slot = words.next()?.parse::<u16>().ok()?;
    let to = words.next()?;
    let to = match to.strip_prefix(':') {
        Some(port) => format!("{fallback_host}:{port}"),
        None => to.to_string(),
    };
    match kind {
        "MOVED" => Some(Redirect::Moved(slot, to)),
        "ASK" => Some(Redirect::Ask(slot, to)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_to_the_slots_redis_cluster_gives_them() {
        // The check value of CRC16/XMODEM, and slots the Redis Cluster
        // specification and `CLUSTER KEYSLOT` give.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{user1000}.followers"), slot(b"user1000"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS as u16);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"p:{abc}:x:1"), slot(b"p:{abc}:lease"));
    }

    fn node(host: &str, port: i64) -> OwnedFrame {
        OwnedFrame::Array(vec![
            OwnedFrame::BulkString(host.as_bytes().to_vec()),
            OwnedFrame::Integer(port),
            OwnedFrame::BulkString(b"id".to_vec()),
        ])
    }

    fn range(first: i64, last: i64, primary: OwnedFrame) -> OwnedFrame {
        OwnedFrame::Array(vec![
            OwnedFrame::Integer(first),
            OwnedFrame::Integer(last),
            primary,
            node("127.0.0.1", 9999),
        ])
    }

    #[test]
    fn a_slot_map_is_read_from_cluster_slots_and_learns_moves() {
        let reply = OwnedFrame::Array(vec![
            range(0, 5460, node("127.0.0.1", 7000)),
            range(5461, 10922, node("", 7001)),
            range(10923, 16383, node("::1", 7002)),
        ]);
        let mut map = SlotMap::from_reply(&reply, "10.0.0.9").expect("a map");
        assert_eq!(map.node_of(0), Some("127.0.0.1:7000"));
        assert_eq!(map.node_of(5460), Some("127.0.0.1:7000"));
        assert_eq!(map.node_of(5461), Some("10.0.0.9:7001"));
        assert_eq!(map.node_of(16383), Some("[::1]:7002"));
        assert_eq!(map.nodes.len(), 3, "replicas are not primaries");
        map.moved(42, "127.0.0.1:7003");
        assert_eq!(map.node_of(42), Some("127.0.0.1:7003"));
        assert_eq!(map.node_of(43), Some("127.0.0.1:7000"));
        let partial = OwnedFrame::Array(vec![range(0, 99, node("h", 1))]);
        let partial = SlotMap::from_reply(&partial, "x").expect("a map");
        assert_eq!(partial.node_of(100), None, "an unserved slot");
        assert!(SlotMap::from_reply(&OwnedFrame::Null, "x").is_err());
        let bad = OwnedFrame::Array(vec![range(10, 20_000, node("h", 1))]);
        assert!(SlotMap::from_reply(&bad, "x").is_err());
    }

    #[test]
    fn moved_and_ask_answers_are_read_and_other_errors_are_not() {
        assert_eq!(
            redirect("MOVED 3999 127.0.0.1:6381", "h"),
            Some(Redirect::Moved(3999, "127.0.0.1:6381".into()))
        );
        assert_eq!(
            redirect("ASK 3999 10.0.0.2:7000", "h"),
            Some(Redirect::Ask(3999, "10.0.0.2:7000".into()))
        );
        assert_eq!(
            redirect("MOVED 1 :7005", "10.1.1.1"),
            Some(Redirect::Moved(1, "10.1.1.1:7005".into()))
        );
        assert_eq!(redirect("ERR unknown command", "h"), None);
        assert_eq!(redirect("OOM command not allowed", "h"), None);
        assert_eq!(redirect("MOVED x y", "h"), None);
    }
}
