//! # layerkv
//!
//! Less KV-cache memory for LLM inference by composing two families of methods:
//! **cross-layer sharing** (a layer reads another layer's K/V: KVSharer, CLA, MLKV, YOCO, LCKV)
//! and **intra-layer retention** (StreamingLLM sinks + window, H2O, SnapKV, PyramidKV budgets).
//!
//! The data flows one way: the model asks the [`LayerKvPolicy`] which KV group a layer reads,
//! the [`KvCache`] (driven by the policy) hands out slots from one cross-layer [`BlockPool`],
//! and the attention kernels read the [`BlockTable`]s it laid out. This crate holds no tensors
//! and depends on no engine; kernels live in `layerkv-kernels`, the model runner in
//! `layerkv-model`.
//!
//! ```
//! use std::sync::Arc;
//! use layerkv::{CacheConfig, KvCache, LayerMap, PolicyBuilder, Retention, Step};
//!
//! // CLA with stride 2 on a 4-layer model, plus StreamingLLM (4 sinks, 60-token window).
//! let policy = PolicyBuilder::new(LayerMap::cla(4, 2)?)
//!     .retention(Retention::SinkWindow { sinks: 4, window: 60 })
//!     .build()?;
//! let config = CacheConfig { block_size: 16, num_pages: 64, bytes_per_token: 2 * 2 * 64 * 2, ..CacheConfig::default() };
//! let cache = KvCache::new(Arc::new(policy), config)?;
//! cache.add_sequence(1)?;
//! let mut step = Step::new();
//! for token in 0..200u32 {
//!     let reserved = cache.reserve(&[(1, &[token])], &mut step)?;
//!     // ... write K/V of group g at reserved.group_slots(g), attend over cache.read().view(1, g);
//!     // an early `?` here drops `reserved`, which rolls the step back ...
//!     // Retain, and move the rows compaction planned (step.moves()) in the same transaction.
//!     reserved.retain_with(|step| {
//!         let _moves = step.moves(); // ... gather every source row, then scatter ...
//!         Ok::<(), layerkv::Error>(())
//!     })?;
//! }
//! let memory = cache.memory(1)?;
//! assert_eq!(memory.bytes_per_layer[1], 0);             // layer 1 reads layer 0's KV
//! assert!(memory.pages_per_group.iter().all(|&p| p <= 5)); // 63 tokens per group, not 200
//! # Ok::<(), layerkv::Error>(())
//! ```

pub mod bits;
mod cache;
pub mod calibrate;
mod compact;
mod config;
mod error;
mod ids;
pub mod map;
pub mod plan;
mod policy;
mod pool;
pub mod retention;
mod rng;
mod sched;
mod spec;
mod step;
mod table;

pub use cache::{CacheReader, CacheSnapshot, KvCache, MemoryReport, Reservation, SequenceSnapshot};
pub use compact::SlotMove;
pub use config::CacheConfig;
pub use error::{Error, Result};
pub use ids::SeqId;
pub use map::{GroupId, LayerMap, Partition, Target};
pub use policy::{
    compresses_in_prefill, lanes_per_group, probe_chunk, LayerKvPolicy, Policy, PolicyBuilder,
};
pub use pool::{chain_hash, group_block_hash, BlockPool, PageId, PoolStats, NULL_PAGE};
pub use retention::{
    Budget, CustomRetention, JointLane, JointScratch, Phase, RetainInput, Retention, RetentionRule,
    ScoreNeed, Scores, KVZIP_CHUNK,
};
pub use rng::SplitMix64;
pub use sched::{
    FinishReason, FinishedRequest, PendingProbe, RequestId, RequestInfo, RequestState,
    ScheduledKind, ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput,
};
pub use step::{PageCopy, Rerotation, RetainOutcome, Step, PROBE_SINKS};
pub use table::{BlockTable, TableView};

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn cache_is_send_and_sync() {
        assert_send_sync::<super::KvCache>();
        assert_send_sync::<super::Policy>();
        assert_send_sync::<super::Scheduler>();
    }
}
