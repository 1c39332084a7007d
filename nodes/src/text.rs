//! Parsing the TEXT of `send` and `reply` into text chunks and references.
//!
//! Syntax (`nodes/CLI.md`): `@path` embeds a reference to the value named
//! `path` (a pet-name path such as `a.b.c`, or one starting with a special
//! name such as `SELF` or `HOST.x`); `@path:edge` suggests the name `edge` to
//! the receiver (default: the last segment of `path`, lowercased for special
//! names). `@` starts a reference only at the start of TEXT or after a
//! character that is not a letter, digit, `.`, `_` or `-`, so `a@b.c` is
//! literal; `@@` is a literal `@`.
//!
//! Decisions where the contract is silent:
//! - A trailing `.` ends the path (`@greeting.` → `greeting`, then `.`), and
//!   so does a `.` not followed by a letter or digit (`@a..b`, `@a. Then`).
//! - After `@`, a word (`[A-Za-z0-9_-]+`) that starts with a letter or digit
//!   must be a pet name (`[a-z0-9][a-z0-9-]*`) or a special name
//!   (`[A-Z][A-Z0-9_]*`): `@Report` or `@x_y` is an error that says to write
//!   `@@` for a literal `@`, never silently literal text. So is a segment
//!   after a `.` that starts with a letter or digit but is not a pet name
//!   (`@HOST.Greeting`). An `@` followed by anything else is literal
//!   (`@ home`, `me@`, `@-)`).
//! - `:edge` is taken only when followed by a pet name; otherwise `:` is text
//!   (`@greeting: hi`).
//!
//! Whether each path names something is the node's to say (it refuses a
//! message with a reference to an unknown name, naming it).

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

/// Whether a word after `@` or `.` means to be a name (so that one which
/// is not a name is an error rather than literal text).
fn looks_like_name(w: &str) -> bool {
    w.starts_with(|c: char| c.is_ascii_alphanumeric())
}

/// Why `@` followed by `word` (after `path.`, if any) is not a reference.
fn not_a_name(path: &str, word: &str) -> String {
    let written = if path.is_empty() {
        format!("@{word}")
    } else {
        format!("@{path}.{word}")
    };
    format!(
        "`{written}` refers to no name: `{word}` is not a pet name (lowercase letters, digits \
         and '-') nor a special name (SELF, HOST); write @@{} for a literal @",
        &written[1..]
    )
}

/// Tries to read a reference right after an `@`; returns it and the bytes
/// consumed, `None` when the `@` is literal text.
fn reference(s: &str) -> Result<Option<(TextRef, usize)>, String> {
    let first = word(s);
    let special = is_special_name(first);
    if !special && !is_pet_name(first) {
        if looks_like_name(first) {
            return Err(not_a_name("", first));
        }
        return Ok(None);
    }
    let mut end = first.len();
    let mut last = first;
    let mut last_special = special;
    // Further segments: `.name`, while a word follows the dot.
    while s[end..].starts_with('.') {
        let next = word(&s[end + 1..]);
        if !is_pet_name(next) {
            if looks_like_name(next) {
                return Err(not_a_name(&s[..end], next));
            }
            break;
        }
        end += 1 + next.len();
        last = next;
        last_special = false;
    }
    let path = s[..end].to_string();
    let mut edge = if last_special {
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
    Ok(Some((TextRef { path, edge }, end)))
}

/// Splits TEXT into chunks and references; an `@word` that means to be a
/// reference but is not a name is an error (saying how to write a literal `@`).
pub fn parse(text: &str) -> Result<Parsed, String> {
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
                && let Some((r, used)) = reference(&rest[1..])?
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
    Ok(out)
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
        let parsed = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
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
        // A special name starts a path like any name.
        assert_eq!(
            p("look: @HOST.greeting"),
            (vec!["look: ", ""], vec![r("HOST.greeting", "greeting")])
        );
        assert_eq!(
            p("@SELF.docs.a:x."),
            (vec!["", "."], vec![r("SELF.docs.a", "x")])
        );
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(parsed) => panic!("{text:?} parsed as {parsed:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn words_that_are_not_names_are_errors() {
        let e = err("see @Report");
        assert!(e.contains("`@Report` refers to no name"), "{e}");
        assert!(e.contains("write @@Report for a literal @"), "{e}");
        let e = err("@x_y");
        assert!(e.contains("`x_y` is not a pet name"), "{e}");
        let e = err("@HOST.Greeting");
        assert!(e.contains("`@HOST.Greeting` refers to no name"), "{e}");
        assert!(e.contains("`Greeting` is not a pet name"), "{e}");
        assert!(e.contains("write @@HOST.Greeting"), "{e}");
        err("@Bob");
        err("hi @a.b.C_d");
        err("@2nd_try");
        // The escape always works.
        assert_eq!(p("see @@Report"), (vec!["see @Report"], vec![]));
    }

    #[test]
    fn not_references() {
        assert_eq!(p("me @ home"), (vec!["me @ home"], vec![]));
        assert_eq!(p("end@"), (vec!["end@"], vec![]));
        assert_eq!(p("@"), (vec!["@"], vec![]));
        assert_eq!(p("@-) @_x"), (vec!["@-) @_x"], vec![]));
        assert_eq!(p("@a. Then"), (vec!["", ". Then"], vec![r("a", "a")]));
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
