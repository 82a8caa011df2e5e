//! Evaluations during training: what one records (a line of the train stage's `metrics.jsonl`),
//! and early stopping over them.

use serde_json::json;

use super::EarlyStoppingConfig;
use crate::config::Metric;
use crate::evaluate::ClassificationReport;

/// One evaluation on the validation split during training.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// Epochs done: whole at an epoch's end, fractional in between (as Hugging Face's log
    /// history counts them).
    pub epoch: f64,
    /// Mean loss of the training steps since the previous evaluation (with one evaluation per
    /// epoch: the epoch's mean step loss).
    pub train_loss: f64,
    /// Mean cross-entropy on the validation split.
    pub validation_loss: f64,
    /// The configured metrics other than the loss, in configuration order.
    pub metrics: Vec<(Metric, f64)>,
}

impl Evaluation {
    /// The evaluation at `step` from the validation `report`, keeping the configured `metrics`.
    pub fn new(
        step: u64,
        epoch: f64,
        train_loss: f64,
        report: &ClassificationReport,
        metrics: &[Metric],
    ) -> Self {
        Self {
            step,
            epoch,
            train_loss,
            validation_loss: report.loss.unwrap_or(f64::NAN),
            metrics: metrics
                .iter()
                .filter(|&&m| m != Metric::Loss)
                .filter_map(|&m| Some((m, report.metric(m)?)))
                .collect(),
        }
    }

    /// The value of a validation metric (`loss` is the validation loss), if recorded.
    pub fn value(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Loss => Some(self.validation_loss),
            other => self.metrics.iter().find(|(m, _)| *m == other).map(|&(_, v)| v),
        }
    }

    /// The `metrics.jsonl` object: `epoch`, `step`, `train_loss`, `validation_loss`, then each
    /// metric by name.
    pub fn to_json(&self) -> serde_json::Value {
        let mut line = json!({
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": self.train_loss,
            "validation_loss": self.validation_loss,
        });
        for (metric, value) in &self.metrics {
            line[metric.name()] = json!(value);
        }
        line
    }
}

/// Early stopping's account of the evaluations so far: the best one and how many came after it
/// without improving on it by more than `min_delta`.
///
/// The best evaluation is the last one that improved; its weights are the ones to keep, and the
/// patience counts from it.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    config: EarlyStoppingConfig,
    observed: usize,
    best: Option<(usize, f64)>,
    since_best: u32,
}

impl EarlyStopping {
    /// Watches `config.metric` with no evaluation seen yet.
    pub fn new(config: EarlyStoppingConfig) -> Self {
        Self { config, observed: 0, best: None, since_best: 0 }
    }

    /// The watched metric.
    pub fn metric(&self) -> Metric {
        self.config.metric
    }

    /// Takes the next evaluation; returns whether it is the new best.
    pub fn observe(&mut self, evaluation: &Evaluation) -> bool {
        let index = self.observed;
        self.observed += 1;
        let value = evaluation.value(self.config.metric).unwrap_or(f64::NAN);
        let improved = match self.best {
            None => true,
            Some((_, best)) if best.is_nan() => !value.is_nan(),
            Some((_, best)) if self.config.metric.lower_is_better() => value < best - self.config.min_delta,
            Some((_, best)) => value > best + self.config.min_delta,
        };
        if improved {
            self.best = Some((index, value));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        improved
    }

    /// Whether the patience has run out.
    pub fn should_stop(&self) -> bool {
        self.since_best >= self.config.patience
    }

    /// The index (among the observed evaluations) and metric value of the best evaluation.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluation(validation_loss: f64, accuracy: f64) -> Evaluation {
        Evaluation {
            step: 1,
            epoch: 1.0,
            train_loss: 0.0,
            validation_loss,
            metrics: vec![(Metric::Accuracy, accuracy)],
        }
    }

    fn run(config: EarlyStoppingConfig, evaluations: &[Evaluation]) -> (Vec<bool>, Option<usize>, bool) {
        let mut stopping = EarlyStopping::new(config);
        let mut improved = Vec::new();
        for e in evaluations {
            improved.push(stopping.observe(e));
            if stopping.should_stop() {
                break;
            }
        }
        (improved, stopping.best().map(|(i, _)| i), stopping.should_stop())
    }

    #[test]
    fn loss_must_fall_and_other_metrics_rise() {
        let history =
            [evaluation(0.9, 0.5), evaluation(0.7, 0.6), evaluation(0.8, 0.7), evaluation(0.75, 0.6)];
        let loss = EarlyStoppingConfig { metric: Metric::Loss, patience: 2, min_delta: 0.0 };
        assert_eq!(run(loss, &history), (vec![true, true, false, false], Some(1), true));
        let accuracy = EarlyStoppingConfig { metric: Metric::Accuracy, patience: 2, min_delta: 0.0 };
        assert_eq!(run(accuracy, &history), (vec![true, true, true, false], Some(2), false));
    }

    #[test]
    fn min_delta_ignores_small_improvements() {
        let history = [evaluation(0.9, 0.5), evaluation(0.85, 0.5), evaluation(0.5, 0.5)];
        let config = EarlyStoppingConfig { metric: Metric::Loss, patience: 1, min_delta: 0.1 };
        assert_eq!(run(config.clone(), &history), (vec![true, false], Some(0), true));
        let patient = EarlyStoppingConfig { patience: 2, ..config };
        assert_eq!(run(patient, &history), (vec![true, false, true], Some(2), false));
    }

    #[test]
    fn a_nan_best_is_replaced_by_any_number() {
        let history = [evaluation(f64::NAN, 0.5), evaluation(3.0, 0.5)];
        let config = EarlyStoppingConfig { metric: Metric::Loss, patience: 1, min_delta: 0.0 };
        assert_eq!(run(config, &history), (vec![true, true], Some(1), false));
    }

    #[test]
    fn json_line_names_every_value() {
        let e = Evaluation {
            step: 12,
            epoch: 2.0,
            train_loss: 0.5,
            validation_loss: 0.25,
            metrics: vec![(Metric::F1, 0.75), (Metric::Accuracy, 0.8)],
        };
        assert_eq!(
            e.to_json().to_string(),
            r#"{"epoch":2.0,"step":12,"train_loss":0.5,"validation_loss":0.25,"f1":0.75,"accuracy":0.8}"#
        );
        assert_eq!((e.value(Metric::Loss), e.value(Metric::Recall)), (Some(0.25), None));
    }
}
