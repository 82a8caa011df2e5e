//! Evaluation: scoring a classifier's predictions against the true labels, and a causal LM's
//! loss and generations (see `lm`).
//!
//! The metrics follow scikit-learn's `classification_report` conventions, so pipe's numbers can be
//! compared with the reference recipe's.

mod lm;
mod metrics;
mod predict;

pub use lm::{Sampling, exact_match, generate, generate_many, lm_loss};
pub use metrics::{ClassMetrics, ClassificationReport};
pub use predict::{Scored, argmax, mean_log_loss, predict_probabilities, score};
