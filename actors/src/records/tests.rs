use super::*;

#[test]
fn round_trips() {
    let a = AgentRec {
        pet_store: FormulaId::random(),
        host: Some(FormulaId::random()),
        label: "alice".into(),
    };
    for kind in [
        FormulaKind::Host(AgentRec {
            host: None,
            ..a.clone()
        }),
        FormulaKind::Guest(a.clone()),
        FormulaKind::Directory,
        FormulaKind::Value(ValueRec {
            kind: ValueKind::Json,
            size: 3,
            hash: [7; 32],
            inline: None,
        }),
        FormulaKind::Value(ValueRec {
            kind: ValueKind::Text,
            size: 2,
            hash: [8; 32],
            inline: Some(b"hi".to_vec()),
        }),
        FormulaKind::Value(ValueRec {
            kind: ValueKind::Bytes,
            size: 0,
            hash: [9; 32],
            inline: Some(Vec::new()),
        }),
        FormulaKind::Promise(PromiseRec {
            description: "need \u{1F600}".into(),
            requester: FormulaId::random(),
            state: PromiseState::Rejected("no".into()),
            resolver: None,
        }),
        FormulaKind::Promise(PromiseRec {
            description: "remote".into(),
            requester: FormulaId::random(),
            state: PromiseState::Pending,
            resolver: Some(RemoteRec {
                cluster: [3; 32],
                swiss: [4; 32],
                addrs: vec!["127.0.0.1:1".into()],
            }),
        }),
        FormulaKind::Remote(RemoteRec {
            cluster: [1; 32],
            swiss: [2; 32],
            addrs: vec![],
        }),
        FormulaKind::Invitation(InvitationRec {
            host: FormulaId::random(),
            dir: FormulaId::random(),
            name: "bob".into(),
        }),
        FormulaKind::Accepting(AcceptingRec {
            host: FormulaId::random(),
            invitation: [5; 32],
            cluster: [6; 32],
            req: RequestId::random(),
            handles: vec![[7; 32], [8; 32]],
        }),
        FormulaKind::Llm(LlmProviderRec {
            provider: "anthropic".into(),
            url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            max_tokens: 5,
            has_key: true,
            removed: false,
            host: FormulaId::random(),
            price_input: 3,
            price_output: 15,
            timeout_ms: 1000,
        }),
    ] {
        let f = Formula {
            created_ms: 5,
            cancelled: None,
            kind,
        };
        assert_eq!(Formula::decode(&f.encode()).unwrap(), f);
    }
    let m = MessageRec {
        number: 9,
        message_id: RequestId::random(),
        reply_to: None,
        from: FormulaId::random(),
        to: FormulaId::random(),
        date_ms: 1,
        body: BodyRec::Package {
            strings: vec!["a\n\"".into(), "".into()],
            names: vec!["x".into()],
            ids: vec![FormulaId::random()],
        },
    };
    assert_eq!(MessageRec::decode(&m.encode()).unwrap(), m);
    assert!(Formula::decode(b"garbage!").is_err());
    assert!(MessageRec::decode(&[]).is_err());
    assert_eq!(
        DedupAnswer::decode(&DedupAnswer::Number(4).encode(1)).unwrap(),
        DedupAnswer::Number(4)
    );
}

/// Messages encode in one segment sized to them (a sized builder, not
/// capnp's 8 KiB default), large or small, and read back the same.
#[test]
fn messages_encode_in_one_segment_of_their_size() {
    let segments = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap()) + 1;
    let long = "x".repeat(10_000);
    for (strings, names, n_ids) in [
        (vec!["hi".to_string()], vec![], 0),
        (vec![long.clone()], vec![], 0),
        (
            vec!["a".into(), "b".into(), long.clone()],
            vec!["r1".into(), "r2".into()],
            2,
        ),
        (
            (0..65).map(|i| format!("s{i}")).collect(),
            (0..64).map(|i| format!("name-{i}")).collect(),
            64,
        ),
    ] {
        let m = MessageRec {
            number: 7,
            message_id: RequestId::random(),
            reply_to: Some(RequestId::random()),
            from: FormulaId::random(),
            to: FormulaId::random(),
            date_ms: 1,
            body: BodyRec::Package {
                strings,
                names,
                ids: (0..n_ids).map(|_| FormulaId::random()).collect(),
            },
        };
        let bytes = m.encode();
        assert_eq!(segments(&bytes), 1, "one segment");
        assert_eq!(MessageRec::decode(&bytes).unwrap(), m);
    }
    let request = MessageRec {
        number: 8,
        message_id: RequestId::random(),
        reply_to: None,
        from: FormulaId::random(),
        to: FormulaId::random(),
        date_ms: 2,
        body: BodyRec::Request {
            description: long,
            promise: FormulaId::random(),
        },
    };
    let bytes = request.encode();
    assert_eq!(segments(&bytes), 1, "one segment");
    assert_eq!(MessageRec::decode(&bytes).unwrap(), request);
    let dedup = DedupAnswer::Number(9).encode(3);
    assert_eq!(segments(&dedup), 1);
}
