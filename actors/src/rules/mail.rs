//! The rules of mail, written once for both ends: what a package, a
//! request and an answer may hold — checked when a local agent sends, and
//! again when mail or an answer arrives from another cluster — and how a
//! promise settles.
//!
//! - A package is text chunks with references between them: one more
//!   chunk than references, a pet name per reference (what the recipient
//!   may adopt it as), at most [`MAX_MESSAGE_REFS`] references and
//!   [`MAX_MESSAGE_TEXT`] bytes of text in all.
//! - A request's description and a rejection's reason are at most
//!   [`MAX_MESSAGE_TEXT`] bytes; an empty reason reads [`NO_REASON`].
//! - A promise is settled once: pending, then resolved or rejected for
//!   good. A second answer is refused and changes nothing.
//!
//! Pure functions: the callers (`mail`, `promises`, `federation`) bring
//! what they read and write what these decide. The errors are those a
//! local caller gets (bad input); what arrives from another cluster maps
//! them to its own refusals.

use crate::error::Error;
use crate::types::{MAX_MESSAGE_REFS, MAX_MESSAGE_TEXT, NO_REASON, PromiseState};

/// Checks a package's shape: `chunks` of text, an edge name per reference
/// in `names`, and `refs` references.
pub fn check_package(chunks: &[String], names: &[String], refs: usize) -> Result<(), Error> {
    if refs > MAX_MESSAGE_REFS {
        return Err(Error::TooLarge {
            what: "references".into(),
            len: refs,
            max: MAX_MESSAGE_REFS,
        });
    }
    if chunks.len() != refs + 1 || names.len() != refs {
        return Err(Error::Invalid(format!(
            "a message has one more text chunk than references and a name per reference; got {} chunks, {} names and {} references",
            chunks.len(),
            names.len(),
            refs
        )));
    }
    let len: usize = chunks.iter().map(String::len).sum();
    check_len("message text", len)?;
    if let Some(n) = names.iter().find(|n| !crate::names::is_pet_name(n)) {
        return Err(Error::InvalidName(n.clone()));
    }
    Ok(())
}

/// Checks the length of a request's description, a rejection's reason or
/// a text message (`what` names it in the error).
pub fn check_text(what: &str, text: &str) -> Result<(), Error> {
    check_len(what, text.len())
}

fn check_len(what: &str, len: usize) -> Result<(), Error> {
    if len > MAX_MESSAGE_TEXT {
        return Err(Error::TooLarge {
            what: what.into(),
            len,
            max: MAX_MESSAGE_TEXT,
        });
    }
    Ok(())
}

/// A rejection's reason as kept: checked, and [`NO_REASON`] when empty.
pub fn reason(text: &str) -> Result<String, Error> {
    check_text("reason", text)?;
    Ok(if text.is_empty() {
        NO_REASON.to_string()
    } else {
        text.to_string()
    })
}

/// Why a promise cannot take an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlreadySettled;

/// Whether a promise in `state` can still take an answer.
pub fn pending(state: &PromiseState) -> Result<(), AlreadySettled> {
    if *state == PromiseState::Pending {
        Ok(())
    } else {
        Err(AlreadySettled)
    }
}

/// Settles a promise in `state` with `outcome` (what it resolves to, or
/// why it was rejected): the new state, or [`AlreadySettled`] when it was
/// not pending (the caller refuses the answer and writes nothing).
pub fn settle(
    state: &PromiseState,
    outcome: Result<capstan_proto::FormulaId, String>,
) -> Result<PromiseState, AlreadySettled> {
    pending(state)?;
    Ok(match outcome {
        Ok(id) => PromiseState::Resolved(id),
        Err(why) => PromiseState::Rejected(why),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::FormulaId;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_package_has_one_more_chunk_than_references_and_a_name_for_each() {
        assert!(check_package(&s(&["hello"]), &[], 0).is_ok());
        assert!(check_package(&s(&["here is ", ""]), &s(&["doc"]), 1).is_ok());
        for (chunks, names, refs) in [
            (s(&["a", "b"]), s(&[]), 0),
            (s(&["a"]), s(&["doc"]), 1),
            (s(&["a", "b"]), s(&[]), 1),
            (s(&[]), s(&[]), 0),
        ] {
            let e = check_package(&chunks, &names, refs).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e:?}");
            assert!(e.to_string().contains("one more text chunk"), "{e}");
        }
    }

    #[test]
    fn a_package_is_bounded_and_names_what_it_refuses() {
        let refs = MAX_MESSAGE_REFS + 1;
        let e = check_package(
            &vec![String::new(); refs + 1],
            &vec!["a".into(); refs],
            refs,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::TooLarge { len, .. } if len == refs),
            "{e:?}"
        );
        let big = "x".repeat(MAX_MESSAGE_TEXT / 2 + 1);
        let e = check_package(&[big.clone(), big], &s(&["a"]), 1).unwrap_err();
        assert!(
            matches!(e, Error::TooLarge { ref what, .. } if what == "message text"),
            "{e:?}"
        );
        let at_max = "x".repeat(MAX_MESSAGE_TEXT);
        assert!(check_package(&[at_max], &[], 0).is_ok());
        for bad in ["", "has space", "a/b", "SELF-ish\n"] {
            let e = check_package(&s(&["a", "b"]), &s(&[bad]), 1).unwrap_err();
            assert!(
                matches!(e, Error::InvalidName(ref n) if n == bad),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn descriptions_and_reasons_are_bounded_and_an_empty_reason_says_so() {
        assert!(check_text("description", &"x".repeat(MAX_MESSAGE_TEXT)).is_ok());
        let e = check_text("description", &"x".repeat(MAX_MESSAGE_TEXT + 1)).unwrap_err();
        assert!(e.to_string().contains("description"), "{e}");
        assert_eq!(reason("").unwrap(), NO_REASON);
        assert_eq!(reason("no time").unwrap(), "no time");
        assert!(reason(&"x".repeat(MAX_MESSAGE_TEXT + 1)).is_err());
    }

    #[test]
    fn a_promise_settles_once() {
        let id = FormulaId::random();
        let resolved = settle(&PromiseState::Pending, Ok(id)).unwrap();
        assert_eq!(resolved, PromiseState::Resolved(id));
        let rejected = settle(&PromiseState::Pending, Err("no".into())).unwrap();
        assert_eq!(rejected, PromiseState::Rejected("no".into()));
        for settled in [resolved, rejected] {
            assert_eq!(settle(&settled, Ok(id)), Err(AlreadySettled));
            assert_eq!(settle(&settled, Err("again".into())), Err(AlreadySettled));
        }
    }
}
