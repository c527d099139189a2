//! IP filters, pure: CIDR ranges, the allow/block decision, and the client
//! address when the connection comes from a trusted proxy.
//!
//! - blocklist wins; a non-empty allowlist admits only its ranges;
//! - the client address is the socket peer, or, when the peer is in
//!   `server.trusted_proxies`, the right-most address of `X-Forwarded-For`
//!   that is not itself a trusted proxy (addresses to its left were written
//!   by whoever the client is, and can be forged);
//! - an entry is what real front ends write: `10.0.0.1`, `10.0.0.1:52345`,
//!   `2001:db8::1`, `[2001:db8::1]:443`, `fe80::1%eth0`, quoted or not;
//!   empty entries (a trailing comma) are skipped. An entry that still
//!   cannot be read fails closed ([`BadForwardedFor`]: the request is
//!   refused), never falling back to the trusted proxy's own address: that
//!   would bypass a blocklist and put every client behind the proxy in one
//!   per-address rate bucket.
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

/// A trusted proxy's `X-Forwarded-For` held an entry that is not an
/// address (the request is refused: 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadForwardedFor;

/// The address in one `X-Forwarded-For` entry: a bare address, with a
/// port (`a.b.c.d:p`, `[v6]:p`), bracketed, quoted, or with an IPv6 zone
/// id (dropped). `None` when it is none of these.
pub fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim().trim_matches('"');
    let host = if let Some(rest) = e.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        inside
    } else if e.matches(':').count() == 1 {
        let (h, port) = e.split_once(':')?;
        if !valid_port(port) {
            return None;
        }
        h
    } else {
        e
    };
    // A zone id (`fe80::1%eth0`, or `%25` as in a URI) names an interface
    // of the proxy's host; the address is what is filtered.
    let host = host.split('%').next().unwrap_or(host);
    host.parse::<IpAddr>().ok().map(canonical)
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// The client's address: the peer, or behind trusted proxies the right-most
/// untrusted `X-Forwarded-For` entry. An entry that cannot be read before
/// that one is found fails closed.
pub fn client_address(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted: &[Cidr],
) -> Result<IpAddr, BadForwardedFor> {
    if !any(trusted, peer) {
        return Ok(peer);
    }
    let Some(chain) = forwarded_for else {
        return Ok(peer);
    };
    let mut client = peer;
    for hop in chain.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
        client = parse_forwarded_entry(hop).ok_or(BadForwardedFor)?;
        if !any(trusted, client) {
            break;
        }
    }
    Ok(client)
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
            Ok(ip("1.2.3.4"))
        );
        // Right-most untrusted entry; the forged left part is ignored.
        assert_eq!(
            client_address(
                ip("127.0.0.1"),
                Some("6.6.6.6, 5.5.5.5, 10.0.0.7"),
                &trusted
            ),
            Ok(ip("5.5.5.5"))
        );
        assert_eq!(
            client_address(ip("127.0.0.1"), None, &trusted),
            Ok(ip("127.0.0.1"))
        );
        // Left of the client, garbage is the client's own writing: ignored.
        assert_eq!(
            client_address(ip("127.0.0.1"), Some("garbage, 5.5.5.5"), &trusted),
            Ok(ip("5.5.5.5"))
        );
        // All trusted, then garbage: the walk would need it; refused.
        assert_eq!(
            client_address(ip("127.0.0.1"), Some("garbage, 10.0.0.2"), &trusted),
            Err(BadForwardedFor)
        );
    }

    #[test]
    fn entries_as_front_ends_write_them() {
        for (entry, want) in [
            ("10.66.1.1", "10.66.1.1"),
            ("10.66.1.1:52345", "10.66.1.1"),
            ("[::ffff:10.66.1.1]:52345", "10.66.1.1"),
            ("::ffff:10.66.1.1", "10.66.1.1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%25eth0]:8080", "fe80::1"),
            ("\"[2001:db8::2]:1\"", "2001:db8::2"),
            (" 10.66.1.1 ", "10.66.1.1"),
        ] {
            assert_eq!(parse_forwarded_entry(entry), Some(ip(want)), "{entry}");
        }
        for bad in [
            "unknown",
            "10.66.1.1:",
            "10.66.1.1:port",
            "10.66.1.1:123456",
            "[2001:db8::1]x",
            "[2001:db8::1",
            "host.example",
            "",
        ] {
            assert_eq!(parse_forwarded_entry(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_port_or_trailing_comma_never_falls_back_to_the_proxy() {
        let trusted = cidrs(&["127.0.0.1/32"]);
        let peer = ip("127.0.0.1");
        for (chain, want) in [
            ("10.66.1.1:52345", "10.66.1.1"),
            ("[::ffff:10.66.1.1]:52345", "10.66.1.1"),
            ("10.66.1.1,", "10.66.1.1"),
            ("10.66.1.1, ", "10.66.1.1"),
            ("fe80::7%eth0", "fe80::7"),
        ] {
            assert_eq!(
                client_address(peer, Some(chain), &trusted),
                Ok(ip(want)),
                "{chain}"
            );
        }
        assert_eq!(
            client_address(peer, Some("unknown"), &trusted),
            Err(BadForwardedFor)
        );
        assert_eq!(
            client_address(peer, Some(","), &trusted),
            Ok(peer),
            "nothing named"
        );
    }
}
