//! Ids: 256-bit formula ids, 128-bit request and message ids.
//!
//! Fresh ids come from the operating system's generator ([`fill_random`]).
//! A simulation that must replay a run from its seed makes the ids of its
//! thread come from the seed instead, with [`seed_thread`]: only an explicit
//! call does that, for the thread that made it and until its guard drops.
//! Ids are bearer-adjacent (swiss numbers of locators are drawn the same
//! way), so nothing outside a simulation may call it.

use std::cell::Cell;
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

thread_local! {
    /// The seeded generator of this thread (splitmix64 state), if any.
    static SEEDED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes the ids drawn on this thread ([`FormulaId::random`],
/// [`RequestId::random`], [`fill_random`]) come from `seed` until the guard
/// drops (then the thread draws as before: from the operating system, or
/// from the generator of an outer guard).
///
/// **For simulations only**: a seeded id is predictable by anyone who
/// knows the seed. A simulation runs its whole world on one thread (a
/// current-thread runtime) and calls this first, so that the same seed
/// replays the same ids.
#[must_use = "the thread draws from the seed only while the guard lives"]
pub fn seed_thread(seed: u64) -> SeededIds {
    let prev = SEEDED.with(|s| s.replace(Some(seed)));
    SeededIds {
        prev,
        _not_send: std::marker::PhantomData,
    }
}

/// While it lives, this thread's ids come from a seed ([`seed_thread`]).
pub struct SeededIds {
    prev: Option<u64>,
    /// Bound to the thread whose generator it replaced.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for SeededIds {
    fn drop(&mut self) {
        SEEDED.with(|s| s.set(self.prev));
    }
}

/// Whether this thread's ids come from a seed ([`seed_thread`]).
pub fn thread_is_seeded() -> bool {
    SEEDED.with(Cell::get).is_some()
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with fresh random bytes for an id or a swiss number: from
/// the operating system's generator, or from the seed of this thread
/// during a simulation ([`seed_thread`]). Not for keys or nonces: those
/// always come from the operating system.
pub fn fill_random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    let seeded = SEEDED.with(|s| {
        let mut state = s.get()?;
        for chunk in buf.chunks_mut(8) {
            let x = splitmix(&mut state).to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
        s.set(Some(state));
        Some(())
    });
    match seeded {
        Some(()) => Ok(()),
        None => os_random(buf),
    }
}

/// How many bytes of the operating system's randomness a thread draws at
/// once ([`os_random`]).
const POOL: usize = 4096;

thread_local! {
    /// Bytes drawn from the operating system's generator but not handed
    /// out yet, and how many of them were: one `getrandom` call serves
    /// many ids (a send draws two, and the call was one of the few system
    /// calls a send made). Bytes leave the pool as they are handed out
    /// (zeroed behind), so none is handed out twice.
    static POOLED: std::cell::RefCell<(Box<[u8; POOL]>, usize)> =
        std::cell::RefCell::new((Box::new([0u8; POOL]), POOL));
}

/// Fills `buf` from this thread's pool of operating-system randomness,
/// refilling the pool when it runs short (a request larger than the pool
/// is drawn directly).
fn os_random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    if buf.len() > POOL / 4 {
        return getrandom::fill(buf);
    }
    POOLED.with(|p| {
        let mut p = p.borrow_mut();
        let (pool, used) = &mut *p;
        if POOL - *used < buf.len() {
            getrandom::fill(&mut pool[..])?;
            *used = 0;
        }
        let taken = &mut pool[*used..*used + buf.len()];
        buf.copy_from_slice(taken);
        // (what was handed out is not kept)
        taken.fill(0);
        *used += buf.len();
        Ok(())
    })
}

/// A formula id: 256 bits, random (or blake3-derived for built-ins). Never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FormulaId(pub [u8; 32]);

impl FormulaId {
    /// A fresh random id from the operating system's generator (or this
    /// thread's seed in a simulation: [`seed_thread`]).
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        fill_random(&mut b).expect("operating system random generator failed");
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

impl AsRef<[u8]> for FormulaId {
    fn as_ref(&self) -> &[u8] {
        &self.0
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
    /// A fresh random id (as [`FormulaId::random`]).
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        fill_random(&mut b).expect("operating system random generator failed");
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

    #[test]
    fn a_seeded_thread_replays_its_ids_and_the_guard_restores() {
        let draw = || {
            let mut swiss = [0u8; 32];
            fill_random(&mut swiss).unwrap();
            (FormulaId::random(), RequestId::random(), swiss)
        };
        assert!(!thread_is_seeded());
        let a = {
            let _g = seed_thread(7);
            assert!(thread_is_seeded());
            (draw(), draw())
        };
        assert!(!thread_is_seeded());
        let b = {
            let _g = seed_thread(7);
            (draw(), draw())
        };
        assert_eq!(a, b, "the same seed draws the same ids");
        assert_ne!(a.0, a.1, "successive draws differ");
        let c = {
            let _g = seed_thread(8);
            draw()
        };
        assert_ne!(a.0, c, "another seed draws other ids");
        // Nested guards restore the outer generator's state as it was.
        let outer = seed_thread(7);
        assert_eq!(draw(), a.0);
        {
            let _inner = seed_thread(99);
            draw();
        }
        assert_eq!(draw(), a.1, "the outer generator goes on where it was");
        // Other threads are not seeded.
        std::thread::spawn(|| assert!(!thread_is_seeded()))
            .join()
            .unwrap();
        // Outside a guard: the operating system's generator.
        drop(outer);
        assert_ne!(FormulaId::random(), FormulaId::random());
    }

    #[test]
    fn pooled_draws_never_repeat_across_refills_and_threads() {
        // Draws of every size the pool serves, across several refills,
        // on two threads: no 16-byte draw repeats, and none is all zero
        // (what the pool leaves where it handed bytes out).
        let draws = || {
            let mut seen = Vec::new();
            for i in 0..3 * POOL / 16 {
                let mut b = vec![0u8; 1 + i % 48];
                fill_random(&mut b).unwrap();
                if b.len() >= 16 {
                    seen.push(b[..16].to_vec());
                }
            }
            seen
        };
        let other = std::thread::spawn(draws);
        let mut all = draws();
        all.extend(other.join().unwrap());
        assert!(all.iter().all(|b| b.iter().any(|x| *x != 0)));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a draw repeated");
        // larger than the pool serves: drawn directly
        let mut big = vec![0u8; POOL];
        fill_random(&mut big).unwrap();
        assert!(big.iter().any(|x| *x != 0));
    }
}
