//! [`LayerKvPolicy`]: the contract between an engine and layerkv, plus [`Policy`], the stock
//! implementation built by [`PolicyBuilder`] and stored as a policy file.
//!
//! A policy is a cross-layer sharing map ([`LayerMap`]) stacked with one [`Retention`] per KV
//! group, so the two reductions multiply: KVSharer at 30% shared layers + a 1k StreamingLLM
//! window keeps 70% of the groups, each holding at most ~1k tokens.
//!
//! Policy files are TOML or JSON with unknown fields rejected:
//! ```toml
//! name = "cla2+streaming"
//! [layer_map]
//! num_layers = 4
//! kv_source = [0, 0, 2, 2]
//! [retention.default]
//! kind = "sink_window"
//! sinks = 4
//! window = 1024
//! [retention.groups.2]      # overrides by owner layer
//! kind = "full"
//! ```

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::map::{GroupId, LayerMap};
use crate::retention::{pyramid_budgets, Budget, Retention, ScoreNeed};

/// What an engine asks of a KV policy. Implement it to plug in your own policy; the
/// [`crate::KvCache`] and the model runner only see this trait.
///
/// Contract: `layer_map()` is fixed for the policy's lifetime; `retention(g)` is valid for every
/// `g < layer_map().num_groups()`; `fingerprint()` changes whenever anything that changes the
/// cached KV contents changes (it keys prefix caching).
pub trait LayerKvPolicy: Send + Sync + std::fmt::Debug {
    /// Which layer's KV each layer reads.
    fn layer_map(&self) -> &LayerMap;

    /// How group `group` decides which slots stay.
    fn retention(&self, group: GroupId) -> &Retention;

    /// A stable 64-bit digest of everything that changes KV contents (map and retentions).
    fn fingerprint(&self) -> u64;

    /// The scores the engine must collect for `group` (derived from its retention).
    fn score_need(&self, group: GroupId) -> ScoreNeed {
        self.retention(group).score_need()
    }

    /// Whether each KV head of a group keeps its own tokens (kvpress's per-head presses): the
    /// engine then gives the cache one lane per KV head ([`crate::CacheConfig::lanes`]), each
    /// running the group's retention on its own scores and freeing its own pages. `false`: one
    /// set of tokens for all the heads of a group.
    fn per_head(&self) -> bool {
        false
    }

    /// AdaKV's budget split for a per-head policy: `Some(floor)` makes the lanes of a group
    /// share their budget ([`crate::Retention::select_joint`]), each keeping at least `floor`
    /// (0..=1) of its uniform share; `None` gives every lane the same budget.
    fn adaptive_floor(&self) -> Option<f64> {
        None
    }

    /// Whether AdaKV's split spans every KV head of every group instead of the heads of one
    /// group (KVzip's global threshold across layers and heads): one budget of
    /// `groups x lanes x budget` slots, so a layer whose heads attend widely keeps more than one
    /// whose heads are peaked. Needs [`Self::adaptive_floor`] and the same joint retention in
    /// every group.
    fn adaptive_across_layers(&self) -> bool {
        false
    }

    /// The retention of KV head `head` of `group` under a per-head policy: the group's, unless
    /// the policy gives that head a role of its own (DuoAttention: retrieval heads keep every
    /// token, the others sinks and a window).
    fn lane_retention(&self, group: GroupId, head: usize) -> &Retention {
        let _ = head;
        self.retention(group)
    }

    /// One more than the highest KV head a per-lane retention names (0 without any): a cache
    /// with fewer lanes refuses the policy.
    fn lanes_named(&self) -> usize {
        0
    }
}

/// Lanes per KV group for a model of `kv_heads` KV heads under `policy`
/// ([`crate::CacheConfig::lanes`]): one per KV head for a per-head policy, else 1.
pub fn lanes_per_group(policy: &dyn LayerKvPolicy, kv_heads: usize) -> usize {
    if policy.per_head() {
        kv_heads.max(1)
    } else {
        1
    }
}

/// Prompt tokens per probe step under `policy` with `lanes` lanes per group: the first lane
/// retention that probes ([`crate::Retention::probe_chunk`], KVzip), or `None` when none does.
/// What tells an engine to run probe steps, a scheduler to hold a prompt's last token back for
/// them, and a planner to make room for them.
pub fn probe_chunk(policy: &dyn LayerKvPolicy, lanes: usize) -> Option<usize> {
    lane_retentions(policy, lanes).find_map(|(_, _, r)| r.probe_chunk())
}

/// Whether some lane of `policy` (with `lanes` lanes per group when it is per-head)
/// compresses its prompt while it prefills ([`crate::Retention::compresses_in_prefill`]): the
/// engine then probes after every prefill step, and planners bound the prompt's steps by the
/// budget instead of the whole prompt.
pub fn compresses_in_prefill(policy: &dyn LayerKvPolicy, lanes: usize) -> bool {
    lane_retentions(policy, lanes).any(|(_, _, r)| r.compresses_in_prefill())
}

/// Every lane of `policy` with `lanes` lanes per group (at least 1), group by group, with its
/// retention ([`LayerKvPolicy::lane_retention`]).
pub(crate) fn lane_retentions(
    policy: &dyn LayerKvPolicy,
    lanes: usize,
) -> impl Iterator<Item = (GroupId, usize, &Retention)> + '_ {
    (0..policy.layer_map().num_groups())
        .flat_map(move |g| (0..lanes.max(1)).map(move |h| (g, h, policy.lane_retention(g, h))))
}

/// The stock policy: a layer map and a retention per group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFile", into = "PolicyFile")]
pub struct Policy {
    name: String,
    map: LayerMap,
    retention: Vec<Retention>,
    per_head: bool,
    adaptive_floor: Option<f64>,
    adaptive_across_layers: bool,
    /// Per-lane retentions, by (group, KV head).
    lanes: BTreeMap<(GroupId, usize), Retention>,
    fingerprint: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    name: String,
    layer_map: LayerMap,
    #[serde(default)]
    retention: RetentionFile,
    /// Retention per KV head (`LayerKvPolicy::per_head`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    per_head: bool,
    /// AdaKV's floor (`LayerKvPolicy::adaptive_floor`); implies `per_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adaptive_floor: Option<f64>,
    /// AdaKV's split across layers (`LayerKvPolicy::adaptive_across_layers`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    adaptive_across_layers: bool,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    #[serde(default)]
    default: Retention,
    /// Overrides keyed by owner layer (as a string, so TOML tables work).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    groups: BTreeMap<String, Retention>,
    /// Per-head overrides keyed `"LAYER.HEAD"` (owner layer, KV head); imply `per_head`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    lanes: BTreeMap<String, Retention>,
}

impl TryFrom<PolicyFile> for Policy {
    type Error = Error;
    fn try_from(file: PolicyFile) -> Result<Self> {
        let mut b = PolicyBuilder::new(file.layer_map)
            .name(file.name)
            .per_head(file.per_head);
        if let Some(floor) = file.adaptive_floor {
            b = b.adaptive(floor);
        }
        b = b.across_layers(file.adaptive_across_layers);
        b = b.retention(file.retention.default);
        for (key, r) in file.retention.groups {
            let layer: usize = key.trim().parse().map_err(|_| Error::Parse {
                format: "policy file",
                position: format!("retention.groups.{key}"),
                reason: "group keys are owner layer indices".into(),
            })?;
            b = b.group_retention(layer, r);
        }
        for (key, r) in file.retention.lanes {
            let parsed = key
                .split_once('.')
                .and_then(|(l, h)| Some((l.trim().parse().ok()?, h.trim().parse().ok()?)));
            let Some((layer, head)) = parsed else {
                return Err(Error::Parse {
                    format: "policy file",
                    position: format!("retention.lanes.{key}"),
                    reason: "lane keys are LAYER.HEAD (owner layer, KV head)".into(),
                });
            };
            b = b.lane_retention(layer, head, r);
        }
        b.build()
    }
}

impl From<Policy> for PolicyFile {
    fn from(p: Policy) -> Self {
        // The most common retention becomes the default; the rest are overrides.
        let mut counts: Vec<(usize, &Retention)> = Vec::new();
        for r in &p.retention {
            match counts.iter_mut().find(|(_, x)| *x == r) {
                Some((c, _)) => *c += 1,
                None => counts.push((1, r)),
            }
        }
        let default = counts
            .iter()
            .max_by_key(|(c, _)| *c)
            .map(|(_, r)| (*r).clone())
            .unwrap_or_default();
        let groups = p
            .retention
            .iter()
            .enumerate()
            .filter(|(_, r)| **r != default)
            .map(|(g, r)| (p.map.owner(g).to_string(), r.clone()))
            .collect();
        let lanes = p
            .lanes
            .iter()
            .map(|(&(g, h), r)| (format!("{}.{h}", p.map.owner(g)), r.clone()))
            .collect();
        PolicyFile {
            name: p.name,
            layer_map: p.map,
            retention: RetentionFile {
                default,
                groups,
                lanes,
            },
            per_head: p.per_head,
            adaptive_floor: p.adaptive_floor,
            adaptive_across_layers: p.adaptive_across_layers,
        }
    }
}

impl Policy {
    /// The unmodified model: every layer owns its KV, every group keeps every token.
    pub fn identity(num_layers: usize) -> Result<Self> {
        PolicyBuilder::new(LayerMap::identity(num_layers)?)
            .name("identity")
            .build()
    }

    /// A human-readable name (for reports).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads a policy file (`.toml` or `.json`, by extension; other extensions try both).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::PolicyFile(format!("{}: {e}", path.display())))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        Self::parse(&text, ext).map_err(|e| match e {
            Error::PolicyFile(msg) => Error::PolicyFile(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses policy text; `format` is `"toml"`, `"json"`, or anything else to try both.
    pub fn parse(text: &str, format: &str) -> Result<Self> {
        match format {
            "json" => serde_json::from_str(text).map_err(|e| Error::PolicyFile(e.to_string())),
            "toml" => toml::from_str(text).map_err(|e| Error::PolicyFile(e.to_string())),
            _ => serde_json::from_str(text)
                .or_else(|_| toml::from_str(text).map_err(|e| Error::PolicyFile(e.to_string()))),
        }
    }

    /// The policy as TOML text (an error for policies with custom retention rules).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::PolicyFile(format!("{}: {e}", self.name)))
    }

    /// The policy as pretty JSON text (an error for policies with custom retention rules).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::PolicyFile(format!("{}: {e}", self.name)))
    }

    /// Writes the policy to `path` (TOML unless the extension is `.json`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => self.to_json()?,
            _ => self.to_toml()?,
        };
        std::fs::write(path, text)
            .map_err(|e| Error::PolicyFile(format!("{}: {e}", path.display())))
    }
}

impl LayerKvPolicy for Policy {
    fn layer_map(&self) -> &LayerMap {
        &self.map
    }

    fn retention(&self, group: GroupId) -> &Retention {
        &self.retention[group]
    }

    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn per_head(&self) -> bool {
        self.per_head
    }

    fn adaptive_floor(&self) -> Option<f64> {
        self.adaptive_floor
    }

    fn adaptive_across_layers(&self) -> bool {
        self.adaptive_across_layers
    }

    fn lane_retention(&self, group: GroupId, head: usize) -> &Retention {
        self.lanes
            .get(&(group, head))
            .unwrap_or(&self.retention[group])
    }

    fn lanes_named(&self) -> usize {
        self.lanes.keys().map(|&(_, h)| h + 1).max().unwrap_or(0)
    }
}

/// Stacks a sharing map with retentions: a default for every group, overrides per owner layer,
/// or a PyramidKV schedule.
#[derive(Debug, Clone)]
pub struct PolicyBuilder {
    name: String,
    map: LayerMap,
    default: Retention,
    overrides: Vec<(usize, Retention)>,
    pyramid: Option<(usize, usize, usize, f64)>,
    per_head: bool,
    adaptive_floor: Option<f64>,
    adaptive_across_layers: bool,
    lanes: Vec<(usize, usize, Retention)>,
}

impl PolicyBuilder {
    /// Starts from a sharing map with `Full` retention everywhere.
    pub fn new(map: LayerMap) -> Self {
        Self {
            name: String::new(),
            map,
            default: Retention::Full,
            overrides: Vec::new(),
            pyramid: None,
            per_head: false,
            adaptive_floor: None,
            adaptive_across_layers: false,
            lanes: Vec::new(),
        }
    }

    /// Starts from `policy`: its name, map, every group's retention (PyramidKV's budgets
    /// included), per-head setting, AdaKV floor and head roles; building it unchanged gives the
    /// same policy.
    pub fn from_policy(policy: &Policy) -> Self {
        let map = policy.map.clone();
        Self {
            name: policy.name.clone(),
            default: Retention::Full,
            overrides: (0..map.num_groups())
                .map(|g| (map.owner(g), policy.retention[g].clone()))
                .collect(),
            pyramid: None,
            per_head: policy.per_head,
            adaptive_floor: policy.adaptive_floor,
            adaptive_across_layers: policy.adaptive_across_layers,
            lanes: policy
                .lanes
                .iter()
                .map(|(&(g, h), r)| (map.owner(g), h, r.clone()))
                .collect(),
            map,
        }
    }

    /// Names the policy.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The retention of every group without an override.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.default = retention;
        self
    }

    /// Overrides the retention of the group owned by `owner_layer`.
    pub fn group_retention(mut self, owner_layer: usize, retention: Retention) -> Self {
        self.overrides.push((owner_layer, retention));
        self
    }

    /// Retention per KV head ([`LayerKvPolicy::per_head`]): every KV head of a group keeps its
    /// own tokens under the group's retention and budget.
    pub fn per_head(mut self, per_head: bool) -> Self {
        self.per_head = per_head;
        self
    }

    /// Gives KV head `head` of the group owned by `owner_layer` its own retention (a head
    /// role); turns [`Self::per_head`] on.
    pub fn lane_retention(mut self, owner_layer: usize, head: usize, retention: Retention) -> Self {
        self.per_head = true;
        self.lanes.push((owner_layer, head, retention));
        self
    }

    /// AdaKV: retention per KV head with the lanes of a group sharing one budget, each keeping
    /// at least `floor` (0..=1; AdaKV uses 0.2) of its uniform share ([`Self::per_head`] on).
    pub fn adaptive(mut self, floor: f64) -> Self {
        self.per_head = true;
        self.adaptive_floor = Some(floor);
        self
    }

    /// AdaKV's split across layers ([`LayerKvPolicy::adaptive_across_layers`]): with
    /// [`Self::adaptive`], every KV head of every group shares one budget (KVzip's global
    /// threshold). `build` refuses it without a floor, with retentions that differ between
    /// groups or have no joint form (SnapKV, KVzip), or with head roles.
    pub fn across_layers(mut self, on: bool) -> Self {
        self.adaptive_across_layers = on;
        self
    }

    /// PyramidKV: SnapKV per group with budgets decreasing from the bottom group to the top
    /// (average `average` tokens, observation window `observe`, steepness `beta`, pooling `pool`).
    pub fn pyramid(mut self, average: usize, observe: usize, pool: usize, beta: f64) -> Self {
        self.pyramid = Some((average, observe, pool, beta));
        self
    }

    /// Validates everything and builds the policy.
    pub fn build(self) -> Result<Policy> {
        let n_groups = self.map.num_groups();
        let mut retention = vec![self.default.clone(); n_groups];
        if let Some((average, observe, pool, beta)) = self.pyramid {
            let budgets = pyramid_budgets(n_groups, average, observe, beta)?;
            for (r, b) in retention.iter_mut().zip(budgets) {
                *r = Retention::SnapKv {
                    observe,
                    budget: Budget::Tokens(b),
                    pool,
                };
            }
        }
        for (layer, r) in self.overrides {
            if layer >= self.map.num_layers() || !self.map.owns_kv(layer) {
                return Err(Error::NotAnOwner { layer });
            }
            retention[self.map.group_of(layer)] = r;
        }
        for r in &retention {
            r.validate()?;
        }
        if let Some(f) = self.adaptive_floor {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::PolicyFile(format!(
                    "adaptive_floor must be in [0, 1] (a fraction of each head's share), got {f}"
                )));
            }
        }
        if self.adaptive_across_layers {
            let joint = matches!(
                retention[0],
                Retention::SnapKv { .. } | Retention::KvZip { .. }
            );
            let why = if self.adaptive_floor.is_none() {
                Some("needs AdaKV's split (adaptive_floor)")
            } else if !joint {
                Some("needs a SnapKV or KVzip retention")
            } else if retention.iter().any(|r| *r != retention[0]) {
                Some("needs the same retention in every group")
            } else if !self.lanes.is_empty() {
                Some("does not combine with head roles")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::PolicyFile(format!(
                    "adaptive_across_layers {why} (one budget over every KV head of every group)"
                )));
            }
        }
        let name = if self.name.is_empty() {
            self.map.to_layer_types()
        } else {
            self.name
        };
        let mut lanes = BTreeMap::new();
        for (layer, head, r) in self.lanes {
            if layer >= self.map.num_layers() || !self.map.owns_kv(layer) {
                return Err(Error::NotAnOwner { layer });
            }
            r.validate()?;
            lanes.insert((self.map.group_of(layer), head), r);
        }
        let fingerprint = fingerprint(
            &self.map,
            &retention,
            self.per_head,
            self.adaptive_floor,
            self.adaptive_across_layers,
            &lanes,
        );
        Ok(Policy {
            name,
            map: self.map,
            retention,
            per_head: self.per_head,
            adaptive_floor: self.adaptive_floor,
            adaptive_across_layers: self.adaptive_across_layers,
            lanes,
            fingerprint,
        })
    }
}

/// FNV-1a over the canonical JSON of the map and retentions: stable across runs and builds
/// (unlike `DefaultHasher`), so prefix-cache keys can be compared between processes.
fn fingerprint(
    map: &LayerMap,
    retention: &[Retention],
    per_head: bool,
    adaptive_floor: Option<f64>,
    across_layers: bool,
    lanes: &BTreeMap<(GroupId, usize), Retention>,
) -> u64 {
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    serde_json::to_string(map)
        .expect("maps serialise")
        .hash(&mut h);
    for r in retention {
        // Custom rules are not serialisable: their name stands in for them.
        serde_json::to_string(r)
            .unwrap_or_else(|_| format!("custom:{r}"))
            .hash(&mut h);
    }
    if per_head {
        // Only when set, so per-group policies keep the fingerprints they had.
        "per_head".hash(&mut h);
    }
    if let Some(f) = adaptive_floor {
        f.to_bits().hash(&mut h);
    }
    if across_layers {
        "across_layers".hash(&mut h);
    }
    for (lane, r) in lanes {
        lane.hash(&mut h);
        serde_json::to_string(r)
            .unwrap_or_else(|_| format!("custom:{r}"))
            .hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacked() -> Policy {
        PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .name("cla2+streaming")
            .retention(Retention::streaming(64))
            .group_retention(2, Retention::Full)
            .build()
            .unwrap()
    }

    #[test]
    fn builder_stacks_map_and_retention() {
        let p = stacked();
        assert_eq!(p.layer_map().num_groups(), 2);
        assert_eq!(p.retention(0), &Retention::streaming(64));
        assert_eq!(p.retention(1), &Retention::Full);
        assert_ne!(p.fingerprint(), Policy::identity(4).unwrap().fingerprint());
    }

    #[test]
    fn files_round_trip_in_toml_and_json() {
        let p = stacked();
        let toml_text = p.to_toml().unwrap();
        assert_eq!(Policy::parse(&toml_text, "toml").unwrap(), p, "{toml_text}");
        assert_eq!(Policy::parse(&p.to_json().unwrap(), "json").unwrap(), p);
        assert_eq!(Policy::parse(&toml_text, "").unwrap(), p);
        let dir = std::env::temp_dir().join(format!("layerkv-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        p.save(&path).unwrap();
        assert_eq!(Policy::load(&path).unwrap(), p);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_policy_files_are_typed_errors() {
        let unknown = "name = \"x\"\nbogus = 1\n[layer_map]\nnum_layers = 2\nkv_source = [0, 0]\n";
        let e = Policy::parse(unknown, "toml").unwrap_err();
        assert!(
            matches!(&e, Error::PolicyFile(m) if m.contains("unknown field")),
            "{e}"
        );
        let not_owner = "[layer_map]\nnum_layers = 2\nkv_source = [0, 0]\n[retention.groups.1]\nkind = \"full\"\n";
        let e = Policy::parse(not_owner, "toml").unwrap_err();
        assert!(e.to_string().contains("layer 1 does not own KV"), "{e}");
        let zero = "[layer_map]\nnum_layers = 1\nkv_source = [0]\n[retention.default]\nkind = \"sink_window\"\nsinks = 0\nwindow = 0\n";
        assert!(Policy::parse(zero, "toml")
            .unwrap_err()
            .to_string()
            .contains("zero budget"));
        assert!(matches!(
            Policy::load("/nonexistent/p.toml").unwrap_err(),
            Error::PolicyFile(_)
        ));
    }

    #[test]
    fn pyramid_assigns_decreasing_snapkv_budgets() {
        let p = PolicyBuilder::new(LayerMap::identity(8).unwrap())
            .pyramid(128, 16, 5, 10.0)
            .build()
            .unwrap();
        let budgets: Vec<usize> = (0..8)
            .map(|g| match p.retention(g) {
                Retention::SnapKv {
                    budget: Budget::Tokens(b),
                    ..
                } => *b,
                r => panic!("{r}"),
            })
            .collect();
        assert!(budgets.windows(2).all(|w| w[0] >= w[1]), "{budgets:?}");
        assert_eq!(p.score_need(0).observe, 16);
    }
}
