//! Pet names, special names and paths.
//!
//! Pet names match `^[a-z0-9][a-z0-9-]{0,127}$`. Special names are upper
//! case and cannot be written (`SELF`, `HOST`, `AGENT`, `MAIL`, `NONE`, …).
//! A path joins names with `.`: `dir.sub.name`; only its first segment may be
//! a special name.

use crate::error::Error;

/// Longest pet name.
pub const MAX_NAME_LEN: usize = 128;
/// Most segments in a path.
pub const MAX_PATH_DEPTH: usize = 32;

/// The special names an agent resolves itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// The agent itself.
    SelfAgent,
    /// The agent's host (the root host is its own host).
    Host,
}

/// Whether `s` is a pet name.
pub fn is_pet_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Whether `s` has the form of a special name (upper-case letters, digits, '-', '_').
pub fn is_special_form(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_uppercase()
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// Resolves a special name, or says why it is not a value.
pub fn special(s: &str) -> Result<Special, Error> {
    match s {
        "SELF" | "AGENT" => Ok(Special::SelfAgent),
        "HOST" => Ok(Special::Host),
        "MAIL" | "NONE" | "MAIN" | "ENDO" | "NETS" | "PINS" | "INFO" => Err(Error::Invalid(
            format!("{s} is a special name that does not name a value here"),
        )),
        _ => Err(Error::UnknownName(s.to_string())),
    }
}

/// A parsed path: at least one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub segments: Vec<String>,
}

impl Path {
    /// Parses `a.b.c`; the first segment may be a special name, the others must be pet names.
    pub fn parse(s: &str) -> Result<Path, Error> {
        if s.is_empty() || s.len() > MAX_PATH_DEPTH * (MAX_NAME_LEN + 1) {
            return Err(Error::InvalidName(truncate(s)));
        }
        let segments: Vec<String> = s.split('.').map(str::to_string).collect();
        if segments.len() > MAX_PATH_DEPTH {
            return Err(Error::InvalidName(truncate(s)));
        }
        for (i, seg) in segments.iter().enumerate() {
            let ok = is_pet_name(seg) || (i == 0 && is_special_form(seg));
            if !ok {
                return Err(Error::InvalidName(truncate(s)));
            }
        }
        Ok(Path { segments })
    }

    /// Parses a path that names a writable place: its last segment must be a pet name.
    pub fn parse_writable(s: &str) -> Result<Path, Error> {
        let p = Path::parse(s)?;
        let last = p.last();
        if is_special_form(last) {
            return Err(Error::SpecialName(last.to_string()));
        }
        Ok(p)
    }

    pub fn last(&self) -> &str {
        self.segments.last().map(String::as_str).unwrap_or("")
    }

    pub fn parent(&self) -> &[String] {
        &self.segments[..self.segments.len() - 1]
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(140).collect()
}

/// The special names a host has besides `SELF` and `HOST`, which name no
/// value (`list` shows them; they cannot be read, written or sent), with
/// what `list` says of them.
pub const HOST_ONLY_SPECIALS: [(&str, &str); 2] = [
    ("MAIL", "your inbox, not a value: see `capstan inbox`"),
    ("NONE", "names nothing, not a value"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pet_names() {
        assert!(is_pet_name("a"));
        assert!(is_pet_name("0-x"));
        assert!(is_pet_name(&"a".repeat(128)));
        assert!(!is_pet_name(&"a".repeat(129)));
        assert!(!is_pet_name("-a"));
        assert!(!is_pet_name("Bad_Name"));
        assert!(!is_pet_name(""));
        assert!(!is_pet_name("é"));
    }

    #[test]
    fn paths() {
        assert_eq!(Path::parse("a.b.c").unwrap().segments, vec!["a", "b", "c"]);
        assert!(Path::parse("SELF").is_ok());
        assert!(Path::parse("a.SELF").is_err());
        assert!(Path::parse("a..b").is_err());
        assert!(Path::parse("").is_err());
        assert!(matches!(
            Path::parse_writable("HOST"),
            Err(Error::SpecialName(_))
        ));
        assert!(matches!(special("NONE"), Err(Error::Invalid(_))));
    }
}
