//! Intra-layer retention: which token slots of one KV group stay in the cache.
//!
//! A [`Retention`] is pure data (it round-trips through serde as part of a policy file) and a
//! pure decision: given the group's logical slots, their validity and, for score-based rules,
//! the accumulated attention mass, it marks the slots to keep. It never allocates pages; the
//! [`crate::KvCache`] applies the decision and returns pages left empty to the pool.
//!
//! Decisions are per KV group, or per lane (one KV head of a group) under a per-head policy
//! ([`crate::LayerKvPolicy::per_head`]): scores are summed over the group's (or lane's) query
//! heads and over every layer that reads it. [`Retention::select_joint`] is AdaKV's split of
//! one budget across the lanes of a group.
//! Costs: `Full`/`SinkWindow` O(kept); `HeavyHitter` O(slots) expected; `SnapKv`
//! O(slots x pool), once per sequence; `KvZip` O(slots) expected, once per sequence (plus the
//! engine's probe steps, about one more prefill of the prompt).

mod adaptive;
mod heavy_hitter;
mod kvzip;
mod pyramid;
mod sink_window;
mod snapkv;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bits;
use crate::error::{Error, Result};

pub use adaptive::JointLane;
pub use pyramid::pyramid_budgets;

/// Prompt tokens per KVzip probe step by default ([`Retention::KvZip`]).
pub const KVZIP_CHUNK: usize = 128;

fn kvzip_chunk() -> usize {
    KVZIP_CHUNK
}

fn kvzip_pool() -> usize {
    1
}

/// Reused buffers of [`Retention::select_joint`] (no allocation once grown).
#[derive(Debug, Default)]
pub struct JointScratch {
    slots: Vec<u32>,
    joint: Vec<(f32, u32, u32)>,
}

/// A token budget: an absolute count, or a fraction of the tokens the group has seen so far.
///
/// In policy files an integer is a token count (`heavy = 128`) and a float is a ratio
/// (`heavy = 0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Budget {
    /// Keep this many tokens.
    Tokens(usize),
    /// Keep `ceil(ratio x tokens seen)` tokens; `0 < ratio <= 1`.
    Ratio(f64),
}

impl Budget {
    /// The budget in tokens for a group that has seen `num_tokens` tokens.
    pub fn resolve(self, num_tokens: usize) -> usize {
        match self {
            Budget::Tokens(n) => n,
            Budget::Ratio(r) => (r * num_tokens as f64).ceil() as usize,
        }
    }

    fn is_zero(self) -> bool {
        matches!(self, Budget::Tokens(0))
    }

    fn check(self, what: &str, retention: &Retention) -> Result<()> {
        if let Budget::Ratio(r) = self {
            if !(r > 0.0 && r <= 1.0) {
                return Err(Error::InvalidRetention {
                    retention: retention.to_string(),
                    reason: format!("{what} ratio must be in (0, 1], got {r}"),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Tokens(n) => write!(f, "{n}"),
            Budget::Ratio(r) => write!(f, "{}%", r * 100.0),
        }
    }
}

/// Where a sequence is when its retention decides, derived by the cache from the sequence's
/// prompt length ([`crate::KvCache::set_prompt_len`]; by default the first step is the prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The step appended prompt tokens and more of the prompt follows (chunked prefill).
    Prefill,
    /// The step appended the prompt's last token: SnapKV compresses here, once per prompt.
    PromptEnd,
    /// The step appended generated (or teacher-forced) tokens after the prompt.
    Decode,
}

/// Which attention scores a retention reads; the cache keeps each kind per sequence and group
/// and the engine feeds them through [`crate::Step`]. A [`Retention::Union`] needs what its
/// parts need, and each part reads its own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScoreNeed {
    /// Attention mass accumulated over every query so far (H2O), summed over heads and readers.
    pub accumulated: bool,
    /// The mass of the latest step's queries only (e.g. TOVA), replaced every step.
    pub last: bool,
    /// The mass of the prompt's last `observe` queries (SnapKV's observation window); 0: none.
    pub observe: usize,
    /// The mass of probe steps' queries, the most of any probe step per slot (KVzip: the
    /// engine replays the prompt after it before its last token, see
    /// [`crate::KvCache::reserve_probe`]); slots no probe saw score `+inf`.
    pub probe: bool,
}

impl ScoreNeed {
    /// Positions suffice; no attention mass is needed.
    pub const NONE: ScoreNeed = ScoreNeed {
        accumulated: false,
        last: false,
        observe: 0,
        probe: false,
    };

    /// Whether nothing is needed.
    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }

    /// Whether the mass of every query row of a step is needed (accumulated or last).
    pub fn all_rows(&self) -> bool {
        self.accumulated || self.last
    }

    /// What both need.
    pub fn union(self, other: ScoreNeed) -> ScoreNeed {
        ScoreNeed {
            accumulated: self.accumulated || other.accumulated,
            last: self.last || other.last,
            observe: self.observe.max(other.observe),
            probe: self.probe || other.probe,
        }
    }
}

/// The scores a retention sees, one entry per logical slot (those its [`ScoreNeed`] asked for).
#[derive(Debug, Clone, Copy, Default)]
pub struct Scores<'a> {
    /// Accumulated attention mass (H2O).
    pub accumulated: Option<&'a [f32]>,
    /// Mass from the latest step's queries.
    pub last: Option<&'a [f32]>,
    /// Mass from the prompt's observation window (SnapKV); all zeros until those queries ran.
    pub observed: Option<&'a [f32]>,
    /// The most mass any probe step put on each slot (KVzip); `+inf` where no probe looked.
    pub probed: Option<&'a [f32]>,
}

/// A retention rule written outside this crate (TOVA, a quantile rule, ...): implement it and
/// wrap it in [`Retention::Custom`]. The cache calls it exactly like the built-in rules.
pub trait RetentionRule: Send + Sync + fmt::Debug {
    /// A short name for reports.
    fn name(&self) -> String;

    /// The scores [`RetentionRule::select`] reads.
    fn score_need(&self) -> ScoreNeed;

    /// Marks in `keep` (cleared by the caller) the valid slots to keep; see
    /// [`Retention::select`]. Slots marked but not valid are ignored.
    fn select(
        &self,
        input: &RetainInput<'_>,
        keep: &mut [u64],
        scratch: &mut Vec<u32>,
    ) -> Result<()>;

    /// Tokens at the start that are pinned and re-rotated to sit right before the first kept
    /// token after them (StreamingLLM's sinks); 0 for rules that keep text positions.
    fn sinks(&self) -> usize {
        0
    }

    /// Upper bound on the tokens kept after a step by a sequence that has seen `num_tokens`
    /// (capacity planning).
    fn max_tokens(&self, num_tokens: usize) -> usize {
        num_tokens
    }
}

/// A shared handle on a [`RetentionRule`] (compared by identity). Custom rules cannot be
/// written to policy files.
#[derive(Debug, Clone)]
pub struct CustomRetention(pub std::sync::Arc<dyn RetentionRule>);

impl PartialEq for CustomRetention {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// How one KV group decides which token slots stay.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Retention {
    /// Keep every token (the unmodified model).
    #[default]
    Full,
    /// StreamingLLM: the first `sinks` tokens plus the last `window` tokens.
    SinkWindow {
        /// Attention-sink tokens at the start, never evicted (StreamingLLM uses 4).
        sinks: usize,
        /// Recent tokens the current token attends to, itself included (between steps the cache
        /// holds `window - 1` of them).
        window: usize,
    },
    /// H2O: the `heavy` tokens with the most accumulated attention plus the `recent` last tokens.
    HeavyHitter {
        /// Heavy-hitter budget.
        heavy: Budget,
        /// Recent-window budget.
        recent: Budget,
    },
    /// SnapKV: once at the end of prefill, compress the prompt to `budget` tokens using the
    /// attention of the last `observe` prompt queries, max-pooled over `pool` slots.
    SnapKv {
        /// Observation window (SnapKV uses 32); always kept.
        observe: usize,
        /// Tokens kept after compression, window included.
        budget: Budget,
        /// Pooling kernel size (odd; SnapKV uses 5 to 7).
        pool: usize,
    },
    /// KVzip (Kim et al. 2025), query-agnostic: once at the end of prefill (or after every
    /// prefill step too, with `prefill`), keep the `budget` slots the prompt's reconstruction
    /// attends to most. Before the prompt's last token the
    /// engine replays the prompt in probe steps of `chunk` tokens after a "repeat the context"
    /// prefix ([`crate::KvCache::reserve_probe`]); each slot scores the most attention any probe
    /// step put on it, and the probes leave nothing in the cache. Tokens no probe saw (the
    /// prompt's last) are kept.
    #[serde(rename = "kvzip")]
    KvZip {
        /// Tokens kept after compression.
        budget: Budget,
        /// Prompt tokens per probe step: the mass sums over a step's rows, so a shorter chunk
        /// comes closer to KVzip's maximum over single queries, at more steps
        /// ([`KVZIP_CHUNK`] when a policy file leaves it out).
        #[serde(default = "kvzip_chunk")]
        chunk: usize,
        /// Max-pooling of the scores over this many neighbouring slots (odd), as SnapKV pools,
        /// so a kept token keeps its neighbours (a number split into several tokens stays
        /// whole); 1, KVzip's own and the default, scores each token alone.
        #[serde(default = "kvzip_pool")]
        pool: usize,
        /// Compress after every prefill chunk too, not only at the prompt's end: the engine
        /// probes each chunk right after it runs, and every prompt step keeps `budget` slots,
        /// those not probed yet (the step's own tokens, and with `pool` above 1 the `pool / 2`
        /// before them; all of them where they are more) and then the best-scored probed ones.
        /// The prompt is never held whole (the peak is the larger of the budget and a step,
        /// plus a step, where plain KVzip holds the whole prompt and a probe), but the
        /// prompt's later tokens are computed over what was kept of the earlier ones, not all
        /// of them: on the embedded model that costs most of KVzip's retrieval
        /// (`docs/benchmarks.md`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prefill: bool,
    },
    /// Keep every slot that any part keeps (e.g. sinks + heavy hitters + window).
    Union {
        /// The composed retentions.
        parts: Vec<Retention>,
    },
    /// A rule implemented outside the crate ([`RetentionRule`]); not serialisable.
    #[serde(skip)]
    Custom(CustomRetention),
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::Full => write!(f, "full"),
            Retention::SinkWindow { sinks, window } => write!(f, "sinks={sinks}+window={window}"),
            Retention::HeavyHitter { heavy, recent } => {
                write!(f, "h2o(heavy={heavy},recent={recent})")
            }
            Retention::SnapKv {
                observe,
                budget,
                pool,
            } => {
                write!(f, "snapkv(budget={budget},observe={observe},pool={pool})")
            }
            Retention::KvZip {
                budget,
                chunk,
                pool,
                prefill,
            } => {
                write!(f, "kvzip(budget={budget},chunk={chunk},pool={pool}")?;
                if *prefill {
                    f.write_str(",prefill")?;
                }
                f.write_str(")")
            }
            Retention::Union { parts } => {
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
            Retention::Custom(c) => write!(f, "{}", c.0.name()),
        }
    }
}

/// What a retention sees of a group when it decides.
///
/// Logical slots are the group's live slots in order (the cache renumbers them when pages are
/// freed or compacted, so their number depends on what is kept, never on how many tokens have
/// streamed by); `positions` maps each to its text position.
#[derive(Debug, Clone, Copy)]
pub struct RetainInput<'a> {
    /// Logical slots of the group's table.
    pub num_slots: usize,
    /// Tokens the sequence has seen (ratio budgets resolve against it).
    pub num_tokens: usize,
    /// Validity bitset over the logical slots.
    pub valid: &'a [u64],
    /// Text position of each logical slot.
    pub positions: &'a [u32],
    /// The scores the retention asked for ([`Retention::score_need`]).
    pub scores: Scores<'a>,
    /// When the decision is made.
    pub phase: Phase,
}

impl Retention {
    /// StreamingLLM's defaults: 4 sinks and the given recent window.
    pub fn streaming(window: usize) -> Self {
        Retention::SinkWindow { sinks: 4, window }
    }

    /// Checks that the rule is possible: non-zero budgets, `window >= sinks`, ratios in (0, 1],
    /// an odd pool, a SnapKV budget larger than its observation window.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::InvalidRetention {
            retention: self.to_string(),
            reason,
        };
        match self {
            Retention::Full => Ok(()),
            Retention::SinkWindow { sinks, window } => {
                if *window == 0 {
                    return Err(bad(
                        "window must keep at least one token (zero budget)".into()
                    ));
                }
                if window < sinks {
                    return Err(bad(format!(
                        "window ({window}) must not be smaller than sinks ({sinks})"
                    )));
                }
                Ok(())
            }
            Retention::HeavyHitter { heavy, recent } => {
                heavy.check("heavy", self)?;
                recent.check("recent", self)?;
                if recent.is_zero() {
                    return Err(bad(
                        "recent must keep at least the current token (zero budget)".into(),
                    ));
                }
                Ok(())
            }
            Retention::SnapKv {
                observe,
                budget,
                pool,
            } => {
                budget.check("budget", self)?;
                if *observe == 0 {
                    return Err(bad(
                        "the observation window must be at least one token".into()
                    ));
                }
                if let Budget::Tokens(b) = budget {
                    if b <= observe {
                        return Err(bad(format!(
                            "budget ({b}) must exceed the observation window ({observe})"
                        )));
                    }
                }
                if *pool == 0 || pool % 2 == 0 {
                    return Err(bad(format!("pool must be odd and positive, got {pool}")));
                }
                Ok(())
            }
            Retention::KvZip {
                budget,
                chunk,
                pool,
                ..
            } => {
                budget.check("budget", self)?;
                if *pool == 0 || pool % 2 == 0 {
                    return Err(bad(format!("pool must be odd and positive, got {pool}")));
                }
                if budget.is_zero() {
                    return Err(bad("the budget must keep at least one token".into()));
                }
                if *chunk == 0 {
                    return Err(bad("a probe step needs at least one token (chunk 0)".into()));
                }
                Ok(())
            }
            Retention::Union { parts } => {
                if parts.is_empty() {
                    return Err(bad("a union needs at least one part (zero budget)".into()));
                }
                parts.iter().try_for_each(Retention::validate)
            }
            Retention::Custom(_) => Ok(()),
        }
    }

    /// Which scores the engine must collect for this retention.
    pub fn score_need(&self) -> ScoreNeed {
        match self {
            Retention::Full | Retention::SinkWindow { .. } => ScoreNeed::NONE,
            Retention::HeavyHitter { .. } => ScoreNeed {
                accumulated: true,
                ..ScoreNeed::NONE
            },
            Retention::SnapKv { observe, .. } => ScoreNeed {
                observe: *observe,
                ..ScoreNeed::NONE
            },
            Retention::KvZip { .. } => ScoreNeed {
                probe: true,
                ..ScoreNeed::NONE
            },
            Retention::Union { parts } => parts
                .iter()
                .map(Retention::score_need)
                .fold(ScoreNeed::NONE, ScoreNeed::union),
            Retention::Custom(c) => c.0.score_need(),
        }
    }

    /// Whether the rule never evicts.
    pub fn is_full(&self) -> bool {
        match self {
            Retention::Full => true,
            Retention::Union { parts } => parts.iter().any(Retention::is_full),
            _ => false,
        }
    }

    /// StreamingLLM sinks: the first tokens that are never evicted and are re-rotated to sit
    /// right before the first kept token after them (positions inside the cache). A union has
    /// the largest sink count of its parts.
    pub fn sinks(&self) -> usize {
        match self {
            Retention::SinkWindow { sinks, .. } => *sinks,
            Retention::Union { parts } => parts.iter().map(Retention::sinks).max().unwrap_or(0),
            Retention::Custom(c) => c.0.sinks(),
            _ => 0,
        }
    }

    /// Marks in `keep` (cleared by the caller, `words_for(num_slots)` words) the valid slots to
    /// keep. `scratch` is caller-owned and reused, so a warmed-up call does not allocate.
    pub fn select(
        &self,
        input: &RetainInput<'_>,
        keep: &mut [u64],
        scratch: &mut Vec<u32>,
    ) -> Result<()> {
        let n = input.num_slots;
        let missing = |what: &str| Error::InvalidRetention {
            retention: self.to_string(),
            reason: format!("the engine did not provide the {what} scores this rule needs"),
        };
        match self {
            Retention::Full => {
                keep.copy_from_slice(&input.valid[..keep.len()]);
            }
            Retention::SinkWindow { sinks, window } => {
                sink_window::select(*sinks, *window, n, input.valid, keep)
            }
            Retention::HeavyHitter { heavy, recent } => heavy_hitter::select(
                heavy.resolve(input.num_tokens),
                recent.resolve(input.num_tokens),
                n,
                input.valid,
                input
                    .scores
                    .accumulated
                    .ok_or_else(|| missing("accumulated"))?,
                keep,
                scratch,
            ),
            Retention::SnapKv {
                observe,
                budget,
                pool,
            } => {
                let budget = budget.resolve(input.num_tokens);
                if input.phase == Phase::PromptEnd && bits::count(input.valid) > budget {
                    snapkv::select(
                        *observe,
                        budget,
                        *pool,
                        n,
                        input.valid,
                        input
                            .scores
                            .observed
                            .ok_or_else(|| missing("observation"))?,
                        keep,
                        scratch,
                    )
                } else {
                    keep.copy_from_slice(&input.valid[..keep.len()]);
                }
            }
            Retention::KvZip {
                budget,
                pool,
                prefill,
                ..
            } => {
                let mut budget = budget.resolve(input.num_tokens);
                let probed = || input.scores.probed.ok_or_else(|| missing("probe"));
                let decides = match input.phase {
                    Phase::PromptEnd => true,
                    // Mid-prompt: every slot not probed yet (the step's own tokens, probed after
                    // it) stays within the budget, or all of them where they are more.
                    Phase::Prefill if *prefill => {
                        let lane = (n, input.valid, probed()?);
                        budget = kvzip::mid_prompt_budget(budget, *pool, [lane]);
                        true
                    }
                    _ => false,
                };
                if decides && bits::count(input.valid) > budget {
                    kvzip::select(budget, *pool, n, input.valid, probed()?, keep, scratch)
                        .map_err(|reason| Error::InvalidRetention {
                            retention: self.to_string(),
                            reason,
                        })?;
                } else {
                    keep.copy_from_slice(&input.valid[..keep.len()]);
                }
            }
            Retention::Union { parts } => {
                for p in parts {
                    p.select(input, keep, scratch)?;
                }
            }
            Retention::Custom(c) => c.0.select(input, keep, scratch)?,
        }
        Ok(())
    }

    /// Prompt tokens per probe step the engine runs before the prompt's last token
    /// ([`Retention::KvZip`]; a union: its first KVzip part's); `None`: no probes.
    pub fn probe_chunk(&self) -> Option<usize> {
        match self {
            Retention::KvZip { chunk, .. } => Some(*chunk),
            Retention::Union { parts } => parts.iter().find_map(Retention::probe_chunk),
            _ => None,
        }
    }

    /// Whether [`Retention::select_joint`] can decide at `phase` (SnapKV, PyramidKV and KVzip
    /// at the prompt's end; KVzip with `prefill` at every prompt step): callers skip gathering
    /// the lanes elsewhere.
    pub fn has_joint_form(&self, phase: Phase) -> bool {
        match self {
            Retention::SnapKv { .. } => phase == Phase::PromptEnd,
            Retention::KvZip { prefill, .. } => {
                phase == Phase::PromptEnd || (*prefill && phase == Phase::Prefill)
            }
            _ => false,
        }
    }

    /// Whether this retention compresses while the prompt is prefilled, not only at its end
    /// (KVzip with `prefill`; a union: any part): a sequence then never holds its whole prompt
    /// ([`Retention::max_tokens_in_prompt`]), and the engine probes after every prefill chunk.
    pub fn compresses_in_prefill(&self) -> bool {
        match self {
            Retention::KvZip { prefill, .. } => *prefill,
            Retention::Union { parts } => parts.iter().any(Retention::compresses_in_prefill),
            _ => false,
        }
    }

    /// Whether [`Retention::select_joint`] reads the probe scores (KVzip) rather than SnapKV's
    /// observation scores.
    pub fn joint_reads_probes(&self) -> bool {
        matches!(self, Retention::KvZip { .. })
    }

    /// AdaKV: one decision for all the lanes of a group (overwriting their keep bits), sharing
    /// `lanes x budget` with each lane keeping at least `floor` of its share (see
    /// `adaptive.rs`). SnapKV (and PyramidKV, SnapKV with per-group budgets) and KVzip (its
    /// probe scores, no window: KVzip's head-level eviction) have a joint form, at the
    /// prompt's end when every lane holds more than its budget (KVzip with `prefill` also at
    /// every prompt step, keeping every slot not probed yet, as
    /// [`Retention::select`] does); elsewhere this returns `false` and writes nothing, and the
    /// caller decides lane by lane with [`Retention::select`]. A joint decision bounds the
    /// group, not each lane.
    pub fn select_joint(
        &self,
        lanes: &mut [JointLane<'_>],
        num_tokens: usize,
        phase: Phase,
        floor: f64,
        scratch: &mut JointScratch,
    ) -> bool {
        // KVzip's head-level split is SnapKV's with no window and no pooling.
        let (observe, budget, pool) = match self {
            Retention::SnapKv {
                observe,
                budget,
                pool,
            } => (*observe, budget, *pool),
            Retention::KvZip { budget, pool, .. } => (0, budget, *pool),
            _ => return false,
        };
        let mut budget = budget.resolve(num_tokens);
        if !self.has_joint_form(phase) || lanes.is_empty() {
            return false;
        }
        if phase == Phase::Prefill {
            // KVzip mid-prompt: as `select`, every slot not yet probed stays (`+inf` scores
            // sort first).
            let lanes = lanes.iter().map(|l| (l.num_slots, l.valid, l.scores));
            budget = kvzip::mid_prompt_budget(budget, pool, lanes);
        }
        if lanes.iter().any(|l| bits::count(l.valid) <= budget) {
            return false;
        }
        adaptive::select_snapkv(
            observe,
            budget,
            pool,
            floor,
            lanes,
            &mut scratch.slots,
            &mut scratch.joint,
        );
        true
    }

    /// Upper bound on the tokens a sequence that has seen `num_tokens` keeps after a step. SnapKV
    /// (and a union with it) bounds nothing: its prompt is held whole until the prompt ends, so
    /// its saving shows after prefill, not at the peak. Used for capacity planning.
    pub fn max_tokens(&self, num_tokens: usize) -> usize {
        let kept = match self {
            Retention::Full => num_tokens,
            Retention::SinkWindow { sinks, window } => sinks + window.saturating_sub(1),
            Retention::HeavyHitter { heavy, recent } => {
                heavy.resolve(num_tokens) + recent.resolve(num_tokens)
            }
            // Nothing is compressed before the prompt ends: a sequence that is all prompt holds
            // all of it until then.
            Retention::SnapKv { .. } | Retention::KvZip { .. } => num_tokens,
            Retention::Union { parts } => parts.iter().map(|p| p.max_tokens(num_tokens)).sum(),
            Retention::Custom(c) => c.0.max_tokens(num_tokens),
        };
        kept.min(num_tokens)
    }

    /// Upper bound on the tokens a sequence keeps after each step of its prompt of `prompt_len`
    /// tokens, prefilled in steps of at most `chunk` tokens: KVzip with `prefill` its budget, or
    /// the step's own tokens where they are more (they wait for their probe); the other rules
    /// what [`Retention::max_tokens`] bounds (SnapKV and plain KVzip the whole prompt). Used for
    /// planning, as `max_tokens`.
    pub fn max_tokens_in_prompt(&self, prompt_len: usize, chunk: usize) -> usize {
        let kept = match self {
            Retention::KvZip {
                budget,
                pool,
                prefill: true,
                ..
            } => budget
                .resolve(prompt_len)
                .max(kvzip::unprobed_room(chunk, *pool)),
            Retention::Union { parts } => parts
                .iter()
                .map(|p| p.max_tokens_in_prompt(prompt_len, chunk))
                .fold(0, usize::saturating_add),
            _ => self.max_tokens(prompt_len),
        };
        kept.min(prompt_len)
    }

    /// Upper bound on the tokens a sequence keeps from the end of its prompt of `prompt_len`
    /// tokens on, while it appends up to `generated` more one at a time. SnapKV and KVzip have
    /// compressed the prompt to its budget by then, and evict nothing after it; the other rules
    /// keep what [`Retention::max_tokens`] bounds at every step. Used for planning, as
    /// `max_tokens`.
    pub fn max_tokens_after_prompt(&self, prompt_len: usize, generated: usize) -> usize {
        let total = prompt_len + generated;
        let kept = match self {
            // SnapKV keeps its observation window even under a smaller budget.
            Retention::SnapKv {
                budget, observe, ..
            } => budget.resolve(prompt_len).max(*observe).min(prompt_len) + generated,
            Retention::KvZip { budget, .. } => {
                budget.resolve(prompt_len).min(prompt_len) + generated
            }
            Retention::Union { parts } => parts
                .iter()
                .map(|p| p.max_tokens_after_prompt(prompt_len, generated))
                .sum(),
            _ => self.max_tokens(total),
        };
        kept.min(total)
    }

    /// Upper bound on the pages one sequence of `num_tokens` tokens holds in a group under this
    /// rule, with `extra` tokens of a step appended on top of what it keeps: the cache compacts
    /// a group whenever its holes add up to a page, so at most one page beyond the dense count.
    pub fn max_pages(&self, num_tokens: usize, extra: usize, block_size: usize) -> usize {
        let full = num_tokens.div_ceil(block_size);
        if self.is_full() {
            return full;
        }
        let live = (self.max_tokens(num_tokens) + extra).min(num_tokens);
        (live.div_ceil(block_size) + 1).min(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        r: &Retention,
        n: usize,
        valid: &[u64],
        scores: Option<&[f32]>,
        phase: Phase,
    ) -> Vec<usize> {
        let mut keep = vec![0u64; bits::words_for(n)];
        let mut scratch = Vec::new();
        let positions: Vec<u32> = (0..n as u32).collect();
        r.select(
            &RetainInput {
                num_slots: n,
                num_tokens: n,
                valid,
                positions: &positions,
                scores: Scores {
                    accumulated: scores,
                    last: scores,
                    observed: scores,
                    probed: scores,
                },
                phase,
            },
            &mut keep,
            &mut scratch,
        )
        .unwrap();
        (0..n).filter(|&s| bits::get(&keep, s)).collect()
    }

    /// KVzip with `prefill` mid-prompt, against a sort: every unprobed (`+inf`) slot stays,
    /// then the best probed ones up to the budget (pooled over `pool` valid neighbours, the
    /// budget raised by the `pool / 2` slots before the unprobed, which pooling scores `+inf`);
    /// nothing is decided before a probe ran, or without `prefill`; at the prompt's end the
    /// budget counts the unprobed as before.
    #[test]
    fn kvzip_compresses_mid_prompt_only_with_prefill() {
        let mut rng = crate::rng::SplitMix64::new(11);
        for case in 0..600 {
            let pool = [1, 3, 5][case % 3];
            let n = 2 + (rng.next_u64() % 60) as usize;
            let budget = 1 + (rng.next_u64() % n as u64) as usize;
            let valid = kvzip::testing::valid(&mut rng, n, 6);
            // The last `fresh` slots are the step's own, not probed yet.
            let fresh = (rng.next_u64() % (n as u64 / 2 + 1)) as usize;
            let probed = kvzip::testing::probed(&mut rng, n, fresh, 9, 0.125);
            let live: Vec<usize> = (0..n).filter(|&x| bits::get(&valid, x)).collect();
            let unprobed: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&x| !probed[x].is_finite())
                .collect();
            let any_probed = unprobed.len() < live.len();
            let half = pool / 2;
            let pooled = |x: usize| {
                live.iter()
                    .filter(|&&t| t + half >= x && t <= x + half)
                    .map(|&t| probed[t])
                    .fold(f32::NEG_INFINITY, f32::max)
            };
            let room = if unprobed.is_empty() {
                budget
            } else {
                budget.max(unprobed.len() + half)
            };
            let mut want = live.clone();
            if any_probed {
                want.sort_by(|&a, &b| pooled(b).total_cmp(&pooled(a)).then(a.cmp(&b)));
                want.truncate(room);
            }
            want.sort_unstable();
            let r = |prefill| Retention::KvZip {
                budget: Budget::Tokens(budget),
                chunk: 4,
                pool,
                prefill,
            };
            let got = run(&r(true), n, &valid, Some(&probed), Phase::Prefill);
            let name = format!("case {case}: n {n} budget {budget} fresh {fresh} pool {pool}");
            assert_eq!(got, want, "{name}");
            assert!(
                unprobed.iter().all(|x| got.contains(x)),
                "{name}: a slot was dropped before its probe"
            );
            let plain = run(&r(false), n, &valid, Some(&probed), Phase::Prefill);
            assert_eq!(plain, live, "{name}: plain KVzip decides at the end only");
            if any_probed {
                let end = run(&r(true), n, &valid, Some(&probed), Phase::PromptEnd);
                let same = run(&r(false), n, &valid, Some(&probed), Phase::PromptEnd);
                assert_eq!(end, same, "{name}");
                assert_eq!(end.len(), budget.min(live.len()), "{name}");
            }
        }
    }

    fn all_valid(n: usize) -> Vec<u64> {
        let mut v = vec![0u64; bits::words_for(n)];
        bits::set_range(&mut v, 0, n);
        v
    }

    #[test]
    fn sink_window_keeps_sinks_and_recent() {
        let r = Retention::SinkWindow {
            sinks: 2,
            window: 3,
        };
        assert_eq!(
            run(&r, 10, &all_valid(10), None, Phase::Decode),
            vec![0, 1, 8, 9]
        );
        assert_eq!(
            run(&r, 4, &all_valid(4), None, Phase::Decode),
            vec![0, 1, 2, 3]
        );
        // After compaction packed the sinks towards the window: a hole before them and holes
        // inside the recent range. Sinks and window are counted over valid slots.
        let mut valid = all_valid(10);
        for s in [0, 3, 7] {
            bits::clear(&mut valid, s);
        }
        assert_eq!(run(&r, 10, &valid, None, Phase::Decode), vec![1, 2, 8, 9]);
        bits::clear(&mut valid, 8);
        assert_eq!(run(&r, 10, &valid, None, Phase::Decode), vec![1, 2, 6, 9]);
    }

    #[test]
    fn heavy_hitters_take_top_scores_outside_the_window() {
        let r = Retention::HeavyHitter {
            heavy: Budget::Tokens(2),
            recent: Budget::Tokens(2),
        };
        let scores = [0.1, 5.0, 0.2, 3.0, 0.3, 9.0, 9.0, 0.0];
        assert_eq!(
            run(&r, 8, &all_valid(8), Some(&scores), Phase::Decode),
            vec![1, 5, 6, 7]
        );
        // Evicted slots are never brought back.
        let mut valid = all_valid(8);
        bits::clear(&mut valid, 1);
        assert_eq!(
            run(&r, 8, &valid, Some(&scores), Phase::Decode),
            vec![3, 5, 6, 7]
        );
    }

    #[test]
    fn union_composes_sinks_heavy_and_window() {
        let r = Retention::Union {
            parts: vec![
                Retention::SinkWindow {
                    sinks: 1,
                    window: 1,
                },
                Retention::HeavyHitter {
                    heavy: Budget::Tokens(1),
                    recent: Budget::Tokens(1),
                },
            ],
        };
        let scores = [0.0, 0.0, 7.0, 0.0, 0.0, 0.0];
        assert_eq!(
            run(&r, 6, &all_valid(6), Some(&scores), Phase::Decode),
            vec![0, 2, 5]
        );
        assert!(r.score_need().accumulated && r.score_need().observe == 0);
    }

    #[test]
    fn snapkv_compresses_once_at_prefill() {
        let r = Retention::SnapKv {
            observe: 2,
            budget: Budget::Tokens(4),
            pool: 1,
        };
        let scores = [0.0, 1.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(
            run(&r, 8, &all_valid(8), Some(&scores), Phase::PromptEnd),
            vec![1, 3, 6, 7]
        );
        assert_eq!(
            run(&r, 8, &all_valid(8), Some(&scores), Phase::Decode).len(),
            8
        );
        // Pooling spreads a peak to its neighbours.
        let r = Retention::SnapKv {
            observe: 2,
            budget: Budget::Tokens(4),
            pool: 3,
        };
        let scores = [0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(
            run(&r, 8, &all_valid(8), Some(&scores), Phase::PromptEnd),
            vec![2, 3, 6, 7]
        );
    }

    #[test]
    fn missing_scores_are_an_error() {
        let r = Retention::HeavyHitter {
            heavy: Budget::Ratio(0.5),
            recent: Budget::Tokens(1),
        };
        let mut keep = vec![0u64; 1];
        let err = r
            .select(
                &RetainInput {
                    num_slots: 4,
                    num_tokens: 4,
                    valid: &all_valid(4),
                    positions: &[0, 1, 2, 3],
                    scores: Scores::default(),
                    phase: Phase::Decode,
                },
                &mut keep,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRetention { reason, .. } if reason.contains("accumulated")),
            "{err}"
        );
    }

    #[test]
    fn impossible_rules_are_rejected() {
        for r in [
            Retention::SinkWindow {
                sinks: 4,
                window: 2,
            },
            Retention::SinkWindow {
                sinks: 0,
                window: 0,
            },
            Retention::HeavyHitter {
                heavy: Budget::Tokens(4),
                recent: Budget::Tokens(0),
            },
            Retention::HeavyHitter {
                heavy: Budget::Ratio(1.5),
                recent: Budget::Tokens(1),
            },
            Retention::SnapKv {
                observe: 32,
                budget: Budget::Tokens(16),
                pool: 5,
            },
            Retention::SnapKv {
                observe: 4,
                budget: Budget::Tokens(16),
                pool: 4,
            },
            Retention::Union { parts: vec![] },
        ] {
            let e = r.validate().unwrap_err();
            assert!(matches!(e, Error::InvalidRetention { .. }), "{r}: {e}");
        }
        Retention::streaming(1024).validate().unwrap();
    }

    #[test]
    fn serde_forms() {
        let r: Retention =
            toml::from_str("kind = \"heavy_hitter\"\nheavy = 0.1\nrecent = 64\n").unwrap();
        assert_eq!(
            r,
            Retention::HeavyHitter {
                heavy: Budget::Ratio(0.1),
                recent: Budget::Tokens(64)
            }
        );
        let e = serde_json::from_str::<Retention>(
            r#"{"kind": "sink_window", "sinks": 4, "window": 8, "x": 1}"#,
        );
        assert!(e.is_err());
        let u = Retention::Union {
            parts: vec![Retention::streaming(16), Retention::Full],
        };
        let back: Retention = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
        assert_eq!(back, u);
    }

    #[test]
    fn page_bounds() {
        assert_eq!(Retention::Full.max_pages(100, 0, 16), 7);
        assert_eq!(
            Retention::SinkWindow {
                sinks: 4,
                window: 32
            }
            .max_pages(10_000, 0, 16),
            1 + 3
        );
        assert_eq!(
            Retention::SinkWindow {
                sinks: 4,
                window: 32
            }
            .max_pages(20, 0, 16),
            2
        );
    }
}
