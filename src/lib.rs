//! byok-operator: bring-your-own-key LLM provider API keys for Kubernetes.
//!
//! The library holds all logic; `main.rs` only parses arguments and calls [`cli::run`].
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::too_many_lines))]

pub mod admin;
pub mod apidoc;
pub mod broker;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod crypto;
pub mod envelope;
pub mod interval;
pub mod metrics;
pub mod names;
pub mod providers;
pub mod reason;
pub mod serve;
pub mod serving;
pub mod sidecar;
pub mod startup;
pub mod status;
pub mod webhook;

// Kubernetes-free parts the sidecar's own crate holds and the operator shares: the broker <->
// sidecar wire format, the egress policy (the verifier's and the sidecar's), the proxy itself
// (its metric names are documented here).
pub use byok_proxy as proxy;
pub use byok_proxy::{egress, grant};
