//! Policy specs: the one text grammar every client parses ([`Policy::from_spec`]), so the
//! CLI, the mistral.rs adapter and the server accept the same `--policy` values.
//!
//! A spec is a policy file path, or `MAP[+RETENTION]`:
//! - MAP: any [`LayerMap::preset`] name (`identity`, `cla:2`, `mlkv:4`, `lckv:1:1`,
//!   `sandwich-top:3`, a `layer_types` string), `kvsharer:{"5":1,...}`, or a policy file, whose
//!   map is taken and whose retention is replaced (`calibrated.toml+stream:4:252`);
//! - RETENTION: `stream:SINKS:WINDOW`, `h2o:HEAVY:RECENT`, `snapkv:BUDGET[:OBSERVE[:POOL]]`,
//!   `pyramid:AVG[:OBSERVE[:POOL[:BETA]]]`, `kvzip:BUDGET[:CHUNK[:POOL]]` (query-agnostic,
//!   scored by probe steps the engine runs) or `kvzip-prefill:BUDGET[:CHUNK[:POOL]]` (KVzip
//!   compressing after every prefill chunk, so the prompt is never held whole);
//! - a final `+per-head` makes every KV head keep its own tokens
//!   ([`crate::LayerKvPolicy::per_head`]): `identity+snapkv:128+per-head`; `+adakv[:FLOOR]`
//!   also lets the heads of a group share their budget (AdaKV, floor 0.2 by default,
//!   [`crate::LayerKvPolicy::adaptive_floor`]), and `+adakv:FLOOR:layers` every head of every
//!   layer (KVzip's global threshold, [`crate::LayerKvPolicy::adaptive_across_layers`]).

use std::path::Path;

use crate::error::{Error, Result};
use crate::map::LayerMap;
use crate::policy::{LayerKvPolicy, Policy, PolicyBuilder};
use crate::retention::{Budget, Retention};

/// What the retention part of a spec accepts, for error messages.
const RETENTIONS: &str =
    "stream:S:W, h2o:H:R, snapkv:B[:O[:P]], pyramid:AVG[:O[:P[:BETA]]], kvzip:B[:CHUNK[:P]], \
     kvzip-prefill:B[:CHUNK[:P]]";

impl Policy {
    /// Parses a policy spec (see the module docs) for a model of `num_layers` layers. A file
    /// path is loaded as a policy file and checked against `num_layers`.
    pub fn from_spec(spec: &str, num_layers: usize) -> Result<Policy> {
        let policy = parse(spec, num_layers)?;
        policy.layer_map().require_layers(num_layers)?;
        Ok(policy)
    }
}

fn parse(spec: &str, num_layers: usize) -> Result<Policy> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(spec_error(spec, "empty spec"));
    }
    if Path::new(spec).is_file() {
        return Policy::load(spec);
    }
    if let Some((rest, floor)) = head_suffix(spec)? {
        let p = parse(rest, num_layers)?;
        // The groups' retentions as parsed (PyramidKV's budgets included).
        let mut builder = PolicyBuilder::from_policy(&p).name(spec).per_head(true);
        if let Some((f, layers)) = floor {
            builder = builder.adaptive(f).across_layers(layers);
        }
        return builder.build();
    }
    let (map_part, retention_part) = match spec.split_once('+') {
        Some((m, r)) => (m, Some(r)),
        None => (spec, None),
    };
    let mut name = spec.to_string();
    let map = match map_part.strip_prefix("kvsharer:") {
        Some(json) => LayerMap::from_kvsharer_json(num_layers, json)?,
        // A policy file's map with another retention (a calibrated map + stream:4:252), named
        // after the file's policy.
        None if Path::new(map_part).is_file() => {
            let file = Policy::load(map_part)?;
            name = format!("{}+{}", file.name(), retention_part.unwrap_or(""));
            file.layer_map().clone()
        }
        None => LayerMap::preset(map_part, num_layers)?,
    };
    let mut builder = PolicyBuilder::new(map).name(name);
    if let Some(r) = retention_part {
        if let Some(args) = r.strip_prefix("pyramid:") {
            // pyramid:AVERAGE[:OBSERVE[:POOL[:BETA]]]: SnapKV with PyramidKV's per-group budgets.
            let parts: Vec<&str> = args.split(':').collect();
            let average = number(r, &parts, 0, None)?;
            let beta = match parts.get(3) {
                Some(p) => p
                    .parse::<f64>()
                    .ok()
                    .filter(|b| b.is_finite())
                    .ok_or_else(|| spec_error(r, &format!("{p:?} is not a number")))?,
                None => 20.0,
            };
            builder = builder.pyramid(
                average,
                number(r, &parts, 1, Some(32))?,
                number(r, &parts, 2, Some(7))?,
                beta,
            );
        } else {
            builder = builder.retention(parse_retention(r)?);
        }
    }
    builder.build()
}

fn parse_retention(text: &str) -> Result<Retention> {
    let parts: Vec<&str> = text.split(':').collect();
    let args = &parts[1..];
    let num = |i, default| number(text, args, i, default);
    Ok(match parts[0] {
        "stream" => Retention::SinkWindow {
            sinks: num(0, Some(4))?,
            window: num(1, None)?,
        },
        "h2o" => Retention::HeavyHitter {
            heavy: Budget::Tokens(num(0, None)?),
            recent: Budget::Tokens(num(1, None)?),
        },
        "snapkv" => Retention::SnapKv {
            budget: Budget::Tokens(num(0, None)?),
            observe: num(1, Some(32))?,
            pool: num(2, Some(7))?,
        },
        "kvzip" | "kvzip-prefill" => Retention::KvZip {
            budget: Budget::Tokens(num(0, None)?),
            chunk: num(1, Some(crate::retention::KVZIP_CHUNK))?,
            pool: num(2, Some(1))?,
            prefill: parts[0] == "kvzip-prefill",
        },
        other => {
            return Err(spec_error(
                text,
                &format!("unknown retention {other:?} (one of {RETENTIONS})"),
            ))
        }
    })
}

/// Argument `i` of a retention (`default` when it is absent).
fn number(text: &str, args: &[&str], i: usize, default: Option<usize>) -> Result<usize> {
    match args.get(i) {
        Some(p) => p
            .parse()
            .map_err(|_| spec_error(text, &format!("{p:?} is not a whole number"))),
        None => default.ok_or_else(|| spec_error(text, &format!("argument {} is missing", i + 1))),
    }
}

/// A final `+per-head` (`None` floor) or `+adakv[:FLOOR]` (AdaKV, floor 0.2 by default): the
/// spec before it and the floor.
/// AdaKV's split of a spec suffix: its floor, and whether it spans the layers.
type Split = (f64, bool);

/// A per-head suffix: `+per-head` (no split), or `+adakv[:FLOOR[:layers]]` (AdaKV's split with
/// its floor, across the layers too with `:layers`).
fn head_suffix(spec: &str) -> Result<Option<(&str, Option<Split>)>> {
    if let Some(rest) = spec.strip_suffix("+per-head") {
        return Ok(Some((rest, None)));
    }
    let Some((rest, tail)) = spec.rsplit_once('+') else {
        return Ok(None);
    };
    let Some(args) = tail.strip_prefix("adakv") else {
        return Ok(None);
    };
    let (floor, layers) = match args.strip_prefix(':') {
        None if args.is_empty() => (0.2, false),
        Some(a) => {
            let (f, layers) = match a.split_once(':') {
                Some((f, "layers")) => (f, true),
                Some((_, other)) => {
                    return Err(spec_error(
                        tail,
                        &format!("{other:?} is not `layers` (AdaKV's split across layers)"),
                    ))
                }
                None => (a, false),
            };
            let f = f
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| spec_error(tail, &format!("{f:?} is not a floor in [0, 1]")))?;
            (f, layers)
        }
        None => return Ok(None),
    };
    Ok(Some((rest, Some((floor, layers)))))
}

fn spec_error(spec: &str, reason: &str) -> Error {
    Error::Parse {
        format: "policy spec",
        position: format!("{spec:?}"),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let p = Policy::from_spec("cla:2+stream:4:60", 4).unwrap();
        assert_eq!(p.layer_map().num_groups(), 2);
        assert_eq!(
            p.retention(0),
            &Retention::SinkWindow {
                sinks: 4,
                window: 60
            }
        );
        let p = Policy::from_spec(r#"kvsharer:{"3":1}"#, 4).unwrap();
        assert_eq!(p.layer_map().source(3), 1);
        assert!(Policy::from_spec("nonsense", 4).is_err());
        let e = Policy::from_spec("identity+stream:4", 4).unwrap_err();
        assert!(e.to_string().contains("argument 2 is missing"), "{e}");
        assert!(Policy::from_spec("identity+snapkv:64", 4).is_ok());
        let p = Policy::from_spec("identity+pyramid:96:16:5:4", 4).unwrap();
        assert!(matches!(p.retention(0), Retention::SnapKv { .. }));
        assert_ne!(p.retention(0), p.retention(3));
        let e = Policy::from_spec("identity+pyramid:x", 4).unwrap_err();
        assert!(e.to_string().contains("\"x\" is not a whole number"), "{e}");
        let e = Policy::from_spec("identity+lru:4", 4).unwrap_err();
        assert!(e.to_string().contains("unknown retention \"lru\""), "{e}");
        assert!(Policy::from_spec("", 4).is_err());
    }

    #[test]
    fn per_head_keeps_the_retentions_and_changes_the_fingerprint() {
        let group = Policy::from_spec("cla:2+pyramid:96:16:5:4", 4).unwrap();
        let head = Policy::from_spec("cla:2+pyramid:96:16:5:4+per-head", 4).unwrap();
        assert!(head.per_head() && !group.per_head());
        assert_eq!(head.layer_map(), group.layer_map());
        for g in 0..2 {
            assert_eq!(head.retention(g), group.retention(g));
        }
        assert_ne!(head.fingerprint(), group.fingerprint());
        // The flag survives a policy file; a file without it is per group.
        let text = head.to_toml().unwrap();
        assert!(text.contains("per_head = true"), "{text}");
        let back = Policy::parse(&text, "toml").unwrap();
        assert!(back.per_head());
        assert_eq!(back.fingerprint(), head.fingerprint());
        assert!(!Policy::parse(&group.to_toml().unwrap(), "toml")
            .unwrap()
            .per_head());
        assert!(Policy::from_spec("identity+per-head+stream:4:8", 4).is_err());
        let ada = Policy::from_spec("cla:2+snapkv:64+adakv", 4).unwrap();
        assert!(ada.per_head());
        assert_eq!(ada.adaptive_floor(), Some(0.2));
        let ada = Policy::from_spec("cla:2+snapkv:64+adakv:0.5", 4).unwrap();
        assert_eq!(ada.adaptive_floor(), Some(0.5));
        let back = Policy::parse(&ada.to_toml().unwrap(), "toml").unwrap();
        assert_eq!(back.adaptive_floor(), Some(0.5));
        assert_eq!(back.fingerprint(), ada.fingerprint());
        let e = Policy::from_spec("cla:2+snapkv:64+adakv:2", 4).unwrap_err();
        assert!(e.to_string().contains("not a floor"), "{e}");
        // AdaKV across layers (KVzip's global threshold): through a file, in the fingerprint,
        // refused where groups cannot share one budget.
        let global = Policy::from_spec("cla:2+kvzip:64+adakv:0:layers", 4).unwrap();
        assert!(global.adaptive_across_layers() && global.per_head());
        assert_eq!(global.adaptive_floor(), Some(0.0));
        let per_group = Policy::from_spec("cla:2+kvzip:64+adakv:0", 4).unwrap();
        assert!(!per_group.adaptive_across_layers());
        assert_ne!(global.fingerprint(), per_group.fingerprint());
        let text = global.to_toml().unwrap();
        assert!(text.contains("adaptive_across_layers = true"), "{text}");
        let back = Policy::parse(&text, "toml").unwrap();
        assert!(back.adaptive_across_layers());
        assert_eq!(back.fingerprint(), global.fingerprint());
        for (spec, why) in [
            ("cla:2+kvzip:64+adakv:0:heads", "not `layers`"),
            ("identity+stream:4:8+adakv:0:layers", "SnapKV or KVzip"),
            (
                "identity+pyramid:64+adakv:0:layers",
                "same retention in every group",
            ),
        ] {
            let e = Policy::from_spec(spec, 4).unwrap_err();
            assert!(e.to_string().contains(why), "{spec}: {e}");
        }
        let e = PolicyBuilder::new(LayerMap::identity(4).unwrap())
            .retention(Retention::streaming(8))
            .across_layers(true)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("adaptive_floor"), "{e}");
        // Head roles: per-lane retentions by owner layer and KV head, through a file.
        let roles = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .retention(Retention::streaming(32))
            .lane_retention(2, 1, Retention::Full)
            .build()
            .unwrap();
        assert!(roles.per_head());
        assert_eq!(roles.lane_retention(1, 1), &Retention::Full);
        assert_eq!(roles.lane_retention(1, 0), &Retention::streaming(32));
        assert_eq!(roles.lanes_named(), 2);
        let text = roles.to_toml().unwrap();
        assert!(text.contains("[retention.lanes.\"2.1\"]"), "{text}");
        let back = Policy::parse(&text, "toml").unwrap();
        assert_eq!(back.lane_retention(1, 1), &Retention::Full);
        assert_eq!(back.fingerprint(), roles.fingerprint());
        let same = PolicyBuilder::from_policy(&roles).build().unwrap();
        assert_eq!(same, roles);
        let bad = text.replace("\"2.1\"", "\"2-1\"");
        let e = Policy::parse(&bad, "toml").unwrap_err();
        assert!(e.to_string().contains("LAYER.HEAD"), "{e}");
        let e = PolicyBuilder::new(LayerMap::cla(4, 2).unwrap())
            .lane_retention(1, 0, Retention::Full)
            .build()
            .unwrap_err();
        assert_eq!(e, Error::NotAnOwner { layer: 1 });
    }

    #[test]
    fn a_policy_file_takes_another_retention() {
        let dir = std::env::temp_dir().join(format!("layerkv-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cal.toml");
        Policy::from_spec(r#"kvsharer:{"3":1,"2":0}+stream:2:8"#, 4)
            .unwrap()
            .save(&file)
            .unwrap();
        let path = file.display().to_string();
        let same = Policy::from_spec(&path, 4).unwrap();
        assert!(matches!(same.retention(0), Retention::SinkWindow { .. }));
        let p = Policy::from_spec(&format!("{path}+h2o:4:4"), 4).unwrap();
        assert_eq!(p.layer_map().sources(), &[0, 1, 0, 1]);
        assert!(matches!(p.retention(0), Retention::HeavyHitter { .. }));
        assert_eq!(p.name(), format!("{}+h2o:4:4", same.name()));
        // A file for another layer count is refused with the counts.
        let e = Policy::from_spec(&path, 6).unwrap_err();
        assert!(matches!(e, Error::WrongLayerCount { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
