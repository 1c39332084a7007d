use super::*;

#[test]
fn proposals_parse_and_refuse_what_is_not_one() {
    let p = parse_proposal(
        "definition: slots {reader: \"an inbox\"}\n{\"kind\":\"define_code\",\"call\":\"c1\",\"source\":\"reader.inbox().length\",\"slots\":{\"reader\":\"an inbox\"}}",
    )
    .unwrap();
    assert_eq!(p.source, "reader.inbox().length");
    assert_eq!(p.slots.keys().collect::<Vec<_>>(), vec!["reader"]);
    assert!(p.values.is_empty());
    assert!(parse_proposal("hello").is_err());
    assert!(parse_proposal("definition: slots {}\nnot json").is_err());
    let big = format!(
        "definition:\n{}",
        json!({"source": "x".repeat(MAX_SOURCE + 1)})
    );
    assert!(matches!(parse_proposal(&big), Err(Error::TooLarge { .. })));
}

#[test]
fn package_text_puts_references_back() {
    assert_eq!(
        package_text(&["see ".into(), " now".into()], &["doc".into()]),
        "see @doc now"
    );
    assert_eq!(package_text(&["plain".into()], &[]), "plain");
}
