//! AdaKV's budget split: the lanes (KV heads) of a group share one budget instead of keeping
//! the same count each. Every lane keeps its observation window and at least `floor` of its
//! uniform share of the prefix budget (AdaKV's safeguard); the rest of the group's budget goes
//! to the highest pooled scores across all lanes, so a head whose attention is peaked keeps
//! few tokens and a head that attends widely keeps many. Per-head attention probabilities sum
//! to one per query, so scores compare across heads as they are.
//!
//! O(total slots x pool) plus one partial sort; the caller owns the scratch.

use super::heavy_hitter::top_k;
use super::sink_window::select_recent;
use crate::bits;

/// One lane of a joint decision: its slots, validity, SnapKV observation scores, and the keep
/// bits to write (overwritten).
pub struct JointLane<'a> {
    /// Logical slots of the lane's table.
    pub num_slots: usize,
    /// Validity bitset over the slots.
    pub valid: &'a [u64],
    /// Observation-window attention mass per slot.
    pub scores: &'a [f32],
    /// Where the decision goes (`words_for(num_slots)` words).
    pub keep: &'a mut [u64],
}

/// SnapKV over the lanes of a group with one shared prefix budget: each lane keeps its last
/// `observe` slots and its top `floor x (budget - observe)` pooled slots, then the group's
/// remaining `lanes x (budget - observe)` minus the floors go to the top pooled slots of all
/// lanes together.
pub(crate) fn select_snapkv(
    observe: usize,
    budget: usize,
    pool: usize,
    floor: f64,
    lanes: &mut [JointLane<'_>],
    slots: &mut Vec<u32>,
    joint: &mut Vec<(f32, u32, u32)>,
) {
    let share = budget.saturating_sub(observe);
    let floor_k = ((floor.clamp(0.0, 1.0) * share as f64).floor() as usize).min(share);
    let half = pool / 2;
    let mut left = share * lanes.len();
    joint.clear();
    for (l, lane) in lanes.iter_mut().enumerate() {
        lane.keep.fill(0);
        let end = select_recent(observe, lane.num_slots, lane.valid, lane.keep);
        let (valid, scores) = (lane.valid, lane.scores);
        if floor_k > 0 {
            top_k(
                floor_k,
                0..end,
                valid,
                |s| pooled(valid, scores, s, half, end),
                lane.keep,
                slots,
            );
            left -= slots.len().min(floor_k);
        }
        for s in (0..end).filter(|&s| bits::get(valid, s) && !bits::get(lane.keep, s)) {
            joint.push((pooled(valid, scores, s, half, end), l as u32, s as u32));
        }
    }
    if joint.len() > left {
        if left == 0 {
            joint.clear();
        } else {
            // Highest score first; ties towards the lower lane, then the earlier slot.
            joint.select_nth_unstable_by(left - 1, |a, b| {
                b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
            });
            joint.truncate(left);
        }
    }
    for &(_, l, s) in joint.iter() {
        bits::set(lanes[l as usize].keep, s as usize);
    }
}

/// SnapKV's pooled score of slot `s`: the maximum over valid slots within `half` of it, below
/// the observation window.
fn pooled(valid: &[u64], scores: &[f32], s: usize, half: usize, end: usize) -> f32 {
    let lo = s.saturating_sub(half);
    let hi = (s + half + 1).min(end);
    (lo..hi)
        .filter(|&t| bits::get(valid, t))
        .map(|t| scores[t])
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The same rule by full sorts: per lane the window and the top `floor` pooled slots, then
    /// the best of everything left across lanes until the group's budget is spent.
    fn naive(
        observe: usize,
        budget: usize,
        pool: usize,
        floor: f64,
        lanes: &[(usize, Vec<u64>, Vec<f32>)],
    ) -> Vec<Vec<usize>> {
        let share = budget - observe;
        let floor_k = (floor * share as f64).floor() as usize;
        let mut kept: Vec<Vec<usize>> = Vec::new();
        let mut rest = Vec::new();
        let mut left = share * lanes.len();
        for (l, (n, valid, scores)) in lanes.iter().enumerate() {
            let live: Vec<usize> = (0..*n).filter(|&s| bits::get(valid, s)).collect();
            let cut = live.len().saturating_sub(observe);
            let end = live.get(cut).copied().unwrap_or(*n);
            let mut keep: Vec<usize> = live[cut..].to_vec();
            let mut cands: Vec<(f32, usize)> = live[..cut]
                .iter()
                .map(|&s| {
                    let lo = s.saturating_sub(pool / 2);
                    let hi = (s + pool / 2 + 1).min(end);
                    let p = (lo..hi)
                        .filter(|&t| bits::get(valid, t))
                        .map(|t| scores[t])
                        .fold(f32::NEG_INFINITY, f32::max);
                    (p, s)
                })
                .collect();
            cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let take = floor_k.min(cands.len());
            left -= take;
            keep.extend(cands[..take].iter().map(|c| c.1));
            rest.extend(cands[take..].iter().map(|&(p, s)| (p, l, s)));
            kept.push(keep);
        }
        rest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for &(_, l, s) in rest.iter().take(left) {
            kept[l].push(s);
        }
        for k in &mut kept {
            k.sort();
        }
        kept
    }

    #[test]
    fn joint_snapkv_matches_full_sorts() {
        let mut rng = SplitMix64::new(7);
        for case in 0..200 {
            let n_lanes = 1 + case % 4;
            let observe = rng.below(5);
            let budget = observe + 1 + rng.below(20);
            let pool = [1, 3, 5][case % 3];
            let floor = [0.0, 0.2, 0.5, 1.0][case % 4];
            let lanes: Vec<(usize, Vec<u64>, Vec<f32>)> = (0..n_lanes)
                .map(|_| {
                    let n = 1 + rng.below(90);
                    let mut valid = vec![0u64; bits::words_for(n)];
                    for s in 0..n {
                        if rng.below(5) > 0 {
                            bits::set(&mut valid, s);
                        }
                    }
                    // Few distinct values, so ties are exercised.
                    let scores = (0..n).map(|_| rng.below(8) as f32 / 8.0).collect();
                    (n, valid, scores)
                })
                .collect();
            let want = naive(observe, budget, pool, floor, &lanes);
            let mut keeps: Vec<Vec<u64>> = lanes
                .iter()
                .map(|(n, _, _)| vec![u64::MAX; bits::words_for(*n)])
                .collect();
            let mut joint: Vec<JointLane<'_>> = lanes
                .iter()
                .zip(keeps.iter_mut())
                .map(|((n, valid, scores), keep)| JointLane {
                    num_slots: *n,
                    valid,
                    scores,
                    keep,
                })
                .collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            select_snapkv(observe, budget, pool, floor, &mut joint, &mut a, &mut b);
            let got: Vec<Vec<usize>> = lanes
                .iter()
                .zip(&keeps)
                .map(|((n, _, _), keep)| (0..*n).filter(|&s| bits::get(keep, s)).collect())
                .collect();
            assert_eq!(got, want, "case {case}");
        }
    }
}
