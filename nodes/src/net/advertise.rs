//! `start --advertise`: the addresses other nodes dial to reach this one.
//!
//! A list of `HOST[:PORT]`, comma-separated: an IPv4 address, a bracketed
//! IPv6 address (`[2001:db8::1]:7401`; a bare IPv6 address is a host
//! without a port) or a DNS name. Without a port an entry means "this host,
//! the port the node is bound to" (so `--listen 0.0.0.0:0 --advertise
//! 192.0.2.10` advertises the port the system chose). An unspecified
//! address (`0.0.0.0`, `::`) is refused: no other machine can dial it.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use super::MAX_LOCATOR_ADDRS;

/// One advertised address: a host (an IPv6 address in brackets) and a
/// port, or none for the bound port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hint {
    host: String,
    port: Option<u16>,
}

/// The parsed value of `--advertise`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise(Vec<Hint>);

impl Advertise {
    /// Parses `HOST[:PORT][,HOST[:PORT]…]`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Advertise, String> {
        let mut hints: Vec<Hint> = Vec::new();
        for entry in text.split(',') {
            let hint = parse_one(entry.trim())
                .map_err(|why| format!("bad --advertise value {:?}: {why}", entry.trim()))?;
            if !hints.contains(&hint) {
                hints.push(hint);
            }
        }
        if hints.len() > MAX_LOCATOR_ADDRS {
            return Err(format!(
                "bad --advertise value {text:?}: at most {MAX_LOCATOR_ADDRS} addresses"
            ));
        }
        Ok(Advertise(hints))
    }

    /// The `host:port` texts put in locators, with `bound_port` for the
    /// entries without a port.
    pub fn addrs(&self, bound_port: u16) -> Vec<String> {
        self.0
            .iter()
            .map(|h| format!("{}:{}", h.host, h.port.unwrap_or(bound_port)))
            .collect()
    }
}

impl fmt::Display for Advertise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&h.host)?;
            if let Some(p) = h.port {
                write!(f, ":{p}")?;
            }
        }
        Ok(())
    }
}

fn parse_one(entry: &str) -> Result<Hint, String> {
    if entry.is_empty() {
        return Err("an empty address; expected HOST[:PORT]".into());
    }
    // [v6] or [v6]:port
    if let Some(rest) = entry.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address is written [ADDRESS] or [ADDRESS]:PORT")?;
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("{inner:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(parse_port(
                p.strip_prefix(':')
                    .ok_or("expected :PORT after the bracketed IPv6 address")?,
            )?),
        };
        return host_ip(IpAddr::V6(ip), port);
    }
    // A bare address, IPv4 or IPv6: a host without a port.
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return host_ip(ip, None);
    }
    let (host, port) = match entry.rsplit_once(':') {
        Some((h, p)) => (h, Some(parse_port(p)?)),
        None => (entry, None),
    };
    if host.contains(':') {
        return Err("an IPv6 address with a port is written [ADDRESS]:PORT".into());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return host_ip(ip, port);
    }
    if host.is_empty() {
        return Err("no host; expected HOST[:PORT]".into());
    }
    let name_ok = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        // All digits and dots but no IPv4 address (e.g. 10.0.0.256).
        && !host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !name_ok {
        return Err(format!(
            "{host:?} is neither an IP address nor a DNS name; expected HOST[:PORT]"
        ));
    }
    Ok(Hint {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be dialled; give the port, or leave it out for the port the node is bound to".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{p:?} is not a port (1 to 65535)")),
    }
}

fn host_ip(ip: IpAddr, port: Option<u16>) -> Result<Hint, String> {
    if ip.is_unspecified() {
        return Err(format!(
            "{ip} is no address another machine can dial; advertise an address or DNS name of this machine"
        ));
    }
    if ip.is_multicast() {
        return Err(format!("{ip} is a multicast address"));
    }
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok(Hint { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_ports() {
        let a = Advertise::parse(
            "192.0.2.10:7401, [2001:db8::1]:7402,node1.Example.com,::1,[::1],10.0.0.1",
        )
        .unwrap();
        assert_eq!(
            a.addrs(9000),
            vec![
                "192.0.2.10:7401",
                "[2001:db8::1]:7402",
                "node1.example.com:9000",
                "[::1]:9000",
                "10.0.0.1:9000"
            ]
        );
        // Printed for remembering, and parsed back the same.
        assert_eq!(Advertise::parse(&a.to_string()).unwrap(), a);
        assert_eq!(Advertise::parse("host:1").unwrap().addrs(5), vec!["host:1"]);
    }

    #[test]
    fn refuses_bad_values() {
        for bad in [
            "",
            ",",
            "0.0.0.0",
            "0.0.0.0:7401",
            "::",
            "[::]:7401",
            "[::]",
            "127.0.0.1:0",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:port",
            "fe80::1:x",
            "2001:db8::1:7401:x",
            "[::1",
            "[::1]7401",
            "[nothost]:1",
            "10.0.0.256",
            "1.2.3",
            "no spaces",
            "under_score",
            "-bad.example",
            ":7401",
            "224.0.0.1",
            "a,b,c,d,e,f,g,h,i",
        ] {
            assert!(Advertise::parse(bad).is_err(), "accepted {bad:?}");
        }
        let e = Advertise::parse("0.0.0.0:7401").unwrap_err();
        assert!(e.contains("0.0.0.0"), "{e}");
    }
}
