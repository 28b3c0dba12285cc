//! `layerkv needle` as a user runs it, on a tiny random llama written by `layerkv-testkit`
//! (its answers are noise; what is checked is the harness): two policies, both modes, a small
//! grid; the table lists identity first, every accuracy lies in [0, 1], identity's ratio to
//! itself is 1 (or `-` when it found nothing), the JSON parses and holds one record per sample,
//! policy and mode, and a heatmap PNG is written per policy and mode.
//!
//! Shown to fail: dropping the identity run that `needle` adds when it is not named (no
//! `[identity]` progress line, no identity rows).

use std::path::Path;
use std::process::Command;

use layerkv_testkit::{scratch, TinyModel};

/// Raises the tiny model's context to 2048 tokens: its byte-level tokenizer spends a token per
/// byte, and the preamble, a multi-query question and the template alone take ~400.
fn long_context(dir: &Path) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["max_position_embeddings"] = 2048.into();
    std::fs::write(&path, c.to_string()).unwrap();
}

fn haystack(dir: &Path) -> std::path::PathBuf {
    let text: String = (0..400)
        .map(|i| format!("Entry {i}: the hacker wrote code until the sun came up. "))
        .collect();
    let path = dir.join("haystack.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn needle_reports_accuracy_per_policy_task_and_mode() {
    let dir = scratch("cli-needle");
    let model = TinyModel::llama(3).write(&dir.join("model"));
    long_context(&model);
    let text = haystack(&dir);
    let json = dir.join("needle.json");
    let plots = dir.join("plots");
    let out = Command::new(env!("CARGO_BIN_EXE_layerkv"))
        .args(["needle", "--model"])
        .arg(&model)
        .args([
            "--policy",
            "identity+stream:4:28",
            "--task",
            "passkey,multiquery",
        ])
        .args([
            "--lengths",
            "96,160",
            "--depths",
            "0.2,0.8",
            "--samples",
            "1",
        ])
        .args(["--mode", "both", "--seed", "4", "--chunk", "32", "--text"])
        .arg(&text)
        .arg("--json")
        .arg(&json)
        .arg("--plot-dir")
        .arg(&plots)
        .env("LAYERKV_HOME", &dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("[identity] 1/8 passkey len 96 depth 0.2 #0 aware"),
        "{stderr}"
    );

    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("policy"), "{stdout}");
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .take_while(|l| !l.starts_with("accuracy:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    // 2 policies x 2 tasks x 2 modes, identity first.
    assert_eq!(rows.len(), 8, "{stdout}");
    assert!(rows[..4].iter().all(|r| r[0] == "identity"), "{stdout}");
    assert!(
        rows[4..].iter().all(|r| r[0] == "identity+stream:4:28"),
        "{stdout}"
    );
    for r in &rows {
        assert_eq!(r.len(), 8, "{r:?}");
        assert!(["passkey", "multiquery"].contains(&r[1]), "{r:?}");
        assert!(["aware", "agnostic"].contains(&r[2]), "{r:?}");
        assert!(r[3].ends_with("/4"), "4 samples per task and mode: {r:?}");
        let acc: f64 = r[4].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r:?}");
        if r[0] == "identity" {
            assert!(r[5] == "-" || r[5] == "1.00", "{r:?}");
            assert_eq!(r[7], "1.000", "{r:?}");
        } else {
            // A 32-token window holds less than identity's 160-token contexts at their peak.
            let peak: f64 = r[7].parse().unwrap();
            assert!(peak > 0.0 && peak < 1.0, "{r:?}");
        }
        assert!(r[6].parse::<usize>().unwrap() > 0, "{r:?}");
    }
    assert!(stdout.contains("accuracy: exact match"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = report["records"].as_array().unwrap();
    // 2 tasks x 2 lengths x 2 depths x 1 sample, under 2 policies, in 2 modes.
    assert_eq!(records.len(), 32);
    for r in records {
        let correct = r["correct"].as_bool().unwrap();
        let recall = r["recall"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&recall));
        assert!(!correct || recall == 1.0, "{r}");
    }
    let table = report["rows"].as_array().unwrap();
    assert_eq!(table.len(), 8);
    for row in table {
        let acc = row["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{row}");
        let cell = records
            .iter()
            .filter(|r| r["policy"] == row["policy"] && r["task"] == row["task"])
            .filter(|r| r["mode"] == row["mode"])
            .collect::<Vec<_>>();
        let right = cell.iter().filter(|r| r["correct"] == true).count();
        assert_eq!(row["correct"].as_u64().unwrap() as usize, right, "{row}");
        let peak = cell
            .iter()
            .map(|r| r["peak_kv_bytes"].as_u64().unwrap())
            .max();
        assert_eq!(row["peak_kv_bytes"].as_u64(), peak, "{row}");
        assert_eq!(
            row["samples"].as_u64().unwrap() as usize,
            cell.len(),
            "{row}"
        );
    }
    for name in [
        "needle-identity-aware.png",
        "needle-identity-agnostic.png",
        "needle-identity_stream_4_28-aware.png",
        "needle-identity_stream_4_28-agnostic.png",
    ] {
        let png = std::fs::read(plots.join(name)).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}");
    }
}

/// KVzip end to end through the CLI: the session sets the chat template's probe turn, the
/// engine probes and compresses each context once, and the query-agnostic questions then find
/// the context held at the budget (the first question's turn holds at most the budget, plus
/// the closing tokens appended after the compression).
#[test]
fn needle_runs_kvzip_query_agnostic() {
    let dir = scratch("cli-needle-kvzip");
    let model = TinyModel::llama(5).write(&dir.join("model"));
    long_context(&model);
    let text = haystack(&dir);
    let json = dir.join("needle.json");
    let out = Command::new(env!("CARGO_BIN_EXE_layerkv"))
        .args(["needle", "--model"])
        .arg(&model)
        .args(["--policy", "identity+kvzip:40:16", "--task", "passkey"])
        .args(["--lengths", "128", "--depths", "0.5", "--samples", "1"])
        .args(["--mode", "both", "--seed", "2", "--text"])
        .arg(&text)
        .arg("--json")
        .arg(&json)
        .env("LAYERKV_HOME", &dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = report["records"].as_array().unwrap();
    let agnostic: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["policy"] == "identity+kvzip:40:16" && r["mode"] == "agnostic")
        .collect();
    assert_eq!(agnostic.len(), 1, "{report}");
    let held = agnostic[0]["held_tokens"][0].as_u64().unwrap();
    let identity_held = records
        .iter()
        .find(|r| r["policy"] == "identity" && r["mode"] == "agnostic")
        .unwrap()["held_tokens"][0]
        .as_u64()
        .unwrap();
    assert!(identity_held > 128, "{identity_held}");
    assert!(held <= 40, "compressed to its budget: held {held}");
}

/// `--policy SPEC@TYPES` runs that policy in its own KV page types beside identity's f32 pages:
/// on heads of 32 values a Q8_0 row is 34 bytes against f32's 128, so the same contexts peak at
/// 34/128 of identity's bytes. Shown to fail with the session built in `--kv-dtype` pages
/// whatever the suffix (the ratio was 1.000).
#[test]
fn needle_runs_a_policy_in_its_own_page_types() {
    let dir = scratch("cli-needle-types");
    let model = TinyModel {
        hidden: 128,
        ..TinyModel::llama(3)
    }
    .write(&dir.join("model"));
    long_context(&model);
    let text = haystack(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_layerkv"))
        .args(["needle", "--model"])
        .arg(&model)
        .args(["--policy", "identity@q8_0", "--task", "passkey"])
        .args(["--lengths", "96", "--depths", "0.5", "--samples", "1"])
        .args(["--mode", "aware", "--text"])
        .arg(&text)
        .env("LAYERKV_HOME", &dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("accuracy:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert_eq!((rows[0][0], rows[1][0]), ("identity", "identity@q8_0"));
    assert_eq!(rows[1][7], format!("{:.3}", 34.0 / 128.0), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `layerkv needle` under KVzip (per head, AdaKV across layers) on the tiny model, step
/// by step or with `--layer-major`, and returns the JSON records of the KVzip policy.
fn kvzip_records(
    dir: &Path,
    model: &Path,
    text: &Path,
    layer_major: bool,
) -> Vec<serde_json::Value> {
    let json = dir.join(format!("needle-{layer_major}.json"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_layerkv"));
    cmd.args(["needle", "--model"])
        .arg(model)
        .args(["--policy", "identity+kvzip:48+adakv:0.5:layers"])
        .args([
            "--task",
            "passkey",
            "--lengths",
            "160",
            "--depths",
            "0.3,0.7",
        ])
        .args([
            "--samples",
            "1",
            "--mode",
            "both",
            "--seed",
            "5",
            "--chunk",
            "32",
        ])
        .arg("--text")
        .arg(text)
        .arg("--json")
        .arg(&json);
    if layer_major {
        cmd.arg("--layer-major");
    }
    let out = cmd
        .env("LAYERKV_HOME", dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr:\n{stderr}");
    assert_eq!(
        stderr.contains("prefills its prompts layer-major"),
        layer_major,
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    report["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["policy"] != "identity")
        .cloned()
        .collect()
}

/// `--layer-major` gives KVzip's answers and held tokens of the step-by-step run, sample by
/// sample and mode by mode, at a lower measured peak (scratch pages included): the step path
/// holds each whole prompt in every layer, layer-major one layer's.
#[test]
fn needle_layer_major_answers_as_step_by_step_at_a_lower_peak() {
    let dir = scratch("cli-needle-layer-major");
    let model = TinyModel::llama(3).write(&dir.join("model"));
    long_context(&model);
    let text = haystack(&dir);
    let steps = kvzip_records(&dir, &model, &text, false);
    let layers = kvzip_records(&dir, &model, &text, true);
    assert_eq!(steps.len(), 4);
    assert_eq!(layers.len(), 4);
    for (a, b) in steps.iter().zip(&layers) {
        assert_eq!(a["answers"], b["answers"], "{a}\n{b}");
        assert_eq!(a["held_tokens"], b["held_tokens"], "{a}\n{b}");
        let (pa, pb) = (
            a["peak_kv_bytes"].as_u64().unwrap(),
            b["peak_kv_bytes"].as_u64().unwrap(),
        );
        assert!(
            pb > 0 && pb < pa,
            "layer-major peak {pb}, step by step {pa}"
        );
    }
}
