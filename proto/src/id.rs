//! Ids: 256-bit formula ids, 128-bit request and message ids.

use std::fmt;
use std::str::FromStr;

/// Error parsing or reading an id.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// Wrong number of bytes.
    #[error("id must be {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    /// Not lowercase hex of the right length.
    #[error("malformed id {0:?}: expected {1} lowercase hex digits")]
    Hex(String, usize),
}

/// A formula id: 256 bits, random (or blake3-derived for built-ins). Never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FormulaId(pub [u8; 32]);

impl FormulaId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("operating system random generator failed");
        FormulaId(b)
    }
    /// A deterministic id for a built-in formula: blake3 of a domain label and a name.
    pub fn derived(label: &str, name: &[u8]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(label);
        h.update(name);
        FormulaId(*h.finalize().as_bytes())
    }
    /// Reads an id from its 32 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, IdError> {
        <[u8; 32]>::try_from(b)
            .map(FormulaId)
            .map_err(|_| IdError::Length {
                expected: 32,
                got: b.len(),
            })
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Lowercase hex, 64 digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The first 8 hex digits, for display.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for FormulaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for FormulaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FormulaId({})", self.short())
    }
}

impl FromStr for FormulaId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex::<32>(s).map(FormulaId)
    }
}

/// A 128-bit id chosen by a sender: request ids (exactly-once) and message ids (threads).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("operating system random generator failed");
        RequestId(b)
    }
    pub fn from_slice(b: &[u8]) -> Result<Self, IdError> {
        <[u8; 16]>::try_from(b)
            .map(RequestId)
            .map_err(|_| IdError::Length {
                expected: 16,
                got: b.len(),
            })
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.to_hex())
    }
}

impl FromStr for RequestId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex::<16>(s).map(RequestId)
    }
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], IdError> {
    let bad = || IdError::Hex(s.chars().take(80).collect(), N * 2);
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err(bad());
    }
    let v = hex::decode(s).map_err(|_| bad())?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let id = FormulaId::random();
        assert_eq!(id.to_hex().parse::<FormulaId>().unwrap(), id);
        assert!("ABC".parse::<FormulaId>().is_err());
        assert!(id.to_hex().to_uppercase().parse::<FormulaId>().is_err());
        assert!(FormulaId::from_slice(&[0; 31]).is_err());
        let r = RequestId::random();
        assert_eq!(r.to_hex().parse::<RequestId>().unwrap(), r);
        assert_ne!(FormulaId::derived("a", b"x"), FormulaId::derived("b", b"x"));
    }
}
