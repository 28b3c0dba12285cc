//! `layerkv convert MODEL.gguf -o DIR`: a llama, mistral or qwen2 GGUF to a Hugging Face model
//! directory, printing what it read (architecture, shape, tensor types, tokenizer) and what it
//! wrote (files and sizes). The conversion itself is [`layerkv_model::convert`]'s. With
//! `--dtype quantized` the directory keeps the file's quantized tensors: config, tokenizer and
//! chat template beside the GGUF itself as `model.gguf`, which `--model DIR` then runs in its
//! own types.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use layerkv_model::assets;
use layerkv_model::convert::{
    gguf_metadata_to_dir, gguf_to_model_dir_with, read_gguf_summary, ConvertOptions, GgufSummary,
};

/// Arguments of `layerkv convert`.
#[derive(clap::Args, Clone, Debug)]
pub struct ConvertArgs {
    /// The GGUF file (llama, mistral or qwen2; byte-level or SentencePiece BPE tokenizer).
    pub gguf: PathBuf,
    /// Output model directory (created; its files are overwritten).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Dtype of the written tensors: f32, bf16 or f16; or `quantized` to keep the GGUF's own
    /// tensors (written as `model.gguf` beside the config and tokenizer).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// What the summary says, one fact per line.
pub fn describe(s: &GgufSummary) -> String {
    let types: Vec<String> = s
        .tensor_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    let pre = if s.pre_tokenizer_raw.is_empty() {
        format!("{} (tokenizer.ggml.pre absent)", s.pre_tokenizer)
    } else if s.pre_tokenizer_raw != s.pre_tokenizer {
        format!(
            "{} (tokenizer.ggml.pre = {})",
            s.pre_tokenizer, s.pre_tokenizer_raw
        )
    } else {
        s.pre_tokenizer.clone()
    };
    let mut lines = vec![
        format!("architecture   {}", s.architecture.name()),
        format!("layers         {}", s.num_layers),
        format!(
            "heads          {} (KV heads {}, head dim {})",
            s.num_heads, s.num_kv_heads, s.head_dim
        ),
        format!("hidden / ffn   {} / {}", s.hidden_size, s.intermediate_size),
        format!(
            "vocab          {} embedding rows, {} tokens",
            s.vocab_size, s.num_tokens
        ),
        format!(
            "context        {} (rope base {}, rms eps {})",
            s.context_length, s.rope_theta, s.rms_norm_eps
        ),
        format!(
            "tensors        {} ({})",
            s.tensor_types.values().sum::<usize>(),
            types.join(", ")
        ),
        format!(
            "tokenizer      {} ({}), pre-tokenizer {pre}, add_bos_token {}, chat template {}",
            s.tokenizer_model,
            if s.tokenizer_model == "llama" {
                "SentencePiece BPE"
            } else {
                "byte-level BPE"
            },
            s.add_bos_token,
            if s.has_chat_template { "yes" } else { "no" }
        ),
    ];
    if let Some(w) = s.sliding_window {
        lines.push(format!("sliding window {w}"));
    }
    if let Some((f, lo, hi, orig)) = s.llama3_rope_scaling {
        lines.push(format!(
            "rope scaling   llama3 (factor {f}, low {lo}, high {hi}, original context {orig})"
        ));
    }
    lines.push(format!(
        "lm head        {}; Q/K/V biases {}",
        if s.tied_embeddings {
            "tied to the embedding"
        } else {
            "output.weight"
        },
        if s.qkv_bias { "yes" } else { "no" }
    ));
    if !s.ignored_tensors.is_empty() {
        lines.push(format!("ignored        {}", s.ignored_tensors.join(", ")));
    }
    lines.join("\n")
}

fn size(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{:.1} MB", m.len() as f64 / 1e6),
        Err(_) => "?".into(),
    }
}

/// Runs `layerkv convert`.
pub fn run(args: ConvertArgs) -> Result<()> {
    let summary = read_gguf_summary(&args.gguf)
        .with_context(|| format!("reading {}", args.gguf.display()))?;
    println!("read {}:\n{}", args.gguf.display(), describe(&summary));
    if args.dtype == "quantized" {
        gguf_metadata_to_dir(&args.gguf, &args.output)
            .with_context(|| format!("converting {}", args.gguf.display()))?;
        let dest = args.output.join(assets::QUANTIZED_MODEL_FILE);
        std::fs::copy(&args.gguf, &dest)
            .with_context(|| format!("copying {} to {}", args.gguf.display(), dest.display()))?;
        println!(
            "wrote {} (quantized, the file's own types):",
            args.output.display()
        );
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            assets::QUANTIZED_MODEL_FILE,
        ] {
            println!("  {f:<22} {}", size(&args.output.join(f)));
        }
        return Ok(());
    }
    let dtype = crate::dtype(&args.dtype)
        .map_err(|e| anyhow::anyhow!("{e} (or quantized, to keep the GGUF's types)"))?;
    gguf_to_model_dir_with(&args.gguf, &args.output, &ConvertOptions { dtype })
        .with_context(|| format!("converting {}", args.gguf.display()))?;
    println!("wrote {} ({:?}):", args.output.display(), dtype);
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let p = args.output.join(f);
        println!("  {f:<22} {}", size(&p));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerkv_model::convert::Architecture;

    #[test]
    fn describe_names_what_was_read() {
        let s = GgufSummary {
            architecture: Architecture::Qwen2,
            num_layers: 24,
            hidden_size: 896,
            intermediate_size: 4864,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            vocab_size: 151936,
            num_tokens: 151936,
            context_length: 32768,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            sliding_window: None,
            qkv_bias: true,
            tied_embeddings: true,
            llama3_rope_scaling: None,
            tensor_types: [("F32".to_string(), 121), ("Q8_0".to_string(), 169)].into(),
            ignored_tensors: Vec::new(),
            tokenizer_model: "gpt2".into(),
            pre_tokenizer: "qwen2".into(),
            pre_tokenizer_raw: "qwen2".into(),
            add_bos_token: false,
            has_chat_template: true,
        };
        let d = describe(&s);
        for want in [
            "architecture   qwen2",
            "layers         24",
            "14 (KV heads 2, head dim 64)",
            "151936 embedding rows",
            "290 (121 F32, 169 Q8_0)",
            "pre-tokenizer qwen2",
            "Q/K/V biases yes",
        ] {
            assert!(d.contains(want), "{want:?} not in\n{d}");
        }
    }
}
