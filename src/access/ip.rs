//! IP filters, pure: CIDR ranges, the allow/block decision, and the client
//! address when the connection comes from a trusted proxy.
//!
//! - blocklist wins; a non-empty allowlist admits only its ranges;
//! - the client address is the socket peer, or, when the peer is in
//!   `server.trusted_proxies`, the right-most address of `X-Forwarded-For`
//!   that is not itself a trusted proxy (addresses to its left were written
//!   by whoever the client is, and can be forged).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are compared as IPv4.

use std::net::IpAddr;

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let net = canonical(net);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length (0-{max})"))?,
        };
        Ok(Cidr { net, prefix })
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn any(ranges: &[Cidr], ip: IpAddr) -> bool {
    ranges.iter().any(|r| r.contains(ip))
}

/// A bucket's filter: blocklist wins, a non-empty allowlist admits only its ranges.
pub fn allowed(ip: IpAddr, allowlist: &[Cidr], blocklist: &[Cidr]) -> bool {
    !any(blocklist, ip) && (allowlist.is_empty() || any(allowlist, ip))
}

/// The client's address: the peer, or behind trusted proxies the right-most
/// untrusted `X-Forwarded-For` entry. A malformed entry ends the walk (the
/// last trusted hop is then the client as far as we can tell).
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    if !any(trusted, peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in chain.rsplit(',').map(str::trim) {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            break;
        };
        client = canonical(ip);
        if !any(trusted, client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| Cidr::parse(s).unwrap()).collect()
    }

    #[test]
    fn ranges() {
        let r = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(r.contains(ip("10.255.1.2")));
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("::ffff:10.1.2.3")));
        let r = Cidr::parse("2001:db8::/32").unwrap();
        assert!(r.contains(ip("2001:db8:1::7")));
        assert!(!r.contains(ip("2001:db9::1")));
        assert!(!r.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "host/8", "::/129", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blocklist_wins_and_allowlist_admits_only_its_ranges() {
        let allow = cidrs(&["10.0.0.0/8", "2001:db8::/32"]);
        let block = cidrs(&["10.1.2.3/32"]);
        assert!(allowed(ip("10.9.9.9"), &allow, &block));
        assert!(!allowed(ip("10.1.2.3"), &allow, &block));
        assert!(!allowed(ip("192.168.1.1"), &allow, &block));
        assert!(allowed(ip("192.168.1.1"), &[], &block));
        assert!(!allowed(ip("10.1.2.3"), &[], &block));
    }

    #[test]
    fn client_address_behind_trusted_proxies() {
        let trusted = cidrs(&["127.0.0.1/32", "10.0.0.0/8"]);
        // Untrusted peer: its X-Forwarded-For means nothing.
        assert_eq!(
            client_address(ip("1.2.3.4"), Some("9.9.9.9"), &trusted),
            ip("1.2.3.4")
        );
        // Right-most untrusted entry; the forged left part is ignored.
        assert_eq!(
            client_address(
                ip("127.0.0.1"),
                Some("6.6.6.6, 5.5.5.5, 10.0.0.7"),
                &trusted
            ),
            ip("5.5.5.5")
        );
        assert_eq!(
            client_address(ip("127.0.0.1"), None, &trusted),
            ip("127.0.0.1")
        );
        assert_eq!(
            client_address(ip("127.0.0.1"), Some("garbage, 10.0.0.2"), &trusted),
            ip("10.0.0.2")
        );
    }
}
