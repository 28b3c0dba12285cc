//! `/metrics` in Prometheus' text format: the engine's gauges and counters
//! ([`layerkv_model::batch::BatchStats`]: queues, preemptions, pages, KV bytes under the policy
//! against identity's for the same sequences, tokens) and the latency histograms the request
//! handlers observe (time to first token, time per output token, end to end).

use std::fmt::Write;
use std::sync::Mutex;

use layerkv_model::batch::BatchStats;

/// Upper bounds (seconds) of the latency buckets: 1 ms to 60 s.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Adds one observation (seconds).
    pub fn observe(&mut self, seconds: f64) {
        for (c, &le) in self.counts.iter_mut().zip(&BUCKETS) {
            if seconds <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, le) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What the handlers observe.
#[derive(Debug, Default)]
pub struct Latencies {
    inner: Mutex<Observed>,
}

#[derive(Debug, Default, Clone)]
struct Observed {
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    requests_ok: u64,
    requests_error: u64,
}

impl Latencies {
    /// A request that generated tokens ended: its time to first token, its mean time per
    /// output token after the first (when it made more than one), its end-to-end latency.
    pub fn finished(&self, ttft: Option<f64>, tpot: Option<f64>, e2e: f64) {
        let mut o = self.inner.lock().expect("no panics while locked");
        if let Some(t) = ttft {
            o.ttft.observe(t);
        }
        if let Some(t) = tpot {
            o.tpot.observe(t);
        }
        o.e2e.observe(e2e);
        o.requests_ok += 1;
    }

    /// A request was refused or failed.
    pub fn error(&self) {
        self.inner
            .lock()
            .expect("no panics while locked")
            .requests_error += 1;
    }

    /// The time-to-first-token histogram now.
    pub fn ttft(&self) -> Histogram {
        self.inner
            .lock()
            .expect("no panics while locked")
            .ttft
            .clone()
    }
}

/// The whole `/metrics` page.
pub fn render(stats: &BatchStats, latencies: &Latencies, policy: &str, model: &str) -> String {
    let o = latencies
        .inner
        .lock()
        .expect("no panics while locked")
        .clone();
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP layerkv_info The served model and its KV policy.\n# TYPE layerkv_info gauge\n\
         layerkv_info{{model=\"{}\",policy=\"{}\"}} 1",
        escape(model),
        escape(policy)
    );
    let gauges: [(&str, &str, f64); 11] = [
        (
            "layerkv_requests_running",
            "Requests holding KV pages.",
            stats.running as f64,
        ),
        (
            "layerkv_requests_waiting",
            "Requests waiting for admission.",
            stats.waiting as f64,
        ),
        (
            "layerkv_requests_probing",
            "Running requests whose prompt's KVzip probe steps are still to run (not \
             scheduled until they ran).",
            stats.probing as f64,
        ),
        (
            "layerkv_kv_pages_total",
            "Pages in the KV pool.",
            stats.pages_total as f64,
        ),
        (
            "layerkv_kv_pages_used",
            "KV pages in use.",
            stats.pages_used as f64,
        ),
        (
            "layerkv_kv_pages_free",
            "KV pages free.",
            stats.pages_total.saturating_sub(stats.pages_used) as f64,
        ),
        (
            "layerkv_kv_pages_peak",
            "The most KV pages in use at any moment since start (high-water mark).",
            stats.pages_peak as f64,
        ),
        (
            "layerkv_kv_pages_planned",
            "KV pages admission plans for the running requests: each one's peak until its \
             prompt is done, then what it holds from there on.",
            stats.pages_planned as f64,
        ),
        (
            "layerkv_kv_bytes",
            "KV bytes the running requests hold under the policy.",
            stats.kv_bytes as f64,
        ),
        (
            "layerkv_kv_identity_bytes",
            "KV bytes the identity policy would hold for the same requests' tokens.",
            stats.identity_kv_bytes as f64,
        ),
        (
            "layerkv_kv_page_bytes",
            "Bytes of one KV page.",
            stats.page_bytes as f64,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let counters: [(&str, &str, u64); 6] = [
        (
            "layerkv_preemptions_total",
            "Requests preempted by recompute.",
            stats.preemptions,
        ),
        (
            "layerkv_prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            stats.prompt_tokens,
        ),
        (
            "layerkv_generation_tokens_total",
            "Tokens generated.",
            stats.generated_tokens,
        ),
        (
            "layerkv_engine_steps_total",
            "Engine steps run.",
            stats.steps,
        ),
        (
            "layerkv_requests_success_total",
            "Requests answered.",
            o.requests_ok,
        ),
        (
            "layerkv_requests_error_total",
            "Requests refused or failed.",
            o.requests_error,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let name = "layerkv_requests_finished_total";
    let _ = writeln!(
        out,
        "# HELP {name} Requests ended in the engine, by reason.\n# TYPE {name} counter"
    );
    for (reason, v) in [
        ("stop", stats.finished_stop),
        ("length", stats.finished_length),
        ("cancelled", stats.cancelled),
        ("failed", stats.failed),
    ] {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {v}");
    }
    o.ttft.render(
        &mut out,
        "layerkv_time_to_first_token_seconds",
        "Time from receiving a request to its first generated token.",
    );
    o.tpot.render(
        &mut out,
        "layerkv_time_per_output_token_seconds",
        "Mean time between a request's output tokens after the first.",
    );
    o.e2e.render(
        &mut out,
        "layerkv_e2e_request_latency_seconds",
        "Time from receiving a request to its last token.",
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Reads one sample's value (`name` or `name{labels}`) from a `/metrics` page.
pub fn read_sample(page: &str, name: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_the_page_parses() {
        let l = Latencies::default();
        l.finished(Some(0.003), Some(0.02), 0.4);
        l.finished(Some(0.3), None, 3.0);
        l.error();
        let stats = BatchStats {
            pages_total: 10,
            pages_used: 3,
            ..BatchStats::default()
        };
        let page = render(&stats, &l, "identity+stream:4:60", "m");
        let ttft = "layerkv_time_to_first_token_seconds";
        assert_eq!(
            read_sample(&page, &format!("{ttft}_bucket{{le=\"0.0025\"}}")),
            Some(0.0)
        );
        assert_eq!(
            read_sample(&page, &format!("{ttft}_bucket{{le=\"0.005\"}}")),
            Some(1.0)
        );
        assert_eq!(
            read_sample(&page, &format!("{ttft}_bucket{{le=\"+Inf\"}}")),
            Some(2.0)
        );
        assert_eq!(
            read_sample(&page, "layerkv_time_per_output_token_seconds_count"),
            Some(1.0)
        );
        assert_eq!(read_sample(&page, "layerkv_kv_pages_free"), Some(7.0));
        assert_eq!(
            read_sample(&page, "layerkv_requests_error_total"),
            Some(1.0)
        );
        assert!(page.contains("policy=\"identity+stream:4:60\""));
    }
}
