//! Test support for byok-operator: a real local control plane (etcd + kube-apiserver built
//! from their Go modules) for integration tests and for `make cluster-up`.
#![deny(unsafe_code)] // one audited exception: PR_SET_PDEATHSIG in envtest::spawn

pub mod cluster;
pub mod connect_proxy;
pub mod envtest;
pub mod fake_provider;
pub mod forged;
pub mod manifests;
pub mod node;
pub mod oci;
pub mod operator;
pub mod pki;
pub mod serving;
pub mod sidecar;
pub mod stub_broker;
