//! Policies named on the command line: a policy file path, or `MAP[+RETENTION]` where MAP is any
//! [`LayerMap::preset`] name (`identity`, `cla:2`, `mlkv:4`, `lckv:1:1`, `sandwich-top:3`, a
//! `layer_types` string) or `kvsharer:{"5":1,...}`, and RETENTION is `stream:SINKS:WINDOW`,
//! `h2o:HEAVY:RECENT`, `snapkv:BUDGET[:OBSERVE[:POOL]]` or `pyramid:AVG[:OBSERVE[:POOL[:BETA]]]`.
//! MAP can also be a policy file: `calibrated.toml+stream:4:252` is that file's map with the
//! retention of the spec (the file's own retention is dropped).

use std::path::Path;

use anyhow::{bail, Context, Result};
use layerkv::{Budget, LayerKvPolicy, LayerMap, Policy, PolicyBuilder, Retention};

/// Parses one policy spec for a model of `num_layers` layers.
pub fn parse(spec: &str, num_layers: usize) -> Result<Policy> {
    let path = Path::new(spec);
    if path.is_file() {
        return Policy::load(path).with_context(|| format!("policy file {spec}"));
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
            let file = Policy::load(Path::new(map_part))
                .with_context(|| format!("policy file {map_part}"))?;
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
            let num = |i: usize, default: f64| -> Result<f64> {
                parts.get(i).map_or(Ok(default), |p| {
                    p.parse()
                        .with_context(|| format!("{r:?}: {p:?} is not a number"))
                })
            };
            let average = num(0, f64::NAN)?;
            anyhow::ensure!(average.is_finite(), "{r:?}: the average budget is missing");
            builder = builder.pyramid(
                average as usize,
                num(1, 32.0)? as usize,
                num(2, 7.0)? as usize,
                num(3, 20.0)?,
            );
        } else {
            builder = builder.retention(parse_retention(r)?);
        }
    }
    Ok(builder.build()?)
}

fn parse_retention(text: &str) -> Result<Retention> {
    let parts: Vec<&str> = text.split(':').collect();
    let num = |i: usize, default: Option<usize>| -> Result<usize> {
        match parts.get(i) {
            Some(p) => p
                .parse()
                .with_context(|| format!("{text:?}: {p:?} is not a number")),
            None => default.with_context(|| format!("{text:?}: argument {i} is missing")),
        }
    };
    Ok(match parts[0] {
        "stream" => Retention::SinkWindow {
            sinks: num(1, Some(4))?,
            window: num(2, None)?,
        },
        "h2o" => Retention::HeavyHitter {
            heavy: Budget::Tokens(num(1, None)?),
            recent: Budget::Tokens(num(2, None)?),
        },
        "snapkv" => Retention::SnapKv {
            budget: Budget::Tokens(num(1, None)?),
            observe: num(2, Some(32))?,
            pool: num(3, Some(7))?,
        },
        other => bail!(
            "unknown retention {other:?} (stream:S:W, h2o:H:R, snapkv:B[:O[:P]], pyramid:AVG[:O[:P[:BETA]]])"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let p = parse("cla:2+stream:4:60", 4).unwrap();
        assert_eq!(p.layer_map().num_groups(), 2);
        assert_eq!(
            p.retention(0),
            &Retention::SinkWindow {
                sinks: 4,
                window: 60
            }
        );
        let p = parse(r#"kvsharer:{"3":1}"#, 4).unwrap();
        assert_eq!(p.layer_map().source(3), 1);
        assert!(parse("nonsense", 4).is_err());
        assert!(parse("identity+stream:4", 4).is_err());
        assert!(parse("identity+snapkv:64", 4).is_ok());
        let p = parse("identity+pyramid:96:16:5:4", 4).unwrap();
        assert!(matches!(p.retention(0), Retention::SnapKv { .. }));
        assert_ne!(p.retention(0), p.retention(3));
        assert!(parse("identity+pyramid:x", 4).is_err());
    }

    #[test]
    fn a_policy_file_takes_another_retention() {
        let dir = std::env::temp_dir().join(format!("layerkv-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cal.toml");
        parse(r#"kvsharer:{"3":1,"2":0}+stream:2:8"#, 4)
            .unwrap()
            .save(&file)
            .unwrap();
        let same_name = |f: &Path| {
            parse(&f.display().to_string(), 4)
                .unwrap()
                .name()
                .to_string()
        };
        let spec = format!("{}+h2o:4:4", file.display());
        let p = parse(&spec, 4).unwrap();
        assert_eq!(p.layer_map().sources(), &[0, 1, 0, 1]);
        assert!(matches!(p.retention(0), Retention::HeavyHitter { .. }));
        assert_eq!(p.name(), format!("{}+h2o:4:4", same_name(&file)));
        let same = parse(&file.display().to_string(), 4).unwrap();
        assert!(matches!(same.retention(0), Retention::SinkWindow { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
