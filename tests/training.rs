//! Training end to end on tiny models of every family: they learn, they are deterministic (also
//! across thread counts), and what they save loads back to the same bits.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use pipe::model::{Batch, Classifier, Dropout, Mode, Model};
use pipe::optim::{OptimizerConfig, ScheduleConfig, ScheduleKind};
use pipe::train::{Examples, TrainConfig, Trainer};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const LABELS: [&str; 3] = ["red", "green", "blue"];

/// 96 rows of random tokens; the class is which of three marker tokens (3, 4, 5) the row holds.
fn synthetic() -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    (0..96)
        .map(|i| {
            let label = (i % 3) as u32;
            let len = rng.random_range(3..12);
            let mut row: Vec<u32> = (0..len).map(|_| rng.random_range(10..128)).collect();
            let at = rng.random_range(0..=row.len());
            row.insert(at, 3 + label);
            row.insert(0, 1);
            row.push(2);
            (row, label)
        })
        .unzip()
}

/// The tiny BERT, and the tiny models of the other families (`scripts/make-fixtures.py`).
const MODELS: [&str; 5] = [
    "parity/bert-tiny",
    "families/distilbert",
    "families/electra",
    "families/roberta",
    "families/xlm-roberta",
];

fn tiny_model() -> Classifier {
    tiny(MODELS[0])
}

/// The fixture model at `source` with the synthetic task's labels and dropout on.
fn tiny(source: &str) -> Classifier {
    let labels = LABELS.iter().map(|s| s.to_string()).collect();
    let mut model =
        Classifier::from_pretrained(&fixture(source), Some(labels), DType::F32, &Device::Cpu, 3).unwrap();
    // The fixture has dropout 0; train with it on so that the seeded masks are exercised.
    model.set_dropout(Dropout { hidden: 0.1, attention: 0.1, classifier: 0.1 });
    model
}

/// Trains the tiny BERT for a fixed budget and returns the model.
fn train(seed: u64) -> Classifier {
    train_model(tiny_model(), seed)
}

/// Trains `model` for a fixed budget.
fn train_model(model: Classifier, seed: u64) -> Classifier {
    let (ids, labels) = synthetic();
    let data = Examples { ids: &ids, labels: &labels };
    let optimizer = OptimizerConfig { lr: 5e-3, ..Default::default() };
    let config = TrainConfig {
        epochs: 60,
        batch_size: 16,
        max_grad_norm: Some(1.0),
        length_bucketing: true,
        ..Default::default()
    };
    let model = Model::Classifier(model);
    let mut trainer = Trainer::new(model, optimizer, ScheduleConfig::default(), config, seed, data).unwrap();
    while !trainer.finished() {
        trainer.step(data).unwrap();
    }
    match trainer.into_model() {
        Model::Classifier(model) => model,
        Model::CausalLm(_) => unreachable!("a classifier was trained"),
    }
}

fn weights_digest(params: &[(String, candle_core::Var)]) -> String {
    let mut h = Sha256::new();
    for (name, var) in params {
        h.update(name.as_bytes());
        for x in var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            h.update(x.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

fn accuracy(model: &Classifier, ids: &[Vec<u32>], labels: &[u32]) -> f64 {
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = Batch::pad(&rows, model.pad_id(), model.dtype(), model.device()).unwrap();
    let logits = model.forward(&batch, Mode::Eval).unwrap();
    let predicted = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    predicted.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

#[test]
fn tiny_model_learns_the_synthetic_task_completely() {
    let (ids, labels) = synthetic();
    let before = accuracy(&tiny_model(), &ids, &labels);
    let model = train(42);
    let after = accuracy(&model, &ids, &labels);
    assert_eq!(after, 1.0, "training accuracy {after} (was {before} before training)");
}

#[test]
fn every_family_learns_the_synthetic_task_completely() {
    let (ids, labels) = synthetic();
    for source in &MODELS[1..] {
        let model = train_model(tiny(source), 42);
        let after = accuracy(&model, &ids, &labels);
        assert_eq!(after, 1.0, "{source}: training accuracy {after}");
    }
}

#[test]
fn same_seed_same_bits_and_another_seed_other_bits() {
    assert_eq!(weights_digest(train(42).params()), weights_digest(train(42).params()));
    assert_ne!(weights_digest(train(42).params()), weights_digest(train(43).params()));
}

/// Run by `same_bits_with_one_and_two_threads` in a child process with RAYON_NUM_THREADS set:
/// the digest of each model's training run.
#[test]
#[ignore = "helper: run by same_bits_with_one_and_two_threads"]
fn print_digest_of_a_training_run() {
    for source in MODELS {
        println!("DIGEST {source} {}", weights_digest(train_model(tiny(source), 42).params()));
    }
}

#[test]
fn same_bits_with_one_and_two_threads() {
    let digest = |threads: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "print_digest_of_a_training_run", "--nocapture"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let digests: Vec<String> =
            stdout.lines().filter_map(|l| l.strip_prefix("DIGEST ").map(str::to_string)).collect();
        assert_eq!(digests.len(), MODELS.len(), "child printed a digest per model: {stdout}");
        digests
    };
    let one = digest("1");
    assert_eq!(one, digest("2"), "weights differ between 1 and 2 threads");
    let bert = format!("{} {}", MODELS[0], weights_digest(train(42).params()));
    assert_eq!(one[0], bert, "child and in-process runs differ");
}

#[test]
fn saved_model_loads_back_bit_exactly_in_hugging_face_layout() {
    let model = train(42);
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let loaded = Classifier::from_pretrained(dir.path(), None, DType::F32, &Device::Cpu, 999).unwrap();
    assert_eq!(loaded.labels(), model.labels());
    let names = |m: &Classifier| m.params().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&loaded), names(&model));
    assert_eq!(weights_digest(loaded.params()), weights_digest(model.params()));

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_labels"], 3);
    assert_eq!(config["id2label"]["2"], "blue");
    assert_eq!(config["label2id"]["green"], 1);
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    assert!(meta.tensors().contains_key("bert.encoder.layer.1.output.LayerNorm.weight"));
}

/// `train.stop_after_epoch` ends training after that epoch while the learning rate follows the
/// whole run's schedule: the weights are exactly the full run's after that epoch, so a sweep's
/// pruned trial is an ordinary, reproducible run.
#[test]
fn stop_after_epoch_gives_the_full_runs_weights_at_that_epoch() {
    let (ids, labels) = synthetic();
    let data = Examples { ids: &ids, labels: &labels };
    let optimizer = OptimizerConfig { lr: 5e-3, ..Default::default() };
    let schedule = ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 0, warmup_ratio: 0.0 };
    let config = TrainConfig { epochs: 3, batch_size: 16, ..Default::default() };
    let make = |config: TrainConfig| {
        Trainer::new(Model::Classifier(tiny_model()), optimizer.clone(), schedule.clone(), config, 0, data)
            .unwrap()
    };
    let mut stopped = make(TrainConfig { stop_after_epoch: Some(2), ..config.clone() });
    let mut full = make(config);
    let mut stopped_lrs = Vec::new();
    while !stopped.finished() {
        stopped_lrs.push(stopped.step(data).unwrap().lr);
    }
    assert_eq!(stopped.steps_done(), 2 * stopped.steps_per_epoch());
    assert_eq!(stopped.total_steps(), full.total_steps(), "the schedule still spans every epoch");
    let full_lrs: Vec<f64> = (0..stopped.steps_done()).map(|_| full.step(data).unwrap().lr).collect();
    assert_eq!(stopped_lrs, full_lrs);
    assert!(*stopped_lrs.last().unwrap() > 1e-4, "the rate did not decay to zero at the stop");
    assert!(!full.finished());
    assert_eq!(weights_digest(stopped.model().params()), weights_digest(full.model().params()));
}
