//! The mutating admission webhook: [`patch`] decides what a pod gets (pure, Kubernetes types
//! in, JSON patch out); the handler only parses the AdmissionReview and answers.

pub mod guard;
pub mod handler;
pub mod patch;
pub mod prescan;
