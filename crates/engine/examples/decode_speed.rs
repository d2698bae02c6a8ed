//! Rough CPU speed check: `cargo run --release -p engine --example decode_speed -- MODEL.gguf [N]`.
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let model = engine::cpu::CpuModel::load(Arc::new(gguf::GgufFile::open(&args[1])?))?;
    let mut kv = model.new_cache(4096);
    let prompt: Vec<u32> = (0..64).map(|i| 100 + i * 7).collect();
    let t = Instant::now();
    let mut logits = model.forward(&mut kv, &prompt, engine::cpu::Logits::Last)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        let next = engine::sampler::argmax(&logits);
        logits = model.forward(&mut kv, &[next], engine::cpu::Logits::Last)?;
    }
    let decode = t.elapsed().as_secs_f64();
    println!(
        "prefill {:.1} tok/s, decode {:.1} tok/s",
        prompt.len() as f64 / prefill,
        n as f64 / decode
    );
    Ok(())
}
