//! Where a MiniLM training step spends its time (forward, backward, optimizer), and how fast it is.
//!
//! `cargo bench --bench train_step [-- LEN BATCH [STEPS]] [--device cuda] [--dtype bf16]
//! [--model DIR] [--ops] [--profile]` (needs `scripts/fetch-model.sh`, or any model of MiniLM's
//! shape in DIR: speed does not depend on the weights; `--device cuda` needs a build with
//! `--features cuda`). Two runs, each the median of STEPS (default 8) steps after 2 warm-up steps:
//! - `sst2`: real SST-2 training rows (tokenized, truncated at LEN) padded to LEN, the fixed shape
//!   the reference recipe trains on; reports samples/s and real tokens/s.
//! - `dense`: every one of the LEN positions a real token, to relate the step's matmul FLOP/s to
//!   the machine's GEMM FLOP/s.
//!
//! On the CPU it also times a layer's 12 linear products alone (the step's own GEMM shapes) and
//! prints the dense step's rate against both probes. `--ops` first prints each op's forward and
//! backward time alone on the dense shape; `--profile` prints, after each run, every op's time
//! per step as the timed steps ran it, forward and backward (`pipe::ops::tape::Profile`; on the
//! CPU: a GPU's asynchronous kernels would show as launch times). The last line is
//! `RESULT {json}` with both throughputs, for scripts (scripts/gpu-check.sh).

#![allow(clippy::disallowed_methods)] // candle's matmul is printed for comparison

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pipe::data::{TextEncoder, read_labeled};
use pipe::model::{Batch, Classifier, Mode};
use pipe::ops::cross_entropy;
use pipe::optim::{AdamW, OptimizerConfig};

/// Steps run before timing starts (allocations, kernel loading, cuBLAS heuristics).
const WARMUP: usize = 2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median seconds of `runs` runs of `f`, after one more to warm up.
fn median_seconds(runs: usize, f: &dyn Fn()) -> f64 {
    let times: Vec<f64> = (0..=runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    median(times)
}

/// Achieved GFLOP/s of f32 `(m x k) * (k x n)` products, median of 7: pipe's GEMM (the one the
/// training path uses) with f32 and with bf16 operands, and candle's matmul (the `gemm` crate)
/// for comparison.
fn gemm_gflops(m: usize, k: usize, n: usize) -> (f64, f64, f64) {
    let time = |f: &dyn Fn()| 2.0 * (m * k * n) as f64 / median_seconds(7, f) * 1e-9;
    let (a, b) = (vec![0.5f32; m * k], vec![0.25f32; k * n]);
    let pipe = time(&|| {
        pipe::ops::gemm::matmul(&a, &b, m, k, n);
    });
    let bf16 = time(&|| {
        use pipe::ops::gemm::{Transpose, matmul_with};
        matmul_with(&a, &b, m, k, n, Transpose::None, pipe::ops::Products::Bf16);
    });
    let (ta, tb) = (
        Tensor::ones((m, k), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((k, n), DType::F32, &Device::Cpu).unwrap(),
    );
    let candle = time(&|| {
        ta.matmul(&tb).unwrap();
    });
    (pipe, bf16, candle)
}

/// GFLOP/s of one encoder layer's linear products alone at `rows` tokens, in `products`' operand
/// precision: for each of its four linears (query/key/value as one, attention output, feed-forward
/// in and out) the forward `x W^T`, the input gradient `g W` and the weight gradient `g^T x` (or
/// `x^T g`, as `ops::linear` computes a wide one), each timed apart (median of 5 after one warm-up), all FLOPs over the sum of the medians. These are
/// the step's own GEMM shapes, attention's small products aside.
fn linear_products_gflops(rows: usize, hidden: usize, inner: usize, products: pipe::ops::Products) -> f64 {
    use pipe::ops::gemm::{Transpose, matmul_with};
    let (mut flops, mut seconds) = (0.0, 0.0);
    for (inp, out) in [(hidden, 3 * hidden), (hidden, hidden), (hidden, inner), (inner, hidden)] {
        let (x, w, g) = (vec![0.5f32; rows * inp], vec![0.25f32; out * inp], vec![0.125f32; rows * out]);
        let runs: [Box<dyn Fn()>; 3] = [
            Box::new(|| drop(matmul_with(&x, &w, rows, inp, out, Transpose::Rhs, products))),
            Box::new(|| drop(matmul_with(&g, &w, rows, out, inp, Transpose::None, products))),
            // The weight's gradient as the layer computes it: a wide one (out < in) as `x^T g`.
            Box::new(|| match out < inp {
                true => drop(matmul_with(&x, &g, inp, rows, out, Transpose::Lhs, products)),
                false => drop(matmul_with(&g, &x, out, rows, inp, Transpose::Lhs, products)),
            }),
        ];
        for run in &runs {
            seconds += median_seconds(5, run);
            flops += 2.0 * (rows * inp * out) as f64;
        }
    }
    flops / seconds * 1e-9
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
/// Each phase ends with a device synchronisation, so GPU times are the work's, not the launches'.
fn time_steps(model: &Classifier, batches: &[Batch], profile: bool) -> anyhow::Result<(f64, f64, f64, f64)> {
    let sync = || model.device().synchronize();
    let labels: Vec<u32> = (0..batches[0].input_ids.dim(0)? as u32).map(|i| i % 2).collect();
    let mut opt = AdamW::new(OptimizerConfig::default(), model.params().to_vec())?;
    let (mut fwd, mut bwd, mut upd, mut tokens) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ops = None;
    for (step, input) in batches.iter().enumerate() {
        if profile && step == WARMUP {
            ops = Some(pipe::ops::tape::Profile::start());
        }
        let mut rng = pipe::rng::stream(0, "dropout", step as u64);
        let t0 = Instant::now();
        // As the train stage runs a step (`pipe::train`).
        let recording = pipe::ops::tape::Recording::start();
        let logits = model.forward(input, Mode::Train(&mut rng))?;
        let loss = cross_entropy(&logits, &labels, None)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let store = recording.gradients(&loss, 1.0)?;
        let grads: Vec<_> = model.params().iter().map(|(_, v)| store.get(v.as_tensor()).cloned()).collect();
        sync()?;
        let t2 = Instant::now();
        opt.step(&grads, 5e-5, 1.0)?;
        sync()?;
        let t3 = Instant::now();
        if step >= WARMUP {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            upd.push((t3 - t2).as_secs_f64() * 1e3);
            tokens.push(input.real_tokens as f64);
        }
    }
    if let Some(ops) = ops {
        let steps = fwd.len().max(1) as f64;
        println!("op (per step, mean of {steps} steps)           ms");
        for (pass, name, spent) in ops.take() {
            println!("{:<40} {:>8.1}", format!("{pass:?} {name}"), spent.as_secs_f64() * 1e3 / steps);
        }
    }
    Ok((median(fwd), median(bwd), median(upd), median(tokens)))
}

/// Median milliseconds of `f` (synchronised) over 20 runs after 3 warm-ups.
fn time_op(device: &Device, f: &dyn Fn() -> candle_core::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for i in 0..23 {
        device.synchronize()?;
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

/// `--ops`: each training-path op alone on the dense shape (`rows` tokens), forward and forward
/// plus backward, to see where a step's time goes.
fn op_breakdown(
    model: &Classifier,
    rows: usize,
    len: usize,
    precision: pipe::device::Precision,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    let device = model.device();
    // As the model computes: bf16 tensors on a GPU, f32 tensors with bf16 products on the CPU.
    let bf16 = precision == pipe::device::Precision::Bf16;
    let (dtype, products) = match (bf16, device.is_cpu()) {
        (true, true) => (DType::F32, pipe::ops::Products::Bf16),
        (true, false) => (DType::BF16, pipe::ops::Products::Full),
        (false, _) => (DType::F32, pipe::ops::Products::Full),
    };
    let c = model.config();
    let var = |shape: &[usize]| -> anyhow::Result<candle_core::Var> {
        Ok(candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)?)
    };
    let (h, inner) = (c.hidden_size, c.intermediate_size);
    let (x, w, b) = (var(&[rows, h])?, var(&[inner, h])?, var(&[inner])?);
    // The same product on a row count that is not a multiple of 8, as packed SST-2 batches have.
    let x_odd = var(&[rows - 3, h])?;
    let qkv = var(&[rows, 3 * h])?;
    let (ln_w, ln_b) = (var(&[h])?, var(&[h])?);
    let table = var(&[c.vocab_size, h])?;
    let ids: Arc<Vec<u32>> = Arc::new((0..rows as u32).map(|i| (i * 7919) % c.vocab_size as u32).collect());
    let segments = Arc::new((0..rows / len).map(|s| (s * len, len)).collect::<Vec<_>>());
    let heads = c.num_attention_heads;
    type Op<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let ops: Vec<(&str, Op)> = vec![
        (
            "linear 384->1536",
            Box::new(|| pipe::ops::linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), products)),
        ),
        (
            "linear 384->1536, rows - 3",
            Box::new(|| pipe::ops::linear(x_odd.as_tensor(), w.as_tensor(), b.as_tensor(), products)),
        ),
        (
            "attention",
            Box::new(|| {
                pipe::ops::attention(
                    qkv.as_tensor(),
                    Arc::clone(&segments),
                    pipe::ops::AttentionShape::full(heads),
                    0.1,
                    7,
                    products,
                )
            }),
        ),
        (
            "layer norm",
            Box::new(|| pipe::ops::layer_norm(x.as_tensor(), ln_w.as_tensor(), ln_b.as_tensor(), 1e-12)),
        ),
        ("gelu", Box::new(|| pipe::ops::activation(x.as_tensor(), pipe::ops::Activation::Gelu))),
        ("dropout", Box::new(|| pipe::ops::dropout(x.as_tensor(), 0.1, 3))),
        ("word embedding", Box::new(|| pipe::ops::embedding(table.as_tensor(), Arc::clone(&ids)))),
    ];
    println!("op (dense, {rows} tokens, {dtype:?}, {products:?} products)  forward ms   forward+backward ms");
    for (name, op) in &ops {
        let fwd = time_op(device, &|| op().map(drop))?;
        let both = time_op(device, &|| op()?.sum_all()?.backward().map(drop))?;
        println!("{name:<30} {fwd:>10.3} {both:>18.3}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { pipe::runtime::configure() }?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let dir = flag("--model").map_or_else(|| root.join("models/all-MiniLM-L6-v2"), Into::into);
    if !dir.join("model.safetensors").is_file() {
        println!("SKIPPED: no model at {} (run scripts/fetch-model.sh)", dir.display());
        return Ok(());
    }
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let (len, batch) = (numbers.first().copied().unwrap_or(128), numbers.get(1).copied().unwrap_or(32));
    let steps = numbers.get(2).copied().unwrap_or(8);
    let precision = match flag("--dtype").as_deref() {
        None | Some("f32") => pipe::device::Precision::F32,
        Some("bf16") => pipe::device::Precision::Bf16,
        Some(other) => anyhow::bail!("--dtype {other}: expected f32 or bf16"),
    };
    let device_name = flag("--device").unwrap_or_else(|| "cpu".into());
    let target = pipe::device::resolve(&device_name)?;
    let mut model =
        Classifier::from_pretrained(&dir, Some(vec!["0".into(), "1".into()]), DType::F32, &target.device, 0)?;
    model.set_precision(precision);
    let c = model.config().clone();
    let (rows, hidden, inner) = (batch * len, c.hidden_size, c.intermediate_size);
    let probes = if let Some(gpu) = &target.gpu {
        println!("device: {gpu}, dtype {}", precision.name());
        None
    } else {
        let (pipe_gemm, bf16_gemm, candle_gemm) = gemm_gflops(rows, hidden, inner);
        println!(
            "machine: {pipe_gemm:.0} GFLOP/s on a {rows}x{hidden}x{inner} f32 GEMM (the FFN's shape; pipe's GEMM, kernel path {}), {bf16_gemm:.0} with bf16 operands, candle's matmul {candle_gemm:.0}",
            pipe::ops::cpu::kernel_path()
        );
        // The probes in the step's precision: the FFN's shape, and the layer's own products.
        let products = match precision {
            pipe::device::Precision::Bf16 => pipe::ops::Products::Bf16,
            _ => pipe::ops::Products::Full,
        };
        let own = linear_products_gflops(rows, hidden, inner, products);
        println!(
            "machine: {own:.0} GFLOP/s on a layer's 12 linear products at {rows} rows ({products:?} operands: forward, input and weight gradients of its four linears, each alone)"
        );
        let ffn = if products == pipe::ops::Products::Bf16 { bf16_gemm } else { pipe_gemm };
        Some((ffn, own))
    };

    if args.iter().any(|a| a == "--ops") {
        op_breakdown(&model, rows, len, precision)?;
    }

    // Dense: all LEN positions real.
    let dense: Vec<Batch> = (0..WARMUP + steps)
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
    let profile = args.iter().any(|a| a == "--profile");
    let (f, b, u, _) = time_steps(&model, &dense, profile)?;
    let total = f + b + u;
    let dense_rate = batch as f64 / total * 1e3;
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
    if let Some((ffn, own)) = probes {
        let rate = flops / total * 1e-6;
        println!(
            "dense step: {:.0}% of the FFN-shape GEMM's rate, {:.0}% of the layer's linear products' rate",
            100.0 * rate / ffn,
            100.0 * rate / own
        );
    }

    // SST-2 rows padded to LEN, as the reference trains.
    let data = read_labeled(&root.join("data/sst2/train.csv"), None, "text", "label")?;
    let encoder = TextEncoder::from_file(&dir.join("tokenizer.json"), len, Default::default())?;
    let ids = encoder.encode_all(&data.texts[..(WARMUP + steps) * batch])?;
    let sst2: Vec<Batch> =
        ids.chunks(batch).map(|rows| padded(rows, len)).collect::<candle_core::Result<_>>()?;
    let (f, b, u, tokens) = time_steps(&model, &sst2, profile)?;
    let total = f + b + u;
    println!(
        "sst2 len {len} batch {batch} (padded to {len}): forward {f:.0} ms, backward {b:.0} ms, optimizer {u:.0} ms, step {total:.0} ms, {:.0} real tokens/s = {:.1} samples/s (threads {})",
        tokens / total * 1e3,
        batch as f64 / total * 1e3,
        rayon::current_num_threads()
    );
    let result = serde_json::json!({
        "device": target.gpu.as_deref().unwrap_or("cpu"),
        "dtype": precision.name(),
        "len": len,
        "batch": batch,
        "steps": steps,
        "dense_samples_per_s": dense_rate,
        "sst2_samples_per_s": batch as f64 / total * 1e3,
    });
    println!("RESULT {result}");
    Ok(())
}
