//! `layerkv chat`: a multi-turn conversation read line by line from stdin (a terminal or a
//! pipe), each reply streamed to stdout as it is generated, through the model's own chat
//! template, under any policy.
//!
//! One sequence holds the whole conversation: each turn renders the conversation and appends
//! only the text past what the sequence already holds (the closing of the last reply, the new
//! user message, the opening of the next reply), so earlier turns are never prefilled again and
//! the policy's retention runs over the conversation as one stream. When the rendered
//! conversation does not extend the held text (a reply cut at `--max-tokens` or a stop string,
//! a template that rewrites earlier turns) the turn re-prefills the conversation from scratch.
//!
//! Input lines: `/reset` starts a new conversation, `/exit` (or end of input) ends. Per-turn
//! figures and the closing memory line go to stderr; stdout is the transcript (`> ` before each
//! user line, echoed when stdin is not a terminal).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Result;
use layerkv::SeqId;
use layerkv_model::chat::Message;
use layerkv_model::generate::{Sampler, StopReason};

use crate::generate_cmd::{memory_line, reply, ModelArgs, SamplingArgs};

/// `layerkv chat` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const SEQ: SeqId = 0;

/// Runs `layerkv chat` until `/exit` or the end of stdin.
pub fn run(args: ChatArgs) -> Result<()> {
    let mut session = args.model.session(&args.sampling)?;
    session.chat_template()?;
    let mut sampler = Sampler::new(session.sampling());
    let opening: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let mut messages = opening.clone();
    // The text the sequence holds (None: unknown, re-prefill on the next turn).
    let mut held: Option<String> = Some(String::new());
    session.engine_mut().add_sequence(SEQ)?;
    let interactive = std::io::stdin().is_terminal();
    let mut out = std::io::stdout();
    let (mut turns, mut generated, mut decode_secs) = (0usize, 0usize, 0f64);
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            let _ = write!(out, "> ");
            let _ = out.flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !interactive {
            let _ = writeln!(out, "> {line}");
        }
        match line {
            "/exit" | "/quit" => break,
            "/reset" => {
                session.engine_mut().free(SEQ)?;
                session.engine_mut().add_sequence(SEQ)?;
                messages = opening.clone();
                held = Some(String::new());
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let full = session.chat_text(&messages)?;
        let (text, cached) = match held.as_deref().and_then(|h| full.strip_prefix(h)) {
            Some(rest) => (rest, held.as_ref().map_or(0, String::len) > 0),
            None => {
                tracing::debug!("the conversation does not extend the held text: re-prefilling");
                session.engine_mut().free(SEQ)?;
                session.engine_mut().add_sequence(SEQ)?;
                (full.as_str(), false)
            }
        };
        let reused = if cached {
            session.engine().cache().num_tokens(SEQ)?
        } else {
            0
        };
        let ids = session.encode_chat(text)?;
        let c = reply(&mut session, SEQ, &ids, &mut sampler)?;
        turns += 1;
        generated += c.tokens.len();
        decode_secs += c.tokens.len().saturating_sub(1) as f64 / c.decode_tokens_per_sec.max(1e-9);
        eprintln!(
            "[turn {turns}: {} new prompt tokens after {reused} held, {} generated ({}); prefill \
             {:.1} tok/s, decode {:.1} tok/s]",
            c.num_prompt_tokens,
            c.tokens.len(),
            match c.stop {
                StopReason::Token(_) => "end of turn",
                StopReason::String(_) => "stop string",
                StopReason::MaxTokens => "--max-tokens",
            },
            c.prefill_tokens_per_sec,
            c.decode_tokens_per_sec,
        );
        held = match c.stop {
            // The sequence holds the prompt and the reply's tokens (the end token is not
            // appended until the next turn's text closes the reply).
            StopReason::Token(_) => Some(format!("{full}{}", c.text)),
            StopReason::String(_) | StopReason::MaxTokens => None,
        };
        messages.push(Message::new("assistant", c.text));
    }
    eprintln!(
        "chat: {turns} turns, {generated} tokens generated, decode {:.1} tok/s; {}",
        generated.saturating_sub(turns) as f64 / decode_secs.max(1e-9),
        memory_line(&session, SEQ)?
    );
    session.engine_mut().free(SEQ)?;
    Ok(())
}
