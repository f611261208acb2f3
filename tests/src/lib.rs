//! Cross-crate tests of the orchestrator: the seeded simulation of real workers over the in-memory
//! adapter ([`runtime_sim`]), used by the property tests, `cargo xtask sim` and the demo.
#![deny(missing_docs)]

pub mod runtime_sim;
