//! Helpers shared by the integration tests: fixtures, tolerances, tiny models.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pipe::model::Batch;

/// `tests/fixtures/...` inside the crate.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture loads")
}

/// `‖x − ref‖₂ / max(‖ref‖₂, floor)`, the comparison of `tests/fixtures/parity/README.md`.
pub fn rel_err(x: &Tensor, reference: &Tensor, floor: f64) -> f64 {
    let x = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let r = reference.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(x.dims(), r.dims(), "shapes differ");
    let diff = (x - &r).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let norm = r.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    diff / norm.max(floor)
}

/// A scalar stored as a one-element tensor.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
}

/// The fixture's padded batch (i64 tensors) as model input in `dtype`.
pub fn fixture_batch(case: &HashMap<String, Tensor>, dtype: DType) -> (Batch, Vec<u32>) {
    let u32s = |name: &str| case[name].to_dtype(DType::U32).unwrap();
    let mask = case["attention_mask"].to_dtype(dtype).unwrap();
    let real_tokens = scalar(&mask.sum_all().unwrap()) as usize;
    let labels = case["labels"].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap();
    let batch = Batch {
        input_ids: u32s("input_ids"),
        attention_mask: mask,
        token_type_ids: u32s("token_type_ids"),
        real_tokens,
    };
    (batch, labels)
}

/// The MiniLM checkpoint, when it has been fetched (`scripts/fetch-model.sh`); tests that need it
/// print why they skip otherwise.
pub fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PIPE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: the real MiniLM is not at {} (run scripts/fetch-model.sh to include this test)",
            dir.display()
        );
        None
    }
}
