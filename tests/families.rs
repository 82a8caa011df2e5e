//! Every encoder family against PyTorch/transformers: the tiny random-init models and float64
//! references of `tests/fixtures/families` (made by `scripts/make-fixtures.py`), saved models that
//! transformers loads, and tokenizers that give transformers' ids.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_matches_reference, fixture, fixture_batch, load, loss_and_grads, rel_err, scalar};
use pipe::data::Flavor;
use pipe::model::{Classifier, Mode};
use pipe::optim::{AdamW, OptimizerConfig};

/// The fixture families (BERT's own are in `tests/parity.rs`).
const FAMILIES: [&str; 5] = ["distilbert", "electra", "modernbert", "roberta", "xlm-roberta"];

fn model(family: &str, dtype: DType) -> Classifier {
    let dir = fixture(&format!("families/{family}"));
    Classifier::from_pretrained(&dir, None, dtype, &Device::Cpu, 0)
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

fn case(family: &str) -> HashMap<String, Tensor> {
    load(&format!("families/{family}-case.safetensors"))
}

/// The attention key biases, whose true gradient is exactly zero: softmax ignores a constant added
/// to every score of a row, and a key bias adds exactly such a constant (`q · b_k`).
fn is_key_bias(name: &str) -> bool {
    name.ends_with("attention.self.key.bias") || name.ends_with("attention.k_lin.bias")
}

#[test]
fn every_family_matches_pytorch_logits_loss_and_every_gradient() {
    for family in FAMILIES {
        let (worst, at) = assert_matches_reference(family, &model(family, DType::F32), &case(family));
        println!("{family}: worst gradient error {worst:e} at {at}");
    }
}

/// In f64, every parameter but the attention key biases gets a gradient that is not zero.
#[test]
fn every_family_gives_every_parameter_a_gradient() {
    for family in FAMILIES {
        let case = case(family);
        let model = model(family, DType::F64);
        let (_, _, grads) = loss_and_grads(&model, &case);
        for ((name, _), grad) in model.params().iter().zip(&grads) {
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{family}: {name}: no gradient"));
            let norm = scalar(&grad.sqr().unwrap().sum_all().unwrap()).sqrt();
            if !is_key_bias(name) {
                assert!(norm > 0.0, "{family}: {name}: zero gradient (an op dropped the graph?)");
            }
        }
    }
}

#[test]
fn every_family_follows_pytorchs_adamw_trajectory() {
    for family in FAMILIES {
        let case = case(family);
        let model = model(family, DType::F32);
        // Weight decay on every parameter, as the fixture's torch.optim.AdamW.
        let config =
            OptimizerConfig { lr: 1e-3, weight_decay: 0.01, decay_bias_and_norm: true, ..Default::default() };
        let mut opt = AdamW::new(config, model.params().to_vec()).unwrap();
        let want = case["adamw_const.losses"].to_vec1::<f64>().unwrap();
        for (step, want) in want.iter().enumerate() {
            let (_, loss, grads) = loss_and_grads(&model, &case);
            let loss = f64::from(loss.to_scalar::<f32>().unwrap());
            assert!((loss - want).abs() / want.abs() < 1e-4, "{family} loss {step}: {loss} vs {want}");
            opt.step(&grads, 1e-3, 1.0).unwrap();
        }
        let mut worst = (0f64, String::new());
        for (name, var) in model.params() {
            let reference = &case[&format!("adamw_const.param.{name}")];
            if is_key_bias(name) {
                // Its true gradient is exactly zero: the float64 reference's is ~1e-21, which
                // Adam's epsilon keeps from moving it, while float32 rounding noise (~1e-9) moves
                // it by a fraction of the learning rate per step. Each step moves an element by
                // at most about the learning rate, whatever the gradient.
                let moved = (var.as_tensor().to_dtype(DType::F64).unwrap() - reference).unwrap();
                let most = scalar(&moved.abs().unwrap().max_all().unwrap());
                assert!(most <= 3.0 * 1e-3 * 1.01, "{family}: {name} moved by {most:e} in 3 steps");
                continue;
            }
            let e = rel_err(var.as_tensor(), reference, 0.0);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        assert!(worst.0 < 1e-4, "{family}: worst parameter error {:e} at {}", worst.0, worst.1);
    }
}

/// Logits of the fixture batch, as f64 values.
fn logits(model: &Classifier, case: &HashMap<String, Tensor>) -> Vec<f64> {
    let (batch, _) = fixture_batch(case, model.dtype());
    let logits = model.forward(&batch, Mode::Eval).unwrap();
    logits.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// A saved model reloads in pipe to the same bits, declares the family's transformers class, and
/// (where PyTorch and transformers are importable) transformers loads it with
/// `AutoModelForSequenceClassification` and computes pipe's logits.
#[test]
fn every_family_saves_a_directory_that_transformers_loads() {
    let python = std::env::var("PIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = std::process::Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    for family in FAMILIES {
        let case = case(family);
        let model = model(family, DType::F32);
        let dir = tempfile::tempdir().unwrap();
        model.save_pretrained(dir.path()).unwrap();
        let reloaded = Classifier::from_pretrained(dir.path(), None, DType::F32, &Device::Cpu, 0).unwrap();
        let (ours, again) = (logits(&model, &case), logits(&reloaded, &case));
        assert_eq!(ours, again, "{family}: the saved model reloads to other logits");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], family);
        if !has_torch {
            println!("SKIPPED: {family}: `{python}` cannot import torch and transformers (set PIPE_PYTHON)");
            continue;
        }
        let theirs = transformers_logits(&python, dir.path(), &case);
        let e = rel_err(
            &Tensor::new(ours.as_slice(), &Device::Cpu).unwrap(),
            &Tensor::new(theirs.as_slice(), &Device::Cpu).unwrap(),
            0.0,
        );
        println!("{family}: transformers loads the saved model; logits differ by {e:e}");
        assert!(e < 1e-5, "{family}: transformers' logits differ from pipe's by {e:e}");
    }
}

/// The logits that transformers computes for the fixture batch with the model saved in `dir`.
fn transformers_logits(python: &str, dir: &Path, case: &HashMap<String, Tensor>) -> Vec<f64> {
    let rows = |name: &str| case[name].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let inputs = serde_json::json!({
        "input_ids": rows("input_ids"),
        "attention_mask": rows("attention_mask"),
        "token_type_ids": rows("token_type_ids"),
    });
    let script = r#"
import json, sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
inputs = {k: torch.tensor(v) for k, v in json.loads(sys.argv[2]).items()}
if model.config.model_type in ("distilbert", "modernbert"):
    del inputs["token_type_ids"]
with torch.no_grad():
    print(json.dumps(model(**inputs).logits.double().flatten().tolist()))
"#;
    let out = std::process::Command::new(python)
        .args(["-c", script, dir.to_str().unwrap(), &inputs.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "transformers failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn an_unsupported_model_type_is_refused_with_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("families/roberta");
    std::fs::copy(source.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), config.replace("\"roberta\"", "\"gpt2\"")).unwrap();
    let err = Classifier::from_pretrained(dir.path(), None, DType::F32, &Device::Cpu, 0).err().unwrap();
    let message = err.to_string();
    assert!(message.contains("`gpt2`"), "{message}");
    assert!(message.contains("bert, distilbert, electra, modernbert, roberta, xlm-roberta"), "{message}");
}

/// pipe's tokenizer (`tokenizers` reading `tokenizer.json`) gives transformers' ids for a
/// RoBERTa-style byte-level BPE and an XLM-R-style Unigram, with special tokens and truncation.
#[test]
fn tokenizers_give_transformers_ids() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("families/tokenizers/cases.json")).unwrap())
            .unwrap();
    let strings: Vec<String> = serde_json::from_value(cases["strings"].clone()).unwrap();
    assert!(strings.len() >= 300, "a few hundred varied strings: {}", strings.len());
    let max_length = cases["max_length"].as_u64().unwrap() as usize;
    for kind in ["bpe", "unigram"] {
        let dir = fixture(&format!("families/tokenizers/{kind}"));
        let flavor = pipe::data::Flavor::of_dir(&dir).unwrap();
        let want_flavor = if kind == "unigram" { Flavor::XlmRoberta } else { Flavor::AsFile };
        assert_eq!(flavor, want_flavor, "{kind}: resolved from config.json's model_type");
        for (length, key) in [(1 << 20, "full"), (max_length, "truncated")] {
            let encoder =
                pipe::data::TextEncoder::from_file(&dir.join("tokenizer.json"), length, flavor).unwrap();
            let ours = encoder.encode_all(&strings).unwrap();
            let want: Vec<Vec<u32>> = serde_json::from_value(cases[kind][key].clone()).unwrap();
            for ((s, ours), want) in strings.iter().zip(&ours).zip(&want) {
                assert_eq!(ours, want, "{kind} {key}: ids of {s:?}");
            }
        }
    }
}

/// RoBERTa's positions start after the padding id, so its longest input is that much shorter
/// than `max_position_embeddings`: an input one longer is an error, not an out-of-range gather.
#[test]
fn roberta_inputs_stop_where_its_positions_do() {
    let model = model("roberta", DType::F32);
    let longest = model.config().max_length();
    assert_eq!(longest, model.config().max_position_embeddings - 2, "pad_token_id 1: two positions skipped");
    let row = |len: usize| vec![5u32; len];
    for (len, fits) in [(longest, true), (longest + 1, false)] {
        let rows = [row(len)];
        let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let batch = pipe::model::Batch::pad(&rows, model.pad_id(), model.dtype(), model.device()).unwrap();
        let result = model.forward(&batch, Mode::Eval);
        assert_eq!(result.is_ok(), fits, "{len} tokens: {:?}", result.err());
    }
}

/// A bare base-model checkpoint (names without the `roberta.`-style prefix, as `AutoModel` saves
/// them) loads to the same encoder: with the head's tensors alongside, the same logits bit for bit.
#[test]
fn every_family_loads_names_without_the_base_prefix() {
    for family in FAMILIES {
        let dir = fixture(&format!("families/{family}"));
        let base = match family {
            "xlm-roberta" => "roberta.".to_string(),
            "modernbert" => "model.".to_string(),
            other => format!("{other}."),
        };
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let stripped: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| (name.strip_prefix(&base).map_or(name.clone(), str::to_string), t))
            .collect();
        assert!(stripped.keys().all(|n| !n.starts_with(&base)), "{family}: every prefix stripped");
        let bare = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(&stripped, bare.path().join("model.safetensors")).unwrap();
        std::fs::copy(dir.join("config.json"), bare.path().join("config.json")).unwrap();
        let reloaded = Classifier::from_pretrained(bare.path(), None, DType::F32, &Device::Cpu, 0).unwrap();
        let case = case(family);
        assert_eq!(logits(&model(family, DType::F32), &case), logits(&reloaded, &case), "{family}");
    }
}

/// `pipe run` and `pipe predict` end to end with an XLM-R model and its SentencePiece tokenizer.
/// The tokenizer's flavour is part of the tokenize key: the same files read as the file says
/// (`tokenizer_class` naming the generic class) give another key.
#[test]
fn an_xlm_roberta_pipeline_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_project(dir.path());
    let model = dir.path().join("model");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("families/xlm-roberta").join(file), model.join(file)).unwrap();
    }
    let tokenizer = fixture("families/tokenizers/unigram/tokenizer.json");
    std::fs::copy(tokenizer, model.join("tokenizer.json")).unwrap();
    let run = common::run_json(dir.path(), &[]);
    assert_eq!(run.statuses(), ["ran", "ran", "ran"]);
    let args = ["predict", &run.run, "--input", "data/validation.csv", "--output", "predicted.csv"];
    common::pipe_ok(dir.path(), &args);
    let predicted = std::fs::read_to_string(dir.path().join("predicted.csv")).unwrap();
    assert_eq!(predicted.lines().count(), 13, "a header and a prediction per row: {predicted}");

    std::fs::write(model.join("tokenizer_config.json"), r#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#)
        .unwrap();
    let as_file = common::run_json(dir.path(), &[]);
    assert_ne!(as_file.key("tokenize"), run.key("tokenize"), "the flavour is part of the key");
}

/// A tokenizer whose ids do not fit the model's embeddings is bad input, found before training.
#[test]
fn a_tokenizer_larger_than_the_models_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_project(dir.path());
    let model = dir.path().join("model");
    std::fs::copy(fixture("families/tokenizers/unigram/tokenizer.json"), model.join("tokenizer.json"))
        .unwrap();
    let output = common::pipe(dir.path(), &["run", "pipeline.toml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{}", common::describe(&["run"], &output));
    assert!(stderr.contains("tokenizer.json") && stderr.contains("vocab_size"), "{stderr}");
}

/// Mixed precision (bf16 products on the CPU) runs every family, close to its f32 logits, and its
/// inference path (the last layer on the first tokens only, where a family has it) gives the
/// bits of the full forward pass.
#[test]
fn every_family_runs_in_bf16_and_infers_with_the_full_pass_bits() {
    for family in FAMILIES {
        let case = case(family);
        let f32_logits = logits(&model(family, DType::F32), &case);
        let mut bf16 = model(family, DType::F32);
        bf16.set_precision(pipe::device::Precision::Bf16);
        let bf16_logits = logits(&bf16, &case);
        let e = rel_err(
            &Tensor::new(bf16_logits.as_slice(), &Device::Cpu).unwrap(),
            &Tensor::new(f32_logits.as_slice(), &Device::Cpu).unwrap(),
            0.0,
        );
        assert!(e > 0.0 && e < 2e-2, "{family}: bf16 logits {e:e} from f32 (bf16 products in use, close)");
        let (batch, _) = fixture_batch(&case, DType::F32);
        let inferred = bf16.forward(&batch, Mode::Infer).unwrap();
        let inferred: Vec<f64> =
            inferred.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(inferred, bf16_logits, "{family}: inference bits");
    }
}
