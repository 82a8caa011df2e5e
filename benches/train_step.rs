//! Where a MiniLM training step spends its time (forward, backward, optimizer), and how fast it is.
//!
//! `cargo bench --bench train_step [-- LEN BATCH]` (needs `scripts/fetch-model.sh`). Two runs, each
//! the median of 8 steps after 2 warm-up steps:
//! - `sst2`: real SST-2 training rows (tokenized, truncated at LEN) padded to LEN, the fixed shape
//!   the reference recipe trains on; reports samples/s and real tokens/s.
//! - `dense`: every one of the LEN positions a real token, to relate the step's matmul FLOP/s to
//!   the machine's GEMM FLOP/s.
//!
//! The last line is the `sst2` result.

#![allow(clippy::disallowed_methods)] // candle's matmul is printed for comparison

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pipe::data::{TextEncoder, read_csv};
use pipe::model::{Batch, BertClassifier, Mode};
use pipe::ops::cross_entropy;
use pipe::optim::{AdamW, OptimizerConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Achieved GFLOP/s of f32 `(m x k) * (k x n)` products, median of 7: pipe's GEMM (the one the
/// training path uses) and candle's matmul (the `gemm` crate) for comparison.
fn gemm_gflops(m: usize, k: usize, n: usize) -> (f64, f64) {
    let time = |f: &dyn Fn()| {
        let times: Vec<f64> = (0..8)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .skip(1)
            .collect();
        2.0 * (m * k * n) as f64 / median(times) * 1e-9
    };
    let (a, b) = (vec![0.5f32; m * k], vec![0.25f32; k * n]);
    let pipe = time(&|| {
        pipe::ops::gemm::matmul(&a, &b, m, k, n);
    });
    let (ta, tb) = (
        Tensor::ones((m, k), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((k, n), DType::F32, &Device::Cpu).unwrap(),
    );
    let candle = time(&|| {
        ta.matmul(&tb).unwrap();
    });
    (pipe, candle)
}

/// Rows padded (with 0, masked) to exactly `len` columns.
fn padded(rows: &[Vec<u32>], len: usize) -> candle_core::Result<Batch> {
    let mut ids = vec![0u32; rows.len() * len];
    let mut mask = vec![0f32; rows.len() * len];
    for (i, row) in rows.iter().enumerate() {
        ids[i * len..i * len + row.len()].copy_from_slice(row);
        mask[i * len..i * len + row.len()].fill(1.0);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows.len(), len), &Device::Cpu)?,
        attention_mask: Tensor::from_vec(mask, (rows.len(), len), &Device::Cpu)?,
        token_type_ids: Tensor::zeros((rows.len(), len), DType::U32, &Device::Cpu)?,
        real_tokens: rows.iter().map(Vec::len).sum(),
    })
}

/// Median forward, backward and optimizer milliseconds and real tokens per step over `batches`.
fn time_steps(model: &BertClassifier, batches: &[Batch]) -> anyhow::Result<(f64, f64, f64, f64)> {
    let labels: Vec<u32> = (0..batches[0].input_ids.dim(0)? as u32).map(|i| i % 2).collect();
    let mut opt = AdamW::new(OptimizerConfig::default(), model.params().to_vec())?;
    let (mut fwd, mut bwd, mut upd, mut tokens) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (step, input) in batches.iter().enumerate() {
        let mut rng = pipe::rng::stream(0, "dropout", step as u64);
        let t0 = Instant::now();
        let logits = model.forward(input, Mode::Train(&mut rng))?;
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
            tokens.push(input.real_tokens as f64);
        }
    }
    Ok((median(fwd), median(bwd), median(upd), median(tokens)))
}

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { pipe::runtime::configure() }?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models/all-MiniLM-L6-v2");
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
    let c = model.config();
    let (rows, hidden, inner) = (batch * len, c.hidden_size, c.intermediate_size);
    let (pipe_gemm, candle_gemm) = gemm_gflops(rows, hidden, inner);
    println!(
        "machine: {pipe_gemm:.0} GFLOP/s on a {rows}x{hidden}x{inner} f32 GEMM (the FFN's shape; pipe's GEMM, kernel path {}), candle's matmul {candle_gemm:.0}",
        pipe::ops::cpu::kernel_path()
    );

    // Dense: all LEN positions real.
    let dense: Vec<Batch> = (0..10)
        .map(|s| {
            let rows: Vec<Vec<u32>> = (0..batch)
                .map(|r| {
                    (0..len)
                        .map(|i| {
                            if i == 0 {
                                101
                            } else {
                                1000 + ((s * 31 + r * 7919 + i * 104_729) % 20_000) as u32
                            }
                        })
                        .collect()
                })
                .collect();
            padded(&rows, len)
        })
        .collect::<candle_core::Result<_>>()?;
    let (f, b, u, _) = time_steps(&model, &dense)?;
    let total = f + b + u;
    let encoder_weights = (c.num_hidden_layers
        * (4 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.intermediate_size))
        as f64;
    let attention = (c.num_hidden_layers * batch * 4 * len * len * c.hidden_size) as f64;
    // Forward: 2 FLOPs per weight per token plus attention's two products; backward twice that.
    let flops = 3.0 * (2.0 * encoder_weights * (batch * len) as f64 + attention);
    println!(
        "dense len {len} batch {batch}: forward {f:.0} ms, backward {b:.0} ms, optimizer {u:.0} ms, step {total:.0} ms, {:.0} GFLOP/s = {:.1} samples/s",
        flops / total * 1e-6,
        batch as f64 / total * 1e3
    );

    // SST-2 rows padded to LEN, as the reference trains.
    let data = read_csv(&root.join("data/sst2/train.csv"), "text", "label")?;
    let encoder = TextEncoder::from_file(&dir.join("tokenizer.json"), len)?;
    let ids = encoder.encode_all(&data.texts[..10 * batch])?;
    let sst2: Vec<Batch> =
        ids.chunks(batch).map(|rows| padded(rows, len)).collect::<candle_core::Result<_>>()?;
    let (f, b, u, tokens) = time_steps(&model, &sst2)?;
    let total = f + b + u;
    println!(
        "sst2 len {len} batch {batch} (padded to {len}): forward {f:.0} ms, backward {b:.0} ms, optimizer {u:.0} ms, step {total:.0} ms, {:.0} real tokens/s = {:.1} samples/s (threads {})",
        tokens / total * 1e3,
        batch as f64 / total * 1e3,
        rayon::current_num_threads()
    );
    Ok(())
}
