#![cfg(loom)]
//! Loom models of the pool (filled in by the verification work).
