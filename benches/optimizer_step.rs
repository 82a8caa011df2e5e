//! Time of one fused AdamW step on the real all-MiniLM-L6-v2 (22.7M parameters).
//!
//! `cargo bench --bench optimizer_step` (needs `scripts/fetch-model.sh` first). Prints the median
//! of 20 steps after 3 warm-up steps, with and without gradient clipping.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pipe::model::Classifier;
use pipe::optim::{AdamW, OptimizerConfig, global_grad_norm};

fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        println!("SKIPPED: no model at {} (run scripts/fetch-model.sh)", dir.display());
        return Ok(());
    }
    let model =
        Classifier::from_pretrained(&dir, Some(vec!["0".into(), "1".into()]), DType::F32, &Device::Cpu, 0)?;
    let grads: Vec<Option<Tensor>> = model
        .params()
        .iter()
        .map(|(_, v)| Ok(Some(v.as_tensor().affine(1e-3, 1e-4)?)))
        .collect::<candle_core::Result<_>>()?;
    let mut opt = AdamW::new(OptimizerConfig::default(), model.params().to_vec())?;
    for clip in [false, true] {
        let mut times = Vec::new();
        for i in 0..23 {
            let start = Instant::now();
            let scale = if clip { (1.0 / (global_grad_norm(&grads)? + 1e-6)).min(1.0) } else { 1.0 };
            opt.step(&grads, 5e-5, scale)?;
            if i >= 3 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "adamw step, {} parameters, clipping {}: median {:.1} ms (min {:.1}, max {:.1}), threads {}",
            model.num_parameters(),
            if clip { "on" } else { "off" },
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            rayon::current_num_threads()
        );
    }
    Ok(())
}
