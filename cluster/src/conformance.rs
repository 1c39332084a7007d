//! Backend conformance suite (SKELETON).
