//! Numerical parity with PyTorch/transformers (`tests/fixtures/parity`, float64 references), and
//! gradient checks that fail if any op silently drops the graph.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_matches_reference, fixture, fixture_batch, load, loss_and_grads, rel_err, scalar};
use pipe::model::{Classifier, Mode};
use pipe::ops::cross_entropy;
use pipe::optim::{AdamW, OptimizerConfig, ScheduleConfig, ScheduleKind, global_grad_norm};

fn tiny(dtype: DType) -> Classifier {
    Classifier::from_pretrained(&fixture("parity/bert-tiny"), None, dtype, &Device::Cpu, 0).unwrap()
}

fn is_key_bias(name: &str) -> bool {
    name.ends_with("attention.self.key.bias")
}

#[test]
fn tiny_bert_logits_loss_and_every_gradient_match_pytorch() {
    let case = load("parity/bert-tiny-case.safetensors");
    let (worst, at) = assert_matches_reference("tiny BERT", &tiny(DType::F32), &case);
    println!("worst gradient error {worst:e} at {at}");
}

/// Inference computes the last layer for each row's [CLS] only; the logits are those of the
/// full forward pass bit for bit, in f32 and with bf16 products.
#[test]
fn inference_gives_the_full_forward_pass_bits() {
    let case = load("parity/bert-tiny-case.safetensors");
    for precision in [pipe::device::Precision::F32, pipe::device::Precision::Bf16] {
        let mut model = tiny(DType::F32);
        model.set_precision(precision);
        let (batch, _) = fixture_batch(&case, model.dtype());
        let bits = |mode| -> Vec<u32> {
            let logits = model.forward(&batch, mode).unwrap();
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(Mode::Infer), bits(Mode::Eval), "{precision:?}");
    }
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_except_the_provably_zero_key_bias() {
    // In f64, so that "zero" is unambiguous: softmax ignores a constant added to every score of a
    // row, and the key bias adds exactly such a constant (q · b_k), so its true gradient is 0.
    let case = load("parity/bert-tiny-case.safetensors");
    let model = tiny(DType::F64);
    let (_, _, grads) = loss_and_grads(&model, &case);
    let norm = |g: &Tensor| scalar(&g.sqr().unwrap().sum_all().unwrap()).sqrt();
    let global = grads
        .iter()
        .flatten()
        .map(|g| {
            let n = norm(g);
            n * n
        })
        .sum::<f64>()
        .sqrt();
    for ((name, _), grad) in model.params().iter().zip(&grads) {
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: no gradient: an op dropped the graph"));
        let n = norm(grad);
        if is_key_bias(name) {
            assert!(n < 1e-12 * global, "{name}: gradient {n:e} should be zero");
        } else {
            assert!(n > 1e-6 * global, "{name}: gradient norm {n:e} is (near) zero: an op dropped the graph");
        }
    }
}

#[test]
fn gradients_match_central_finite_differences_in_f64() {
    let case = load("parity/bert-tiny-case.safetensors");
    let model = tiny(DType::F64);
    let (_, _, grads) = loss_and_grads(&model, &case);
    let (batch, labels) = fixture_batch(&case, DType::F64);
    let loss_now = || {
        let logits = model.forward(&batch, Mode::Eval).unwrap();
        cross_entropy(&logits, &labels, None).unwrap().to_scalar::<f64>().unwrap()
    };
    let h = 1e-5;
    let mut checked = 0;
    for ((name, var), grad) in model.params().iter().zip(&grads) {
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let analytic = grad.as_ref().unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Three coordinates per tensor; for embeddings, ones the batch actually uses (row 0: [CLS],
        // position 0, token type 0) so that the check is not trivially 0 == 0.
        let n = original.len();
        let width = *var.dims().last().unwrap();
        let picks = if name.contains("embeddings.") && !name.contains("LayerNorm") {
            vec![1, width / 2, width - 1].into_iter().map(|c| c % n).collect::<Vec<_>>()
        } else {
            vec![0, n / 2, n - 1]
        };
        let picks = if name.contains("word_embeddings") {
            let cls = case["input_ids"]
                .to_dtype(DType::U32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()[0] as usize;
            picks.into_iter().map(|c| cls * width + c % width).collect()
        } else {
            picks
        };
        for i in picks {
            let set = |value: f64| {
                let mut v = original.clone();
                v[i] = value;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            };
            set(original[i] + h);
            let plus = loss_now();
            set(original[i] - h);
            let minus = loss_now();
            set(original[i]);
            let numeric = (plus - minus) / (2.0 * h);
            let err = (numeric - analytic[i]).abs();
            assert!(
                err <= 1e-8 + 1e-5 * analytic[i].abs(),
                "{name}[{i}]: finite difference {numeric:e} vs backprop {:e}",
                analytic[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * model.params().len());
}

/// Replays an AdamW trajectory of the fixture: `steps` updates on the fixture batch.
fn trajectory(prefix: &str, steps: u64, clip: Option<f64>, schedule: ScheduleConfig) {
    let case = load("parity/bert-tiny-case.safetensors");
    let model = tiny(DType::F32);
    let config = OptimizerConfig { lr: 1e-3, weight_decay: 0.01, ..Default::default() };
    let mut opt = AdamW::new(config, model.params().to_vec()).unwrap();
    let want_losses = case[&format!("{prefix}.losses")].to_vec1::<f64>().unwrap();
    let want_lrs = case[&format!("{prefix}.lrs")].to_vec1::<f64>().unwrap();
    for step in 0..steps {
        let (_, loss, grads) = loss_and_grads(&model, &case);
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        let i = step as usize;
        assert!(
            (loss - want_losses[i]).abs() / want_losses[i].abs() < 1e-4,
            "{prefix} loss {i}: {loss} vs {}",
            want_losses[i]
        );
        let lr = schedule.lr_at(1e-3, step, steps);
        assert!((lr - want_lrs[i]).abs() < 1e-12, "{prefix} lr {i}: {lr} vs {}", want_lrs[i]);
        let scale = clip.map_or(1.0, |max| (max / (global_grad_norm(&grads).unwrap() + 1e-6)).min(1.0));
        opt.step(&grads, lr, scale).unwrap();
    }
    let mut worst = (0f64, String::new());
    for (name, var) in model.params() {
        let e = rel_err(var.as_tensor(), &case[&format!("{prefix}.param.{name}")], 0.0);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    assert!(worst.0 < 1e-4, "{prefix}: worst parameter error {:e} at {}", worst.0, worst.1);
}

#[test]
fn adamw_constant_trajectory_matches_torch() {
    let constant = ScheduleConfig { kind: ScheduleKind::Constant, warmup_steps: 0, warmup_ratio: 0.0 };
    trajectory("adamw_const", 3, None, constant);
}

#[test]
fn adamw_with_clipping_and_linear_warmup_matches_torch() {
    let linear = ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 1, warmup_ratio: 0.0 };
    trajectory("adamw_clip_linear", 4, Some(0.1), linear);
}

#[test]
fn minilm_tokens_logits_loss_and_gradients_match_pytorch() {
    let Some(dir) = common::minilm_dir() else { return };
    let case = load("parity/minilm-sst2-case.safetensors");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("parity/minilm-sst2-case.json")).unwrap())
            .unwrap();
    let texts: Vec<String> =
        json["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let encoder =
        pipe::data::TextEncoder::from_file(&dir.join("tokenizer.json"), 128, Default::default()).unwrap();
    let ids = encoder.encode_all(&texts).unwrap();
    let mask = case["attention_mask"].to_vec2::<i64>().unwrap();
    let want = case["input_ids"].to_vec2::<i64>().unwrap();
    for (row, ids) in ids.iter().enumerate() {
        let len = mask[row].iter().filter(|&&m| m == 1).count();
        let want: Vec<u32> = want[row][..len].iter().map(|&x| x as u32).collect();
        assert_eq!(ids, &want, "token ids of row {row}");
    }

    let model =
        Classifier::from_pretrained(&dir, Some(vec!["0".into(), "1".into()]), DType::F32, &Device::Cpu, 0)
            .unwrap();
    for (name, var) in model.params() {
        if let Some(t) = case.get(name) {
            var.set(t).unwrap();
        }
    }
    let (batch, labels) = fixture_batch(&case, DType::F32);
    let logits = model.forward(&batch, Mode::Eval).unwrap();
    let loss = cross_entropy(&logits, &labels, None).unwrap();
    let e = rel_err(&logits, &case["expected.logits"], 0.0);
    assert!(e < 1e-4, "logits err {e:e}");
    let e = rel_err(&loss.reshape(1).unwrap(), &case["expected.loss"], 0.0);
    assert!(e < 1e-4, "loss err {e:e}");
    let store = loss.backward().unwrap();
    let grad = |name: &str| {
        let var = &model.params().iter().find(|(n, _)| n == name).unwrap().1;
        store.get(var.as_tensor()).unwrap().clone()
    };
    for name in ["classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"] {
        let e = rel_err(&grad(name), &case[&format!("expected.grad.{name}")], 0.0);
        assert!(e < 1e-4, "{name} gradient err {e:e}");
    }
    let word = grad("bert.embeddings.word_embeddings.weight");
    let norm = scalar(&word.sqr().unwrap().sum_all().unwrap()).sqrt();
    let want = scalar(&case["expected.grad.bert.embeddings.word_embeddings.weight.norm"]);
    assert!((norm - want).abs() / want < 1e-4, "word embedding gradient norm {norm} vs {want}");
}
