//! Order-preserving tuple encoding of keys.
//!
//! Every element is a one-byte type tag followed by its payload:
//!
//! | element | tag    | payload                                                       |
//! |---------|--------|---------------------------------------------------------------|
//! | bytes   | `0x01` | the bytes, each `0x00` escaped as `0x00 0xFF`, then `0x00`    |
//! | str     | `0x02` | UTF-8 bytes, escaped and terminated like bytes                |
//! | u64     | `0x1C` | 8 bytes big-endian                                            |
//!
//! This is FoundationDB's tuple layer restricted to three types (the u64 tag is
//! FoundationDB's tag of an 8-byte positive integer). Properties:
//!
//! - the byte order of encoded keys is the element-wise order of tuples whose
//!   elements have the same types (and elements of different types order by tag);
//! - a tuple sorts before all of its extensions (its encoding is their prefix),
//!   so `[key, prefix_end(key))` is the range of all its extensions.

const TAG_BYTES: u8 = 0x01;
const TAG_STR: u8 = 0x02;
const TAG_U64: u8 = 0x1C;
const ESCAPE: u8 = 0xFF;

/// Error decoding a tuple-encoded key.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("malformed tuple key: {0}")]
pub struct TupleError(pub String);

/// Builds a key from elements; byte order of encoded keys = element-wise order.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TupleKey(Vec<u8>);

impl TupleKey {
    /// An empty tuple (encodes to no bytes).
    pub fn new() -> Self {
        TupleKey(Vec::new())
    }
    /// Appends a byte-string element.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.push(TAG_BYTES);
        push_escaped(&mut self.0, b);
        self
    }
    /// Appends a string element.
    pub fn str(mut self, s: &str) -> Self {
        self.0.push(TAG_STR);
        push_escaped(&mut self.0, s.as_bytes());
        self
    }
    /// Appends an unsigned integer element.
    pub fn u64(mut self, n: u64) -> Self {
        self.0.push(TAG_U64);
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }
    /// The encoded key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The encoded key, by value.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl AsRef<[u8]> for TupleKey {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<TupleKey> for Vec<u8> {
    fn from(key: TupleKey) -> Vec<u8> {
        key.0
    }
}

fn push_escaped(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 1);
    for &byte in b {
        out.push(byte);
        if byte == 0x00 {
            out.push(ESCAPE);
        }
    }
    out.push(0x00);
}

/// Reads elements back, in order.
pub struct TupleReader<'a> {
    rest: &'a [u8],
}

impl<'a> TupleReader<'a> {
    /// A reader over an encoded key (typically with any subspace prefix stripped).
    pub fn new(key: &'a [u8]) -> Self {
        TupleReader { rest: key }
    }
    /// Reads a byte-string element.
    pub fn bytes(&mut self) -> Result<Vec<u8>, TupleError> {
        self.tag(TAG_BYTES, "bytes")?;
        self.escaped()
    }
    /// Reads a string element.
    pub fn str(&mut self) -> Result<String, TupleError> {
        self.tag(TAG_STR, "str")?;
        let raw = self.escaped()?;
        String::from_utf8(raw).map_err(|_| TupleError("str element is not valid UTF-8".into()))
    }
    /// Reads an unsigned integer element.
    pub fn u64(&mut self) -> Result<u64, TupleError> {
        self.tag(TAG_U64, "u64")?;
        let Some((bytes, rest)) = self.rest.split_first_chunk::<8>() else {
            return Err(TupleError(format!(
                "u64 element truncated: {} bytes left, 8 needed",
                self.rest.len()
            )));
        };
        self.rest = rest;
        Ok(u64::from_be_bytes(*bytes))
    }
    /// True when every element has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    fn tag(&mut self, want: u8, name: &str) -> Result<(), TupleError> {
        match self.rest.split_first() {
            None => Err(TupleError(format!(
                "expected a {name} element, found the end of the key"
            ))),
            Some((&tag, rest)) if tag == want => {
                self.rest = rest;
                Ok(())
            }
            Some((&tag, _)) => Err(TupleError(format!(
                "expected a {name} element (tag {want:#04x}), found tag {tag:#04x}"
            ))),
        }
    }

    fn escaped(&mut self) -> Result<Vec<u8>, TupleError> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.rest.len() {
            let byte = self.rest[i];
            if byte == 0x00 {
                if self.rest.get(i + 1) == Some(&ESCAPE) {
                    out.push(0x00);
                    i += 2;
                    continue;
                }
                self.rest = &self.rest[i + 1..];
                return Ok(out);
            }
            out.push(byte);
            i += 1;
        }
        Err(TupleError("unterminated bytes/str element".into()))
    }
}

/// The first key after every key that starts with `prefix` (FoundationDB's strinc):
/// trailing `0xFF` bytes are stripped and the last remaining byte is incremented.
///
/// Never panics. Two inputs have no such key among short keys:
/// - the empty prefix returns `[0xFF]`, the end of the user keyspace (keys starting
///   with `0xFF` are reserved for the system);
/// - a prefix made only of `0xFF` bytes returns `0xFF` repeated
///   [`MAX_KEY_SIZE`](crate::MAX_KEY_SIZE)` + 1` times, which is greater than every
///   legal key.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        return vec![0xFF];
    }
    match prefix.iter().rposition(|&b| b != 0xFF) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0xFF; crate::MAX_KEY_SIZE + 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Elem {
        Bytes(Vec<u8>),
        Str(String),
        U64(u64),
    }

    fn encode(elems: &[Elem]) -> Vec<u8> {
        let mut k = TupleKey::new();
        for e in elems {
            k = match e {
                Elem::Bytes(b) => k.bytes(b),
                Elem::Str(s) => k.str(s),
                Elem::U64(n) => k.u64(*n),
            };
        }
        k.into_vec()
    }

    fn elem() -> impl Strategy<Value = Elem> {
        prop_oneof![
            proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), any::<u8>()], 0..8)
                .prop_map(Elem::Bytes),
            "[\\x00a-c\u{e9}]{0,6}".prop_map(Elem::Str),
            prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0u64..300].prop_map(Elem::U64),
        ]
    }

    /// Same-shape tuples: elements at the same position have the same type.
    fn same_shape_pair() -> impl Strategy<Value = (Vec<Elem>, Vec<Elem>)> {
        proptest::collection::vec((elem(), elem()), 0..5).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(a, b)| match (&a, b) {
                    (Elem::Bytes(_), Elem::Bytes(x)) => (a, Elem::Bytes(x)),
                    (Elem::Bytes(_), Elem::Str(s)) => (a, Elem::Bytes(s.into_bytes())),
                    (Elem::Bytes(_), Elem::U64(n)) => (a, Elem::Bytes(n.to_be_bytes().to_vec())),
                    (Elem::Str(_), Elem::Str(x)) => (a, Elem::Str(x)),
                    (Elem::Str(_), Elem::Bytes(b)) => {
                        (a, Elem::Str(String::from_utf8_lossy(&b).into_owned()))
                    }
                    (Elem::Str(_), Elem::U64(n)) => (a, Elem::Str(n.to_string())),
                    (Elem::U64(_), Elem::U64(n)) => (a, Elem::U64(n)),
                    (Elem::U64(_), Elem::Bytes(b)) => (a, Elem::U64(b.len() as u64)),
                    (Elem::U64(_), Elem::Str(s)) => (a, Elem::U64(s.len() as u64)),
                })
                .unzip()
        })
    }

    fn cmp_elems(a: &[Elem], b: &[Elem]) -> std::cmp::Ordering {
        for (x, y) in a.iter().zip(b) {
            let o = match (x, y) {
                (Elem::Bytes(x), Elem::Bytes(y)) => x.cmp(y),
                (Elem::Str(x), Elem::Str(y)) => x.as_bytes().cmp(y.as_bytes()),
                (Elem::U64(x), Elem::U64(y)) => x.cmp(y),
                _ => unreachable!("same shape"),
            };
            if o.is_ne() {
                return o;
            }
        }
        a.len().cmp(&b.len())
    }

    proptest! {
        #[test]
        fn round_trip(elems in proptest::collection::vec(elem(), 0..6)) {
            let key = encode(&elems);
            let mut r = TupleReader::new(&key);
            for e in &elems {
                match e {
                    Elem::Bytes(b) => prop_assert_eq!(&r.bytes().unwrap(), b),
                    Elem::Str(s) => prop_assert_eq!(&r.str().unwrap(), s),
                    Elem::U64(n) => prop_assert_eq!(r.u64().unwrap(), *n),
                }
            }
            prop_assert!(r.is_empty());
        }

        #[test]
        fn order_matches_elementwise((a, b) in same_shape_pair(), cut in 0usize..6) {
            prop_assert_eq!(encode(&a).cmp(&encode(&b)), cmp_elems(&a, &b));
            // A tuple sorts before its extensions, and they all sort before prefix_end.
            let short = &a[..cut.min(a.len())];
            let ks = encode(short);
            let ka = encode(&a);
            prop_assert!(ks <= ka);
            prop_assert!(ka.starts_with(&ks));
            if !ks.is_empty() {
                prop_assert!(ka < prefix_end(&ks));
            }
        }

        #[test]
        fn prefix_end_bounds_extensions(p in proptest::collection::vec(any::<u8>(), 0..6),
                                        ext in proptest::collection::vec(any::<u8>(), 0..6)) {
            let end = prefix_end(&p);
            let mut k = p.clone();
            k.extend_from_slice(&ext);
            if p.is_empty() {
                prop_assert_eq!(k.first().is_none_or(|b| *b != 0xFF), k < end);
            } else {
                prop_assert!(k < end);
                prop_assert!(p < end);
            }
        }

        #[test]
        fn decoding_garbage_never_panics(key in proptest::collection::vec(any::<u8>(), 0..24)) {
            let mut r = TupleReader::new(&key);
            for i in 0..8 {
                let _ = match i % 3 { 0 => r.bytes().map(|_| ()), 1 => r.str().map(|_| ()), _ => r.u64().map(|_| ()) };
            }
        }
    }

    #[test]
    fn prefix_end_examples() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b""), vec![0xFF]);
        assert_eq!(prefix_end(b"\xff\xff").len(), crate::MAX_KEY_SIZE + 1);
    }

    #[test]
    fn escaping_and_errors() {
        let k = TupleKey::new().bytes(b"a\x00b").u64(7).str("x");
        assert_eq!(
            k.as_bytes(),
            b"\x01a\x00\xffb\x00\x1c\x00\x00\x00\x00\x00\x00\x00\x07\x02x\x00"
        );
        let mut r = TupleReader::new(k.as_bytes());
        assert!(r.u64().is_err(), "wrong tag is an error");
        assert_eq!(r.bytes().unwrap(), b"a\x00b");
        assert!(r.u64().is_ok());
        assert!(TupleReader::new(b"\x01abc").bytes().is_err());
        assert!(TupleReader::new(b"\x1c\x00").u64().is_err());
        assert!(TupleReader::new(b"\x02\xff\x00").str().is_err());
    }
}
