//! The evaluate stage: the trained model on the validation split, and on the held-out test split
//! when the pipeline has one.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use serde_json::json;

use super::tokenize::TOKENS_FILE;
use super::train::{MODEL_DIR, VALIDATION_PROBABILITIES, read_probabilities};
use super::{Observer, Stage, StageError, Upstream, io_error, upstream_digest};
use crate::config::EvaluateConfig;
use crate::data;
use crate::device::Precision;
use crate::evaluate::{Scored, score};
use crate::model::Classifier;
use crate::plan::{KeyFields, StageKind};
use crate::store::WorkDir;

/// Output: the classification report as JSON.
pub const METRICS_FILE: &str = "metrics.json";
/// Output: one row per validation example with the true and predicted class and probabilities.
pub const PREDICTIONS_FILE: &str = "predictions.csv";
/// Output (with `dataset.test`): the classification report on the test split.
pub const TEST_METRICS_FILE: &str = "test_metrics.json";

/// Scores the trained model on the validation split.
pub struct EvaluateStage {
    pub(crate) evaluate: EvaluateConfig,
    /// The pipeline's `dtype`: a bf16 run predicts with bf16 products, as it evaluated while it
    /// trained (and as `pipe predict` does for it).
    pub(crate) precision: Precision,
}

impl Stage for EvaluateStage {
    fn kind(&self) -> StageKind {
        StageKind::Evaluate
    }

    fn key_fields(&self, upstream: &Upstream) -> KeyFields {
        let inputs = BTreeMap::from([
            ("tokenize".to_string(), upstream_digest(upstream, StageKind::Tokenize)),
            ("train".to_string(), upstream_digest(upstream, StageKind::Train)),
        ]);
        let mut params = json!({ "evaluate": { "batch_size": self.evaluate.batch_size } });
        if self.precision != Precision::F32 {
            params["dtype"] = json!(self.precision.name());
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
        let trained = &upstream[&StageKind::Train];
        let mut model =
            Classifier::from_pretrained(&trained.file(MODEL_DIR), None, DType::F32, &Device::Cpu, 0)?;
        model.set_precision(self.precision);
        // The train stage's last evaluation already predicted these rows with these weights, as
        // `score` does here (it writes them only then): the same bits, without predicting again.
        let reused = trained.file(VALIDATION_PROBABILITIES);
        let reuse = reused.exists();
        let Scored { probabilities, predicted, report } = if reuse {
            let probabilities = read_probabilities(&reused, validation.labels.len(), model.labels().len())?;
            Scored::new(probabilities, &validation.labels, model.labels())
        } else {
            score(&model, &validation.ids, &validation.labels, self.evaluate.batch_size)?
        };
        let path = work.out().join(METRICS_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&report).expect("JSON") + "\n")
            .map_err(io_error(&path))?;
        let path = work.out().join(PREDICTIONS_FILE);
        let mut csv = csv::Writer::from_path(&path)
            .map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))?;
        let mut header = vec!["row".to_string(), "label".into(), "predicted".into()];
        header.extend(model.labels().iter().map(|l| format!("p_{l}")));
        let write_err = |e: csv::Error| StageError::Invalid(format!("{}: {e}", path.display()));
        csv.write_record(&header).map_err(write_err)?;
        for (row, (p, (&label, &pred))) in
            probabilities.iter().zip(validation.labels.iter().zip(&predicted)).enumerate()
        {
            let mut record = vec![
                row.to_string(),
                model.labels()[label as usize].clone(),
                model.labels()[pred as usize].clone(),
            ];
            record.extend(p.iter().map(|v| format!("{v:.6}")));
            csv.write_record(&record).map_err(write_err)?;
        }
        csv.flush().map_err(io_error(&path))?;
        let mut facts = json!({
            "seconds": start.elapsed().as_secs_f64(),
            "rows": validation.labels.len(),
            "validation_predicted_by": if reuse { "train" } else { "evaluate" },
        });
        if let Some(test) = splits.get("test") {
            let scored = score(&model, &test.ids, &test.labels, self.evaluate.batch_size)?;
            let path = work.out().join(TEST_METRICS_FILE);
            std::fs::write(&path, serde_json::to_string_pretty(&scored.report).expect("JSON") + "\n")
                .map_err(io_error(&path))?;
            facts["test_rows"] = json!(test.labels.len());
            facts["seconds"] = json!(start.elapsed().as_secs_f64());
        }
        Ok(facts)
    }
}
