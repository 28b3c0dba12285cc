//! Randomised invariants of KVSharer calibration through the public API: random models (layer
//! counts, K/V, a pseudo-random quality response to each map), random targets, orders and
//! rules. After every search: the map is downward with layer 0 owning its KV, `pairs` is the
//! map's sharing layers, every scored candidate changes exactly one layer of the map accepted
//! so far and no map is scored twice, the shared count never passes the target, and the
//! reported candidates are the returned ones.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use layerkv::calibrate::{
    calibrate, Acceptance, CalibrationConfig, CalibrationModel, Candidate, LayerKv, PairOrder,
    RunOutput, ShareTarget,
};
use layerkv::{LayerMap, Result};
use proptest::prelude::*;

const WIDTH: usize = 8;

/// K/V from a seed; the hidden state under a map is the reference plus noise whose size and
/// direction depend on a hash of the map, so acceptance is arbitrary but deterministic.
struct RandomModel {
    num_layers: usize,
    seed: u64,
    maps: Vec<LayerMap>,
}

fn hash(x: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

fn unit(x: u64) -> f32 {
    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

impl CalibrationModel for RandomModel {
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    fn reference_kv(&mut self, samples: &[Vec<u32>]) -> Result<Vec<LayerKv>> {
        let seq = samples[0].len();
        Ok((0..self.num_layers)
            .map(|l| {
                let gen = |which: u64| {
                    (0..2 * seq * 4)
                        .map(|i| unit(hash((self.seed, l, which, i))))
                        .collect()
                };
                LayerKv {
                    k: gen(0),
                    v: gen(1),
                    kv_heads: 2,
                    seq,
                    head_dim: 4,
                }
            })
            .collect())
    }

    fn run(&mut self, map: &LayerMap, samples: &[Vec<u32>]) -> Result<RunOutput> {
        self.maps.push(map.clone());
        let key = hash((self.seed, map.sources()));
        let amplitude = if map.num_groups() == map.num_layers() {
            0.0
        } else {
            unit(key) * 4.0 + 2.0
        };
        let hidden = (0..samples.len())
            .map(|s| {
                (0..WIDTH)
                    .map(|i| 1.0 + amplitude * unit(hash((key, s, i))))
                    .collect()
            })
            .collect();
        let nll = 2.0 + f64::from(amplitude.abs()) * 0.1;
        Ok(RunOutput { hidden, nll })
    }
}

fn order() -> impl Strategy<Value = PairOrder> {
    prop_oneof![
        Just(PairOrder::Dissimilar),
        Just(PairOrder::Similar),
        Just(PairOrder::Adjacent),
        any::<u64>().prop_map(|seed| PairOrder::Random { seed }),
    ]
}

fn acceptance() -> impl Strategy<Value = Acceptance> {
    prop_oneof![
        (-1.0f64..1.0).prop_map(|threshold| Acceptance::Cosine { threshold }),
        (0.0f64..0.3).prop_map(|max_increase| Acceptance::Nll { max_increase }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn calibration_invariants(
        num_layers in 1usize..10,
        seed in any::<u64>(),
        want in 0usize..10,
        order in order(),
        acceptance in acceptance(),
        num_samples in 1usize..4,
        len in 2usize..6,
    ) {
        let target = ShareTarget::Layers(want.min(num_layers - 1));
        let config = CalibrationConfig { target, order, acceptance, max_candidates: None };
        let samples: Vec<Vec<u32>> = (0..num_samples)
            .map(|s| (0..len).map(|t| (s * 7 + t) as u32).collect())
            .collect();
        let mut model = RandomModel { num_layers, seed, maps: Vec::new() };
        let mut reported: Vec<Candidate> = Vec::new();
        let cal = calibrate(&mut model, &samples, &config, &mut |c| reported.push(c.clone())).unwrap();

        prop_assert_eq!(&reported, &cal.candidates);
        prop_assert!(!cal.map.needs_upward());
        prop_assert!(cal.map.owns_kv(0));
        prop_assert!(cal.num_shared() <= cal.target_shared);
        prop_assert_eq!(cal.reached_target(), cal.num_shared() == cal.target_shared);
        prop_assert_eq!(cal.map.num_groups(), num_layers - cal.num_shared());
        for l in 0..num_layers {
            prop_assert_eq!(cal.pairs.get(&l).copied(), (!cal.map.owns_kv(l)).then(|| cal.map.source(l)));
        }
        // The first run is the reference; then one run per scored candidate.
        prop_assert_eq!(model.maps.len(), 1 + cal.candidates.len());
        prop_assert_eq!(&model.maps[0], &LayerMap::identity(num_layers).unwrap());
        let mut accepted = model.maps[0].clone();
        let mut shared = 0;
        let mut since_accept: Vec<&LayerMap> = Vec::new();
        for (map, c) in model.maps[1..].iter().zip(&cal.candidates) {
            prop_assert!(!since_accept.contains(&map), "{} scored twice", map);
            since_accept.push(map);
            let changed: Vec<usize> = (0..num_layers).filter(|&l| map.source(l) != accepted.source(l)).collect();
            prop_assert_eq!(changed, vec![c.layer]);
            prop_assert_eq!(map.source(c.layer), c.source);
            prop_assert!(c.source <= c.pair_source && c.pair_source < c.layer);
            if c.accepted {
                accepted = map.clone();
                shared += 1;
                since_accept.clear();
            }
            prop_assert_eq!(c.num_shared, shared);
        }
        prop_assert_eq!(&accepted, &cal.map);
    }
}
