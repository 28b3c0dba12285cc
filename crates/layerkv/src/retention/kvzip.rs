//! KVzip (Kim et al. 2025): keep the `budget` slots that the prompt's own reconstruction
//! attends to most. The scores come from probe steps ([`crate::KvCache::reserve_probe`]):
//! each slot holds the most mass any probe step put on it, `+inf` where no probe looked (a
//! token appended after the probes, such as the prompt's last, which is therefore kept).

use crate::bits;

/// A mid-prompt decision's budget (KVzip with `prefill`) over `lanes` (slots, validity,
/// probe scores) that share `budget` each: raised so every slot not probed yet (`+inf`, the
/// step's own) fits, with, under max-pooling, the `pool / 2` slots before them, whose pooled
/// score is theirs; so none is dropped before its probe, and a prompt with nothing probed yet
/// keeps everything.
pub(crate) fn mid_prompt_budget<'a>(
    budget: usize,
    pool: usize,
    lanes: impl IntoIterator<Item = (usize, &'a [u64], &'a [f32])>,
) -> usize {
    lanes
        .into_iter()
        .fold(budget, |budget, (num_slots, valid, probed)| {
            let unprobed = (0..num_slots)
                .filter(|&s| bits::get(valid, s) && !probed[s].is_finite())
                .count();
            budget.max(unprobed_room(unprobed, pool))
        })
}

/// Slots a mid-prompt decision keeps for `unprobed` slots not probed yet: themselves and the
/// `pool / 2` before them (see [`mid_prompt_budget`]).
pub(crate) fn unprobed_room(unprobed: usize, pool: usize) -> usize {
    if unprobed == 0 {
        0
    } else {
        unprobed.saturating_add(pool / 2)
    }
}

/// Marks the `budget` valid slots with the highest probe scores, max-pooled over `pool`
/// neighbouring slots as SnapKV pools (1: KVzip's own, per token; ties towards the earlier
/// slot). Errors when no valid slot was probed: the engine ran no probe step before the
/// prompt's end, and an arbitrary pick would pass for a decision.
pub(crate) fn select(
    budget: usize,
    pool: usize,
    num_slots: usize,
    valid: &[u64],
    probed: &[f32],
    keep: &mut [u64],
    scratch: &mut Vec<u32>,
) -> Result<(), String> {
    let seen = (0..num_slots).any(|s| bits::get(valid, s) && probed[s].is_finite());
    if !seen {
        return Err(format!(
            "no probe step scored any of the {} slots: the engine must run the prompt's probe \
             steps (KvCache::reserve_probe) before its last token",
            bits::count(valid)
        ));
    }
    if pool <= 1 {
        super::heavy_hitter::top_k(budget, 0..num_slots, valid, |s| probed[s], keep, scratch);
    } else {
        super::snapkv::select(0, budget, pool, num_slots, valid, probed, keep, scratch);
    }
    Ok(())
}

/// Random inputs for the KVzip tests here and in `retention`.
#[cfg(test)]
pub(crate) mod testing {
    use crate::bits;
    use crate::rng::SplitMix64;

    /// `n` slots, each valid unless its draw is a multiple of `hole_one_in`.
    pub(crate) fn valid(rng: &mut SplitMix64, n: usize, hole_one_in: u64) -> Vec<u64> {
        let mut valid = vec![0u64; bits::words_for(n)];
        for s in 0..n {
            if !rng.next_u64().is_multiple_of(hole_one_in) {
                bits::set(&mut valid, s);
            }
        }
        valid
    }

    /// Probe scores of `n` slots: the last `unprobed` `+inf`, the others one of `levels`
    /// values `step` apart (few distinct values, so ties occur).
    pub(crate) fn probed(
        rng: &mut SplitMix64,
        n: usize,
        unprobed: usize,
        levels: u64,
        step: f32,
    ) -> Vec<f32> {
        (0..n)
            .map(|s| {
                if s + unprobed >= n {
                    f32::INFINITY
                } else {
                    (rng.next_u64() % levels) as f32 * step
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a full sort of (score, slot) pairs.
    #[test]
    fn kvzip_keeps_the_top_probed_slots_and_the_unprobed() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for case in 0..200 {
            let n = 1 + (rng.next_u64() % 90) as usize;
            let budget = 1 + (rng.next_u64() % n as u64) as usize;
            let valid = testing::valid(&mut rng, n, 5);
            // The last few slots unprobed.
            let unprobed = (rng.next_u64() % 3) as usize;
            let probed = testing::probed(&mut rng, n, unprobed, 7, 0.25);
            let mut keep = vec![0u64; valid.len()];
            let r = select(budget, 1, n, &valid, &probed, &mut keep, &mut Vec::new());
            let mut order: Vec<usize> = (0..n).filter(|&s| bits::get(&valid, s)).collect();
            if !order.iter().any(|&s| probed[s].is_finite()) {
                assert!(r.is_err(), "case {case}: nothing probed must be an error");
                continue;
            }
            r.unwrap();
            order.sort_by(|&a, &b| probed[b].total_cmp(&probed[a]).then(a.cmp(&b)));
            order.truncate(budget);
            let got: Vec<usize> = (0..n).filter(|&s| bits::get(&keep, s)).collect();
            order.sort_unstable();
            assert_eq!(got, order, "case {case}: n {n} budget {budget}");
        }
    }
}
