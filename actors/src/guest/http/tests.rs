use super::*;

#[test]
fn prefixes_match_scheme_host_port_exactly_and_path_by_prefix() {
    let spec = validate(
        &["http://127.0.0.1:8080/api/".into()],
        &[],
        &[],
        0,
        0,
        false,
    )
    .unwrap();
    assert_eq!(spec.allow, vec!["http://127.0.0.1:8080/api/"]);
    assert_eq!(spec.methods, vec!["GET"]);
    let ok = |s: &str| allowed(&spec, &reqwest::Url::parse(s).unwrap());
    assert!(ok("http://127.0.0.1:8080/api/x?y=1"));
    assert!(!ok("http://127.0.0.1:8081/api/x"));
    assert!(!ok("https://127.0.0.1:8080/api/x"));
    assert!(!ok("http://localhost:8080/api/x"));
    assert!(!ok("http://127.0.0.1:8080/admin"));
    assert!(!ok("http://127.0.0.1:8080/api/../admin"));
    assert!(!ok("http://u:p@127.0.0.1:8080/api/x"));
}

#[test]
fn bad_specs_are_refused() {
    assert!(validate(&[], &[], &[], 0, 0, false).is_err());
    assert!(validate(&["ftp://x/".into()], &[], &[], 0, 0, false).is_err());
    assert!(validate(&["http://x/".into()], &["BREW".into()], &[], 0, 0, false).is_err());
    assert!(
        validate(
            &["http://x/".into()],
            &[],
            &[],
            MAX_TIMEOUT_MS + 1,
            0,
            false
        )
        .is_err()
    );
    assert!(
        validate(
            &["http://x/".into()],
            &[],
            &[("Authorization".into(), "relative/key".into())],
            0,
            0,
            false
        )
        .is_err()
    );
}

#[test]
fn prefixes_match_on_path_segment_boundaries() {
    let spec = validate(&["https://h/v1".into()], &[], &[], 0, 0, false).unwrap();
    let ok = |s: &str| allowed(&spec, &reqwest::Url::parse(s).unwrap());
    assert!(ok("https://h/v1"));
    assert!(ok("https://h/v1?x=1"));
    assert!(ok("https://h/v1/models"));
    assert!(!ok("https://h/v1-admin"));
    assert!(!ok("https://h/v10/x"));
    assert!(
        !ok("https://h/v1/../admin"),
        "dot segments are resolved first"
    );
    assert!(!ok("https://h/v1/%2e%2e/admin"), "encoded dot segments too");
    let amb = |s: &str| ambiguous_path(&reqwest::Url::parse(s).unwrap()).is_some();
    assert!(amb("https://h/v1/..%2Fadmin"));
    assert!(amb("https://h/v1/x%5c..%5cadmin"));
    assert!(
        !ok("https://h/v1/.%2e/.%2E/admin"),
        "mixed dot segments are resolved too"
    );
    assert!(!amb("https://h/v1/a%20b"));
}

#[test]
fn credentials_need_https_unless_insecure_http_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "Bearer tok-123456789").unwrap();
    let hs = [("Authorization".to_string(), key.display().to_string())];
    let clear = ["http://127.0.0.1:9/".to_string()];
    let e = validate(&clear, &[], &hs, 0, 0, false).unwrap_err();
    assert!(e.to_string().contains("--insecure-http"), "{e}");
    assert!(
        validate(&clear, &[], &hs, 0, 0, true)
            .unwrap()
            .insecure_http
    );
    assert!(validate(&["https://h/".into()], &[], &hs, 0, 0, false).is_ok());
    assert!(
        validate(&clear, &[], &[], 0, 0, false).is_ok(),
        "no credentials"
    );
}

#[test]
fn encoded_echoes_of_a_secret_are_redacted() {
    use base64::Engine as _;
    let secret = "sk-live-0123456789abcdef".to_string();
    let secrets = [secret.clone()];
    for e in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for lead in ["", "a", "ab", "abc"] {
            let text = format!("{lead}key={secret};");
            let echoed = format!("echo {}", e.encode(text.as_bytes()));
            let r = String::from_utf8(redact(echoed.as_bytes(), &secrets)).unwrap();
            assert!(r.contains("[REDACTED]"), "{lead:?}: {r}");
        }
    }
    let hexed = format!("h={}", hex::encode(secret.as_bytes()));
    assert!(
        !String::from_utf8(redact(hexed.as_bytes(), &secrets))
            .unwrap()
            .contains("30313233")
    );
    let pct = "q=sk%2Dlive%2D0123456789abcdef";
    assert_eq!(redact(pct.as_bytes(), &secrets), b"q=[REDACTED]");
    assert_eq!(redact(b"nothing here", &secrets), b"nothing here");
}

#[test]
fn secrets_are_redacted() {
    let r = redact(
        b"token=Bearer abc and abc",
        &["Bearer abc".into(), "abc".into()],
    );
    assert_eq!(r, b"token=[REDACTED] and [REDACTED]");
}
