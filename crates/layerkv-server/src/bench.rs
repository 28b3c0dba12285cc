//! The load benchmark (`layerkv bench-serve`): requests with Poisson arrivals against any
//! OpenAI-compatible `/v1/completions`, streamed, measuring what `vllm bench serve` measures:
//! TTFT, TPOT (mean time per output token after the first, per request), ITL (every gap
//! between streamed chunks), end-to-end latency (mean, p50, p99), request and output-token
//! throughput, and errors. Against a layerkv server it also samples `/metrics` during the run:
//! the peak of running requests and the preemptions.
//!
//! Prompts are slices of a text at seeded offsets, about `prompt_tokens` tokens long (by
//! `chars_per_token`); the prompt tokens the server counted come back in `usage` and are
//! reported. Requests ask for exactly `max_tokens` tokens (`ignore_eos`, greedy), so every
//! server generates the same amount.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use layerkv::SplitMix64;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

use crate::metrics::read_sample;

/// What to send.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Base URL of the server (`http://127.0.0.1:8080`).
    pub url: String,
    /// `model` of each request (`None`: the server's first model).
    pub model: Option<String>,
    /// Mean arrivals per second (Poisson); `None` sends every request at once.
    pub rate: Option<f64>,
    /// Requests to send.
    pub requests: usize,
    /// Requests in flight at most.
    pub max_concurrency: usize,
    /// Approximate prompt length in tokens.
    pub prompt_tokens: usize,
    /// Characters per token of the server's tokenizer, to cut prompts.
    pub chars_per_token: f64,
    /// Tokens each request generates.
    pub max_tokens: usize,
    /// The text prompts are cut from.
    pub text: String,
    /// Seed of the arrivals and the prompt offsets.
    pub seed: u64,
    /// Fraction of requests whose client disconnects after the first streamed chunk (a soak's
    /// cancellations); they count as `disconnected`, not as errors.
    pub disconnect: f64,
    /// Token ids sent with a `logit_bias` of -100, for servers that ignore `ignore_eos`
    /// (llama-cpp-python's): banning the end-of-sequence tokens makes them generate
    /// `max_tokens` tokens too.
    pub ban_tokens: Vec<u32>,
}

/// Mean, median and 99th percentile of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
}

impl Summary {
    fn of(mut seconds: Vec<f64>) -> Self {
        if seconds.is_empty() {
            return Self::default();
        }
        seconds.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * seconds.len() as f64).ceil() as usize).clamp(1, seconds.len()) - 1;
            seconds[i] * 1e3
        };
        Self {
            mean_ms: seconds.iter().sum::<f64>() / seconds.len() as f64 * 1e3,
            p50_ms: rank(0.5),
            p99_ms: rank(0.99),
        }
    }
}

/// The benchmark's results.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BenchReport {
    /// Requests sent.
    pub requests: usize,
    /// Requests answered completely.
    pub completed: usize,
    /// Requests that failed (HTTP errors other than 429, broken streams).
    pub errors: usize,
    /// Requests refused with 429 (the server's queue was full).
    pub refused: usize,
    /// Requests whose client disconnected on purpose ([`BenchConfig::disconnect`]).
    pub disconnected: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Wall time from the first send to the last answer, seconds.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second.
    pub output_throughput: f64,
    /// Mean prompt tokens per request, as the server counted them.
    pub mean_prompt_tokens: f64,
    /// Generated tokens in all.
    pub output_tokens: usize,
    /// Time to first token.
    pub ttft: Summary,
    /// Time per output token after the first.
    pub tpot: Summary,
    /// Inter-token latency (every gap between streamed chunks).
    pub itl: Summary,
    /// End-to-end latency.
    pub e2e: Summary,
    /// Most requests running at once, from the server's `/metrics` (`None`: no layerkv
    /// metrics).
    pub peak_running: Option<f64>,
    /// Preemptions during the run, from `/metrics`.
    pub preemptions: Option<f64>,
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Done(Measured),
    Refused,
    Disconnected,
    Failed(String),
}

/// One request's measurements.
#[derive(Debug, Default)]
struct Measured {
    ttft: Option<f64>,
    gaps: Vec<f64>,
    e2e: f64,
    prompt_tokens: Option<usize>,
    output_tokens: usize,
}

/// Runs the benchmark.
pub async fn run(config: &BenchConfig) -> Result<BenchReport, String> {
    if config.requests == 0 || config.max_concurrency == 0 || config.max_tokens == 0 {
        return Err("requests, max_concurrency and max_tokens must be at least 1".into());
    }
    let chars: Vec<char> = config.text.chars().collect();
    let want = ((config.prompt_tokens as f64) * config.chars_per_token).ceil() as usize;
    if chars.len() < want.max(1) {
        return Err(format!(
            "the text has {} characters; prompts of {} tokens need {want}",
            chars.len(),
            config.prompt_tokens
        ));
    }
    let base = config.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.max_concurrency)
        .build()
        .map_err(|e| e.to_string())?;
    let before = scrape(&client, &base).await;
    let peak = Arc::new(Mutex::new(None::<f64>));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (client, base, peak, running) =
            (client.clone(), base.clone(), peak.clone(), running.clone());
        tokio::spawn(async move {
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(page) = scrape(&client, &base).await {
                    if let Some(r) = read_sample(&page, "layerkv_requests_running") {
                        let mut p = peak.lock().await;
                        *p = Some(p.map_or(r, |x: f64| x.max(r)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut rng = SplitMix64::new(config.seed);
    let gate = Arc::new(Semaphore::new(config.max_concurrency));
    let start = Instant::now();
    let mut next_at = 0.0f64;
    let mut tasks = Vec::with_capacity(config.requests);
    for i in 0..config.requests {
        if let Some(rate) = config.rate {
            let u = rng.next_f64();
            next_at += -(1.0 - u).ln() / rate;
            let wait = Duration::from_secs_f64(next_at).saturating_sub(start.elapsed());
            tokio::time::sleep(wait).await;
        }
        let offset = rng.below(chars.len() - want + 1);
        let prompt: String = chars[offset..offset + want].iter().collect();
        let body = json!({
            "model": config.model,
            "prompt": prompt,
            "max_tokens": config.max_tokens,
            "temperature": 0.0,
            "seed": config.seed.wrapping_add(i as u64),
            "stream": true,
            "stream_options": {"include_usage": true},
            "ignore_eos": true,
        });
        let mut body = body;
        if !config.ban_tokens.is_empty() {
            let bias: serde_json::Map<String, Value> = config
                .ban_tokens
                .iter()
                .map(|t| (t.to_string(), json!(-100)))
                .collect();
            body["logit_bias"] = Value::Object(bias);
        }
        let leave = config.disconnect > 0.0 && rng.next_f64() < config.disconnect;
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (client, url) = (client.clone(), format!("{base}/v1/completions"));
        tasks.push(tokio::spawn(async move {
            let r = one(&client, &url, &body, leave).await;
            drop(permit);
            r
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.map_err(|e| e.to_string())?);
    }
    let duration = start.elapsed().as_secs_f64();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    let after = scrape(&client, &base).await;
    let preemptions = match (before, after) {
        (Some(b), Some(a)) => Some(
            read_sample(&a, "layerkv_preemptions_total").unwrap_or(0.0)
                - read_sample(&b, "layerkv_preemptions_total").unwrap_or(0.0),
        ),
        _ => None,
    };
    let peak_running = *peak.lock().await;
    Ok(summarise(
        config.requests,
        results,
        duration,
        peak_running,
        preemptions,
    ))
}

fn summarise(
    requests: usize,
    results: Vec<Outcome>,
    duration: f64,
    peak_running: Option<f64>,
    preemptions: Option<f64>,
) -> BenchReport {
    let mut report = BenchReport {
        requests,
        duration_s: duration,
        peak_running,
        preemptions,
        ..BenchReport::default()
    };
    let (mut ttft, mut tpot, mut itl, mut e2e, mut prompt) =
        (vec![], vec![], vec![], vec![], vec![]);
    for r in results {
        match r {
            Outcome::Refused => report.refused += 1,
            Outcome::Disconnected => report.disconnected += 1,
            Outcome::Done(m) => {
                report.completed += 1;
                report.output_tokens += m.output_tokens;
                ttft.extend(m.ttft);
                if m.output_tokens > 1 {
                    if let Some(t) = m.ttft {
                        tpot.push((m.e2e - t) / (m.output_tokens - 1) as f64);
                    }
                }
                itl.extend(m.gaps);
                e2e.push(m.e2e);
                prompt.extend(m.prompt_tokens);
            }
            Outcome::Failed(e) => {
                report.errors += 1;
                report.first_error.get_or_insert(e);
            }
        }
    }
    report.request_throughput = report.completed as f64 / duration.max(1e-9);
    report.output_throughput = report.output_tokens as f64 / duration.max(1e-9);
    report.mean_prompt_tokens = if prompt.is_empty() {
        0.0
    } else {
        prompt.iter().sum::<usize>() as f64 / prompt.len() as f64
    };
    report.ttft = Summary::of(ttft);
    report.tpot = Summary::of(tpot);
    report.itl = Summary::of(itl);
    report.e2e = Summary::of(e2e);
    report
}

async fn scrape(client: &reqwest::Client, base: &str) -> Option<String> {
    let r = client.get(format!("{base}/metrics")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let page = r.text().await.ok()?;
    page.contains("layerkv_requests_running").then_some(page)
}

/// Sends one streamed completion and times its chunks; `leave`: disconnects after the first
/// chunk.
async fn one(client: &reqwest::Client, url: &str, body: &Value, leave: bool) -> Outcome {
    let t0 = Instant::now();
    let r = match client.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let status = r.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Outcome::Refused;
    }
    if !status.is_success() {
        let text = r.text().await.unwrap_or_default();
        return Outcome::Failed(format!("HTTP {status}: {text}"));
    }
    if leave {
        let mut stream = r.bytes_stream();
        let _ = stream.next().await;
        return Outcome::Disconnected;
    }
    match read(r, t0).await {
        Ok(m) => Outcome::Done(m),
        Err(e) => Outcome::Failed(e),
    }
}

/// Reads a streamed completion to its end, timing the chunks that carry text.
async fn read(r: reqwest::Response, t0: Instant) -> Result<Measured, String> {
    let mut m = Measured::default();
    let mut last = None::<Instant>;
    let mut buf = String::new();
    let mut stream = r.bytes_stream();
    let mut chunks = 0usize;
    let mut usage_tokens = None;
    let mut done = false;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| e.to_string())?;
        // Servers end lines with \n or \r\n (sse-starlette, llama-cpp-python's); JSON data
        // never holds a raw \r.
        buf.extend(
            String::from_utf8_lossy(&bytes)
                .chars()
                .filter(|&c| c != '\r'),
        );
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| format!("a stream chunk is not JSON ({e}): {data}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("error in stream: {err}"));
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    m.prompt_tokens = u["prompt_tokens"].as_u64().map(|n| n as usize);
                    usage_tokens = u["completion_tokens"].as_u64().map(|n| n as usize);
                }
                let text = v["choices"][0]["text"].as_str().unwrap_or("");
                if !text.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => m.ttft = Some((now - t0).as_secs_f64()),
                        Some(l) => m.gaps.push((now - l).as_secs_f64()),
                    }
                    last = Some(now);
                    chunks += 1;
                }
            }
        }
    }
    if !done {
        return Err("the stream ended without data: [DONE]".into());
    }
    m.e2e = t0.elapsed().as_secs_f64();
    m.output_tokens = usage_tokens.unwrap_or(chunks);
    Ok(m)
}

/// The report as a table for a terminal.
pub fn table(r: &BenchReport) -> String {
    let mut s = String::new();
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    s += &format!(
        "requests {} | completed {} | refused (429) {} | disconnected {} | errors {} | duration \
         {:.2} s\n",
        r.requests, r.completed, r.refused, r.disconnected, r.errors, r.duration_s
    );
    s += &format!(
        "request throughput {:.3} req/s | output throughput {:.1} tok/s | mean prompt {:.0} tokens\n",
        r.request_throughput, r.output_throughput, r.mean_prompt_tokens
    );
    s += &format!(
        "peak running {} | preemptions {}\n",
        opt(r.peak_running),
        opt(r.preemptions)
    );
    s += "metric      mean ms    p50 ms    p99 ms\n";
    for (name, m) in [
        ("TTFT", r.ttft),
        ("TPOT", r.tpot),
        ("ITL", r.itl),
        ("E2E", r.e2e),
    ] {
        s += &format!(
            "{name:<8} {:>10.1} {:>9.1} {:>9.1}\n",
            m.mean_ms, m.p50_ms, m.p99_ms
        );
    }
    if let Some(e) = &r.first_error {
        s += &format!("first error: {e}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Summary::of((1..=100).map(|i| i as f64 / 1000.0).collect());
        assert!((s.p50_ms - 50.0).abs() < 1e-9, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 1e-9, "{s:?}");
        assert!((s.mean_ms - 50.5).abs() < 1e-9, "{s:?}");
        assert_eq!(Summary::of(vec![]), Summary::default());
    }
}
