//! Evaluation: scoring a model's predictions against the true labels.
//!
//! The metrics follow scikit-learn's `classification_report` conventions, so pipe's numbers can be
//! compared with the reference recipe's.

mod metrics;
mod predict;

pub use metrics::{ClassMetrics, ClassificationReport};
pub use predict::{Scored, argmax, mean_log_loss, predict_probabilities, score};
