//! Where a MiniLM training step spends its time: forward, backward, optimizer.
//!
//! `cargo bench --bench train_step [-- LEN BATCH]` (needs `scripts/fetch-model.sh`). Medians of
//! 8 steps after 2 warm-up steps, at a fixed sequence length (every row padded to LEN, as the
//! reference recipe does).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pipe::model::{Batch, BertClassifier, Mode};
use pipe::ops::cross_entropy;
use pipe::optim::{AdamW, OptimizerConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Achieved GFLOP/s of candle's f32 matmul on `(m x k) * (k x n)`, median of 7.
fn gemm_gflops(m: usize, k: usize, n: usize) -> f64 {
    let a = Tensor::ones((m, k), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((k, n), DType::F32, &Device::Cpu).unwrap();
    let times: Vec<f64> = (0..8)
        .map(|_| {
            let t = Instant::now();
            a.matmul(&b).unwrap();
            t.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    2.0 * (m * k * n) as f64 / median(times) * 1e-9
}

fn main() -> anyhow::Result<()> {
    pipe::runtime::configure();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        println!("SKIPPED: no model at {} (run scripts/fetch-model.sh)", dir.display());
        return Ok(());
    }
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (len, batch) = (args.first().copied().unwrap_or(128), args.get(1).copied().unwrap_or(32));
    let model = BertClassifier::from_pretrained(
        &dir,
        Some(vec!["0".into(), "1".into()]),
        DType::F32,
        &Device::Cpu,
        0,
    )?;
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|r| {
            (0..len)
                .map(|i| if i == 0 { 101 } else { 1000 + ((r * 7919 + i * 104_729) % 20_000) as u32 })
                .collect()
        })
        .collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 2).collect();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let input = Batch::pad(&refs, 0, DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(OptimizerConfig::default(), model.params().to_vec())?;
    let (mut fwd, mut bwd, mut upd) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..10u64 {
        let mut rng = pipe::rng::stream(0, "dropout", step);
        let t0 = Instant::now();
        let logits = model.forward(&input, Mode::Train(&mut rng))?;
        let loss = cross_entropy(&logits, &labels, None)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let store = loss.backward()?;
        let grads: Vec<_> = model.params().iter().map(|(_, v)| store.get(v.as_tensor()).cloned()).collect();
        let t2 = Instant::now();
        opt.step(&grads, 5e-5, 1.0)?;
        let t3 = Instant::now();
        if step >= 2 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            upd.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let (f, b, u) = (median(fwd), median(bwd), median(upd));
    let total = f + b + u;
    // Matmul FLOPs of a step: forward 2 per weight per token plus attention's two products;
    // backward twice the forward.
    let c = model.config();
    let tokens = (batch * len) as f64;
    let encoder_weights = (c.num_hidden_layers
        * (4 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.intermediate_size))
        as f64;
    let attention = (c.num_hidden_layers * batch * 4 * len * len * c.hidden_size) as f64;
    let step_flops = 3.0 * (2.0 * encoder_weights * tokens + attention);
    println!(
        "machine: {:.0} GFLOP/s on a {}x{}x{} f32 GEMM (the FFN's shape)",
        gemm_gflops(batch * len, c.hidden_size, c.intermediate_size),
        batch * len,
        c.hidden_size,
        c.intermediate_size
    );
    println!(
        "len {len} batch {batch}: forward {f:.0} ms, backward {b:.0} ms, optimizer {u:.0} ms, step {total:.0} ms, {:.0} GFLOP/s = {:.1} samples/s (threads {})",
        step_flops / total * 1e-6,
        batch as f64 / total * 1e3,
        rayon::current_num_threads()
    );
    Ok(())
}
