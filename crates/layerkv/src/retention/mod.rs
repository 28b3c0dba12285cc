//! Intra-layer retention: which token slots of one KV group stay in the cache.
//!
//! A [`Retention`] is pure data (it round-trips through serde as part of a policy file) and a
//! pure decision: given the group's logical slots, their validity and, for score-based rules,
//! the accumulated attention mass, it marks the slots to keep. It never allocates pages; the
//! [`crate::KvCache`] applies the decision and returns pages left empty to the pool.
//!
//! Decisions are per KV group, not per head or per layer: the paged layout stores one set of
//! slots per group, so scores are summed over heads and over every layer that reads the group.
//! Costs: `Full`/`SinkWindow` O(kept); `HeavyHitter` O(slots) expected; `SnapKv`
//! O(slots x pool), once per sequence.

mod heavy_hitter;
mod pyramid;
mod sink_window;
mod snapkv;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bits;
use crate::error::{Error, Result};

pub use pyramid::pyramid_budgets;

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

/// When the engine asks a retention to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Right after the prompt (all prefill chunks) has been appended.
    Prefill,
    /// After a decode step.
    Decode,
}

/// Which scores a retention needs from the attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreNeed {
    /// Positions suffice; no attention mass is needed.
    None,
    /// Attention mass accumulated over every query so far (H2O), summed over heads and readers.
    Accumulated,
    /// At the end of prefill, the mass from the last `n` prompt queries only (SnapKV).
    ObservationWindow(usize),
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
    /// Keep every slot that any part keeps (e.g. sinks + heavy hitters + window).
    Union {
        /// The composed retentions.
        parts: Vec<Retention>,
    },
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
            Retention::Union { parts } => {
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
        }
    }
}

/// What a retention sees of a group when it decides.
#[derive(Debug, Clone, Copy)]
pub struct RetainInput<'a> {
    /// Logical slots of the group's table (tokens appended so far).
    pub num_slots: usize,
    /// Validity bitset over the logical slots.
    pub valid: &'a [u64],
    /// Attention mass per logical slot, if the retention needs it ([`Retention::score_need`]).
    pub scores: Option<&'a [f32]>,
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
            Retention::Union { parts } => {
                if parts.is_empty() {
                    return Err(bad("a union needs at least one part (zero budget)".into()));
                }
                parts.iter().try_for_each(Retention::validate)
            }
        }
    }

    /// Which scores the engine must collect for this retention.
    pub fn score_need(&self) -> ScoreNeed {
        match self {
            Retention::Full | Retention::SinkWindow { .. } => ScoreNeed::None,
            Retention::HeavyHitter { .. } => ScoreNeed::Accumulated,
            Retention::SnapKv { observe, .. } => ScoreNeed::ObservationWindow(*observe),
            Retention::Union { parts } => {
                parts
                    .iter()
                    .map(Retention::score_need)
                    .fold(ScoreNeed::None, |a, b| match (a, b) {
                        (ScoreNeed::None, x) | (x, ScoreNeed::None) => x,
                        (ScoreNeed::Accumulated, _) | (_, ScoreNeed::Accumulated) => {
                            ScoreNeed::Accumulated
                        }
                        (ScoreNeed::ObservationWindow(a), ScoreNeed::ObservationWindow(b)) => {
                            ScoreNeed::ObservationWindow(a.max(b))
                        }
                    })
            }
        }
    }

    /// Whether the rule ever evicts.
    pub fn is_full(&self) -> bool {
        match self {
            Retention::Full => true,
            Retention::Union { parts } => parts.iter().any(Retention::is_full),
            _ => false,
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
        let scores = || {
            input.scores.ok_or(Error::ScoreLength {
                group: usize::MAX,
                expected: n,
                actual: 0,
            })
        };
        match self {
            Retention::Full => {
                keep.copy_from_slice(&input.valid[..keep.len()]);
            }
            Retention::SinkWindow { sinks, window } => {
                sink_window::select(*sinks, *window, n, input.valid, keep)
            }
            Retention::HeavyHitter { heavy, recent } => heavy_hitter::select(
                heavy.resolve(n),
                recent.resolve(n),
                n,
                input.valid,
                scores()?,
                keep,
                scratch,
            ),
            Retention::SnapKv {
                observe,
                budget,
                pool,
            } => {
                if input.phase == Phase::Prefill && bits::count(input.valid) > budget.resolve(n) {
                    snapkv::select(
                        *observe,
                        budget.resolve(n),
                        *pool,
                        n,
                        input.valid,
                        scores()?,
                        keep,
                        scratch,
                    )
                } else {
                    keep.copy_from_slice(&input.valid[..keep.len()]);
                }
            }
            Retention::Union { parts } => {
                for p in parts {
                    p.select(input, keep, scratch)?;
                }
            }
        }
        Ok(())
    }

    /// Upper bound on the pages one sequence of `num_tokens` tokens holds in a group under this
    /// rule (scattered heavy hitters counted one page each). Used for capacity planning.
    pub fn max_pages(&self, num_tokens: usize, block_size: usize) -> usize {
        let full = num_tokens.div_ceil(block_size);
        let span = |n: usize| {
            if n == 0 {
                0
            } else {
                n.div_ceil(block_size) + 1
            }
        };
        let pages = match self {
            Retention::Full => full,
            Retention::SinkWindow { sinks, window } => sinks.div_ceil(block_size) + span(*window),
            Retention::HeavyHitter { heavy, recent } => {
                heavy.resolve(num_tokens) + span(recent.resolve(num_tokens))
            }
            Retention::SnapKv {
                observe, budget, ..
            } => budget.resolve(num_tokens).saturating_sub(*observe) + span(*observe),
            Retention::Union { parts } => parts
                .iter()
                .map(|p| p.max_pages(num_tokens, block_size))
                .sum(),
        };
        pages.min(full)
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
        r.select(
            &RetainInput {
                num_slots: n,
                valid,
                scores,
                phase,
            },
            &mut keep,
            &mut scratch,
        )
        .unwrap();
        (0..n).filter(|&s| bits::get(&keep, s)).collect()
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
        assert_eq!(r.score_need(), ScoreNeed::Accumulated);
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
            run(&r, 8, &all_valid(8), Some(&scores), Phase::Prefill),
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
            run(&r, 8, &all_valid(8), Some(&scores), Phase::Prefill),
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
                    valid: &all_valid(4),
                    scores: None,
                    phase: Phase::Decode,
                },
                &mut keep,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(matches!(err, Error::ScoreLength { actual: 0, .. }));
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
        assert_eq!(Retention::Full.max_pages(100, 16), 7);
        assert_eq!(
            Retention::SinkWindow {
                sinks: 4,
                window: 32
            }
            .max_pages(10_000, 16),
            1 + 3
        );
        assert_eq!(
            Retention::SinkWindow {
                sinks: 4,
                window: 32
            }
            .max_pages(20, 16),
            2
        );
    }
}
