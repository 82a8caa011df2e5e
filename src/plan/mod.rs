//! Stage keys: what decides whether a stage's stored outputs can be reused.
//!
//! A pipeline resolves into three stages, `tokenize -> train -> evaluate`. Each stage has a
//! **key**, the SHA-256 of a canonical JSON document, its [`KeyFields`]:
//!
//! - `kind`: the stage kind;
//! - `version`: the stage's output format version, bumped by hand whenever a change to pipe
//!   changes what the stage writes or computes (its numerics included), so that old outputs are
//!   never reused under new code ([`StageKind::version`]);
//! - `params`: the resolved configuration values the stage reads, and nothing else (changing
//!   `evaluate.batch_size` does not retrain, unless the train stage evaluates during training,
//!   which batches as the evaluate stage does);
//! - `inputs`: the content digests of everything the stage reads: data files, tokenizer and model
//!   files, and the output digests of upstream stages.
//!
//! What is deliberately **not** in a key: paths (moving a project or a CSV does not invalidate
//! anything; renaming a file to the same bytes keeps it fresh), modification times (a `git
//! checkout` that restores the same bytes keeps it fresh), thread counts (results are bit-identical
//! across them), wall-clock times, host names. A downstream stage keys on its upstream's *output
//! digest*, not its key, so a change upstream that happens to produce identical outputs does not
//! ripple down.
//!
//! The keyed fields are kept beside each pipeline's latest run (`refs/` in the store) only to
//! explain why a stage is dirty: [`KeyFields::changes_from`] compares them field by field, so
//! `pipe plan` can say `train.epochs changed: 1 -> 2` or `input dataset.train changed`. The hash
//! alone decides; the explanation never does. A crash is never mistaken for fresh, because a stage
//! is found only through the manifest that the store writes after its outputs (see
//! [`crate::store`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest;

/// The kinds of stage, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Tokenize,
    Train,
    Evaluate,
}

impl StageKind {
    /// All kinds, in the order they run.
    pub const ALL: [StageKind; 3] = [StageKind::Tokenize, StageKind::Train, StageKind::Evaluate];

    /// The name used in keys, paths and output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Train => "train",
            Self::Evaluate => "evaluate",
        }
    }

    /// Output format version: bump when the stage's outputs or numerics change.
    pub fn version(self) -> u32 {
        match self {
            // 2: leakage counts per split and class, drop_duplicates.
            Self::Tokenize => 2,
            // 2: evaluations during training, metrics.jsonl, curves, early stopping, class weights.
            // 3: the model computes only real tokens (packed rows), which changes rounding.
            // 4: machine-independent numerics: pipe's own GEMM (one FMA chain per element), its
            //    own exp/tanh/ln, the loss as one op, head initialisation by the polar method.
            // 5: query, key and value as one product: the input's gradient is one FMA chain over
            //    the three instead of three chains added in the gradient store.
            // 6: the last evaluation's validation probabilities among the outputs (when they are
            //    the saved weights' on the CPU in f32), which the evaluate stage then reads.
            // 7: the same for bf16 runs on the CPU (the evaluate stage predicts in the run's dtype).
            // 8: a TensorBoard event file among the outputs (the logs' scalars, at their steps).
            Self::Train => 8,
            // 2: packed rows in the forward pass (rounding), shared scoring with training.
            // 3: machine-independent numerics (pipe's GEMM, exp and tanh; softmax in pipe).
            // 4: a bf16 pipeline predicts with bf16 products, as its evaluations during training.
            Self::Evaluate => 4,
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Everything a stage key is computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyFields {
    pub kind: StageKind,
    pub version: u32,
    /// The resolved configuration values the stage reads, as a JSON object of sections.
    pub params: serde_json::Value,
    /// Content digests of the stage's inputs, by input name.
    pub inputs: BTreeMap<String, String>,
}

impl KeyFields {
    /// The stage key: SHA-256 of the fields as canonical JSON.
    pub fn key(&self) -> String {
        let Self { kind, version, params, inputs } = self;
        let doc = serde_json::json!({ "kind": kind, "version": version, "params": params, "inputs": inputs });
        digest::bytes(digest::canonical_json(&doc).as_bytes())
    }

    /// Why these fields differ from `previous`, one readable line per difference.
    pub fn changes_from(&self, previous: &KeyFields) -> Vec<String> {
        let mut changes = Vec::new();
        if self.version != previous.version {
            changes.push(format!(
                "pipe's {} format changed: version {} -> {}",
                self.kind, previous.version, self.version
            ));
        }
        let (now, before) = (flatten(&self.params), flatten(&previous.params));
        for (path, value) in &now {
            match before.get(path) {
                Some(old) if old == value => {}
                Some(old) => changes.push(format!("{path} changed: {old} -> {value}")),
                None => changes.push(format!("{path} added: {value}")),
            }
        }
        for (path, old) in &before {
            if !now.contains_key(path) {
                changes.push(format!("{path} removed (was {old})"));
            }
        }
        for (name, d) in &self.inputs {
            match previous.inputs.get(name) {
                Some(old) if old == d => {}
                Some(old) => changes.push(format!(
                    "input {name} changed: sha256 {} -> {}",
                    crate::store::short(old),
                    crate::store::short(d)
                )),
                None => changes.push(format!("input {name} added")),
            }
        }
        for name in previous.inputs.keys() {
            if !self.inputs.contains_key(name) {
                changes.push(format!("input {name} removed"));
            }
        }
        changes
    }
}

/// A JSON object as `dotted.path -> value text`.
fn flatten(value: &serde_json::Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&path, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// The run id: the first 12 hex digits of the SHA-256 over the stage keys in order.
pub fn run_id(stage_keys: &[&str]) -> String {
    digest::bytes(stage_keys.join("\n").as_bytes())[..12].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(epochs: u64, data: &str) -> KeyFields {
        KeyFields {
            kind: StageKind::Train,
            version: 1,
            params: json!({"train": {"epochs": epochs, "batch_size": 16}, "seed": 42}),
            inputs: BTreeMap::from([("tokenize".to_string(), data.to_string())]),
        }
    }

    #[test]
    fn the_key_is_stable() {
        // Golden value: if this changes, every stored stage is invalidated. Change it only on purpose.
        assert_eq!(
            fields(3, "abc").key(),
            "72a3f1d45fea0b45f7341adefc1d2bbe8d044488a8a50f47631a2c57bca13550"
        );
    }

    #[test]
    fn parameters_and_inputs_change_the_key_and_are_explained() {
        let base = fields(3, "abc");
        assert_ne!(base.key(), fields(4, "abc").key());
        assert_ne!(base.key(), fields(3, "abd").key());
        assert_eq!(fields(4, "abc").changes_from(&base), vec!["train.epochs changed: 3 -> 4"]);
        let why = fields(3, "0123456789abcdef").changes_from(&base);
        assert_eq!(why, vec!["input tokenize changed: sha256 abc -> 0123456789ab"]);
    }
}
