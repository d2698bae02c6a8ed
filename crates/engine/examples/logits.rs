//! Print the last-position logits of a token sequence (debugging aid):
//! `cargo run --release -p engine --example logits -- MODEL.gguf 1 2 3`
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let file = Arc::new(gguf::GgufFile::open(&args[1])?);
    let tokens: Vec<u32> = args[2..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let model = engine::cpu::CpuModel::load(file)?;
    let mut kv = model.new_cache(4096);
    let t = std::time::Instant::now();
    let logits = model.forward(&mut kv, &tokens, engine::cpu::Logits::Last)?;
    eprintln!("forward of {} tokens: {:?}", tokens.len(), t.elapsed());
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in &idx[..5] {
        println!("{i} {}", logits[i]);
    }
    println!("first8 {:?}", &logits[..8]);
    Ok(())
}
