//! mistral.rs patched with `kv-policy.patch`, run through its own scheduler
//! (`TextModelBuilder`), against layerkv-mistralrs on the same model and policy: the identity
//! check and one sharing map. Built and run by `run.sh`, never in CI.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use layerkv::{LayerMap, PolicyBuilder};
use layerkv_mistralrs::LayerKvModelBuilder;
use mistralrs::{KvSharingMap, ModelDType, Response, TextModelBuilder, TokenSource};

// `run.sh` copies tests/common/mistralrs_request.rs beside this file.
mod mistralrs_request;
use mistralrs_request::greedy_request;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

async fn ask(m: &mistralrs::Model, ids: &[u32], raw: bool, max_len: usize) -> Res<Response> {
    let (req, mut rx) = greedy_request(ids, raw, max_len, 0);
    m.inner().get_sender(None)?.send(req).await?;
    rx.recv().await.ok_or_else(|| "no response".into())
}

#[tokio::main]
async fn main() -> Res<()> {
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => layerkv_model::assets::ensure_default_model()?,
    };
    let text = std::fs::read_to_string(layerkv_model::assets::ensure_default_texts()?.jargon)?;
    let map_json = r#"{"2":0,"3":0,"7":0,"12":0}"#;
    let cases: [(&str, Option<&str>); 2] = [("identity", None), ("kvsharer 4 layers", Some(map_json))];
    for (name, json) in cases {
        let mut builder = TextModelBuilder::new(dir.to_string_lossy())
            .with_token_source(TokenSource::None)
            .with_force_cpu()
            .with_dtype(ModelDType::F32)
            .with_prefix_cache_n(None)
            .with_max_num_seqs(1);
        if let Some(j) = json {
            builder = builder.with_kv_policy(Arc::new(KvSharingMap::from_json(j)?));
        }
        let theirs = builder.build().await?;
        let mut ours = LayerKvModelBuilder::new(&dir).with_max_tokens(32);
        if let Some(j) = json {
            let map = LayerMap::from_kvsharer_json(30, j)?;
            ours = ours.with_policy(PolicyBuilder::new(map).name(name).build()?);
        }
        let mut ours = ours.build()?;
        let ids = ours.tokenizer().encode(&text)?[..256].to_vec();
        let Response::Raw { logits_chunks, .. } = ask(&theirs, &ids, true, 1).await? else {
            return Err("expected raw logits".into());
        };
        let their_logits = logits_chunks[0].to_device(&Device::Cpu)?;
        let my_logits: Tensor = ours.prompt_logits(&ids)?;
        let diff = (&my_logits - &their_logits)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let t0 = Instant::now();
        let Response::CompletionDone(done) = ask(&theirs, &ids, false, 32).await? else {
            return Err("expected a completion".into());
        };
        let their_secs = t0.elapsed().as_secs_f64();
        let mine = ours.generate_ids(&ids, |_| {})?;
        let mem = ours.last_memory().expect("ran");
        println!(
            "{name}: logits max abs diff {diff:.3e} over {} positions; greedy 32 tokens {} (mistral.rs {:.1} tok/s decode, {their_secs:.2} s; layerkv {:.1} tok/s); layerkv KV {} of identity's {} bytes",
            ids.len(),
            if mine.text == done.choices[0].text { "equal" } else { "DIFFER" },
            done.usage.avg_compl_tok_per_sec,
            mine.decode_tokens_per_sec,
            mem.held_bytes,
            mem.identity_bytes,
        );
        if mine.text != done.choices[0].text {
            println!("  layerkv:    {:?}\n  mistral.rs: {:?}", mine.text, done.choices[0].text);
        }
    }
    Ok(())
}
