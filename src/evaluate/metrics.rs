//! Classification metrics: accuracy, per-class precision/recall/F1, their macro averages and the
//! confusion matrix.
//!
//! Conventions are scikit-learn's, so the numbers match the reference recipe: a ratio whose
//! denominator is zero is 0 (`zero_division=0`), and a macro average is the unweighted mean over
//! *every* class of the model, including classes absent from the evaluated rows.

use serde::{Deserialize, Serialize};

use crate::config::Metric;

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The class's label.
    pub label: String,
    /// Of the rows predicted as this class, the fraction that are this class.
    pub precision: f64,
    /// Of the rows of this class, the fraction predicted as this class.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Number of rows whose true label is this class.
    pub support: u64,
}

/// Every metric pipe reports for one evaluated split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Fraction of rows predicted correctly.
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 scores.
    pub macro_f1: f64,
    /// Mean cross-entropy loss, when the caller computed it.
    pub loss: Option<f64>,
    /// One entry per class, in class index order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true class][predicted class]` = number of rows.
    pub confusion: Vec<Vec<u64>>,
    /// Number of rows evaluated.
    pub rows: usize,
}

impl ClassificationReport {
    /// Scores `predicted` against `labels` (class indices, one per row) for the classes `names`.
    ///
    /// Both slices must have the same length and hold indices below `names.len()`; rows that
    /// break this are left out of the scores (and fail a debug assertion), since they can only
    /// come from a bug in the caller.
    pub fn from_predictions(labels: &[u32], predicted: &[u32], names: &[String], loss: Option<f64>) -> Self {
        debug_assert_eq!(labels.len(), predicted.len(), "one prediction per label");
        let classes = names.len();
        let mut confusion = vec![vec![0u64; classes]; classes];
        let mut rows = 0usize;
        for (&truth, &guess) in labels.iter().zip(predicted) {
            let (truth, guess) = (truth as usize, guess as usize);
            debug_assert!(truth < classes && guess < classes, "class index out of range");
            if let Some(cell) = confusion.get_mut(truth).and_then(|row| row.get_mut(guess)) {
                *cell += 1;
                rows += 1;
            }
        }

        let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
        let per_class: Vec<ClassMetrics> = names
            .iter()
            .enumerate()
            .map(|(class, label)| {
                let true_positives = confusion[class][class];
                let support: u64 = confusion[class].iter().sum();
                let predicted_as_class: u64 = confusion.iter().map(|row| row[class]).sum();
                let false_positives = predicted_as_class - true_positives;
                let false_negatives = support - true_positives;
                ClassMetrics {
                    label: label.clone(),
                    precision: ratio(true_positives, predicted_as_class),
                    recall: ratio(true_positives, support),
                    // The count form is scikit-learn's; it equals 2PR/(P+R) whenever that is
                    // defined.
                    f1: ratio(2 * true_positives, 2 * true_positives + false_positives + false_negatives),
                    support,
                }
            })
            .collect();

        ClassificationReport {
            accuracy: ratio(correct, rows as u64),
            macro_f1: mean(per_class.iter().map(|c| c.f1)),
            loss,
            per_class,
            confusion,
            rows,
        }
    }

    /// Macro-averaged precision over all classes.
    pub fn macro_precision(&self) -> f64 {
        mean(self.per_class.iter().map(|c| c.precision))
    }

    /// Macro-averaged recall over all classes.
    pub fn macro_recall(&self) -> f64 {
        mean(self.per_class.iter().map(|c| c.recall))
    }

    /// The value of `metric`; `None` for the loss when it was not computed, and for a causal LM's
    /// metrics.
    pub fn metric(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Accuracy => Some(self.accuracy),
            Metric::F1 => Some(self.macro_f1),
            Metric::Precision => Some(self.macro_precision()),
            Metric::Recall => Some(self.macro_recall()),
            Metric::Loss => self.loss,
            Metric::Perplexity | Metric::ExactMatch => None,
        }
    }

    /// A per-class table and the confusion matrix, for the terminal.
    ///
    /// ```text
    ///            precision  recall      f1  support
    /// neg           0.6667  1.0000  0.8000        2
    /// pos           1.0000  0.5000  0.6667        2
    ///
    /// accuracy                      0.7500        4
    /// macro avg     0.8333  0.7500  0.7333        4
    /// loss          0.4000
    ///
    /// confusion (rows: true, columns: predicted)
    ///      neg  pos
    /// neg    2    0
    /// pos    1    1
    /// ```
    pub fn table(&self) -> String {
        let label_width = self
            .per_class
            .iter()
            .map(|c| c.label.chars().count())
            .chain(["macro avg".len()])
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "{:label_width$}  {:>9}  {:>6}  {:>6}  {:>7}\n",
            "", "precision", "recall", "f1", "support"
        );
        for class in &self.per_class {
            out.push_str(&format!(
                "{:label_width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
                class.label, class.precision, class.recall, class.f1, class.support
            ));
        }
        out.push_str(&format!(
            "\n{:label_width$}  {:>9}  {:>6}  {:>6.4}  {:>7}\n",
            "accuracy", "", "", self.accuracy, self.rows
        ));
        out.push_str(&format!(
            "{:label_width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
            "macro avg",
            self.macro_precision(),
            self.macro_recall(),
            self.macro_f1,
            self.rows
        ));
        if let Some(loss) = self.loss {
            out.push_str(&format!("{:label_width$}  {:>9.4}\n", "loss", loss));
        }

        out.push_str("\nconfusion (rows: true, columns: predicted)\n");
        let row_label_width = self.per_class.iter().map(|c| c.label.chars().count()).max().unwrap_or(0);
        // Long labels would make the matrix unreadably wide: columns show at most 12 characters.
        let headers: Vec<String> =
            self.per_class.iter().map(|c| c.label.chars().take(12).collect()).collect();
        let widths: Vec<usize> = headers
            .iter()
            .enumerate()
            .map(|(col, header)| {
                let widest_count =
                    self.confusion.iter().map(|row| row[col].to_string().len()).max().unwrap_or(1);
                header.chars().count().max(widest_count)
            })
            .collect();
        out.push_str(&format!("{:row_label_width$}", ""));
        for (header, width) in headers.iter().zip(&widths) {
            out.push_str(&format!("  {header:>width$}"));
        }
        out.push('\n');
        for (class, row) in self.per_class.iter().zip(&self.confusion) {
            out.push_str(&format!("{:row_label_width$}", class.label));
            for (count, width) in row.iter().zip(&widths) {
                out.push_str(&format!("  {count:>width$}"));
            }
            out.push('\n');
        }
        out
    }
}

/// `numerator / denominator`, or 0 when the denominator is 0 (scikit-learn's `zero_division=0`).
fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 { 0.0 } else { numerator as f64 / denominator as f64 }
}

/// Unweighted mean; 0 for no values.
fn mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let count = values.len();
    if count == 0 { 0.0 } else { values.sum::<f64>() / count as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
    }

    #[test]
    fn matches_scikit_learn_documentation_example() {
        // The example of sklearn.metrics.precision_score / recall_score / f1_score:
        //   y_true = [0, 1, 2, 0, 1, 2], y_pred = [0, 2, 1, 0, 0, 1]
        //   precision_score(average="macro") = 0.2222..., recall_score(average="macro") = 0.3333...,
        //   f1_score(average="macro") = 0.2666..., f1_score(average=None) = [0.8, 0, 0].
        // By hand: class 0: TP 2, predicted 3, support 2 -> P 2/3, R 1, F1 4/(4+1+0) = 0.8.
        // Classes 1 and 2: TP 0 -> P = R = F1 = 0. Accuracy 2/6.
        let report = ClassificationReport::from_predictions(
            &[0, 1, 2, 0, 1, 2],
            &[0, 2, 1, 0, 0, 1],
            &names(&["a", "b", "c"]),
            None,
        );
        assert_close(report.accuracy, 1.0 / 3.0);
        assert_close(report.macro_precision(), 2.0 / 9.0);
        assert_close(report.macro_recall(), 1.0 / 3.0);
        assert_close(report.macro_f1, 0.8 / 3.0);
        let f1: Vec<f64> = report.per_class.iter().map(|c| c.f1).collect();
        assert_eq!(f1, vec![0.8, 0.0, 0.0]);
        assert_eq!(report.confusion, vec![vec![2, 0, 0], vec![1, 0, 1], vec![0, 2, 0]]);
        assert_eq!(report.rows, 6);
    }

    #[test]
    fn class_never_predicted_and_class_absent_count_as_zero() {
        // y_true = [0, 0, 0, 1, 1, 2], y_pred = [0, 0, 1, 1, 0, 0]; class 2 is never predicted,
        // class 3 ("unused") occurs nowhere. Confusion:
        //   true 0: [2, 1, 0, 0]   true 1: [1, 1, 0, 0]   true 2: [1, 0, 0, 0]
        // class 0: TP 2, predicted 4, support 3 -> P 0.5,  R 2/3, F1 4/(4+2+1) = 4/7
        // class 1: TP 1, predicted 2, support 2 -> P 0.5,  R 0.5, F1 2/(2+1+1) = 0.5
        // class 2: TP 0, predicted 0, support 1 -> P 0 (zero division), R 0, F1 0
        // class 3: nothing -> all 0, support 0
        // macro over all 4 classes (sklearn with labels=[0, 1, 2, 3], zero_division=0):
        //   P = (0.5 + 0.5) / 4 = 0.25, R = (2/3 + 0.5) / 4 = 7/24, F1 = (4/7 + 0.5) / 4 = 15/56.
        // accuracy = 3/6 = 0.5.
        let report = ClassificationReport::from_predictions(
            &[0, 0, 0, 1, 1, 2],
            &[0, 0, 1, 1, 0, 0],
            &names(&["neg", "neutral", "pos", "unused"]),
            Some(0.75),
        );
        assert_close(report.accuracy, 0.5);
        let c = &report.per_class;
        assert_close(c[0].precision, 0.5);
        assert_close(c[0].recall, 2.0 / 3.0);
        assert_close(c[0].f1, 4.0 / 7.0);
        assert_close(c[1].f1, 0.5);
        assert_eq!((c[2].precision, c[2].recall, c[2].f1, c[2].support), (0.0, 0.0, 0.0, 1));
        assert_eq!((c[3].precision, c[3].recall, c[3].f1, c[3].support), (0.0, 0.0, 0.0, 0));
        assert_eq!(c[0].label, "neg");
        assert_eq!(c.iter().map(|c| c.support).collect::<Vec<_>>(), vec![3, 2, 1, 0]);

        assert_close(report.metric(Metric::Accuracy).unwrap(), 0.5);
        assert_close(report.metric(Metric::Precision).unwrap(), 0.25);
        assert_close(report.metric(Metric::Recall).unwrap(), 7.0 / 24.0);
        assert_close(report.metric(Metric::F1).unwrap(), 15.0 / 56.0);
        assert_eq!(report.metric(Metric::Loss), Some(0.75));
    }

    #[test]
    fn binary_f1_agrees_with_harmonic_mean() {
        // y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
        // class 1: TP 3, FP 2, FN 1 -> P 0.6, R 0.75, F1 2*0.6*0.75/1.35 = 2/3
        // class 0: TP 4, FP 1, FN 2 -> P 0.8, R 4/6, F1 2*0.8*(2/3)/(0.8+2/3) = 8/11
        // sklearn f1_score(average="macro") = (2/3 + 8/11) / 2 = 46/66 = 0.69696...
        let report = ClassificationReport::from_predictions(
            &[1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            &[1, 1, 1, 0, 1, 1, 0, 0, 0, 0],
            &names(&["0", "1"]),
            None,
        );
        assert_close(report.per_class[1].f1, 2.0 / 3.0);
        assert_close(report.per_class[0].f1, 8.0 / 11.0);
        assert_close(report.macro_f1, 23.0 / 33.0);
        assert_close(report.accuracy, 0.7);
        assert_eq!(report.metric(Metric::Loss), None);
    }

    #[test]
    fn no_rows_scores_zero_without_nan() {
        let report = ClassificationReport::from_predictions(&[], &[], &names(&["a", "b"]), None);
        assert_eq!((report.accuracy, report.macro_f1, report.rows), (0.0, 0.0, 0));
        assert_eq!(report.confusion, vec![vec![0, 0], vec![0, 0]]);
    }

    #[test]
    fn serializes_to_json_and_back() {
        let report = ClassificationReport::from_predictions(
            &[0, 1, 1],
            &[0, 1, 0],
            &names(&["neg", "pos"]),
            Some(0.5),
        );
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.starts_with(r#"{"accuracy":0.6666666666666666,"macro_f1":0.6666666666666666,"loss":0.5,"#),
            "{json}"
        );
        assert!(json.contains(r#""confusion":[[1,0],[1,1]]"#), "{json}");
        let back: ClassificationReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn table_shows_classes_averages_and_confusion() {
        let report = ClassificationReport::from_predictions(
            &[0, 0, 1, 1],
            &[0, 0, 0, 1],
            &names(&["neg", "pos"]),
            Some(0.4),
        );
        // Leading newline (removed below) so the first line's indentation survives.
        let expected = "
           precision  recall      f1  support
neg           0.6667  1.0000  0.8000        2
pos           1.0000  0.5000  0.6667        2

accuracy                      0.7500        4
macro avg     0.8333  0.7500  0.7333        4
loss          0.4000

confusion (rows: true, columns: predicted)
     neg  pos
neg    2    0
pos    1    1
";
        assert_eq!(report.table(), &expected[1..]);
    }
}
