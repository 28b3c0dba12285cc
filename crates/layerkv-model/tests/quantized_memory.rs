//! Resident memory of the default GGUF run quantized: after [`load_gguf`] and one decode step,
//! the process holds at most 1.3x the file's size (measured: 1.12x). Its own test binary, so
//! no other test's tensors share the process.
//!
//! Fails if the loader keeps an f32 copy of the weights (e.g. dequantizes the tied embedding
//! for the LM head: +113 MB, checked once by building the head from a dequantized table).

use candle_core::Device;
use layerkv_model::{assets, quantized::load_gguf};

/// `VmRSS` of this process in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

#[test]
fn quantized_default_gguf_stays_near_its_file_size() {
    let gguf = assets::ensure_default_gguf().expect("fetch the default GGUF");
    let file = std::fs::metadata(&gguf).unwrap().len();
    let q = load_gguf(&gguf, &Device::Cpu).unwrap();
    let x = q.model.embed(&[1, 2, 3]).unwrap();
    let logits = q.model.logits(&x).unwrap();
    assert_eq!(logits.dims(), [3, q.model.config().vocab_size]);
    let rss = rss_bytes();
    let ratio = rss as f64 / file as f64;
    eprintln!("RSS {rss} bytes after load = {ratio:.2}x the {file}-byte file");
    assert!(
        ratio <= 1.3,
        "RSS {rss} bytes is {ratio:.2}x the file ({file} bytes)"
    );
}
