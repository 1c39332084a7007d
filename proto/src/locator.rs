//! Locators: durable, bearer-secret references to a capability of a cluster.
//!
//! `capstan://<cluster-id>/<swiss>?at=<host:port>,<host:port>…`
//!
//! - `cluster-id`: blake3 of the cluster's public key, 32 bytes;
//! - `swiss`: 256 random bits, the secret that designates the capability;
//! - `at`: address hints (1 to [`MAX_ADDRS`]), tried in order. Nothing is
//!   trusted by address: the peer must prove it belongs to `cluster-id`.
//!
//! Both 32-byte fields are printed in lowercase unpadded base32 (52 digits).

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE32_NOPAD, Encoding};

/// At most this many address hints.
pub const MAX_ADDRS: usize = 8;
/// A locator longer than this is refused before parsing.
pub const MAX_LOCATOR_LEN: usize = 1024;

const SCHEME: &str = "capstan://";

/// Why a locator does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocatorError {
    #[error("a locator starts with capstan://")]
    Scheme,
    #[error("locator longer than {MAX_LOCATOR_LEN} characters")]
    TooLong,
    #[error("malformed locator: {0}")]
    Malformed(String),
}

/// A parsed locator.
#[derive(Clone, PartialEq, Eq)]
pub struct Locator {
    pub cluster: [u8; 32],
    pub swiss: [u8; 32],
    pub addrs: Vec<String>,
}

impl fmt::Debug for Locator {
    // Never print the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locator")
            .field("cluster", &encode32(&self.cluster))
            .field("swiss", &"<secret>")
            .field("addrs", &self.addrs)
            .finish()
    }
}

fn lower32() -> Encoding {
    let mut spec = BASE32_NOPAD.specification();
    spec.symbols = "abcdefghijklmnopqrstuvwxyz234567".into();
    spec.encoding().expect("valid base32 specification")
}

/// Lowercase unpadded base32 of 32 bytes (52 characters).
pub fn encode32(b: &[u8; 32]) -> String {
    lower32().encode(b)
}

/// Parses 52 base32 digits into 32 bytes.
pub fn decode32(s: &str, what: &str) -> Result<[u8; 32], LocatorError> {
    let bad = || LocatorError::Malformed(format!("{what} must be 52 base32 digits"));
    if s.len() != 52 {
        return Err(bad());
    }
    let v = lower32()
        .decode(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| bad())?;
    <[u8; 32]>::try_from(v.as_slice()).map_err(|_| bad())
}

/// Checks one `host:port` hint (an IP address or a DNS name, and a port).
fn valid_addr(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    // An IPv6 address is bracketed ([::1]:7401); a bare host has no colon.
    let host = match host.strip_prefix('[') {
        Some(inner) => match inner.strip_suffix(']') {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            _ => return false,
        },
        None if host.contains(':') => return false,
        None => host,
    };
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

impl Locator {
    /// The cluster id in base32.
    pub fn cluster_text(&self) -> String {
        encode32(&self.cluster)
    }
}

impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}?at={}",
            encode32(&self.cluster),
            encode32(&self.swiss),
            self.addrs.join(",")
        )
    }
}

impl FromStr for Locator {
    type Err = LocatorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > MAX_LOCATOR_LEN {
            return Err(LocatorError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(LocatorError::Scheme)?;
        let (path, query) = rest
            .split_once('?')
            .ok_or_else(|| LocatorError::Malformed("missing ?at=<host:port> hints".into()))?;
        let (cluster, swiss) = path
            .split_once('/')
            .ok_or_else(|| LocatorError::Malformed("expected <cluster-id>/<swiss>".into()))?;
        let cluster = decode32(cluster, "the cluster id")?;
        let swiss = decode32(swiss, "the swiss number")?;
        let mut addrs = Vec::new();
        for param in query.split('&') {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            match k {
                "at" => {
                    for a in v.split(',').filter(|a| !a.is_empty()) {
                        if !valid_addr(a) {
                            return Err(LocatorError::Malformed(format!(
                                "bad address hint {a:?}: expected host:port"
                            )));
                        }
                        addrs.push(a.to_string());
                    }
                }
                _ => {
                    return Err(LocatorError::Malformed(format!("unknown parameter {k:?}")));
                }
            }
        }
        if addrs.is_empty() {
            return Err(LocatorError::Malformed(
                "no address hints: expected ?at=<host:port>".into(),
            ));
        }
        if addrs.len() > MAX_ADDRS {
            return Err(LocatorError::Malformed(format!(
                "more than {MAX_ADDRS} address hints"
            )));
        }
        Ok(Locator {
            cluster,
            swiss,
            addrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Locator {
        Locator {
            cluster: [7; 32],
            swiss: [200; 32],
            addrs: vec!["127.0.0.1:7401".into(), "[::1]:7402".into()],
        }
    }

    #[test]
    fn round_trips() {
        let l = sample();
        let s = l.to_string();
        assert!(s.starts_with("capstan://"));
        assert_eq!(s.parse::<Locator>().unwrap(), l);
        assert!(!format!("{l:?}").contains(&encode32(&l.swiss)));
    }

    #[test]
    fn refuses_malformed() {
        let good = sample().to_string();
        for bad in [
            "",
            "http://x/y?at=1.2.3.4:5",
            "capstan://abc/def?at=127.0.0.1:1",
            &good.replace("?at=", "?to="),
            &good.replace("7401", "0"),
            &good.replace("[::1]:7402", "::1:7402"),
            &good.replace("[::1]:7402", "[::1:7402"),
            &good.replace("[::1]:7402", "[nothost]:7402"),
            &good.replace("7401", "99999"),
            &good.replace("127.0.0.1:7401,[::1]:7402", ""),
            &good.replace("/", "").replacen("capstan:", "capstan://", 1),
            &"x".repeat(2000),
        ] {
            assert!(bad.parse::<Locator>().is_err(), "accepted {bad:?}");
        }
    }
}
