//! Cross-crate tests of the orchestrator: a deterministic cluster simulation over the in-memory
//! adapter ([`sim`]), used by the property tests and the demo.
#![deny(missing_docs)]

pub mod runtime_sim;
pub mod sim;
