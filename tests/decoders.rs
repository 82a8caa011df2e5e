//! Decoder language models (Llama, Qwen2, Qwen3) against PyTorch/transformers: the tiny random-init
//! models and float64 references of `tests/fixtures/decoders` (made by
//! `scripts/make-decoder-fixtures.py`), generation with a key/value cache, and saved directories
//! that transformers loads.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load, rel_err, scalar};
use pipe::model::{CausalLm, Mode};
use pipe::optim::{AdamW, OptimizerConfig};

const DECODERS: [&str; 3] = ["llama", "qwen2", "qwen3"];

fn model(name: &str, dtype: DType) -> CausalLm {
    CausalLm::from_pretrained(&fixture(&format!("decoders/{name}")), dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn case(name: &str) -> HashMap<String, Tensor> {
    load(&format!("decoders/{name}-case.safetensors"))
}

fn ints(case: &HashMap<String, Tensor>, name: &str) -> Vec<usize> {
    case[name]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// The fixture's rows (real tokens only) and where each row's loss starts.
fn rows(case: &HashMap<String, Tensor>) -> (Vec<Vec<u32>>, Vec<usize>) {
    let ids = case["input_ids"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let rows = ids.into_iter().zip(ints(case, "lengths")).map(|(row, n)| row[..n].to_vec()).collect();
    (rows, ints(case, "loss_from"))
}

fn loss_and_grads(model: &CausalLm, case: &HashMap<String, Tensor>) -> (Tensor, Vec<Option<Tensor>>) {
    let (rows, loss_from) = rows(case);
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let (loss, counted) = model.loss(&rows, &loss_from, Mode::Eval).unwrap();
    assert!(counted > 0);
    let store = loss.backward().unwrap();
    let grads = model.params().iter().map(|(_, v)| store.get(v.as_tensor()).cloned()).collect();
    (loss, grads)
}

#[test]
fn every_decoder_matches_pytorch_logits_loss_and_every_gradient() {
    for name in DECODERS {
        let case = case(name);
        let model = model(name, DType::F32);
        let (rows, _) = rows(&case);
        let rows_ref: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let logits = model.logits(&rows_ref, Mode::Eval).unwrap();
        let e = rel_err(&logits, &case["expected.logits"], 0.0);
        assert!(e < 1e-5, "{name}: logits err {e:e}");
        let (loss, grads) = loss_and_grads(&model, &case);
        let e = rel_err(&loss.reshape(1).unwrap(), &case["expected.loss"], 0.0);
        assert!(e < 1e-5, "{name}: loss err {e:e}");
        let floor = 1e-3 * scalar(&case["expected.grad_global_norm"]);
        let mut worst = (0f64, String::new());
        for ((param, _), grad) in model.params().iter().zip(&grads) {
            let reference = case
                .get(&format!("grad.{param}"))
                .unwrap_or_else(|| panic!("{name}: pipe trains `{param}`, which the reference does not"));
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: {param} received no gradient"));
            let e = rel_err(grad, reference, floor);
            if e > worst.0 {
                worst = (e, param.clone());
            }
        }
        assert!(worst.0 < 1e-5, "{name}: worst gradient error {:e} at {}", worst.0, worst.1);
        let references = case.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(grads.len(), references, "{name}: every parameter the reference trains");
        println!("{name}: logits and loss within 1e-5, worst gradient error {:e} at {}", worst.0, worst.1);
    }
}

/// In f64 every parameter gets a gradient that is not zero (no op cuts the graph), but the key
/// biases, whose true gradient is zero.
#[test]
fn every_decoder_gives_every_parameter_a_gradient() {
    for name in DECODERS {
        let model = model(name, DType::F64);
        let (_, grads) = loss_and_grads(&model, &case(name));
        for ((param, _), grad) in model.params().iter().zip(&grads) {
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: {param}: no gradient"));
            let norm = scalar(&grad.sqr().unwrap().sum_all().unwrap()).sqrt();
            assert!(norm > 0.0 || param.ends_with("k_proj.bias"), "{name}: {param}: zero gradient");
        }
    }
}

#[test]
fn every_decoder_follows_pytorchs_adamw_trajectory() {
    for name in DECODERS {
        let case = case(name);
        let model = model(name, DType::F32);
        let config =
            OptimizerConfig { lr: 1e-3, weight_decay: 0.01, decay_bias_and_norm: true, ..Default::default() };
        let mut opt = AdamW::new(config, model.params().to_vec()).unwrap();
        for (step, want) in case["adamw_const.losses"].to_vec1::<f64>().unwrap().iter().enumerate() {
            let (loss, grads) = loss_and_grads(&model, &case);
            let loss = f64::from(loss.to_scalar::<f32>().unwrap());
            assert!((loss - want).abs() / want.abs() < 1e-4, "{name} loss {step}: {loss} vs {want}");
            opt.step(&grads, 1e-3, 1.0).unwrap();
        }
        let mut worst = (0f64, String::new());
        for (param, var) in model.params() {
            if param.ends_with("k_proj.bias") {
                // Its true gradient is exactly zero (a key bias adds the same `q · b` to every
                // score of a row, which softmax ignores): float32 rounding noise moves it by up to
                // the learning rate per step, where the float64 reference stays put.
                let moved = (var.as_tensor().to_dtype(DType::F64).unwrap()
                    - &case[&format!("adamw_const.param.{param}")])
                    .unwrap();
                let most = scalar(&moved.abs().unwrap().max_all().unwrap());
                assert!(most <= 3.0 * 1e-3 * 1.01, "{name}: {param} moved by {most:e} in 3 steps");
                continue;
            }
            let e = rel_err(var.as_tensor(), &case[&format!("adamw_const.param.{param}")], 0.0);
            if e > worst.0 {
                worst = (e, param.clone());
            }
        }
        assert!(worst.0 < 1e-4, "{name}: worst parameter error {:e} at {}", worst.0, worst.1);
    }
}

/// Greedy decoding with the key/value cache gives transformers' `generate` tokens, and each step's
/// logits are the bits of a full pass over the whole sequence.
#[test]
fn every_decoder_generates_transformers_greedy_tokens_with_the_full_pass_bits() {
    for name in DECODERS {
        let case = case(name);
        let model = model(name, DType::F32);
        let prompt: Vec<u32> = ints(&case, "generate.prompt").into_iter().map(|v| v as u32).collect();
        let want: Vec<u32> = ints(&case, "generate.greedy").into_iter().map(|v| v as u32).collect();
        let mut cache = model.new_cache();
        let mut sequence = prompt.clone();
        let mut logits = model.extend(&mut cache, &prompt).unwrap();
        let eos = model.config().eos_ids();
        while sequence.len() - prompt.len() < 12 && !sequence[prompt.len()..].iter().any(|t| eos.contains(t))
        {
            let full = model.logits(&[&sequence], Mode::Infer).unwrap();
            let last = full.get(sequence.len() - 1).unwrap();
            let (a, b) = (logits.to_vec1::<f32>().unwrap(), last.to_vec1::<f32>().unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: cached step differs");
            let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            sequence.push(next);
            logits = model.extend(&mut cache, &[next]).unwrap();
        }
        assert_eq!(&sequence[prompt.len()..], want.as_slice(), "{name}: greedy tokens");
        assert_eq!(cache.len(), sequence.len());
    }
}

/// Several sequences generated together (their steps packed into each product, prompts of
/// different lengths, one finishing early, one sampled) get the tokens each gets alone.
#[test]
fn generating_many_sequences_at_once_gives_each_its_own_tokens() {
    use pipe::evaluate::{Sampling, generate, generate_many};
    for name in DECODERS {
        let model = model(name, DType::F32);
        let prompts: [Vec<u32>; 4] =
            [vec![3, 17, 9], vec![40, 2, 2, 8, 61, 5, 11], vec![7], vec![12, 30, 4, 4]];
        let limits = [6, 4, 1, 9];
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let steps: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let packed = model.extend_many(&mut caches, &steps).unwrap().to_vec2::<f32>().unwrap();
        for (prompt, row) in prompts.iter().zip(&packed) {
            let alone = model.extend(&mut model.new_cache(), prompt).unwrap().to_vec1::<f32>().unwrap();
            assert!(
                row.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: packed logits differ"
            );
        }
        for sampling in [Sampling::Greedy, Sampling::Sample { temperature: 0.9, top_p: 0.95, seed: 3 }] {
            let requests: Vec<(&[u32], usize)> = prompts.iter().map(Vec::as_slice).zip(limits).collect();
            let together = generate_many(&model, &requests, &[], sampling).unwrap();
            for ((prompt, limit), got) in requests.iter().zip(&together) {
                assert_eq!(got.len(), *limit, "{name}: no stop token, so every request runs to its limit");
                assert_eq!(
                    got,
                    &generate(&model, prompt, *limit, &[], sampling).unwrap(),
                    "{name} {sampling:?}"
                );
            }
        }
    }
}

/// A saved directory reloads to the same logits and declares the variant's transformers class;
/// where PyTorch and transformers are importable, `AutoModelForCausalLM` loads it and computes
/// pipe's logits.
#[test]
fn every_decoder_saves_a_directory_that_transformers_loads() {
    let python = std::env::var("PIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = std::process::Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    for name in DECODERS {
        let case = case(name);
        let model = model(name, DType::F32);
        let dir = tempfile::tempdir().unwrap();
        model.save_pretrained(dir.path()).unwrap();
        let reloaded = CausalLm::from_pretrained(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let (rows, _) = rows(&case);
        let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let ours = model.logits(&rows, Mode::Eval).unwrap();
        let again = reloaded.logits(&rows, Mode::Eval).unwrap();
        assert_eq!(ours.to_vec2::<f32>().unwrap(), again.to_vec2::<f32>().unwrap(), "{name}: reload");
        if !has_torch {
            println!("SKIPPED: {name}: `{python}` cannot import torch and transformers (set PIPE_PYTHON)");
            continue;
        }
        let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
rows = json.loads(sys.argv[2])
with torch.no_grad():
    out = [model(input_ids=torch.tensor([r])).logits[0].double().flatten().tolist() for r in rows]
print(json.dumps([x for r in out for x in r]))
"#;
        let out = std::process::Command::new(&python)
            .args(["-c", script, dir.path().to_str().unwrap(), &serde_json::to_string(&rows).unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: transformers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<f64> =
            serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap();
        let theirs = Tensor::new(theirs.as_slice(), &Device::Cpu).unwrap();
        let e = rel_err(&ours.flatten_all().unwrap(), &theirs, 0.0);
        println!("{name}: transformers loads the saved model; logits differ by {e:e}");
        assert!(e < 1e-5, "{name}: transformers' logits differ from pipe's by {e:e}");
    }
}

/// What pipe cannot run is refused when the model loads, naming the file and what it expected.
#[test]
fn unsupported_decoder_configs_are_refused() {
    let source = fixture("decoders/llama");
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    for (from, to, expect) in [
        (
            "\"llama\"",
            "\"gpt2\"",
            "model_type `gpt2` is not a supported decoder (supported: llama, qwen2, qwen3)",
        ),
        ("\"silu\"", "\"gelu\"", "hidden_act `gelu`"),
        (
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 3",
            "not a multiple of num_key_value_heads 3",
        ),
        ("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"", "rope_type `yarn`"),
    ] {
        assert!(config.contains(from), "the fixture config has {from}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(source.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        std::fs::write(dir.path().join("config.json"), config.replace(from, to)).unwrap();
        let message =
            CausalLm::from_pretrained(dir.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(message.contains(expect) && message.contains("config.json"), "{message}");
    }
}

/// bf16 mixed precision (bf16 products on the CPU, f32 everything else) stays close to f32, and
/// gives every parameter a finite gradient.
#[test]
fn every_decoder_trains_in_bf16_close_to_f32() {
    for name in DECODERS {
        let case = case(name);
        let (full, _) = loss_and_grads(&model(name, DType::F32), &case);
        let mut bf16 = model(name, DType::F32);
        bf16.set_precision(pipe::device::Precision::Bf16);
        let (mixed, grads) = loss_and_grads(&bf16, &case);
        let (full, mixed) = (scalar(&full), scalar(&mixed));
        assert!((full - mixed).abs() / full < 2e-2, "{name}: bf16 loss {mixed} vs f32 {full}");
        for ((param, _), grad) in bf16.params().iter().zip(&grads) {
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: {param}: no gradient"));
            assert!(scalar(&grad.sqr().unwrap().sum_all().unwrap()).is_finite(), "{name}: {param}");
        }
    }
}
