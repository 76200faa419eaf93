//! byok-operator: bring-your-own-key LLM provider API keys for Kubernetes.
//!
//! The library holds all logic; `main.rs` only parses arguments and calls [`cli::run`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod apidoc;
pub mod broker;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod crypto;
pub mod egress;
pub mod grant;
pub mod interval;
pub mod metrics;
pub mod names;
pub mod providers;
pub mod proxy;
pub mod reason;
pub mod serve;
pub mod serving;
pub mod status;
pub mod telemetry;
pub mod webhook;
