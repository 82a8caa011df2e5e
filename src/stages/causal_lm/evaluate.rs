//! The evaluate stage of a causal LM: the trained model's loss and perplexity on the validation
//! split and, for prompt/completion data, the exact match of its greedy generations against the
//! completions (each generation kept in `generations.csv`); the same on the test split; and with
//! `evaluate.baseline`, the pretrained model's scores beside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::json;

use crate::config::{EvaluateConfig, Metric};
use crate::data::{self, LmTokenizer, TokenizedSplit};
use crate::device::Precision;
use crate::model::CausalLm;
use crate::plan::{KeyFields, StageKind};
use crate::stages::{
    Input, METRICS_FILE, MODEL_DIR, Observer, Stage, StageError, TEST_METRICS_FILE, TOKENS_FILE, Upstream,
    VALIDATION_LOSS, io_error, upstream_digest,
};
use crate::store::WorkDir;

/// Output (prompt/completion data): each validation prompt, its completion and the generation.
pub const GENERATIONS_FILE: &str = "generations.csv";

/// A split's metrics (a JSON object by name) and, with exact match, each row's generation.
type Scored = (serde_json::Value, Option<Vec<Vec<u32>>>);

/// Scores the trained causal LM.
pub struct LmEvaluateStage {
    pub(crate) evaluate: EvaluateConfig,
    pub(crate) precision: Precision,
    /// With `evaluate.baseline`: the pretrained model (a directory or a GGUF file) and its
    /// weights' digest, scored too.
    pub(crate) pretrained: Option<(PathBuf, Input)>,
}

impl LmEvaluateStage {
    /// The metrics of `split`, and its greedy generations when exact match is asked for. `known`:
    /// the loss and predicted tokens, when the train stage already computed them for this model.
    fn score(
        &self,
        model: &CausalLm,
        split: &TokenizedSplit,
        stop: &[u32],
        known: Option<(f64, usize)>,
    ) -> Result<Scored, StageError> {
        let (loss, tokens) = match known {
            Some(known) => known,
            None => crate::evaluate::lm_loss(model, &split.ids, &split.labels, self.evaluate.batch_size)?,
        };
        let mut report = json!({ "loss": loss, "perplexity": libm::exp(loss), "sequences": split.ids.len(), "predicted_tokens": tokens });
        let mut generations = None;
        if self.evaluate.metrics.contains(&Metric::ExactMatch) {
            let (matched, rows, generated) = crate::evaluate::exact_match(
                model,
                &split.ids,
                &split.labels,
                stop,
                self.evaluate.batch_size,
            )?;
            report["exact_match"] = json!(matched);
            report["exact_match_rows"] = json!(rows);
            generations = Some(generated);
        }
        Ok((report, generations))
    }
}

impl Stage for LmEvaluateStage {
    fn kind(&self) -> StageKind {
        StageKind::Evaluate
    }

    fn key_fields(&self, upstream: &Upstream) -> KeyFields {
        let inputs = BTreeMap::from([
            ("tokenize".to_string(), upstream_digest(upstream, StageKind::Tokenize)),
            ("train".to_string(), upstream_digest(upstream, StageKind::Train)),
        ]);
        let mut params = json!({
            "task": "causal-lm",
            "evaluate": { "batch_size": self.evaluate.batch_size, "exact_match": self.evaluate.metrics.contains(&Metric::ExactMatch) },
        });
        if self.precision != Precision::F32 {
            params["dtype"] = json!(self.precision.name());
        }
        let mut inputs = inputs;
        if let Some((_, weights)) = &self.pretrained {
            params["evaluate"]["baseline"] = json!(true);
            inputs.insert("baseline".into(), weights.sha256.clone());
        }
        KeyFields { kind: StageKind::Evaluate, version: StageKind::Evaluate.version(), params, inputs }
    }

    fn run(
        &mut self,
        work: &WorkDir,
        upstream: &Upstream,
        _observe: Observer<'_>,
    ) -> Result<serde_json::Value, StageError> {
        let start = std::time::Instant::now();
        let splits = data::load_tokens(&upstream[&StageKind::Tokenize].file(TOKENS_FILE))?;
        let validation = splits
            .get("validation")
            .ok_or_else(|| StageError::Invalid("tokenize output has no validation split".into()))?;
        let model_dir = upstream[&StageKind::Train].file(MODEL_DIR);
        let mut model = CausalLm::from_pretrained(&model_dir, DType::F32, &Device::Cpu)?;
        model.set_precision(self.precision);
        let tokenizer = LmTokenizer::load(&model_dir.join("tokenizer.json"))?;
        let stop = [tokenizer.eos()];
        // The train stage's last evaluation already computed the validation loss with these
        // weights, as `lm_loss` does here (it writes it only then): the same bits, not recomputed.
        let reused = upstream[&StageKind::Train].file(VALIDATION_LOSS);
        let known = match reused.exists() {
            true => Some(read_validation_loss(&reused)?),
            false => None,
        };
        let (mut report, generations) = self.score(&model, validation, &stop, known)?;
        if let Some((source, _)) = &self.pretrained {
            let mut pretrained = CausalLm::from_source(source, DType::F32, &Device::Cpu)?;
            pretrained.set_precision(self.precision);
            report["baseline"] = self.score(&pretrained, validation, &stop, None)?.0;
        }
        write_json(&work.out().join(METRICS_FILE), &report)?;
        if let Some(generations) = generations {
            write_generations(&work.out().join(GENERATIONS_FILE), &tokenizer, validation, &generations)?;
        }
        let mut facts = json!({
            "seconds": start.elapsed().as_secs_f64(),
            "sequences": validation.ids.len(),
            "validation_loss_from": if known.is_some() { "train" } else { "evaluate" },
        });
        if let Some(test) = splits.get("test") {
            let (report, _) = self.score(&model, test, &stop, None)?;
            write_json(&work.out().join(TEST_METRICS_FILE), &report)?;
            facts["test_sequences"] = json!(test.ids.len());
            facts["seconds"] = json!(start.elapsed().as_secs_f64());
        }
        Ok(facts)
    }
}

/// Reads the train stage's [`VALIDATION_LOSS`]: the loss and the tokens it averages over.
fn read_validation_loss(path: &Path) -> Result<(f64, usize), StageError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))?;
    match (value["loss"].as_f64(), value["predicted_tokens"].as_u64()) {
        (Some(loss), Some(tokens)) => Ok((loss, tokens as usize)),
        _ => Err(StageError::Invalid(format!(
            "{}: expected {{\"loss\", \"predicted_tokens\"}}",
            path.display()
        ))),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    std::fs::write(path, serde_json::to_string_pretty(value).expect("JSON") + "\n").map_err(io_error(path))
}

/// `generations.csv`: row, prompt, completion, generation (decoded, special tokens left out) and
/// whether the generation matched.
fn write_generations(
    path: &Path,
    tokenizer: &LmTokenizer,
    split: &TokenizedSplit,
    generations: &[Vec<u32>],
) -> Result<(), StageError> {
    let bad = |e: String| StageError::Invalid(format!("{}: {e}", path.display()));
    let mut csv = csv::Writer::from_path(path).map_err(|e| bad(e.to_string()))?;
    csv.write_record(["row", "prompt", "completion", "generated", "exact_match"])
        .map_err(|e| bad(e.to_string()))?;
    for (row, ((ids, &from), generated)) in split.ids.iter().zip(&split.labels).zip(generations).enumerate() {
        let from = from as usize;
        if generated.is_empty() {
            // Not scored: no prompt, or a completion cut at max_length.
            continue;
        }
        let text = |ids: &[u32]| tokenizer.decode(ids).map_err(&bad);
        let matched = generated.as_slice() == &ids[from..];
        csv.write_record([
            row.to_string(),
            text(&ids[..from])?,
            text(&ids[from..])?,
            text(generated)?,
            matched.to_string(),
        ])
        .map_err(|e| bad(e.to_string()))?;
    }
    csv.flush().map_err(io_error(path))
}
