//! Capstan's wire and storage schemas, and ids.
//!
//! # Layout
//!
//! - `schema/records.capnp` → [`records_capnp`]: durable records (formulas,
//!   directory entries, messages, dedup records).
//! - `schema/api.capnp` → [`api_capnp`]: the control-socket API of a node.
//! - `schema/net.capnp` → [`net_capnp`]: the node-to-node API over QUIC.
//! - [`locator`]: `capstan://<cluster-id>/<swiss>?at=…` locators.
//! - [`id`]: 256-bit formula ids and 128-bit request/message ids.
//!
//! The generated Rust is committed under `src/generated/` so that building
//! Capstan needs no `capnp` tool; `scripts/gen-proto` regenerates it and CI
//! checks it is current.

pub mod id;
pub mod locator;

#[allow(clippy::all, clippy::pedantic, unused, missing_docs, unsafe_code)]
#[rustfmt::skip]
pub mod records_capnp {
    include!("generated/records_capnp.rs");
}

#[allow(clippy::all, clippy::pedantic, unused, missing_docs, unsafe_code)]
#[rustfmt::skip]
pub mod api_capnp {
    include!("generated/api_capnp.rs");
}

#[allow(clippy::all, clippy::pedantic, unused, missing_docs, unsafe_code)]
#[rustfmt::skip]
pub mod net_capnp {
    include!("generated/net_capnp.rs");
}

pub use id::{FormulaId, IdError, RequestId};
pub use locator::{Locator, LocatorError};
