//! [`LayerMap`]: which layer's KV each layer reads (cross-layer sharing), plus a per-layer
//! sliding-window flag.
//!
//! Invariants of a constructed map (checked by every constructor, including deserialisation):
//! `source[i] < num_layers`; chains are resolved, so `source[source[i]] == source[i]`; every
//! layer that is some layer's source owns its KV. Layers that read owner `j` form KV group `j`;
//! groups are numbered densely in order of their owner layer.
//!
//! Sources above the reading layer (`source[i] > i`) are *upward* references (LCKV, the
//! systematic study's top/middle layouts): they need iterative prefill, see
//! [`LayerMap::needs_upward`]. Construction is O(n) (chain resolution O(n^2) worst case on
//! adversarial chains, n = layers); every query after construction is O(1).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Index of a KV group: dense, `0..num_groups`, ordered by owner layer.
pub type GroupId = usize;

/// For each of a model's layers, the layer whose KV it reads.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LayerMapFile", into = "LayerMapFile")]
pub struct LayerMap {
    source: Vec<usize>,
    sliding: Vec<bool>,
    group_of: Vec<GroupId>,
    owners: Vec<usize>,
    readers: Vec<Vec<usize>>,
}

/// The serde form: `{"num_layers": n, "kv_source": [...], "sliding_window": [...]}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerMapFile {
    num_layers: usize,
    kv_source: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sliding_window: Option<Vec<bool>>,
}

impl TryFrom<LayerMapFile> for LayerMap {
    type Error = Error;
    fn try_from(file: LayerMapFile) -> Result<Self> {
        if file.kv_source.len() != file.num_layers {
            return Err(Error::WrongLayerCount {
                what: "kv_source",
                expected: file.num_layers,
                actual: file.kv_source.len(),
            });
        }
        let sliding = file
            .sliding_window
            .unwrap_or_else(|| vec![false; file.num_layers]);
        LayerMap::with_sliding(file.kv_source, sliding)
    }
}

impl From<LayerMap> for LayerMapFile {
    fn from(map: LayerMap) -> Self {
        let any_sliding = map.sliding.iter().any(|&s| s);
        LayerMapFile {
            num_layers: map.num_layers(),
            kv_source: map.source,
            sliding_window: any_sliding.then_some(map.sliding),
        }
    }
}

/// How the study's layouts partition layers into sharing groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    /// The bottom `k - 1` layers keep their own KV; all layers above form one group (YOCO-like).
    Pizza,
    /// `ceil((k-1)/2)` bottom and `floor((k-1)/2)` top layers keep their own KV; the middle
    /// layers form one group (LCKV-like).
    Sandwich,
    /// `k` groups of adjacent layers of (nearly) equal size, larger groups first (CLA-like).
    Lasagna,
}

/// Which layer of a group the group's layers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The lowest layer of the group (downward sharing, one pass).
    Bottom,
    /// The highest layer of the group (upward sharing, iterative prefill).
    Top,
    /// The middle layer, `floor((lo + hi) / 2)` (upward for the layers below it).
    Middle,
}

impl LayerMap {
    /// Builds a map from per-layer sources (chains allowed) with no sliding-window layers.
    pub fn new(source: Vec<usize>) -> Result<Self> {
        let n = source.len();
        Self::with_sliding(source, vec![false; n])
    }

    /// Builds a map from per-layer sources (chains are resolved to their root) and per-layer
    /// sliding-window flags.
    pub fn with_sliding(source: Vec<usize>, sliding: Vec<bool>) -> Result<Self> {
        let n = source.len();
        if n == 0 {
            return Err(Error::InvalidMap {
                reason: "a map needs at least one layer".into(),
            });
        }
        if sliding.len() != n {
            return Err(Error::WrongLayerCount {
                what: "sliding_window",
                expected: n,
                actual: sliding.len(),
            });
        }
        for (layer, &src) in source.iter().enumerate() {
            if src >= n {
                return Err(Error::SourceOutOfRange {
                    layer,
                    source_layer: src,
                    num_layers: n,
                });
            }
        }
        // Resolve chains: follow sources until a fixed point; more than n steps means a cycle.
        let mut resolved = vec![0usize; n];
        for (layer, slot) in resolved.iter_mut().enumerate() {
            let mut cur = layer;
            let mut steps = 0;
            while source[cur] != cur {
                cur = source[cur];
                steps += 1;
                if steps > n {
                    return Err(Error::Cycle { layer });
                }
            }
            *slot = cur;
        }
        let mut group_of = vec![usize::MAX; n];
        let mut owners = Vec::new();
        for layer in 0..n {
            if resolved[layer] == layer {
                group_of[layer] = owners.len();
                owners.push(layer);
            }
        }
        let mut readers = vec![Vec::new(); owners.len()];
        for layer in 0..n {
            let g = group_of[resolved[layer]];
            group_of[layer] = g;
            readers[g].push(layer);
        }
        Ok(Self {
            source: resolved,
            sliding,
            group_of,
            owners,
            readers,
        })
    }

    /// The map of `lanes` lanes per group, for a per-head cache: layer `l`'s KV head `h` becomes
    /// layer `l * lanes + h`, reading `source(l) * lanes + h` with `l`'s sliding flag. Groups
    /// stay ordered by owner, so lane `h` of group `g` is group `g * lanes + h` of the result.
    pub fn lanes(&self, lanes: usize) -> Result<Self> {
        if lanes == 0 {
            return Err(Error::InvalidMap {
                reason: "a map needs at least one lane per group".into(),
            });
        }
        let n = self.num_layers();
        let source = (0..n * lanes)
            .map(|v| self.source[v / lanes] * lanes + v % lanes)
            .collect();
        let sliding = (0..n * lanes).map(|v| self.sliding[v / lanes]).collect();
        Self::with_sliding(source, sliding)
    }

    /// Every layer owns its KV: the unmodified model.
    pub fn identity(num_layers: usize) -> Result<Self> {
        Self::new((0..num_layers).collect())
    }

    /// Cross-Layer Attention: consecutive groups of `stride` layers read the group's bottom layer
    /// (`cla(n, 2)` = `0_0_2_2_4_4_...`).
    pub fn cla(num_layers: usize, stride: usize) -> Result<Self> {
        if stride == 0 {
            return Err(Error::InvalidMap {
                reason: "cla stride must be at least 1".into(),
            });
        }
        Self::new((0..num_layers).map(|i| i - i % stride).collect())
    }

    /// MLKV with `m` KV layers: KV layers are `[0] + [floor((i+1) L / m) for i < m-1]`; every
    /// other layer reads the nearest KV layer below it.
    pub fn mlkv(num_layers: usize, num_kv_layers: usize) -> Result<Self> {
        if num_kv_layers == 0 || num_kv_layers > num_layers {
            return Err(Error::InvalidMap {
                reason: format!("mlkv needs 1..={num_layers} KV layers, got {num_kv_layers}"),
            });
        }
        let mut is_kv = vec![false; num_layers];
        is_kv[0] = true;
        for i in 0..num_kv_layers - 1 {
            is_kv[(i + 1) * num_layers / num_kv_layers] = true;
        }
        let mut last = 0;
        let source = (0..num_layers)
            .map(|l| {
                if is_kv[l] {
                    last = l;
                }
                last
            })
            .collect();
        Self::new(source)
    }

    /// YOCO: the bottom half (`floor(n/2)` layers) keep their own KV with a sliding window;
    /// layer `floor(n/2)` owns the global KV that every layer above reads.
    pub fn yoco(num_layers: usize) -> Result<Self> {
        if num_layers < 2 {
            return Err(Error::InvalidMap {
                reason: "yoco needs at least 2 layers".into(),
            });
        }
        let half = num_layers / 2;
        let source = (0..num_layers).map(|l| l.min(half)).collect();
        let sliding = (0..num_layers).map(|l| l < half).collect();
        Self::with_sliding(source, sliding)
    }

    /// LCKV: `warmup_bottom` bottom and `warmup_top` top layers keep their own KV; every layer
    /// in between reads the KV of the highest of them, layer `n - 1 - warmup_top` (upward).
    /// `lckv(22, 1, 1)` = `0_20_20_..._20_21`.
    pub fn lckv(num_layers: usize, warmup_bottom: usize, warmup_top: usize) -> Result<Self> {
        if warmup_bottom + warmup_top >= num_layers {
            return Err(Error::InvalidMap {
                reason: format!(
                    "lckv warmup layers ({warmup_bottom} bottom + {warmup_top} top) leave no layer to share in a {num_layers}-layer model"
                ),
            });
        }
        let target = num_layers - 1 - warmup_top;
        let source = (0..num_layers)
            .map(|l| {
                if l < warmup_bottom || l > target {
                    l
                } else {
                    target
                }
            })
            .collect();
        Self::new(source)
    }

    /// KVSharer: `{layer: source}` pairs with `source < layer`; every other layer owns its KV.
    /// Chains (`3 -> 2 -> 1`) resolve to their root.
    pub fn kvsharer(num_layers: usize, pairs: &BTreeMap<usize, usize>) -> Result<Self> {
        let mut source: Vec<usize> = (0..num_layers).collect();
        for (&layer, &src) in pairs {
            if layer >= num_layers {
                return Err(Error::SourceOutOfRange {
                    layer,
                    source_layer: src,
                    num_layers,
                });
            }
            if src >= layer {
                return Err(Error::UpwardReference {
                    layer,
                    source_layer: src,
                    context: "a KVSharer map",
                });
            }
            source[layer] = src;
        }
        Self::new(source)
    }

    /// One of the systematic study's nine layouts with `num_kv_layers` layers that keep KV.
    /// Layer 0 always keeps its KV. CLA = lasagna/bottom, YOCO = pizza/bottom,
    /// LCKV = sandwich/top.
    pub fn study(
        num_layers: usize,
        num_kv_layers: usize,
        partition: Partition,
        target: Target,
    ) -> Result<Self> {
        if num_kv_layers == 0 || num_kv_layers > num_layers {
            return Err(Error::InvalidMap {
                reason: format!(
                    "a {num_layers}-layer layout needs 1..={num_layers} KV layers, got {num_kv_layers}"
                ),
            });
        }
        let k = num_kv_layers;
        // Groups as inclusive ranges [lo, hi] of adjacent layers, bottom to top.
        let mut groups: Vec<(usize, usize)> = Vec::with_capacity(k);
        match partition {
            Partition::Pizza => {
                groups.extend((0..k - 1).map(|l| (l, l)));
                groups.push((k - 1, num_layers - 1));
            }
            Partition::Sandwich => {
                let bottom = (k - 1).div_ceil(2);
                let top = (k - 1) / 2;
                groups.extend((0..bottom).map(|l| (l, l)));
                groups.push((bottom, num_layers - 1 - top));
                groups.extend((num_layers - top..num_layers).map(|l| (l, l)));
            }
            Partition::Lasagna => {
                let base = num_layers / k;
                let extra = num_layers % k;
                let mut lo = 0;
                for g in 0..k {
                    let size = base + usize::from(g < extra);
                    groups.push((lo, lo + size - 1));
                    lo += size;
                }
            }
        }
        let mut source = vec![0; num_layers];
        for &(lo, hi) in &groups {
            let t = match target {
                Target::Bottom => lo,
                Target::Top => hi,
                Target::Middle => (lo + hi) / 2,
            };
            for s in &mut source[lo..=hi] {
                *s = t;
            }
        }
        // Layer 0 always keeps its own KV, even when its group's target lies above it.
        source[0] = 0;
        Self::new(source)
    }

    /// Parses the LCKV / systematic-study `layer_types` string: integers joined by `_`, one per
    /// layer, entry i = the layer whose KV layer i reads; an `s` suffix marks a sliding-window
    /// layer. Example: `0_20_20_20_21`, `0s_1s_2_2`.
    pub fn from_layer_types(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::Parse {
                format: "layer_types",
                position: "0".into(),
                reason: "empty string".into(),
            });
        }
        let mut source = Vec::new();
        let mut sliding = Vec::new();
        for (i, entry) in text.split('_').enumerate() {
            let (digits, is_sliding) = match entry.strip_suffix('s') {
                Some(d) => (d, true),
                None => (entry, false),
            };
            let src: usize = digits.parse().map_err(|_| Error::Parse {
                format: "layer_types",
                position: format!("entry {i}"),
                reason: format!("{entry:?} is not a layer index with an optional 's' suffix"),
            })?;
            source.push(src);
            sliding.push(is_sliding);
        }
        Self::with_sliding(source, sliding)
    }

    /// Renders the map as a `layer_types` string (the inverse of [`LayerMap::from_layer_types`]).
    pub fn to_layer_types(&self) -> String {
        let mut out = String::new();
        for (i, (&s, &w)) in self.source.iter().zip(&self.sliding).enumerate() {
            if i > 0 {
                out.push('_');
            }
            out.push_str(&s.to_string());
            if w {
                out.push('s');
            }
        }
        out
    }

    /// Parses a KVSharer map as JSON (`{"5": 1, "7": 3}`) for a model of `num_layers` layers.
    pub fn from_kvsharer_json(num_layers: usize, text: &str) -> Result<Self> {
        let raw: BTreeMap<String, usize> =
            serde_json::from_str(text).map_err(|e| Error::Parse {
                format: "KVSharer map",
                position: format!("line {} column {}", e.line(), e.column()),
                reason: e.to_string(),
            })?;
        let mut pairs = BTreeMap::new();
        for (key, src) in raw {
            let layer: usize = key.trim().parse().map_err(|_| Error::Parse {
                format: "KVSharer map",
                position: format!("key {key:?}"),
                reason: "keys must be layer indices".into(),
            })?;
            pairs.insert(layer, src);
        }
        Self::kvsharer(num_layers, &pairs)
    }

    /// Builds a preset by name: `identity`, `cla:STRIDE`, `mlkv:M`, `yoco`,
    /// `lckv:BOTTOM:TOP`, `PARTITION-TARGET:K` (e.g. `sandwich-top:3`), or a raw
    /// `layer_types` string.
    pub fn preset(name: &str, num_layers: usize) -> Result<Self> {
        let mut parts = name.trim().split(':');
        let head = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let arg = |i: usize| -> Result<usize> {
            let text = args.get(i).ok_or_else(|| Error::Parse {
                format: "preset",
                position: name.into(),
                reason: format!("argument {} is missing", i + 1),
            })?;
            text.parse().map_err(|_| Error::Parse {
                format: "preset",
                position: name.into(),
                reason: format!("argument {text:?} is not a number"),
            })
        };
        let map = match head {
            "identity" => Self::identity(num_layers)?,
            "cla" => Self::cla(num_layers, arg(0)?)?,
            "mlkv" => Self::mlkv(num_layers, arg(0)?)?,
            "yoco" => Self::yoco(num_layers)?,
            "lckv" => Self::lckv(num_layers, arg(0)?, arg(1)?)?,
            _ => {
                if let Some((p, t)) = head.split_once('-') {
                    let partition = match p {
                        "pizza" => Some(Partition::Pizza),
                        "sandwich" => Some(Partition::Sandwich),
                        "lasagna" => Some(Partition::Lasagna),
                        _ => None,
                    };
                    let target = match t {
                        "bottom" => Some(Target::Bottom),
                        "top" => Some(Target::Top),
                        "middle" => Some(Target::Middle),
                        _ => None,
                    };
                    if let (Some(p), Some(t)) = (partition, target) {
                        return Self::study(num_layers, arg(0)?, p, t);
                    }
                }
                if head.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                    let map = Self::from_layer_types(head)?;
                    if map.num_layers() != num_layers {
                        return Err(Error::WrongLayerCount {
                            what: "layer_types",
                            expected: num_layers,
                            actual: map.num_layers(),
                        });
                    }
                    return Ok(map);
                }
                return Err(Error::Parse {
                    format: "preset",
                    position: name.into(),
                    reason: "unknown preset (identity, cla:S, mlkv:M, yoco, lckv:B:T, \
                             {pizza,sandwich,lasagna}-{bottom,top,middle}:K, or a layer_types string)"
                        .into(),
                });
            }
        };
        Ok(map)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.source.len()
    }

    /// The layer whose KV `layer` reads (itself when it owns KV).
    ///
    /// # Panics
    /// If `layer >= num_layers()`.
    pub fn source(&self, layer: usize) -> usize {
        self.source[layer]
    }

    /// Per-layer sources, resolved to their roots.
    pub fn sources(&self) -> &[usize] {
        &self.source
    }

    /// Whether `layer` uses a sliding-window attention limit.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding[layer]
    }

    /// Whether `layer` owns KV (computes K/V projections and holds pages).
    pub fn owns_kv(&self, layer: usize) -> bool {
        self.source[layer] == layer
    }

    /// Number of KV groups (= layers that own KV).
    pub fn num_groups(&self) -> usize {
        self.owners.len()
    }

    /// The group that `layer` reads.
    pub fn group_of(&self, layer: usize) -> GroupId {
        self.group_of[layer]
    }

    /// The layer that owns group `group`.
    pub fn owner(&self, group: GroupId) -> usize {
        self.owners[group]
    }

    /// The owner layer of every group, in group order.
    pub fn owners(&self) -> &[usize] {
        &self.owners
    }

    /// Layers that read group `group` (its owner included), ascending.
    pub fn readers(&self, group: GroupId) -> &[usize] {
        &self.readers[group]
    }

    /// Whether some layer reads a layer above it, which needs iterative (multi-pass) prefill.
    pub fn needs_upward(&self) -> bool {
        self.source.iter().enumerate().any(|(l, &s)| s > l)
    }

    /// Whether `layer` reads a layer above it (its own current token is then not visible).
    pub fn is_upward(&self, layer: usize) -> bool {
        self.source[layer] > layer
    }

    /// Fails with [`Error::UpwardReference`] naming the first upward layer; for engines that
    /// only run one pass per step.
    pub fn require_downward(&self, context: &'static str) -> Result<()> {
        match self.source.iter().enumerate().find(|(l, &s)| s > *l) {
            Some((layer, &s)) => Err(Error::UpwardReference {
                layer,
                source_layer: s,
                context,
            }),
            None => Ok(()),
        }
    }

    /// Fails with [`Error::WrongLayerCount`] unless the map has `num_layers` layers.
    pub fn require_layers(&self, num_layers: usize) -> Result<()> {
        if self.num_layers() == num_layers {
            Ok(())
        } else {
            Err(Error::WrongLayerCount {
                what: "model",
                expected: num_layers,
                actual: self.num_layers(),
            })
        }
    }

    /// Fraction of layers that own KV (1.0 for identity): the sharing factor of the KV bytes.
    pub fn kv_fraction(&self) -> f64 {
        self.num_groups() as f64 / self.num_layers() as f64
    }
}

impl fmt::Debug for LayerMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerMap({})", self.to_layer_types())
    }
}

impl fmt::Display for LayerMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_layer_types())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(map: &LayerMap) -> String {
        map.to_layer_types()
    }

    #[test]
    fn presets_match_the_papers() {
        assert_eq!(types(&LayerMap::cla(6, 2).unwrap()), "0_0_2_2_4_4");
        assert_eq!(types(&LayerMap::lckv(6, 1, 1).unwrap()), "0_4_4_4_4_5");
        assert_eq!(types(&LayerMap::yoco(6).unwrap()), "0s_1s_2s_3_3_3");
        let mlkv = LayerMap::mlkv(32, 4).unwrap();
        assert_eq!(mlkv.owners(), &[0, 8, 16, 24]);
        assert_eq!(mlkv.source(7), 0);
        assert_eq!(mlkv.source(31), 24);
        assert!(!mlkv.needs_upward());
        assert!(LayerMap::lckv(6, 1, 1).unwrap().needs_upward());
    }

    #[test]
    fn study_layouts_reproduce_named_methods() {
        // CLA = lasagna-bottom, LCKV = sandwich-top, YOCO = pizza-bottom (partition only).
        assert_eq!(
            LayerMap::study(22, 11, Partition::Lasagna, Target::Bottom).unwrap(),
            LayerMap::cla(22, 2).unwrap()
        );
        assert_eq!(
            LayerMap::study(22, 3, Partition::Sandwich, Target::Top).unwrap(),
            LayerMap::lckv(22, 1, 1).unwrap()
        );
        let pizza = LayerMap::study(22, 12, Partition::Pizza, Target::Bottom).unwrap();
        assert_eq!(pizza.sources(), LayerMap::yoco(22).unwrap().sources());
        let mid = LayerMap::study(22, 3, Partition::Sandwich, Target::Middle).unwrap();
        assert_eq!(mid.source(1), 10);
        assert_eq!(mid.source(20), 10);
        assert_eq!(mid.source(21), 21);
        for p in [Partition::Pizza, Partition::Sandwich, Partition::Lasagna] {
            for t in [Target::Bottom, Target::Top, Target::Middle] {
                for k in 1..=8 {
                    let m = LayerMap::study(8, k, p, t).unwrap();
                    assert!(m.owns_kv(0), "{p:?}-{t:?}:{k}");
                    assert!(m.num_groups() <= k + 1, "{p:?}-{t:?}:{k} {m}");
                }
            }
        }
    }

    #[test]
    fn layer_types_round_trip_and_chains_resolve() {
        let m = LayerMap::from_layer_types("0s_1s_2_2_2").unwrap();
        assert_eq!(m.to_layer_types(), "0s_1s_2_2_2");
        assert_eq!(m.num_groups(), 3);
        assert_eq!(m.readers(2), &[2, 3, 4]);
        let chain = LayerMap::new(vec![0, 0, 1, 2]).unwrap();
        assert_eq!(chain.sources(), &[0, 0, 0, 0]);
    }

    #[test]
    fn serde_round_trips_json_and_toml() {
        let m = LayerMap::yoco(8).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<LayerMap>(&json).unwrap(), m);
        let toml_text = toml::to_string(&m).unwrap();
        assert_eq!(toml::from_str::<LayerMap>(&toml_text).unwrap(), m);
    }

    #[test]
    fn bad_maps_name_the_layer_and_rule() {
        assert_eq!(
            LayerMap::new(vec![0, 5]).unwrap_err(),
            Error::SourceOutOfRange {
                layer: 1,
                source_layer: 5,
                num_layers: 2
            }
        );
        assert!(matches!(
            LayerMap::new(vec![0, 2, 1]).unwrap_err(),
            Error::Cycle { layer: 1 }
        ));
        assert!(matches!(
            LayerMap::from_layer_types("0_x_1").unwrap_err(),
            Error::Parse { .. }
        ));
        let e = serde_json::from_str::<LayerMap>(r#"{"num_layers": 3, "kv_source": [0, 0]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("expected 3 layers"), "{e}");
        let e =
            serde_json::from_str::<LayerMap>(r#"{"num_layers": 1, "kv_source": [0], "extra": 1}"#)
                .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let mut pairs = BTreeMap::new();
        pairs.insert(2, 3);
        assert!(matches!(
            LayerMap::kvsharer(4, &pairs).unwrap_err(),
            Error::UpwardReference { layer: 2, .. }
        ));
        assert!(matches!(
            LayerMap::lckv(6, 1, 1)
                .unwrap()
                .require_downward("test")
                .unwrap_err(),
            Error::UpwardReference {
                layer: 1,
                source_layer: 4,
                ..
            }
        ));
        assert!(matches!(
            LayerMap::identity(3)
                .unwrap()
                .require_layers(4)
                .unwrap_err(),
            Error::WrongLayerCount {
                expected: 4,
                actual: 3,
                ..
            }
        ));
        assert!(LayerMap::preset("nonsense", 4).is_err());
        assert!(LayerMap::preset("cla", 4).is_err());
    }

    #[test]
    fn kvsharer_json_and_presets_by_name() {
        let m = LayerMap::from_kvsharer_json(6, r#"{"5": 1, "3": 0, "4": 3}"#).unwrap();
        assert_eq!(m.sources(), &[0, 1, 2, 0, 0, 1]);
        assert_eq!(m.num_groups(), 3);
        assert_eq!(
            LayerMap::preset("cla:2", 4).unwrap().sources(),
            &[0, 0, 2, 2]
        );
        assert_eq!(
            LayerMap::preset("sandwich-top:3", 22).unwrap(),
            LayerMap::lckv(22, 1, 1).unwrap()
        );
        assert_eq!(LayerMap::preset("0_0_2_2", 4).unwrap().num_groups(), 2);
    }
}
