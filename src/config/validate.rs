//! Range and consistency checks that types cannot express. Each problem names the key path it is
//! about, so that the loader can point at the layer that wrote it.

use super::{Metric, Pipeline, Task};
use crate::train::{ClassWeights, EarlyStoppingConfig};

/// An invalid value at a key path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub path: &'static str,
    pub message: String,
    pub help: Option<String>,
}

/// More epochs than any fine-tuning needs; a larger value is a typo (and would overflow the step
/// count).
const MAX_EPOCHS: u64 = 1_000_000;

fn problem(path: &'static str, message: impl Into<String>) -> Problem {
    Problem { path, message: message.into(), help: None }
}

/// The first invalid value, in file order.
pub(crate) fn first_problem(p: &Pipeline) -> Option<Problem> {
    let d = &p.dataset;
    let checks = [
        pipeline_name(&p.name),
        (!is_device(&p.device)).then(|| Problem {
            path: "device",
            message: format!("invalid device {:?}", p.device),
            help: Some("expected \"cpu\", \"cuda\" or \"cuda:N\" with N the GPU index".into()),
        }),
        non_empty("dataset.train", &d.train.to_string_lossy()),
        d.validation.as_ref().and_then(|v| non_empty("dataset.validation", &v.to_string_lossy())),
        d.test.as_ref().and_then(|t| non_empty("dataset.test", &t.to_string_lossy())),
        match (&d.validation, d.validation_split) {
            (Some(_), Some(_)) => Some(Problem {
                path: "dataset.validation_split",
                message: "`validation` and `validation_split` are both set".into(),
                help: Some(
                    "keep one: `validation` names a CSV file, `validation_split` holds out a \
                     fraction of the training rows"
                        .into(),
                ),
            }),
            (None, None) => Some(Problem {
                path: "dataset",
                message: "[dataset] needs `validation` or `validation_split`".into(),
                help: Some(
                    "add `validation = \"path/to/validation.csv\"` or `validation_split = 0.1`".into(),
                ),
            }),
            (_, Some(split)) if !(split > 0.0 && split < 1.0) => Some(problem(
                "dataset.validation_split",
                format!("`dataset.validation_split` must be between 0 and 1 (exclusive), got {split}"),
            )),
            _ => None,
        },
        non_empty("dataset.text_column", &d.text_column),
        non_empty("dataset.label_column", &d.label_column),
        (d.text_column == d.label_column).then(|| {
            problem("dataset.label_column", "`text_column` and `label_column` name the same column")
        }),
        non_empty("tokenizer.source", &p.tokenizer.source),
        (p.tokenizer.max_length < 2).then(|| {
            problem(
                "tokenizer.max_length",
                format!(
                    "`tokenizer.max_length` must be at least 2 ([CLS] and [SEP]), got {}",
                    p.tokenizer.max_length
                ),
            )
        }),
        non_empty("model.source", &p.model.source),
        probability("model.dropout", p.model.dropout),
        probability("model.attention_dropout", p.model.attention_dropout),
        probability("model.classifier_dropout", p.model.classifier_dropout),
        positive("optimizer.lr", p.optimizer.lr),
        (!(p.optimizer.weight_decay >= 0.0 && p.optimizer.weight_decay.is_finite())).then(|| {
            problem(
                "optimizer.weight_decay",
                format!(
                    "`optimizer.weight_decay` must be zero or positive, got {}",
                    p.optimizer.weight_decay
                ),
            )
        }),
        p.optimizer.betas.iter().find_map(|&beta| {
            (!(0.0..1.0).contains(&beta)).then(|| {
                problem("optimizer.betas", format!("each of `optimizer.betas` must be in [0, 1), got {beta}"))
            })
        }),
        positive("optimizer.eps", p.optimizer.eps),
        (!(0.0..1.0).contains(&p.schedule.warmup_ratio)).then(|| {
            problem(
                "schedule.warmup_ratio",
                format!("`schedule.warmup_ratio` must be in [0, 1), got {}", p.schedule.warmup_ratio),
            )
        }),
        at_least_one("train.epochs", p.train.epochs),
        (p.train.epochs > MAX_EPOCHS).then(|| {
            problem(
                "train.epochs",
                format!("`train.epochs` must be at most {MAX_EPOCHS}, got {}", p.train.epochs),
            )
        }),
        at_least_one("train.batch_size", p.train.batch_size as u64),
        at_least_one("train.grad_accum_steps", p.train.grad_accum_steps as u64),
        p.train.max_grad_norm.and_then(|norm| positive("train.max_grad_norm", norm)),
        p.train.max_steps.and_then(|steps| at_least_one("train.max_steps", steps)),
        p.train.stop_after_epoch.and_then(|epoch| {
            at_least_one("train.stop_after_epoch", epoch).or_else(|| {
                (epoch > p.train.epochs).then(|| {
                    problem(
                        "train.stop_after_epoch",
                        format!(
                            "`train.stop_after_epoch` is {epoch}, after the last of `train.epochs` = {}",
                            p.train.epochs
                        ),
                    )
                })
            })
        }),
        p.train.eval_every_steps.and_then(|steps| at_least_one("train.eval_every_steps", steps)),
        p.train.early_stopping.as_ref().and_then(|stopping| early_stopping_problem(p, stopping)),
        p.train.class_weights.as_ref().and_then(class_weights_problem),
        at_least_one("evaluate.batch_size", p.evaluate.batch_size as u64),
        p.evaluate
            .metrics
            .is_empty()
            .then(|| problem("evaluate.metrics", "`evaluate.metrics` must name at least one metric")),
        causal_lm_problem(p),
        p.evaluate.metrics.iter().enumerate().find_map(|(i, metric)| {
            p.evaluate.metrics[..i]
                .contains(metric)
                .then(|| problem("evaluate.metrics", format!("`evaluate.metrics` lists `{metric}` twice")))
        }),
    ];
    checks.into_iter().flatten().next()
}

/// What a task's data and metrics must be: a classifier reads labels and reports classification
/// metrics; a causal LM reads a text column, or a prompt and a completion column, and reports
/// loss, perplexity and (with completions) exact match.
fn causal_lm_problem(p: &Pipeline) -> Option<Problem> {
    let causal_lm = p.model.task == Task::CausalLm;
    let d = &p.dataset;
    if let Some(metric) =
        p.evaluate.metrics.iter().find(|m| m.for_causal_lm().is_some_and(|lm| lm != causal_lm))
    {
        let help = match causal_lm {
            true => {
                "a causal LM reports \"loss\", \"perplexity\" and (with prompt/completion data) \"exact_match\""
            }
            false => "\"perplexity\" and \"exact_match\" score a causal LM (`model.task = \"causal-lm\"`)",
        };
        return Some(Problem {
            path: "evaluate.metrics",
            message: format!(
                "`evaluate.metrics` lists `{metric}`, which does not score a {}",
                p.model.task.name()
            ),
            help: Some(help.into()),
        });
    }
    if !causal_lm && p.evaluate.baseline {
        return Some(Problem {
            path: "evaluate.baseline",
            message:
                "`evaluate.baseline` scores a pretrained causal LM; a classifier's head starts untrained"
                    .into(),
            help: Some("remove it, or set `model.task = \"causal-lm\"`".into()),
        });
    }
    if !causal_lm {
        return [
            ("dataset.prompt_column", &d.prompt_column),
            ("dataset.completion_column", &d.completion_column),
        ]
        .into_iter()
        .find(|(_, column)| column.is_some())
        .map(|(path, _)| Problem {
            path,
            message: format!("`{path}` is for a causal LM's prompt/completion data"),
            help: Some("set `model.task = \"causal-lm\"`, or remove it".into()),
        });
    }
    match (&d.prompt_column, &d.completion_column) {
        (Some(_), None) | (None, Some(_)) => {
            let path =
                if d.prompt_column.is_some() { "dataset.prompt_column" } else { "dataset.completion_column" };
            return Some(Problem {
                path,
                message: "`prompt_column` and `completion_column` go together".into(),
                help: Some("set both for supervised fine-tuning, or neither to learn `text_column`".into()),
            });
        }
        (Some(prompt), Some(completion)) if prompt == completion => {
            return Some(problem(
                "dataset.completion_column",
                "`prompt_column` and `completion_column` name the same column",
            ));
        }
        _ => {}
    }
    if d.prompt_completion().is_none() {
        if p.evaluate.metrics.contains(&Metric::ExactMatch) {
            return Some(Problem {
                path: "evaluate.metrics",
                message: "`exact_match` compares generations with completions, and the data has none".into(),
                help: Some("set `dataset.prompt_column` and `dataset.completion_column`".into()),
            });
        }
        if p.tokenizer.chat_template {
            return Some(problem(
                "tokenizer.chat_template",
                "the chat template wraps prompts, and the data has none (set `dataset.prompt_column` and `dataset.completion_column`)",
            ));
        }
    }
    let classifier_only = [
        ("model.classifier_dropout", p.model.classifier_dropout.is_some()),
        ("model.dropout", p.model.dropout.is_some()),
        ("train.class_weights", p.train.class_weights.is_some()),
    ];
    if let Some((path, _)) = classifier_only.into_iter().find(|(_, set)| *set) {
        return Some(Problem {
            path,
            message: format!("`{path}` does not apply to a causal LM"),
            help: Some("a decoder has attention dropout only (`model.attention_dropout`)".into()),
        });
    }
    if p.train.early_stopping.as_ref().is_some_and(|s| s.metric == Metric::ExactMatch) {
        return Some(Problem {
            path: "train.early_stopping.metric",
            message: "exact match is scored by the evaluate stage only (it generates), not during training"
                .into(),
            help: Some("watch \"loss\" or \"perplexity\"".into()),
        });
    }
    None
}

/// Early stopping needs evaluations, a metric they record, and sensible bounds.
fn early_stopping_problem(p: &Pipeline, stopping: &EarlyStoppingConfig) -> Option<Problem> {
    if !p.train.evaluates() {
        return Some(Problem {
            path: "train.early_stopping",
            message: "early stopping needs evaluations during training, but `train.eval_every_epoch` \
                      is false and `train.eval_every_steps` is not set"
                .into(),
            help: Some("set `train.eval_every_epoch = true` or `train.eval_every_steps = N`".into()),
        });
    }
    let metric = stopping.metric;
    if metric != Metric::Loss && !p.evaluate.metrics.contains(&metric) {
        return Some(Problem {
            path: "train.early_stopping.metric",
            message: format!(
                "`train.early_stopping.metric` is `{metric}`, which `evaluate.metrics` does not list"
            ),
            help: Some(format!(
                "add \"{metric}\" to `evaluate.metrics`, or watch \"loss\" (always computed)"
            )),
        });
    }
    at_least_one("train.early_stopping.patience", u64::from(stopping.patience)).or_else(|| {
        (!(stopping.min_delta >= 0.0 && stopping.min_delta.is_finite())).then(|| {
            problem(
                "train.early_stopping.min_delta",
                format!(
                    "`train.early_stopping.min_delta` must be zero or positive, got {}",
                    stopping.min_delta
                ),
            )
        })
    })
}

fn class_weights_problem(weights: &ClassWeights) -> Option<Problem> {
    let ClassWeights::Explicit(weights) = weights else { return None };
    if weights.is_empty() {
        return Some(problem("train.class_weights", "`train.class_weights` must list one weight per class"));
    }
    weights.iter().find_map(|&w| {
        (!(w > 0.0 && w.is_finite())).then(|| {
            problem("train.class_weights", format!("each of `train.class_weights` must be positive, got {w}"))
        })
    })
}

/// `cpu`, `cuda` or `cuda:N`.
fn is_device(device: &str) -> bool {
    match device.strip_prefix("cuda:") {
        Some(index) => !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()),
        None => device == "cpu" || device == "cuda",
    }
}

/// The pipeline's `name` becomes a directory under the store (`refs/<name>/`), so it must be one
/// plain path component: no separators, no `..`, nothing hidden, no control characters.
fn pipeline_name(name: &str) -> Option<Problem> {
    let bad_char = name
        .chars()
        .find(|c| c.is_control() || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|'));
    let message = if name.trim().is_empty() {
        "`name` must not be empty".to_string()
    } else if let Some(c) = bad_char {
        format!("`name` {name:?} contains {c:?}; a pipeline name is one path component")
    } else if name.starts_with('.') || name.trim() != name {
        format!("`name` {name:?} must not start with a dot or with or end in spaces")
    } else if name.chars().count() > 100 {
        "`name` must be at most 100 characters".to_string()
    } else {
        return None;
    };
    Some(Problem {
        path: "name",
        message,
        help: Some("use letters, digits, spaces, `.`, `_` and `-`, e.g. name = \"sst2-minilm\"".into()),
    })
}

fn non_empty(path: &'static str, value: &str) -> Option<Problem> {
    value.trim().is_empty().then(|| problem(path, format!("`{path}` must not be empty")))
}

fn positive(path: &'static str, value: f64) -> Option<Problem> {
    (!(value > 0.0 && value.is_finite()))
        .then(|| problem(path, format!("`{path}` must be a positive number, got {value}")))
}

fn at_least_one(path: &'static str, value: u64) -> Option<Problem> {
    (value < 1).then(|| problem(path, format!("`{path}` must be at least 1, got {value}")))
}

fn probability(path: &'static str, value: Option<f64>) -> Option<Problem> {
    let value = value?;
    (!(0.0..1.0).contains(&value)).then(|| problem(path, format!("`{path}` must be in [0, 1), got {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        for good in ["cpu", "cuda", "cuda:0", "cuda:12"] {
            assert!(is_device(good), "{good}");
        }
        for bad in ["", "gpu", "cuda:", "cuda:x", "cuda0", "CPU", "cpu:0"] {
            assert!(!is_device(bad), "{bad}");
        }
    }
}
