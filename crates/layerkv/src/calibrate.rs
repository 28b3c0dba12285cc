//! KVSharer's training-free calibration, the model-agnostic part: the layer distance matrix,
//! the pair orders, the acceptance rules and the greedy search that turns them into a
//! [`LayerMap`].
//!
//! The engine side is one small trait, [`CalibrationModel`]: the per-layer K/V of the
//! unmodified model averaged over the samples, and a run of the model under a candidate map
//! (final hidden states per sample, mean next-token NLL). This module holds no tensors, only
//! flattened `f32` slices, so any engine can calibrate.
//!
//! The search ([`calibrate`]) follows the KVSharer authors' code:
//! 1. the reference K/V give the [`DistanceMatrix`]: for layers `i > j`, the mean over heads
//!    and tokens of the L2 norm over `head_dim` of `K_i - K_j`, the same for V, the two averaged;
//! 2. the unmodified model runs once (the reference of every score);
//! 3. pairs `(i, j)`, `i > j`, are tried in a [`PairOrder`] (KVSharer: most dissimilar first).
//!    A pair is skipped without running the model when layer `i` already shares, or when `i`
//!    is already another layer's source (sharing it would silently move that layer's KV too;
//!    skipping keeps every accepted step a change of exactly one layer). Otherwise the
//!    candidate map is the current map plus `i` reading `j`'s root (chains collapse, so the
//!    source is always below the layer: no upward reference can arise); a pair that builds
//!    the map of a pair rejected since the last acceptance is skipped too;
//! 4. the candidate is scored with the [`Acceptance`] rule and accepted or rejected. When the
//!    engine has retrieval probes ([`CalibrationModel::retrieval`]), a candidate the rule
//!    accepts is also asked them, and rejected if it loses one that the current map answers
//!    (perplexity and hidden-state similarity do not see a forgotten fact). The search
//!    stops when the [`ShareTarget`] is reached, the pairs run out or
//!    [`CalibrationConfig::max_candidates`] were scored (then the result holds fewer shared
//!    layers than asked: [`Calibration::reached_target`] is false, not an error).
//!
//! Invariants of the result: the map is downward only (`source < layer` for every sharing
//! layer), layer 0 owns its KV, `pairs` lists exactly the sharing layers with their roots.
//!
//! Cost: the distance matrix is O(L^2 x kv_heads x seq x head_dim) on the CPU
//! (L = layers); the search runs the model `1 + C` times, C = pairs scored
//! (at most L (L - 1) / 2), and holds one reference run's hidden states; with probes, the
//! probes run once for the unmodified model and once per candidate the rule accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::map::LayerMap;
use crate::rng::SplitMix64;

/// One layer's K and V, each flattened row-major as `[kv_heads, seq, head_dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerKv {
    /// Keys, `kv_heads * seq * head_dim` values.
    pub k: Vec<f32>,
    /// Values, same layout as `k`.
    pub v: Vec<f32>,
    /// KV heads.
    pub kv_heads: usize,
    /// Tokens.
    pub seq: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl LayerKv {
    /// Number of values `k` and `v` must each hold.
    pub fn expected_len(&self) -> usize {
        self.kv_heads * self.seq * self.head_dim
    }

    /// Checks sizes and finiteness; `layer` names the layer in the error.
    fn check(&self, layer: usize) -> Result<()> {
        if self.kv_heads == 0 || self.seq == 0 || self.head_dim == 0 {
            return Err(calibration(format!(
                "reference K/V of layer {layer} has an empty shape [{}, {}, {}] (kv_heads, seq, head_dim)",
                self.kv_heads, self.seq, self.head_dim
            )));
        }
        for (name, data) in [("K", &self.k), ("V", &self.v)] {
            if data.len() != self.expected_len() {
                return Err(calibration(format!(
                    "reference {name} of layer {layer} has {} values, expected {} = [{}, {}, {}] (kv_heads, seq, head_dim)",
                    data.len(),
                    self.expected_len(),
                    self.kv_heads,
                    self.seq,
                    self.head_dim
                )));
            }
            if let Some(pos) = data.iter().position(|x| !x.is_finite()) {
                return Err(calibration(format!(
                    "reference {name} of layer {layer} holds {} at index {pos}",
                    data[pos]
                )));
            }
        }
        Ok(())
    }
}

/// What one run of the model under a map returns.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutput {
    /// Per sample, the flattened final hidden states (after the final norm), all samples the
    /// same length.
    pub hidden: Vec<Vec<f32>>,
    /// Mean next-token negative log-likelihood over the samples (nats per token).
    pub nll: f64,
}

/// What calibration needs from an engine. Implement it for your engine to calibrate it; the
/// search never sees a tensor.
pub trait CalibrationModel {
    /// Number of decoder layers.
    fn num_layers(&self) -> usize;

    /// Per layer, the unmodified model's K and V averaged element-wise over the samples (all
    /// samples have the same length), each flattened `[kv_heads, seq, head_dim]`.
    fn reference_kv(&mut self, samples: &[Vec<u32>]) -> Result<Vec<LayerKv>>;

    /// Runs the model under `map` on every sample: flattened final hidden states per sample
    /// (after the final norm) and the mean next-token NLL over the samples.
    fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput>;

    /// Which of the engine's retrieval probes (questions about facts planted in a context,
    /// such as a pass key) the model answers right under `map`: one entry per probe, the same
    /// probes in the same order for every map. `None` (the default) means no probes, which
    /// turns the retrieval rule off.
    fn retrieval(&mut self, map: &LayerMap) -> Result<Option<Vec<bool>>> {
        let _ = map;
        Ok(None)
    }
}

/// Symmetric `n x n` matrix of layer distances with a zero diagonal.
///
/// Serialises as `{"num_layers": n, "distance": [[..], ..]}`; deserialisation checks the shape,
/// the symmetry, the zero diagonal and that every entry is finite and non-negative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DistanceFile", into = "DistanceFile")]
pub struct DistanceMatrix {
    distance: Vec<Vec<f64>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistanceFile {
    num_layers: usize,
    distance: Vec<Vec<f64>>,
}

impl TryFrom<DistanceFile> for DistanceMatrix {
    type Error = Error;
    fn try_from(file: DistanceFile) -> Result<Self> {
        let n = file.num_layers;
        if file.distance.len() != n {
            return Err(Error::WrongLayerCount {
                what: "distance matrix rows",
                expected: n,
                actual: file.distance.len(),
            });
        }
        for (i, row) in file.distance.iter().enumerate() {
            if row.len() != n {
                return Err(calibration(format!(
                    "distance matrix row {i} has {} entries, expected {n}",
                    row.len()
                )));
            }
            for (j, &d) in row.iter().enumerate() {
                if !d.is_finite() || d < 0.0 {
                    return Err(calibration(format!(
                        "distance matrix entry [{i}][{j}] = {d} is not a finite non-negative number"
                    )));
                }
                if i == j && d != 0.0 {
                    return Err(calibration(format!(
                        "distance matrix diagonal [{i}][{i}] = {d}, expected 0"
                    )));
                }
            }
        }
        for i in 0..n {
            for j in 0..i {
                if file.distance[i][j] != file.distance[j][i] {
                    return Err(calibration(format!(
                        "distance matrix is not symmetric at [{i}][{j}] = {} vs [{j}][{i}] = {}",
                        file.distance[i][j], file.distance[j][i]
                    )));
                }
            }
        }
        Ok(Self {
            distance: file.distance,
        })
    }
}

impl From<DistanceMatrix> for DistanceFile {
    fn from(m: DistanceMatrix) -> Self {
        DistanceFile {
            num_layers: m.num_layers(),
            distance: m.distance,
        }
    }
}

impl DistanceMatrix {
    /// KVSharer's distances from per-layer K/V (all layers the same shape, sizes and values
    /// checked): for `i > j`, mean over heads and tokens of `||K_i - K_j||_2` over `head_dim`,
    /// the same for V, the two averaged. O(L^2 x kv_heads x seq x head_dim).
    pub fn from_kv(layers: &[LayerKv]) -> Result<Self> {
        let Some(first) = layers.first() else {
            return Err(calibration("no layers to compute distances from".into()));
        };
        for (layer, kv) in layers.iter().enumerate() {
            kv.check(layer)?;
            if (kv.kv_heads, kv.seq, kv.head_dim) != (first.kv_heads, first.seq, first.head_dim) {
                return Err(calibration(format!(
                    "reference K/V of layer {layer} has shape [{}, {}, {}], layer 0 has [{}, {}, {}] (kv_heads, seq, head_dim)",
                    kv.kv_heads, kv.seq, kv.head_dim, first.kv_heads, first.seq, first.head_dim
                )));
            }
        }
        let n = layers.len();
        let d = first.head_dim;
        let rows = first.kv_heads * first.seq;
        let mean_row_norm = |a: &[f32], b: &[f32]| -> f64 {
            let total: f64 = a
                .chunks_exact(d)
                .zip(b.chunks_exact(d))
                .map(|(x, y)| {
                    x.iter()
                        .zip(y)
                        .map(|(&p, &q)| {
                            let t = f64::from(p) - f64::from(q);
                            t * t
                        })
                        .sum::<f64>()
                        .sqrt()
                })
                .sum();
            total / rows as f64
        };
        let mut distance = vec![vec![0.0; n]; n];
        for i in 0..n {
            for j in 0..i {
                let dk = mean_row_norm(&layers[i].k, &layers[j].k);
                let dv = mean_row_norm(&layers[i].v, &layers[j].v);
                let dist = 0.5 * (dk + dv);
                distance[i][j] = dist;
                distance[j][i] = dist;
            }
        }
        Ok(Self { distance })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.distance.len()
    }

    /// Distance between layers `i` and `j` (`None` when either is out of range).
    pub fn get(&self, i: usize, j: usize) -> Option<f64> {
        self.distance.get(i)?.get(j).copied()
    }

    /// The rows of the matrix (for plotting).
    pub fn rows(&self) -> &[Vec<f64>] {
        &self.distance
    }

    /// JSON text `{"num_layers": n, "distance": [[..], ..]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Parses the JSON form written by [`DistanceMatrix::to_json`], validating it.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Parse {
            format: "distance matrix",
            position: format!("line {} column {}", e.line(), e.column()),
            reason: e.to_string(),
        })
    }
}

/// In which order the search tries pairs `(layer, source)`, `layer > source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PairOrder {
    /// KVSharer: the most distant pair first (ties: smaller layer, then smaller source first).
    Dissimilar,
    /// Ablation: the closest pair first, exactly the reverse of [`PairOrder::Dissimilar`].
    Similar,
    /// Ablation: a shuffle of all pairs, the same for the same seed (splitmix64 Fisher-Yates).
    Random {
        /// Shuffle seed.
        seed: u64,
    },
    /// CLA-style: only `(i, i - 1)`, from the top layer down. Because a layer that is already
    /// a source is skipped, accepting every pair gives CLA's `0_0_2_2_..` pattern from the top.
    Adjacent,
}

impl PairOrder {
    /// The pairs `(layer, source)` in this order, for the distances `d`.
    pub fn pairs(&self, d: &DistanceMatrix) -> Vec<(usize, usize)> {
        let n = d.num_layers();
        let all = || (1..n).flat_map(|i| (0..i).map(move |j| (i, j)));
        match *self {
            PairOrder::Dissimilar | PairOrder::Similar => {
                let mut pairs: Vec<(usize, usize)> = all().collect();
                pairs.sort_by(|&(a, b), &(c, e)| {
                    d.distance[c][e]
                        .total_cmp(&d.distance[a][b])
                        .then((a, b).cmp(&(c, e)))
                });
                if *self == PairOrder::Similar {
                    pairs.reverse();
                }
                pairs
            }
            PairOrder::Random { seed } => {
                let mut pairs: Vec<(usize, usize)> = all().collect();
                let mut rng = SplitMix64::new(seed);
                for k in (1..pairs.len()).rev() {
                    let r = (rng.next_u64() % (k as u64 + 1)) as usize;
                    pairs.swap(k, r);
                }
                pairs
            }
            PairOrder::Adjacent => (1..n).rev().map(|i| (i, i - 1)).collect(),
        }
    }
}

impl fmt::Display for PairOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairOrder::Dissimilar => f.write_str("dissimilar"),
            PairOrder::Similar => f.write_str("similar"),
            PairOrder::Random { seed } => write!(f, "random(seed {seed})"),
            PairOrder::Adjacent => f.write_str("adjacent"),
        }
    }
}

/// When a candidate map is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Acceptance {
    /// KVSharer's rule: the mean over samples of the cosine similarity between the unmodified
    /// and the candidate run's flattened final hidden states must be `> threshold` (theirs:
    /// 0.5). The score is that mean cosine.
    Cosine {
        /// Accept when the mean cosine is strictly above this.
        threshold: f64,
    },
    /// A stricter rule the paper does not have: the candidate's calibration NLL must be
    /// `<= reference NLL * (1 + max_increase)`. The score is the relative increase
    /// `nll / reference - 1`.
    Nll {
        /// Largest allowed relative NLL increase (0.02 = 2%).
        max_increase: f64,
    },
}

impl Acceptance {
    fn check(&self) -> Result<()> {
        match *self {
            Acceptance::Cosine { threshold } if !threshold.is_finite() => Err(calibration(
                format!("cosine threshold {threshold} is not a finite number"),
            )),
            Acceptance::Nll { max_increase } if !max_increase.is_finite() || max_increase < 0.0 => {
                Err(calibration(format!(
                    "NLL max_increase {max_increase} is not a finite number >= 0"
                )))
            }
            _ => Ok(()),
        }
    }

    /// `(score, accepted)` for a candidate with mean cosine `cosine` and NLL `nll`.
    fn decide(&self, cosine: f64, nll: f64, reference_nll: f64) -> (f64, bool) {
        match *self {
            Acceptance::Cosine { threshold } => (cosine, cosine > threshold),
            Acceptance::Nll { max_increase } => {
                let score = if reference_nll > 0.0 {
                    nll / reference_nll - 1.0
                } else {
                    nll - reference_nll
                };
                (score, nll <= reference_nll * (1.0 + max_increase))
            }
        }
    }
}

/// How many layers the search should make share.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareTarget {
    /// Exactly this many sharing layers (at most `num_layers - 1`: layer 0 owns its KV).
    Layers(usize),
    /// This fraction of the layers, in `[0, 1)`, rounded to the nearest whole number of layers
    /// and capped at `num_layers - 1`.
    Fraction(f64),
}

impl ShareTarget {
    /// The number of sharing layers this target asks of a `num_layers`-layer model.
    pub fn num_shared(&self, num_layers: usize) -> Result<usize> {
        let most = num_layers.saturating_sub(1);
        match *self {
            ShareTarget::Layers(k) if k > most => Err(calibration(format!(
                "{k} shared layers asked, but a {num_layers}-layer model can share at most {most} (layer 0 owns its KV)"
            ))),
            ShareTarget::Layers(k) => Ok(k),
            ShareTarget::Fraction(f) if !(0.0..1.0).contains(&f) => Err(calibration(format!(
                "share fraction {f} is outside [0, 1)"
            ))),
            ShareTarget::Fraction(f) => Ok(((f * num_layers as f64).round() as usize).min(most)),
        }
    }
}

/// Everything the search needs besides the model and the samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationConfig {
    /// How many layers should share.
    pub target: ShareTarget,
    /// The order pairs are tried in.
    pub order: PairOrder,
    /// When a candidate is accepted.
    pub acceptance: Acceptance,
    /// Stop after scoring this many candidates (`None`: until the target is reached or the
    /// pairs run out). Bounds the cost of a strict rule, which may otherwise score every pair.
    pub max_candidates: Option<usize>,
}

impl Default for CalibrationConfig {
    /// KVSharer's defaults: 25% of the layers, most dissimilar first, cosine > 0.5.
    fn default() -> Self {
        Self {
            target: ShareTarget::Fraction(0.25),
            order: PairOrder::Dissimilar,
            acceptance: Acceptance::Cosine { threshold: 0.5 },
            max_candidates: None,
        }
    }
}

/// One scored candidate of the search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Position in the pair order (0-based, counting skipped pairs too).
    pub rank: usize,
    /// The layer that would stop owning KV.
    pub layer: usize,
    /// The layer the pair names.
    pub pair_source: usize,
    /// The layer it would read: the root of `pair_source`'s chain (`<= pair_source < layer`).
    pub source: usize,
    /// The pair's distance.
    pub distance: f64,
    /// Mean cosine similarity of the final hidden states to the unmodified run's.
    pub cosine: f64,
    /// Mean next-token NLL of the candidate run.
    pub nll: f64,
    /// What the acceptance rule compared (cosine, or relative NLL increase).
    pub score: f64,
    /// Whether the candidate was accepted.
    pub accepted: bool,
    /// Retrieval probes the candidate answers right (`None`: not probed, because the engine
    /// has no probes or the acceptance rule rejected it first).
    pub retrieval: Option<usize>,
    /// Whether it was rejected for losing a probe the current map answers (the acceptance
    /// rule alone would have accepted it).
    pub lost_retrieval: bool,
    /// Sharing layers after this decision.
    pub num_shared: usize,
}

/// The result of a calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// The calibrated map (downward only; layer 0 owns its KV).
    pub map: LayerMap,
    /// `layer -> source` of every sharing layer (sources resolved to their roots).
    pub pairs: BTreeMap<usize, usize>,
    /// The layer distances the order was built from.
    pub distances: DistanceMatrix,
    /// Every scored candidate, in the order tried.
    pub candidates: Vec<Candidate>,
    /// Pairs skipped without running the model (layer already sharing or already a source, or
    /// the same candidate map as an already rejected pair).
    pub num_skipped: usize,
    /// Sharing layers the target asked for.
    pub target_shared: usize,
    /// Mean NLL of the unmodified model on the samples.
    pub reference_nll: f64,
    /// Mean NLL of the calibrated map (the last accepted candidate; the reference when none).
    pub final_nll: f64,
    /// Mean cosine of the calibrated map to the unmodified run (1 when nothing was accepted).
    pub final_cosine: f64,
    /// Retrieval probes of the engine (0: none, the rule was off).
    pub num_probes: usize,
    /// Probes the unmodified model answers right (`None` without probes).
    pub reference_retrieval: Option<usize>,
    /// Probes the calibrated map answers right (`None` without probes).
    pub final_retrieval: Option<usize>,
}

impl Calibration {
    /// Sharing layers in the result.
    pub fn num_shared(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the result has as many sharing layers as asked (false: the pairs ran out).
    pub fn reached_target(&self) -> bool {
        self.num_shared() >= self.target_shared
    }

    /// The map after the first `num_shared` accepted candidates (`None` when fewer were
    /// accepted). It is exactly what the same search with the target `num_shared` returns: the
    /// search's decisions do not depend on the target, it only stops once the target is
    /// reached, so one search for `k` layers holds the searches for every smaller count.
    pub fn map_at(&self, num_shared: usize) -> Option<LayerMap> {
        if num_shared > self.num_shared() {
            return None;
        }
        let mut source: Vec<usize> = (0..self.map.num_layers()).collect();
        for c in self
            .candidates
            .iter()
            .filter(|c| c.accepted)
            .take(num_shared)
        {
            source[c.layer] = c.source;
        }
        LayerMap::new(source).ok()
    }
}

/// Checks the samples: at least one, each with at least 2 tokens, all the same length.
pub fn check_samples(samples: &[Vec<u32>]) -> Result<usize> {
    let Some(first) = samples.first() else {
        return Err(calibration("no calibration samples".into()));
    };
    for (s, sample) in samples.iter().enumerate() {
        if sample.len() < 2 {
            return Err(calibration(format!(
                "sample {s} has {} tokens; next-token NLL needs at least 2",
                sample.len()
            )));
        }
        if sample.len() != first.len() {
            return Err(calibration(format!(
                "sample {s} has {} tokens but sample 0 has {}; all samples must have the same length",
                sample.len(),
                first.len()
            )));
        }
    }
    Ok(first.len())
}

/// Runs KVSharer's search (see the module docs) and reports every scored candidate to
/// `progress` as soon as it is decided.
pub fn calibrate<M: CalibrationModel + ?Sized>(
    model: &mut M,
    samples: &[Vec<u32>],
    config: &CalibrationConfig,
    progress: &mut dyn FnMut(&Candidate),
) -> Result<Calibration> {
    let seq = check_samples(samples)?;
    config.acceptance.check()?;
    let n = model.num_layers();
    if n == 0 {
        return Err(calibration("the model reports 0 layers".into()));
    }
    let target_shared = config.target.num_shared(n)?;

    let kv = model.reference_kv(samples)?;
    if kv.len() != n {
        return Err(Error::WrongLayerCount {
            what: "reference K/V",
            expected: n,
            actual: kv.len(),
        });
    }
    if let Some((layer, l)) = kv.iter().enumerate().find(|(_, l)| l.seq != seq) {
        return Err(calibration(format!(
            "reference K/V of layer {layer} covers {} tokens, the samples have {seq}",
            l.seq
        )));
    }
    let distances = DistanceMatrix::from_kv(&kv)?;
    drop(kv);

    let identity = LayerMap::identity(n)?;
    let reference = checked_run(model, &identity, samples, None)?;
    // What the current map answers (the retrieval rule: never lose one of these).
    let mut answered = model.retrieval(&identity)?;
    let num_probes = answered.as_ref().map_or(0, Vec::len);
    let reference_retrieval = answered.as_ref().map(|a| count(a));
    let width = reference.hidden[0].len();
    let mut source: Vec<usize> = (0..n).collect();
    let mut map = identity;
    let mut candidates = Vec::new();
    let mut num_skipped = 0;
    let mut num_shared = 0;
    let (mut final_nll, mut final_cosine) = (reference.nll, 1.0);
    // (layer, root) candidates rejected since the last acceptance: two pairs naming sources
    // of one chain (`i -> j` and `i -> root(j)`) build the same map, scored once.
    let mut rejected: BTreeSet<(usize, usize)> = BTreeSet::new();

    for (rank, (layer, pair_source)) in config.order.pairs(&distances).into_iter().enumerate() {
        if num_shared >= target_shared
            || config.max_candidates.is_some_and(|m| candidates.len() >= m)
        {
            break;
        }
        let is_source = (0..n).any(|l| l != layer && source[l] == layer);
        if source[layer] != layer || is_source {
            num_skipped += 1;
            continue;
        }
        let root = source[pair_source];
        debug_assert!(root < layer, "chains resolve below the layer");
        if rejected.contains(&(layer, root)) {
            num_skipped += 1;
            continue;
        }
        let mut cand_source = source.clone();
        cand_source[layer] = root;
        let cand_map = LayerMap::new(cand_source.clone())?;
        let out = checked_run(model, &cand_map, samples, Some(width))?;
        let cosine = mean_cosine(&reference.hidden, &out.hidden);
        let (score, mut accepted) = config.acceptance.decide(cosine, out.nll, reference.nll);
        let (mut retrieval, mut lost_retrieval) = (None, false);
        if accepted {
            if let Some(current) = &answered {
                let got = checked_retrieval(model, &cand_map, current.len())?;
                retrieval = Some(count(&got));
                lost_retrieval = current.iter().zip(&got).any(|(&was, &is)| was && !is);
                if lost_retrieval {
                    accepted = false;
                } else {
                    answered = Some(got);
                }
            }
        }
        if accepted {
            source = cand_source;
            map = cand_map;
            num_shared += 1;
            final_nll = out.nll;
            final_cosine = cosine;
            rejected.clear();
        } else {
            rejected.insert((layer, root));
        }
        let candidate = Candidate {
            rank,
            layer,
            pair_source,
            source: root,
            distance: distances.distance[layer][pair_source],
            cosine,
            nll: out.nll,
            score,
            accepted,
            retrieval,
            lost_retrieval,
            num_shared,
        };
        progress(&candidate);
        candidates.push(candidate);
    }
    let pairs = (0..n)
        .filter(|&l| source[l] != l)
        .map(|l| (l, source[l]))
        .collect();
    Ok(Calibration {
        map,
        pairs,
        distances,
        candidates,
        num_skipped,
        target_shared,
        reference_nll: reference.nll,
        final_nll,
        final_cosine,
        num_probes,
        reference_retrieval,
        final_retrieval: answered.as_ref().map(|a| count(a)),
    })
}

/// Probes answered right.
fn count(answers: &[bool]) -> usize {
    answers.iter().filter(|&&a| a).count()
}

/// [`CalibrationModel::retrieval`] under `map`, checked to answer the `num_probes` probes the
/// unmodified model was asked.
fn checked_retrieval<M: CalibrationModel + ?Sized>(
    model: &mut M,
    map: &LayerMap,
    num_probes: usize,
) -> Result<Vec<bool>> {
    match model.retrieval(map)? {
        Some(got) if got.len() == num_probes => Ok(got),
        Some(got) => Err(calibration(format!(
            "the retrieval probes under map {map} returned {} answers, the unmodified model {num_probes}",
            got.len()
        ))),
        None => Err(calibration(format!(
            "the engine answered {num_probes} retrieval probes for the unmodified model but none under map {map}"
        ))),
    }
}

/// Runs the model and checks what it returned: one hidden vector per sample, all of `width`
/// values (the first run's when `None`), finite values and a finite NLL.
fn checked_run<M: CalibrationModel + ?Sized>(
    model: &mut M,
    map: &LayerMap,
    samples: &[Vec<u32>],
    width: Option<usize>,
) -> Result<RunOutput> {
    let out = model.run(map, samples)?;
    if out.hidden.len() != samples.len() {
        return Err(calibration(format!(
            "the run under map {map} returned hidden states for {} samples, expected {}",
            out.hidden.len(),
            samples.len()
        )));
    }
    let width = width.unwrap_or(out.hidden[0].len());
    for (s, h) in out.hidden.iter().enumerate() {
        if h.is_empty() || h.len() != width {
            return Err(calibration(format!(
                "the run under map {map} returned {} hidden values for sample {s}, expected {width} (non-zero, equal for every run)",
                h.len()
            )));
        }
        if let Some(pos) = h.iter().position(|x| !x.is_finite()) {
            return Err(calibration(format!(
                "the run under map {map}: hidden state of sample {s} holds {} at index {pos}",
                h[pos]
            )));
        }
    }
    if !out.nll.is_finite() {
        return Err(calibration(format!(
            "the run under map {map} returned NLL {}",
            out.nll
        )));
    }
    Ok(out)
}

/// Cosine similarity of two vectors in f64 (1 when both are zero, 0 when only one is).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    match (na > 0.0, nb > 0.0) {
        (true, true) => dot / (na.sqrt() * nb.sqrt()),
        (false, false) => 1.0,
        _ => 0.0,
    }
}

fn mean_cosine(reference: &[Vec<f32>], candidate: &[Vec<f32>]) -> f64 {
    let total: f64 = reference
        .iter()
        .zip(candidate)
        .map(|(a, b)| cosine(a, b))
        .sum();
    total / reference.len() as f64
}

fn calibration(what: String) -> Error {
    Error::Calibration { what }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: usize = 2;
    const HEAD_DIM: usize = 4;

    /// A deterministic toy: each layer has its own random K/V; the hidden state of a sample is
    /// the sum over layers of the K/V vector of the layer each layer reads, plus a
    /// sample-specific offset, so every change of source changes it. NLL grows with the
    /// distance between a sharing layer and its source.
    struct Toy {
        kv: Vec<(Vec<f32>, Vec<f32>)>,
        seq: usize,
        runs: usize,
        identity_runs: usize,
        maps: Vec<LayerMap>,
        /// Breakages for the error tests.
        drop_layer: bool,
        bad_hidden: Option<(usize, f32)>,
        short_run: bool,
        wrong_shape: bool,
    }

    impl Toy {
        fn new(num_layers: usize, seq: usize, seed: u64) -> Self {
            let mut rng = SplitMix64::new(seed);
            let len = HEADS * seq * HEAD_DIM;
            let mut uniform = move || (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
            let kv = (0..num_layers)
                .map(|l| {
                    let scale = 1.0 + l as f32 * 0.37;
                    let k = (0..len).map(|_| uniform() * scale).collect();
                    let v = (0..len).map(|_| uniform() * scale).collect();
                    (k, v)
                })
                .collect();
            Self {
                kv,
                seq,
                runs: 0,
                identity_runs: 0,
                maps: Vec::new(),
                drop_layer: false,
                bad_hidden: None,
                short_run: false,
                wrong_shape: false,
            }
        }
    }

    impl CalibrationModel for Toy {
        fn num_layers(&self) -> usize {
            self.kv.len()
        }

        fn reference_kv(&mut self, _samples: &[Vec<u32>]) -> Result<Vec<LayerKv>> {
            let mut out: Vec<LayerKv> = self
                .kv
                .iter()
                .map(|(k, v)| LayerKv {
                    k: k.clone(),
                    v: v.clone(),
                    kv_heads: HEADS,
                    seq: self.seq,
                    head_dim: HEAD_DIM,
                })
                .collect();
            if self.drop_layer {
                out.pop();
            }
            if self.wrong_shape {
                out[1].k.pop();
            }
            Ok(out)
        }

        fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput> {
            self.runs += 1;
            if *map == LayerMap::identity(map.num_layers())? {
                self.identity_runs += 1;
            }
            self.maps.push(map.clone());
            let len = self.kv[0].0.len();
            let mut hidden = Vec::new();
            for (s, sample) in samples.iter().enumerate() {
                let offset = sample[0] as f32 * 0.01;
                let mut h = vec![offset; len];
                for l in 0..map.num_layers() {
                    let (k, v) = &self.kv[map.source(l)];
                    for (x, (a, b)) in h.iter_mut().zip(k.iter().zip(v)) {
                        *x += a + b;
                    }
                }
                if let Some((bad, value)) = self.bad_hidden {
                    if bad == s {
                        h[3] = value;
                    }
                }
                hidden.push(h);
            }
            if self.short_run {
                hidden.pop();
            }
            let mut nll = 2.0;
            for l in 0..map.num_layers() {
                let (a, b) = (&self.kv[l].0, &self.kv[map.source(l)].0);
                let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum();
                nll += f64::from(d) / len as f64 * 0.01;
            }
            Ok(RunOutput { hidden, nll })
        }
    }

    fn samples(count: usize, len: usize) -> Vec<Vec<u32>> {
        (0..count)
            .map(|s| (0..len).map(|t| (s * 31 + t) as u32).collect())
            .collect()
    }

    fn config(target: ShareTarget, order: PairOrder, acceptance: Acceptance) -> CalibrationConfig {
        CalibrationConfig {
            target,
            order,
            acceptance,
            max_candidates: None,
        }
    }

    fn lenient() -> Acceptance {
        Acceptance::Cosine { threshold: -2.0 }
    }

    fn run<M: CalibrationModel>(toy: &mut M, cfg: &CalibrationConfig) -> Result<Calibration> {
        calibrate(toy, &samples(3, 5), cfg, &mut |_| {})
    }

    fn naive_distance(a: &LayerKv, b: &LayerKv) -> f64 {
        let mut total = [0f64; 2];
        for (which, (x, y)) in [(&a.k, &b.k), (&a.v, &b.v)].into_iter().enumerate() {
            for h in 0..a.kv_heads {
                for t in 0..a.seq {
                    let mut sq = 0f64;
                    for e in 0..a.head_dim {
                        let idx = (h * a.seq + t) * a.head_dim + e;
                        sq += (f64::from(x[idx]) - f64::from(y[idx])).powi(2);
                    }
                    total[which] += sq.sqrt();
                }
            }
        }
        let per = (a.kv_heads * a.seq) as f64;
        (total[0] / per + total[1] / per) / 2.0
    }

    #[test]
    fn distance_matrix_is_symmetric_zero_diagonal_and_naive() {
        let mut toy = Toy::new(6, 5, 7);
        let kv = toy.reference_kv(&samples(1, 5)).unwrap();
        let d = DistanceMatrix::from_kv(&kv).unwrap();
        assert_eq!(d.num_layers(), 6);
        for i in 0..6 {
            assert_eq!(d.get(i, i), Some(0.0));
            for j in 0..6 {
                assert_eq!(d.get(i, j), d.get(j, i));
                let naive = naive_distance(&kv[i], &kv[j]);
                assert!((d.get(i, j).unwrap() - naive).abs() < 1e-9, "{i} {j}");
            }
        }
        assert_eq!(d.get(6, 0), None);
        let json = d.to_json();
        assert!(json.contains("\"num_layers\": 6"), "{json}");
        let back = DistanceMatrix::from_json(&json).unwrap();
        for (a, b) in back.rows().iter().flatten().zip(d.rows().iter().flatten()) {
            assert!((a - b).abs() <= 1e-12 * b.max(1.0), "{a} vs {b}");
        }
        let asym = r#"{"num_layers": 2, "distance": [[0, 1], [2, 0]]}"#;
        assert!(DistanceMatrix::from_json(asym).is_err());
        let diag = r#"{"num_layers": 1, "distance": [[1]]}"#;
        assert!(DistanceMatrix::from_json(diag).is_err());
    }

    #[test]
    fn reaches_the_target_with_a_valid_downward_map() {
        for k in 0..=5 {
            let mut toy = Toy::new(6, 5, 1);
            let cfg = config(ShareTarget::Layers(k), PairOrder::Dissimilar, lenient());
            let cal = run(&mut toy, &cfg).unwrap();
            assert_eq!(cal.target_shared, k);
            assert_eq!(cal.map.num_layers(), 6);
            assert_eq!(cal.map.num_groups(), 6 - cal.num_shared());
            assert!(cal.map.owns_kv(0));
            for (&l, &s) in &cal.pairs {
                assert!(s < l, "upward {l} -> {s}");
                assert_eq!(cal.map.source(l), s);
                assert!(cal.map.owns_kv(s));
            }
            assert_eq!(toy.identity_runs, 1, "the reference runs once");
            assert_eq!(toy.runs, 1 + cal.candidates.len());
            if cal.reached_target() {
                assert_eq!(cal.num_shared(), k, "k = {k}");
            } else {
                // Pairs ran out: every layer still owning KV (but 0) is some layer's source,
                // so no pair was left that could have been tried.
                assert!(cal.num_shared() < k);
                for l in 1..6 {
                    let is_source = (0..6).any(|r| r != l && cal.map.source(r) == l);
                    assert!(
                        !cal.map.owns_kv(l) || is_source,
                        "k = {k}: layer {l} could share"
                    );
                }
            }
        }
        // With every candidate accepted, half the layers are reachable on this toy.
        for k in 0..=3 {
            let cfg = config(ShareTarget::Layers(k), PairOrder::Dissimilar, lenient());
            assert_eq!(run(&mut Toy::new(6, 5, 1), &cfg).unwrap().num_shared(), k);
        }
    }

    #[test]
    fn map_at_is_the_search_for_a_smaller_target() {
        for order in [
            PairOrder::Dissimilar,
            PairOrder::Similar,
            PairOrder::Random { seed: 7 },
            PairOrder::Adjacent,
        ] {
            let strict = Acceptance::Nll { max_increase: 0.02 };
            let big = run(
                &mut Toy::new(8, 5, 3),
                &config(ShareTarget::Layers(5), order, strict),
            )
            .unwrap();
            for k in 0..=big.num_shared() {
                let small = run(
                    &mut Toy::new(8, 5, 3),
                    &config(ShareTarget::Layers(k), order, strict),
                )
                .unwrap();
                assert_eq!(big.map_at(k).as_ref(), Some(&small.map), "{order} k = {k}");
            }
            assert_eq!(big.map_at(big.num_shared()).as_ref(), Some(&big.map));
            assert_eq!(big.map_at(big.num_shared() + 1), None);
        }
    }

    #[test]
    fn every_candidate_map_is_downward_and_changes_one_layer() {
        for order in [
            PairOrder::Dissimilar,
            PairOrder::Similar,
            PairOrder::Random { seed: 3 },
            PairOrder::Adjacent,
        ] {
            let mut toy = Toy::new(8, 5, 2);
            let cfg = config(ShareTarget::Layers(7), order, lenient());
            let cal = run(&mut toy, &cfg).unwrap();
            let mut accepted = LayerMap::identity(8).unwrap();
            for (map, cand) in toy.maps[1..].iter().zip(&cal.candidates) {
                assert!(!map.needs_upward(), "{order}: {map}");
                let changed: Vec<usize> = (0..8)
                    .filter(|&l| map.source(l) != accepted.source(l))
                    .collect();
                assert_eq!(changed, vec![cand.layer], "{order}: {map}");
                if cand.accepted {
                    accepted = map.clone();
                }
            }
            assert_eq!(accepted, cal.map);
        }
    }

    #[test]
    fn adjacent_order_builds_cla_from_the_top() {
        let mut toy = Toy::new(6, 5, 4);
        let cfg = config(ShareTarget::Layers(5), PairOrder::Adjacent, lenient());
        let cal = run(&mut toy, &cfg).unwrap();
        assert_eq!(cal.map.to_layer_types(), "0_0_2_2_4_4");
        assert!(!cal.reached_target(), "only 3 adjacent pairs can be taken");
        assert_eq!(cal.target_shared, 5);
        assert_eq!(cal.num_skipped, 2);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let order = PairOrder::Random { seed: 42 };
        let cfg = config(ShareTarget::Fraction(0.5), order, lenient());
        let a = run(&mut Toy::new(8, 5, 9), &cfg).unwrap();
        let b = run(&mut Toy::new(8, 5, 9), &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.num_shared(), 4);
        let d = &a.distances;
        let other = PairOrder::Random { seed: 43 }.pairs(d);
        assert_ne!(order.pairs(d), other);
        let mut sorted = other.clone();
        sorted.sort();
        assert_eq!(sorted.len(), 28);
        sorted.dedup();
        assert_eq!(sorted.len(), 28, "a shuffle holds every pair once");
    }

    #[test]
    fn threshold_one_accepts_nothing() {
        let mut toy = Toy::new(5, 5, 5);
        let cosine = Acceptance::Cosine { threshold: 1.0 };
        let cfg = config(ShareTarget::Layers(2), PairOrder::Dissimilar, cosine);
        let mut seen = Vec::new();
        let cal = calibrate(&mut toy, &samples(3, 5), &cfg, &mut |c| {
            seen.push(c.clone())
        })
        .unwrap();
        assert_eq!(cal.num_shared(), 0);
        assert_eq!(cal.map, LayerMap::identity(5).unwrap());
        assert!(!cal.reached_target());
        assert_eq!(cal.candidates.len(), 10, "every pair scored, none accepted");
        assert_eq!(seen, cal.candidates);
        assert!(seen.iter().all(|c| !c.accepted && c.score < 1.0));
        assert_eq!(cal.final_nll, cal.reference_nll);
    }

    #[test]
    fn max_candidates_bounds_the_search() {
        let strict = Acceptance::Cosine { threshold: 1.0 };
        for m in [0, 1, 4] {
            let cfg = CalibrationConfig {
                max_candidates: Some(m),
                ..config(ShareTarget::Layers(2), PairOrder::Dissimilar, strict)
            };
            let mut toy = Toy::new(6, 5, 2);
            let cal = run(&mut toy, &cfg).unwrap();
            assert_eq!(cal.candidates.len(), m);
            assert_eq!(toy.runs, 1 + m);
            assert!(!cal.reached_target());
        }
        // A bound the search does not reach changes nothing.
        let cfg = config(ShareTarget::Layers(2), PairOrder::Similar, lenient());
        let bounded = CalibrationConfig {
            max_candidates: Some(100),
            ..cfg
        };
        assert_eq!(
            run(&mut Toy::new(6, 5, 2), &cfg).unwrap(),
            run(&mut Toy::new(6, 5, 2), &bounded).unwrap()
        );
    }

    #[test]
    fn nll_rule_bounds_the_increase() {
        let mut toy = Toy::new(6, 5, 6);
        let rule = Acceptance::Nll { max_increase: 0.0 };
        let cfg = config(ShareTarget::Layers(3), PairOrder::Similar, rule);
        let cal = run(&mut toy, &cfg).unwrap();
        assert_eq!(cal.num_shared(), 0, "any sharing raises the toy's NLL");
        let rule = Acceptance::Nll { max_increase: 1.0 };
        let cal = run(
            &mut Toy::new(6, 5, 6),
            &config(ShareTarget::Layers(3), PairOrder::Similar, rule),
        )
        .unwrap();
        assert_eq!(cal.num_shared(), 3);
        assert!(cal.final_nll <= cal.reference_nll * 2.0);
        for c in cal.candidates.iter().filter(|c| c.accepted) {
            assert!((c.score - (c.nll / cal.reference_nll - 1.0)).abs() < 1e-12);
        }
    }

    #[test]
    fn dissimilar_and_similar_are_opposite() {
        let mut toy = Toy::new(7, 5, 8);
        let d = DistanceMatrix::from_kv(&toy.reference_kv(&samples(1, 5)).unwrap()).unwrap();
        let dis = PairOrder::Dissimilar.pairs(&d);
        let mut sim = PairOrder::Similar.pairs(&d);
        assert_eq!(dis.len(), 21);
        for w in dis.windows(2) {
            assert!(d.get(w[0].0, w[0].1) >= d.get(w[1].0, w[1].1));
        }
        sim.reverse();
        assert_eq!(dis, sim);
        // The search tries them in that order: the first candidate is the extreme pair.
        let strict = Acceptance::Cosine { threshold: 1.0 };
        let a = run(
            &mut Toy::new(7, 5, 8),
            &config(ShareTarget::Layers(1), PairOrder::Dissimilar, strict),
        )
        .unwrap();
        let b = run(
            &mut Toy::new(7, 5, 8),
            &config(ShareTarget::Layers(1), PairOrder::Similar, strict),
        )
        .unwrap();
        let first = |c: &Calibration| (c.candidates[0].layer, c.candidates[0].pair_source);
        assert_eq!(first(&a), dis[0]);
        assert_eq!(first(&b), *dis.last().unwrap());
        let tried_a: Vec<_> = a
            .candidates
            .iter()
            .map(|c| (c.layer, c.pair_source))
            .collect();
        let mut tried_b: Vec<_> = b
            .candidates
            .iter()
            .map(|c| (c.layer, c.pair_source))
            .collect();
        tried_b.reverse();
        assert_eq!(tried_a, tried_b);
    }

    #[test]
    fn chains_collapse_to_the_root() {
        // Accept everything in a shuffled order: a later pair naming a sharing layer as its
        // source resolves to that layer's root, so every source owns its KV.
        let mut toy = Toy::new(6, 5, 11);
        let cfg = config(
            ShareTarget::Layers(5),
            PairOrder::Random { seed: 5 },
            lenient(),
        );
        let cal = run(&mut toy, &cfg).unwrap();
        for c in &cal.candidates {
            assert!(c.source <= c.pair_source && c.pair_source < c.layer);
        }
        for (&l, &s) in &cal.pairs {
            assert!(cal.map.owns_kv(s), "{l} reads {s}, which shares");
        }
    }

    /// Three layers with K = V = 0, 10, 4 (distances (1,0) > (2,1) > (2,0)); a map is as good as
    /// the reference only when nothing but layer 1 shares.
    struct Scripted {
        runs: usize,
    }

    impl CalibrationModel for Scripted {
        fn num_layers(&self) -> usize {
            3
        }

        fn reference_kv(&mut self, samples: &[Vec<u32>]) -> Result<Vec<LayerKv>> {
            let seq = samples[0].len();
            Ok([0.0, 10.0, 4.0]
                .iter()
                .map(|&x| LayerKv {
                    k: vec![x; seq],
                    v: vec![x; seq],
                    kv_heads: 1,
                    seq,
                    head_dim: 1,
                })
                .collect())
        }

        fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput> {
            self.runs += 1;
            let good = map.owns_kv(2);
            Ok(RunOutput {
                hidden: vec![vec![1.0]; samples.len()],
                nll: if good { 2.0 } else { 3.0 },
            })
        }
    }

    #[test]
    fn a_rejected_map_is_not_scored_again_through_its_chain() {
        let mut model = Scripted { runs: 0 };
        let rule = Acceptance::Nll { max_increase: 0.0 };
        let cfg = config(ShareTarget::Layers(2), PairOrder::Dissimilar, rule);
        let cal = calibrate(&mut model, &samples(2, 2), &cfg, &mut |_| {}).unwrap();
        let tried: Vec<_> = cal
            .candidates
            .iter()
            .map(|c| (c.layer, c.pair_source, c.source, c.accepted))
            .collect();
        // (1, 0) accepted; (2, 1) means 2 reads 0 and is rejected; (2, 0) is that same map.
        assert_eq!(tried, vec![(1, 0, 0, true), (2, 1, 0, false)]);
        assert_eq!(cal.num_skipped, 1);
        assert_eq!(model.runs, 3, "reference + two candidates");
        assert_eq!(cal.map.to_layer_types(), "0_0_2");
        assert!(!cal.reached_target());
    }

    fn err_text(r: Result<Calibration>) -> String {
        match r {
            Err(Error::Calibration { what }) => what,
            Err(other) => other.to_string(),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn errors_say_what_and_where() {
        let cfg = CalibrationConfig::default();
        let mut toy = Toy::new(4, 5, 1);
        let none: Vec<Vec<u32>> = Vec::new();
        assert!(err_text(calibrate(&mut toy, &none, &cfg, &mut |_| {}))
            .contains("no calibration samples"));
        let short = vec![vec![1, 2, 3], vec![4]];
        assert!(err_text(calibrate(&mut toy, &short, &cfg, &mut |_| {}))
            .contains("sample 1 has 1 tokens"));
        let ragged = vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8]];
        assert!(err_text(calibrate(&mut toy, &ragged, &cfg, &mut |_| {}))
            .contains("sample 2 has 2 tokens but sample 0 has 3"));
        for f in [1.0, -0.1, f64::NAN, 2.0] {
            let c = config(ShareTarget::Fraction(f), PairOrder::Dissimilar, lenient());
            assert!(
                err_text(run(&mut toy, &c)).contains("outside [0, 1)"),
                "{f}"
            );
        }
        let c = config(ShareTarget::Layers(4), PairOrder::Dissimilar, lenient());
        assert!(err_text(run(&mut toy, &c)).contains("at most 3"));
        assert_eq!(ShareTarget::Fraction(0.99).num_shared(4).unwrap(), 3);
        assert_eq!(ShareTarget::Fraction(0.3).num_shared(30).unwrap(), 9);
        let c = config(
            ShareTarget::Layers(1),
            PairOrder::Dissimilar,
            Acceptance::Cosine {
                threshold: f64::NAN,
            },
        );
        assert!(err_text(run(&mut toy, &c)).contains("threshold"));
        let c = config(
            ShareTarget::Layers(1),
            PairOrder::Dissimilar,
            Acceptance::Nll { max_increase: -1.0 },
        );
        assert!(err_text(run(&mut toy, &c)).contains("max_increase"));

        let c = config(ShareTarget::Layers(1), PairOrder::Dissimilar, lenient());
        let mut toy = Toy::new(4, 5, 1);
        toy.drop_layer = true;
        assert_eq!(
            run(&mut toy, &c).unwrap_err(),
            Error::WrongLayerCount {
                what: "reference K/V",
                expected: 4,
                actual: 3
            }
        );
        let mut toy = Toy::new(4, 5, 1);
        toy.wrong_shape = true;
        assert!(err_text(run(&mut toy, &c))
            .contains("reference K of layer 1 has 39 values, expected 40"));
        let mut toy = Toy::new(4, 5, 1);
        toy.kv[2].1[7] = f32::NAN;
        assert!(err_text(run(&mut toy, &c)).contains("reference V of layer 2 holds NaN at index 7"));
        let mut toy = Toy::new(4, 6, 1);
        assert!(err_text(run(&mut toy, &c)).contains("covers 6 tokens, the samples have 5"));
        let mut toy = Toy::new(4, 5, 1);
        toy.bad_hidden = Some((2, f32::INFINITY));
        assert!(err_text(run(&mut toy, &c)).contains("hidden state of sample 2 holds inf"));
        let mut toy = Toy::new(4, 5, 1);
        toy.short_run = true;
        assert!(err_text(run(&mut toy, &c)).contains("for 2 samples, expected 3"));
        let mut toy = Toy::new(0, 5, 1);
        assert!(err_text(run(&mut toy, &c)).contains("0 layers"));
    }

    #[test]
    fn one_layer_model_shares_nothing() {
        let mut toy = Toy::new(1, 5, 1);
        let cal = run(
            &mut toy,
            &config(ShareTarget::Fraction(0.5), PairOrder::Dissimilar, lenient()),
        )
        .unwrap();
        assert_eq!(cal.num_shared(), 0);
        assert!(cal.reached_target());
        assert!(cal.candidates.is_empty());
    }

    /// [`Toy`] with three retrieval probes: probe 0 is lost when layer `fragile` stops owning
    /// its KV; `answers` overrides the answer count (a broken engine).
    struct Probed {
        toy: Toy,
        fragile: usize,
        answers: Option<usize>,
        probed: Vec<LayerMap>,
    }

    impl CalibrationModel for Probed {
        fn num_layers(&self) -> usize {
            self.toy.num_layers()
        }

        fn reference_kv(&mut self, samples: &[Vec<u32>]) -> Result<Vec<LayerKv>> {
            self.toy.reference_kv(samples)
        }

        fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput> {
            self.toy.run(map, samples)
        }

        fn retrieval(&mut self, map: &LayerMap) -> Result<Option<Vec<bool>>> {
            self.probed.push(map.clone());
            let mut got = vec![map.owns_kv(self.fragile), true, false];
            if let Some(n) = self.answers {
                got.resize(n, true);
            }
            Ok(Some(got))
        }
    }

    /// The retrieval rule rejects exactly the candidate that loses a probe the current map
    /// answers, and that changes the result (without probes the same search shares the
    /// fragile layer; shown failing with the rule's rejection removed).
    #[test]
    fn a_candidate_that_loses_a_probe_is_rejected() {
        let cfg = config(ShareTarget::Layers(3), PairOrder::Dissimilar, lenient());
        let plain = run(&mut Toy::new(6, 5, 1), &cfg).unwrap();
        let fragile = *plain
            .pairs
            .keys()
            .next()
            .expect("the plain search shares a layer");
        assert_eq!(plain.num_probes, 0);
        assert_eq!(plain.reference_retrieval, None);
        assert!(plain.candidates.iter().all(|c| c.retrieval.is_none()));

        let mut probed = Probed {
            toy: Toy::new(6, 5, 1),
            fragile,
            answers: None,
            probed: Vec::new(),
        };
        let cal = run(&mut probed, &cfg).unwrap();
        assert!(cal.map.owns_kv(fragile), "{:?}", cal.pairs);
        assert_eq!(cal.num_probes, 3);
        assert_eq!(cal.reference_retrieval, Some(2));
        assert_eq!(cal.final_retrieval, Some(2));
        let lost: Vec<&Candidate> = cal.candidates.iter().filter(|c| c.lost_retrieval).collect();
        assert!(!lost.is_empty());
        for c in &lost {
            assert_eq!(c.layer, fragile);
            assert!(!c.accepted);
            assert_eq!(c.retrieval, Some(1));
        }
        for c in cal.candidates.iter().filter(|c| c.accepted) {
            assert_eq!(c.retrieval, Some(2));
        }
        // Probed: the unmodified model, then every candidate the rule accepted, no other.
        let by_rule = cal
            .candidates
            .iter()
            .filter(|c| c.accepted || c.lost_retrieval)
            .count();
        assert_eq!(probed.probed.len(), 1 + by_rule);
        assert_eq!(probed.probed[0], LayerMap::identity(6).unwrap());

        // An engine whose probe count changes between maps is an error, not a decision.
        let mut broken = Probed {
            toy: Toy::new(6, 5, 1),
            fragile,
            answers: None,
            probed: Vec::new(),
        };
        let mut calls = 0;
        struct Flaky<'a>(&'a mut Probed, &'a mut usize);
        impl CalibrationModel for Flaky<'_> {
            fn num_layers(&self) -> usize {
                self.0.num_layers()
            }
            fn reference_kv(&mut self, samples: &[Vec<u32>]) -> Result<Vec<LayerKv>> {
                self.0.reference_kv(samples)
            }
            fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput> {
                self.0.run(map, samples)
            }
            fn retrieval(&mut self, map: &LayerMap) -> Result<Option<Vec<bool>>> {
                *self.1 += 1;
                self.0.answers = (*self.1 > 1).then_some(4);
                self.0.retrieval(map)
            }
        }
        let err = run(&mut Flaky(&mut broken, &mut calls), &cfg).unwrap_err();
        assert!(err.to_string().contains("returned 4 answers"), "{err}");
    }

    #[test]
    fn cosine_edge_cases() {
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 0.0]), 0.0);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-12);
    }
}
