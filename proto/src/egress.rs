//! Which network addresses a component's outbound requests may reach.
//!
//! Outbound requests are refused, after name resolution, when they would
//! reach loopback, link-local (cloud metadata lives at 169.254.169.254),
//! private (RFC 1918, fc00::/7), shared (100.64.0.0/10) or other
//! non-public addresses, unless an admin allows those ranges
//! ([`PrivateEgress`], the `--allow-private-egress` flag). The host applies
//! this to every connection it opens for a component; the control plane
//! applies it to `allow_outbound` entries when a service is deployed, so a
//! literal such as `169.254.169.254` or `localhost` is refused up front.
//! Pure: no resolution or I/O here.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of non-public address `ip` is, or `None` for a public one.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => non_public_v4(v4),
            None => non_public_v6(v6),
        },
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match () {
        () if ip.is_loopback() => "a loopback address",
        () if ip.is_link_local() => "a link-local address (cloud metadata services live there)",
        () if ip.is_private() => "a private address (RFC 1918)",
        () if a == 100 && (64..128).contains(&b) => "a shared address (100.64.0.0/10, carrier-grade NAT)",
        () if a == 0 => "an unspecified address (0.0.0.0/8)",
        () if ip.is_broadcast() || ip.is_multicast() => "a broadcast or multicast address",
        () => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match () {
        () if ip.is_loopback() => "a loopback address",
        () if ip.is_unspecified() => "an unspecified address (::)",
        () if first & 0xffc0 == 0xfe80 => "a link-local address (fe80::/10)",
        () if first & 0xfe00 == 0xfc00 => "a private address (unique local, fc00::/7)",
        () if ip.is_multicast() => "a multicast address",
        () => return None,
    })
}

/// The non-public ranges an admin lets components reach anyway (the
/// `--allow-private-egress` flag): empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivateEgress {
    allowed: Vec<IpNet>,
}

/// Why an `--allow-private-egress` value or an `allow_outbound` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// Not an address or a CIDR range.
    #[error("{0:?} is not an IP address or CIDR range (e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)")]
    BadRange(String),
    /// The entry names a non-public address the admin has not allowed.
    #[error("{entry} is {kind}; components may not call loopback, link-local or private addresses unless an admin allows the range (--allow-private-egress)")]
    NonPublic { entry: String, kind: &'static str },
}

impl PrivateEgress {
    /// Allows exactly these ranges.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        PrivateEgress { allowed }
    }

    /// Parses a comma-separated list of CIDR ranges or single addresses.
    pub fn parse(list: &str) -> Result<Self, EgressError> {
        let allowed = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                item.parse::<IpNet>().or_else(|_| item.parse::<IpAddr>().map(IpNet::from)).map_err(|_| EgressError::BadRange(item.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(PrivateEgress { allowed })
    }

    /// The ranges allowed, for messages.
    pub fn describe(&self) -> String {
        if self.allowed.is_empty() { "none".into() } else { self.allowed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ") }
    }

    /// Whether the admin allowed `ip` explicitly.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allowed.iter().any(|net| net.contains(&ip))
    }

    /// Why a connection to `ip` is refused, or `None` if it may go ahead.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        non_public(ip).filter(|_| !self.allows(ip))
    }

    /// Checks one `allow_outbound` entry (`host`, `host:port`, `*.domain`,
    /// `[v6]:port`): an address literal in a refused range, or `localhost`
    /// (and names under `.localhost`, which resolve to loopback by RFC
    /// 6761), is refused. Other names are checked when they are resolved.
    pub fn check_entry(&self, entry: &str) -> Result<(), EgressError> {
        let host = entry_host(entry);
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = if name == "localhost" || name.ends_with(".localhost") { Some(IpAddr::V4(Ipv4Addr::LOCALHOST)) } else { host.parse::<IpAddr>().ok() };
        match ip.and_then(|ip| self.refusal(ip)) {
            Some(kind) => Err(EgressError::NonPublic { entry: entry.to_string(), kind }),
            None => Ok(()),
        }
    }
}

/// The host part of an `allow_outbound` entry.
fn entry_host(entry: &str) -> &str {
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match entry.rsplit_once(':') {
        // One colon and digits after it: a port. More colons: a bare IPv6 address.
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => entry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_ranges_are_named() {
        for (ip, kind) in [
            ("127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("192.168.1.1", Some("private")),
            ("100.64.0.1", Some("shared")),
            ("100.128.0.1", None),
            ("0.0.0.0", Some("unspecified")),
            ("::1", Some("loopback")),
            ("fe80::1", Some("link-local")),
            ("fd12::1", Some("private")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("93.184.216.34", None),
            ("2606:4700::1111", None),
        ] {
            let found = non_public(ip.parse().expect("an address"));
            match kind {
                Some(word) => assert!(found.is_some_and(|k| k.contains(word)), "{ip}: {found:?}"),
                None => assert_eq!(found, None, "{ip}"),
            }
        }
    }

    #[test]
    fn admins_can_allow_ranges() {
        let policy = PrivateEgress::parse("10.0.0.0/8, 127.0.0.1").expect("parses");
        assert_eq!(policy.refusal("10.9.9.9".parse().expect("ip")), None);
        assert_eq!(policy.refusal("127.0.0.1".parse().expect("ip")), None);
        assert!(policy.refusal("127.0.0.2".parse().expect("ip")).is_some());
        assert!(policy.refusal("::ffff:192.168.0.1".parse().expect("ip")).is_some());
        assert_eq!(PrivateEgress::parse("10.0.0.0/33"), Err(EgressError::BadRange("10.0.0.0/33".into())));
        assert_eq!(PrivateEgress::parse("").expect("empty is none"), PrivateEgress::default());
    }

    #[test]
    fn allow_outbound_entries_are_checked() {
        let none = PrivateEgress::default();
        for refused in ["169.254.169.254", "169.254.169.254:80", "127.0.0.1:8080", "localhost", "LOCALHOST:3000", "api.localhost", "[::1]:80", "::1", "10.0.0.1"] {
            let error = none.check_entry(refused).expect_err(refused).to_string();
            assert!(error.contains(refused) && error.contains("--allow-private-egress"), "{error}");
        }
        for allowed in ["api.example.com", "api.example.com:443", "*.example.com", "93.184.216.34", "[2606:4700::1111]:443"] {
            assert_eq!(none.check_entry(allowed), Ok(()), "{allowed}");
        }
        let loopback = PrivateEgress::parse("127.0.0.0/8").expect("parses");
        assert_eq!(loopback.check_entry("localhost:8080"), Ok(()));
        assert!(loopback.check_entry("169.254.169.254").is_err());
    }
}
