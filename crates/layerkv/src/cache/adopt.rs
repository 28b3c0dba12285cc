//! Installing a prompt that an engine prefilled and probed **outside** the cache, layer by layer
//! ([`KvCache::adopt_prompt`]), so a sequence never holds its whole prompt in every layer at
//! once.
//!
//! KVzip decides at the prompt's end with scores that need every prompt token computed over the
//! whole context; run step by step, a sequence therefore holds its whole prompt (and a probe) in
//! every group before it compresses. An engine that prefills **layer-major** (every prompt token
//! through layer 0, then layer 1, ...) needs one layer's prompt at a time: it scores each layer's
//! tokens with the probes there, hands the cache every lane's scores, and the cache decides what
//! the prompt-end step would have decided (the retention's own rule and AdaKV's joint split),
//! allocates pages for the kept slots alone and tells the engine which text positions each
//! lane keeps; the engine then writes those rows. The decision mirrors [`Core::retain`]'s at
//! the prompt's end, on a table that holds every prompt token with nothing evicted yet.

use crate::bits;
use crate::error::{Error, Result};
use crate::ids::SeqId;
use crate::map::GroupId;
use crate::retention::{JointLane, JointScratch, Phase, RetainInput, Retention, Scores};

use super::KvCache;

impl KvCache {
    /// Whether [`KvCache::adopt_prompt`] can install prompts under this cache's policy: every
    /// lane keeps KVzip's tokens decided once at the prompt's end (`kvzip:B`, AdaKV's splits
    /// allowed; not `kvzip-prefill`, not a union with another rule), no layer slides, and
    /// prefix caching is off. The error says which group breaks it.
    pub fn check_adoptable(&self) -> Result<()> {
        let core = &self.core;
        let why = |group: GroupId, reason: String| {
            Err(Error::InvalidConfig(format!(
                "layer-major prefill: allocator group {group}: {reason}"
            )))
        };
        for g in 0..core.num_groups() {
            match core.retention(g) {
                Retention::KvZip { prefill: false, .. } => {}
                r => {
                    return why(
                        g,
                        format!(
                            "its retention is {r}; only KVzip deciding at the prompt's end \
                             (kvzip:B) is scored layer by layer"
                        ),
                    )
                }
            }
            if let Some(w) = core.windows[g] {
                return why(g, format!("its layers slide over {w} slots"));
            }
        }
        if core.caching {
            return Err(Error::InvalidConfig(
                "layer-major prefill: prefix caching is on".into(),
            ));
        }
        Ok(())
    }

    /// The probe scores of `seq`'s allocator group `group` (a lane under a per-head policy),
    /// one per logical slot: the most attention weight any probe step put on the slot, `+inf`
    /// where no probe looked. Empty when the group's retention reads no probes. For engines
    /// that probe a prompt in a scratch cache and install it elsewhere
    /// ([`KvCache::adopt_prompt`]).
    pub fn probe_scores(&self, seq: SeqId, group: GroupId) -> Result<Vec<f32>> {
        self.core.check_group(group)?;
        let st = self.state.read();
        let s = st.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
        Ok(s.scores
            .get(group)
            .map(|sc| sc.probed.clone())
            .unwrap_or_default())
    }

    /// Installs the prompt of the empty sequence `seq`, prefilled and probed outside the cache
    /// (layer-major prefill), in its compressed form: `probed[g]` holds allocator group `g`'s
    /// probe score of every prompt token (`prompt_len` each; `+inf` for tokens no probe
    /// looked at, such as the last), and the cache decides what its retention keeps as the
    /// prompt's last step would (each lane's rule, then AdaKV's joint split per group or across
    /// layers), takes pages for the kept slots only, and records `prompt_len` tokens seen.
    /// Returns, per allocator group, the text positions it keeps in slot order: logical slot
    /// `s` of group `g` holds position `kept[g][s]`, whose K/V the engine writes next (a write
    /// that fails leaves garbage rows: free the sequence then). Needs
    /// [`KvCache::check_adoptable`]. Fails without changing anything on a sequence that holds
    /// tokens, scores of the wrong shape or NaN (a model whose attention went NaN: the step path
    /// would decide with them), or too few free pages ([`Error::PoolExhausted`]).
    pub fn adopt_prompt(
        &self,
        seq: SeqId,
        prompt_len: usize,
        probed: &[Vec<f32>],
    ) -> Result<Vec<Vec<u32>>> {
        self.check_adoptable()?;
        let core = &self.core;
        let groups = core.num_groups();
        let bs = core.config.block_size;
        if probed.len() != groups {
            return Err(Error::InvalidConfig(format!(
                "adopt_prompt: {} score vectors for {groups} allocator groups",
                probed.len()
            )));
        }
        if prompt_len == 0 {
            return Err(Error::InvalidConfig("adopt_prompt: an empty prompt".into()));
        }
        if let Some((g, p)) = probed
            .iter()
            .enumerate()
            .find(|(_, p)| p.len() != prompt_len)
        {
            return Err(Error::InvalidConfig(format!(
                "adopt_prompt: group {g} has {} scores for a prompt of {prompt_len} tokens",
                p.len()
            )));
        }
        if let Some((g, s, v)) = probed.iter().enumerate().find_map(|(g, p)| {
            p.iter()
                .enumerate()
                .find(|(_, v)| v.is_nan())
                .map(|(s, &v)| (g, s, v))
        }) {
            return Err(Error::InvalidConfig(format!(
                "adopt_prompt: group {g}'s score of token {s} is {v}"
            )));
        }
        let mut st = self.state.write();
        {
            let s = st.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
            if s.num_tokens != 0 {
                return Err(Error::InvalidConfig(format!(
                    "adopt_prompt: sequence {seq} already holds {} tokens",
                    s.num_tokens
                )));
            }
            if let Some(p) = s.prompt_len.filter(|&p| p != prompt_len) {
                return Err(Error::InvalidConfig(format!(
                    "adopt_prompt: sequence {seq} declared a prompt of {p} tokens, not {prompt_len}"
                )));
            }
        }
        let keep = core.decide_prompt(prompt_len, probed)?;
        let kept: Vec<Vec<u32>> = keep
            .iter()
            .map(|k| {
                (0..prompt_len)
                    .filter(|&x| bits::get(k, x))
                    .map(|x| x as u32)
                    .collect()
            })
            .collect();
        let pages: usize = kept.iter().map(|k| k.len().div_ceil(bs)).sum();
        let available = st.pool.num_available();
        if pages > available {
            return Err(Error::PoolExhausted {
                requested: pages,
                available,
            });
        }
        // Apply: nothing below can fail (the pages were counted).
        let super::sequence::State { pool, seqs, .. } = &mut *st;
        let s = seqs.get_mut(&seq).expect("checked above");
        for (g, positions) in kept.iter().enumerate() {
            let n = positions.len();
            let t = s.table_mut(g);
            for _ in 0..n.div_ceil(bs) {
                t.push_page(pool.allocate()?);
            }
            t.push_slots(n, 0);
            t.materialise();
            t.positions.copy_from_slice(positions);
            if let Some(sc) = s.scores.get_mut(g) {
                let need = core.needs[g];
                for (wanted, v) in [
                    (need.accumulated, &mut sc.accumulated),
                    (need.last, &mut sc.last),
                    (need.observe > 0, &mut sc.observed),
                ] {
                    if wanted {
                        v.clear();
                        v.resize(n, 0.0);
                    }
                }
                if need.probe {
                    sc.probed.clear();
                    sc.probed
                        .extend(positions.iter().map(|&p| probed[g][p as usize]));
                }
            }
        }
        s.num_tokens = prompt_len;
        s.prompt_len = Some(prompt_len);
        Ok(kept)
    }
}

impl super::Core {
    /// What every allocator group keeps of a prompt of `n` tokens with probe scores `probed`,
    /// decided as [`super::Core::retain`] decides at the prompt's end (all slots valid, slot
    /// `x` at position `x`): keep bits per group.
    fn decide_prompt(&self, n: usize, probed: &[Vec<f32>]) -> Result<Vec<Vec<u64>>> {
        let groups = self.num_groups();
        let lanes = self.config.lanes;
        let words = bits::words_for(n);
        let mut valid = vec![0u64; words];
        bits::set_range(&mut valid, 0, n);
        let positions: Vec<u32> = (0..n as u32).collect();
        let mut keep = vec![vec![0u64; words]; groups];
        let mut scratch = Vec::new();
        for g in 0..groups {
            let input = RetainInput {
                num_slots: n,
                num_tokens: n,
                valid: &valid,
                positions: &positions,
                scores: Scores {
                    probed: Some(&probed[g]),
                    ..Scores::default()
                },
                phase: Phase::PromptEnd,
            };
            self.retention(g)
                .select(&input, &mut keep[g], &mut scratch)?;
        }
        if let Some(floor) = self.policy.adaptive_floor() {
            let mut joint = JointScratch::default();
            let spans: Vec<std::ops::Range<usize>> = if self.policy.adaptive_across_layers() {
                std::iter::once(0..groups).collect()
            } else if lanes > 1 {
                (0..groups / lanes)
                    .map(|g| g * lanes..(g + 1) * lanes)
                    .collect()
            } else {
                Vec::new()
            };
            for span in spans {
                let retention = self.policy.retention(span.start / lanes);
                if !retention.has_joint_form(Phase::PromptEnd)
                    || span.clone().any(|t| self.retention(t) != retention)
                {
                    continue;
                }
                let mut lanes_of: Vec<JointLane<'_>> = keep[span.clone()]
                    .iter_mut()
                    .zip(&probed[span])
                    .map(|(keep, scores)| JointLane {
                        num_slots: n,
                        valid: &valid,
                        scores,
                        keep,
                    })
                    .collect();
                retention.select_joint(&mut lanes_of, n, Phase::PromptEnd, floor, &mut joint);
            }
        }
        for k in &mut keep {
            for (k, v) in k.iter_mut().zip(&valid) {
                *k &= v;
            }
        }
        Ok(keep)
    }
}
