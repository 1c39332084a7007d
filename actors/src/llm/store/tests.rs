use super::*;

#[test]
fn records_round_trip() {
    let a = AuditEntry {
        number: 7,
        at_ms: 1,
        provider: "claude".into(),
        kind: "anthropic".into(),
        model: "m".into(),
        input_tokens: 2,
        output_tokens: 3,
        estimated_tokens: 4,
        cost_micros: 5,
        outcome: "ok".into(),
        duration_ms: 6,
        tool_calls: 1,
        redactions: 0,
    };
    assert_eq!(decode_audit(7, &encode_audit(&a)).unwrap(), a);
    let b = Budget {
        token_limit: 1,
        tokens_used: 2,
        cost_limit: 3,
        cost_used: 4,
        calls: 5,
        injection: safety::InjectionPolicy::Block,
        tokens_reserved: 6,
        cost_reserved: 7,
    };
    assert_eq!(decode_budget(&encode_budget(&b)).unwrap(), b);
    assert!(decode_budget(b"junk").is_err());
}
