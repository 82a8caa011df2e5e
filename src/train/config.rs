//! `[train]`: how the train stage walks the data, when it evaluates, when it stops early, and how
//! it weights the classes.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::Metric;

/// `[train]`: epochs, batching and the step loop. Defaults follow the reference recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed (and averaged) before each optimizer step.
    pub grad_accum_steps: usize,
    /// Clip the global gradient L2 norm to this value before each step (`clip_grad_norm_`).
    pub max_grad_norm: Option<f64>,
    /// Stop after this many optimizer steps, even mid-epoch (the schedule is sized to it).
    pub max_steps: Option<u64>,
    /// End training after this epoch while the learning-rate schedule still runs over all
    /// `epochs`: the weights are exactly those the full run has after that epoch. A sweep's pruned
    /// trial is this run. (Left out of the stage key when unset.)
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub stop_after_epoch: Option<u64>,
    /// Shuffle the training rows every epoch (seeded).
    pub shuffle: bool,
    /// Group rows of similar length into the same batch (less padding, faster); batches are still
    /// visited in a seeded random order.
    pub length_bucketing: bool,
    /// Evaluate on the validation split at the end of every epoch (train and validation loss and
    /// `evaluate.metrics`, written to `metrics.jsonl` and drawn in `curves.png`). While the train
    /// stage evaluates, `evaluate.batch_size` and `evaluate.metrics` are part of its key.
    pub eval_every_epoch: bool,
    /// Also evaluate every this many optimizer steps. Whenever training evaluates at all, the last
    /// step is evaluated too.
    #[schemars(range(min = 1))]
    pub eval_every_steps: Option<u64>,
    /// Stop when the validation metric stops improving, and keep the best evaluation's weights.
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Weight each class in the training loss: "balanced" (`rows / (classes * rows of the
    /// class)`, as scikit-learn) or one positive number per class, in label order.
    pub class_weights: Option<ClassWeights>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 16,
            grad_accum_steps: 1,
            max_grad_norm: None,
            max_steps: None,
            stop_after_epoch: None,
            shuffle: true,
            length_bucketing: false,
            eval_every_epoch: true,
            eval_every_steps: None,
            early_stopping: None,
            class_weights: None,
        }
    }
}

impl TrainConfig {
    /// Whether the train stage evaluates on the validation split at all.
    pub fn evaluates(&self) -> bool {
        self.eval_every_epoch || self.eval_every_steps.is_some()
    }
}

/// `[train.early_stopping]`: stop training once the validation metric has not improved for
/// `patience` evaluations in a row, and save the weights of the best evaluation (Hugging Face's
/// `EarlyStoppingCallback` with `load_best_model_at_end`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStoppingConfig {
    /// The validation metric to watch: "loss" (always computed; lower is better) or one of
    /// `evaluate.metrics` (higher is better).
    pub metric: Metric,
    /// Evaluations in a row without improvement after which training stops.
    #[schemars(range(min = 1))]
    pub patience: u32,
    /// An evaluation improves on the best only by more than this.
    #[schemars(range(min = 0))]
    pub min_delta: f64,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        Self { metric: Metric::Loss, patience: 3, min_delta: 0.0 }
    }
}

/// How the classes are weighted in the training loss (`torch.nn.CrossEntropyLoss(weight=...)`).
///
/// Written as the string `"balanced"` or a list of numbers, hence the hand-written serde and
/// schema: a derived untagged enum would answer a typo with "did not match any variant".
#[derive(Debug, Clone, PartialEq)]
pub enum ClassWeights {
    /// `rows / (classes * rows of the class)` over the training split (scikit-learn's
    /// `compute_class_weight("balanced")`).
    Balanced,
    /// One weight per class, in label order.
    Explicit(Vec<f64>),
}

impl ClassWeights {
    /// The weight of each of `classes` classes, given the training rows' class indices; an error
    /// message when an explicit list has another length.
    pub fn resolve(&self, labels: &[u32], classes: usize) -> Result<Vec<f64>, String> {
        match self {
            ClassWeights::Balanced => {
                let mut counts = vec![0usize; classes];
                for &label in labels {
                    if let Some(count) = counts.get_mut(label as usize) {
                        *count += 1;
                    }
                }
                // A class without training rows never weighs in the loss; 0 avoids a division by 0.
                Ok(counts
                    .iter()
                    .map(|&n| if n == 0 { 0.0 } else { labels.len() as f64 / (classes * n) as f64 })
                    .collect())
            }
            ClassWeights::Explicit(weights) if weights.len() == classes => Ok(weights.clone()),
            ClassWeights::Explicit(weights) => Err(format!(
                "`train.class_weights` lists {} weights, but the training data has {classes} classes",
                weights.len()
            )),
        }
    }
}

impl Serialize for ClassWeights {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ClassWeights::Balanced => serializer.serialize_str("balanced"),
            ClassWeights::Explicit(weights) => weights.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ClassWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ClassWeights;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"balanced\" or a list of numbers, one per class")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<ClassWeights, E> {
                match value {
                    "balanced" => Ok(ClassWeights::Balanced),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ClassWeights, A::Error> {
                let mut weights = Vec::new();
                while let Some(weight) = seq.next_element::<f64>()? {
                    weights.push(weight);
                }
                Ok(ClassWeights::Explicit(weights))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for ClassWeights {
    fn schema_name() -> Cow<'static, str> {
        "ClassWeights".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "\"balanced\" or one positive weight per class, in label order.",
            "oneOf": [
                { "const": "balanced" },
                { "type": "array", "items": { "type": "number", "exclusiveMinimum": 0 }, "minItems": 1 }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_weights_are_scikit_learns() {
        // compute_class_weight("balanced", classes=[0, 1, 2], y=[0, 0, 0, 1]) -> [4/9, 4/3, 0]
        // (sklearn refuses a class without rows; pipe gives it weight 0, which no row ever uses).
        let weights = ClassWeights::Balanced.resolve(&[0, 0, 0, 1], 3).unwrap();
        assert_eq!(weights, vec![4.0 / 9.0, 4.0 / 3.0, 0.0]);
    }

    #[test]
    fn explicit_weights_must_match_the_classes() {
        let weights = ClassWeights::Explicit(vec![1.0, 2.0]);
        assert_eq!(weights.resolve(&[0, 1], 2).unwrap(), vec![1.0, 2.0]);
        let message = weights.resolve(&[0, 1], 3).unwrap_err();
        assert!(message.contains("lists 2 weights, but the training data has 3 classes"), "{message}");
    }

    #[test]
    fn reads_and_writes_both_forms() {
        #[derive(Debug, Deserialize, Serialize)]
        struct T {
            w: ClassWeights,
        }
        let t: T = toml::from_str("w = \"balanced\"").unwrap();
        assert_eq!(t.w, ClassWeights::Balanced);
        let t: T = toml::from_str("w = [1, 2.5]").unwrap();
        assert_eq!(t.w, ClassWeights::Explicit(vec![1.0, 2.5]));
        assert_eq!(toml::to_string(&t).unwrap().trim(), "w = [1.0, 2.5]");
        let message = toml::from_str::<T>("w = \"balance\"").unwrap_err().to_string();
        assert!(message.contains("expected \"balanced\" or a list of numbers, one per class"), "{message}");
    }
}
