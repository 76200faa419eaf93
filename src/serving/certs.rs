//! Certificates. Filled in by the serving work.
