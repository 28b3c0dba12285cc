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
    /// Decode tokens/s with that batch (0 when nothing fits).
    pub throughput_at_budget: f64,
    /// The fixed KV budget of the throughput column, in bytes.
    pub budget_bytes: usize,
    /// KV bytes one sequence of the throughput column needs at most under this policy.
    pub sequence_bytes: usize,
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
        // Nothing fits: say so instead of a meaningless `0.0 (0.00)`; the note below the
        // table gives the budget that would fit one sequence.
        let tput = if r.batch_at_budget == 0 {
            format!("{:>14}", "none fits")
        } else {
            format!(
                "{:>7.1} ({:>4.2})",
                r.throughput_at_budget,
                r.throughput_at_budget / base.throughput_at_budget.max(1e-9)
            )
        };
        let _ = writeln!(
            out,
            "{:<34} {:>6} {:>9.3} {:>8.3} {:>11} {:>7.3} {:>7.3} {:>6.0} ({:>4.2}) {:>6.1} ({:>4.2}) {:>7} {tput}",
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
        );
    }
    for r in rows.iter().filter(|r| r.batch_at_budget == 0) {
        let _ = writeln!(
            out,
            "{}: no sequence fits the throughput budget of {} bytes: one needs {} bytes \
             (--budget-seqs {} would fit one)",
            r.policy,
            r.budget_bytes,
            r.sequence_bytes,
            r.sequence_bytes.div_ceil(base.sequence_bytes.max(1)).max(1),
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

/// `s` in at most `n` characters, cut at the start (`…` then its end): for stacked policy names,
/// whose retention (the part that tells rows apart) comes last.
pub fn truncate_start(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        std::iter::once('…')
            .chain(s.chars().skip(count - (n - 1)))
            .collect()
    }
}

/// Writes rows as pretty JSON (`-`: to stdout).
pub fn write_json(path: &Path, rows: &[Row]) -> Result<()> {
    let text = serde_json::to_string_pretty(rows)?;
    if path == Path::new("-") {
        println!("{text}");
        return Ok(());
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes rows as CSV.
pub fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut out = String::from(
        "policy,groups,ppl,nll,kv_bytes,agreement,prefill_tps,decode_tps,batch_at_budget,throughput_at_budget,budget_bytes,sequence_bytes\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "\"{}\",{},{},{},{},{},{},{},{},{},{},{}",
            r.policy.replace('"', "\"\""),
            r.groups,
            r.ppl,
            r.nll,
            r.kv_bytes,
            r.agreement,
            r.prefill_tps,
            r.decode_tps,
            r.batch_at_budget,
            r.throughput_at_budget,
            r.budget_bytes,
            r.sequence_bytes
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, batch: usize, sequence_bytes: usize) -> Row {
        Row {
            policy: policy.into(),
            groups: 4,
            ppl: 10.0,
            nll: 2.3,
            kv_bytes: 1000,
            agreement: 1.0,
            prefill_tps: 100.0,
            decode_tps: 10.0,
            batch_at_budget: batch,
            throughput_at_budget: if batch == 0 { 0.0 } else { 40.0 },
            budget_bytes: 4000,
            sequence_bytes,
        }
    }

    /// `truncate` (cut at the end) would give `kvsharer-similar-nl…`, which this rejects.
    #[test]
    fn truncate_start_keeps_the_end() {
        let name = "kvsharer-similar-nll0.1-4of30+stream:4:252";
        assert_eq!(truncate_start(name, 20), "…-4of30+stream:4:252");
        assert_eq!(truncate_start(name, 20).chars().count(), 20);
        assert_eq!(truncate_start("identity", 20), "identity");
    }

    #[test]
    fn a_budget_nothing_fits_is_said_plainly() {
        let t = table(&[row("identity", 4, 1000), row("snapkv", 0, 5500)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].ends_with("40.0 (1.00)"), "{t}");
        assert!(lines[2].ends_with("0      none fits"), "{t}");
        assert!(!lines[2].contains("0.0 (0.00)"), "{t}");
        assert_eq!(
            lines[3],
            "snapkv: no sequence fits the throughput budget of 4000 bytes: one needs 5500 bytes \
             (--budget-seqs 6 would fit one)"
        );
        assert_eq!(lines.len(), 4);
    }
}
