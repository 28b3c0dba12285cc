//! mistral.rs 0.8.1's `BlockPool` (`mistralrs-core/src/paged_attention/block_pool.rs` and its
//! `block_hash.rs`), compiled unchanged from the cargo registry source so the allocator
//! benchmark can run it beside layerkv's `BlockPool` on the same trace. It is not reachable
//! through mistral.rs's public API, and none of its code is copied into this repository.

#![allow(clippy::all, missing_docs, unused)]

include!(concat!(env!("OUT_DIR"), "/mistralrs_block_pool.rs"));
