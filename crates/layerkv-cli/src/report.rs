//! The comparison table (policy vs identity) printed by `demo` and `eval`, and its JSON/CSV forms.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// One policy's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Policy name.
    pub policy: String,
    /// KV groups / layers.
    pub groups: usize,
    /// Perplexity on the evaluation text.
    pub ppl: f64,
    /// Mean NLL (nats/token).
    pub nll: f64,
    /// Peak KV bytes of one evaluation sequence.
    pub kv_bytes: usize,
    /// Teacher-forced greedy agreement with identity (1.0 for identity).
    pub agreement: f64,
    /// Prefill tokens/s (batch 1).
    pub prefill_tps: f64,
    /// Decode tokens/s (batch 1).
    pub decode_tps: f64,
    /// Sequences that fit in the fixed KV budget.
    pub batch_at_budget: usize,
    /// Decode tokens/s with that batch.
    pub throughput_at_budget: f64,
}

/// Renders rows with every figure also as a ratio against the first row (the baseline).
pub fn table(rows: &[Row]) -> String {
    let base = &rows[0];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>6} {:>9} {:>8} {:>11} {:>7} {:>7} {:>12} {:>12} {:>7} {:>14}",
        "policy",
        "groups",
        "ppl",
        "x",
        "KV bytes",
        "x",
        "agree",
        "prefill t/s",
        "decode t/s",
        "batch",
        "tput@budget"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<34} {:>6} {:>9.3} {:>8.3} {:>11} {:>7.3} {:>7.3} {:>6.0} ({:>4.2}) {:>6.1} ({:>4.2}) {:>7} {:>7.1} ({:>4.2})",
            truncate(&r.policy, 34),
            r.groups,
            r.ppl,
            r.ppl / base.ppl,
            r.kv_bytes,
            r.kv_bytes as f64 / base.kv_bytes.max(1) as f64,
            r.agreement,
            r.prefill_tps,
            r.prefill_tps / base.prefill_tps.max(1e-9),
            r.decode_tps,
            r.decode_tps / base.decode_tps.max(1e-9),
            r.batch_at_budget,
            r.throughput_at_budget,
            r.throughput_at_budget / base.throughput_at_budget.max(1e-9),
        );
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}

/// Writes rows as pretty JSON.
pub fn write_json(path: &Path, rows: &[Row]) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(rows)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes rows as CSV.
pub fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut out = String::from(
        "policy,groups,ppl,nll,kv_bytes,agreement,prefill_tps,decode_tps,batch_at_budget,throughput_at_budget\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "\"{}\",{},{},{},{},{},{},{},{},{}",
            r.policy.replace('"', "\"\""),
            r.groups,
            r.ppl,
            r.nll,
            r.kv_bytes,
            r.agreement,
            r.prefill_tps,
            r.decode_tps,
            r.batch_at_budget,
            r.throughput_at_budget
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}
