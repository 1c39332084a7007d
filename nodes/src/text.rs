//! Parsing the TEXT of `send` and `reply` into text chunks and references.
//!
//! Syntax (`nodes/CLI.md`): `@path` embeds a reference to the value named
//! `path` (a pet-name path such as `a.b.c`, or a special name such as `SELF`);
//! `@path:edge` suggests the name `edge` to the receiver (default: the last
//! segment of `path`, lowercased for special names). `@` starts a reference
//! only at the start of TEXT or after a character that is not a letter, digit,
//! `.`, `_` or `-`, so `a@b.c` is literal; `@@` is a literal `@`.
//!
//! Decisions where the contract is silent:
//! - A trailing `.` ends the path (`@greeting.` → `greeting`, then `.`).
//! - After `@`, the word (`[A-Za-z0-9_-]+`) must be a pet name
//!   (`[a-z0-9][a-z0-9-]*`) or a special name (`[A-Z][A-Z0-9_]*`); otherwise
//!   the `@` is literal (`@Bob`, `@ home`, `me@`).
//! - `:edge` is taken only when followed by a pet name; otherwise `:` is text
//!   (`@greeting: hi`).

/// A reference in a parsed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRef {
    /// A path in the sender's names.
    pub path: String,
    /// The name suggested to the receiver.
    pub edge: String,
}

/// A parsed text: `strings.len() == refs.len() + 1`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub strings: Vec<String>,
    pub refs: Vec<TextRef>,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A character after which `@` is literal.
fn blocks_reference(c: char) -> bool {
    c.is_alphanumeric() || c == '.' || c == '_' || c == '-'
}

fn is_pet_name(w: &str) -> bool {
    let mut chars = w.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_special_name(w: &str) -> bool {
    let mut chars = w.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The word (`[A-Za-z0-9_-]*`) at the start of `s`.
fn word(s: &str) -> &str {
    let end = s.find(|c: char| !is_word_char(c)).unwrap_or(s.len());
    &s[..end]
}

/// Tries to read a reference right after an `@`; returns it and the bytes consumed.
fn reference(s: &str) -> Option<(TextRef, usize)> {
    let first = word(s);
    let special = is_special_name(first);
    if !special && !is_pet_name(first) {
        return None;
    }
    let mut end = first.len();
    let mut last = first;
    if !special {
        // Further segments: `.name`, while a pet name follows the dot.
        while s[end..].starts_with('.') {
            let next = word(&s[end + 1..]);
            if !is_pet_name(next) {
                break;
            }
            end += 1 + next.len();
            last = next;
        }
    }
    let path = s[..end].to_string();
    let mut edge = if special {
        last.to_ascii_lowercase()
    } else {
        last.to_string()
    };
    if s[end..].starts_with(':') {
        let e = word(&s[end + 1..]);
        if is_pet_name(e) {
            edge = e.to_string();
            end += 1 + e.len();
        }
    }
    Some((TextRef { path, edge }, end))
}

/// Splits TEXT into chunks and references.
pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let mut current = String::new();
    let mut prev: Option<char> = None;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let c = rest.chars().next().expect("non-empty");
        if c == '@' {
            if rest.starts_with("@@") {
                current.push('@');
                i += 2;
                prev = Some('@');
                continue;
            }
            if !prev.is_some_and(blocks_reference)
                && let Some((r, used)) = reference(&rest[1..])
            {
                out.strings.push(std::mem::take(&mut current));
                out.refs.push(r);
                i += 1 + used;
                prev = text[..i].chars().next_back();
                continue;
            }
        }
        current.push(c);
        prev = Some(c);
        i += c.len_utf8();
    }
    out.strings.push(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str, edge: &str) -> TextRef {
        TextRef {
            path: path.into(),
            edge: edge.into(),
        }
    }

    fn p(text: &str) -> (Vec<&'static str>, Vec<TextRef>) {
        let parsed = parse(text);
        let strings = parsed
            .strings
            .into_iter()
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect();
        (strings, parsed.refs)
    }

    #[test]
    fn plain_text() {
        assert_eq!(p("hello"), (vec!["hello"], vec![]));
        assert_eq!(p(""), (vec![""], vec![]));
    }

    #[test]
    fn simple_reference() {
        assert_eq!(
            p("here is @greeting"),
            (vec!["here is ", ""], vec![r("greeting", "greeting")])
        );
        assert_eq!(p("@x"), (vec!["", ""], vec![r("x", "x")]));
    }

    #[test]
    fn escaped_at() {
        assert_eq!(p("@@"), (vec!["@"], vec![]));
        assert_eq!(p("mail me @@home"), (vec!["mail me @home"], vec![]));
        assert_eq!(p("@@@x"), (vec!["@", ""], vec![r("x", "x")]));
    }

    #[test]
    fn at_inside_word_is_literal() {
        assert_eq!(p("a@b.c"), (vec!["a@b.c"], vec![]));
        assert_eq!(p("x.@y"), (vec!["x.@y"], vec![]));
        assert_eq!(p("x_@y x-@y"), (vec!["x_@y x-@y"], vec![]));
        assert_eq!(p("é@y"), (vec!["é@y"], vec![]));
    }

    #[test]
    fn edge_names() {
        assert_eq!(p("@x:y"), (vec!["", ""], vec![r("x", "y")]));
        assert_eq!(p("@a.b:c!"), (vec!["", "!"], vec![r("a.b", "c")]));
        assert_eq!(
            p("@greeting: hi"),
            (vec!["", ": hi"], vec![r("greeting", "greeting")])
        );
    }

    #[test]
    fn paths_and_trailing_punctuation() {
        assert_eq!(p("@a.b"), (vec!["", ""], vec![r("a.b", "b")]));
        assert_eq!(
            p("see @greeting."),
            (vec!["see ", "."], vec![r("greeting", "greeting")])
        );
        assert_eq!(
            p("@dir.sub-1.x, ok"),
            (vec!["", ", ok"], vec![r("dir.sub-1.x", "x")])
        );
        assert_eq!(p("@a..b"), (vec!["", "..b"], vec![r("a", "a")]));
        assert_eq!(p("(@a)"), (vec!["(", ")"], vec![r("a", "a")]));
    }

    #[test]
    fn special_names() {
        assert_eq!(p("@SELF"), (vec!["", ""], vec![r("SELF", "self")]));
        assert_eq!(p("@HOST:boss"), (vec!["", ""], vec![r("HOST", "boss")]));
        assert_eq!(p("@Bob"), (vec!["@Bob"], vec![]));
    }

    #[test]
    fn not_references() {
        assert_eq!(p("me @ home"), (vec!["me @ home"], vec![]));
        assert_eq!(p("end@"), (vec!["end@"], vec![]));
        assert_eq!(p("@"), (vec!["@"], vec![]));
        assert_eq!(p("@x_y"), (vec!["@x_y"], vec![]));
    }

    #[test]
    fn unicode_text() {
        assert_eq!(
            p("héllo 世界 @doc — ok"),
            (vec!["héllo 世界 ", " — ok"], vec![r("doc", "doc")])
        );
        assert_eq!(
            p("→@a←@b"),
            (vec!["→", "←", ""], vec![r("a", "a"), r("b", "b")])
        );
    }

    #[test]
    fn adjacent_references() {
        // `@a@b`: the second `@` follows a letter, so it is literal.
        assert_eq!(p("@a@b"), (vec!["", "@b"], vec![r("a", "a")]));
        assert_eq!(
            p("@a @b"),
            (vec!["", " ", ""], vec![r("a", "a"), r("b", "b")])
        );
    }
}
