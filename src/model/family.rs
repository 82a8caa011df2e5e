//! The encoder families pipe fine-tunes, and what sets each apart: its weight names, its position
//! ids, where its embeddings and dropout differ, and its classification head. The encoder layer
//! and its ops are shared (see `encoder`): BERT, DistilBERT, RoBERTa, XLM-RoBERTa and ELECTRA are
//! the same post-norm transformer under different names; ModernBERT's pre-norm layer, over the same
//! ops, is in `modernbert`.

use crate::ops::Activation;

/// An architecture, as `config.json`'s `model_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    DistilBert,
    Roberta,
    XlmRoberta,
    Electra,
    ModernBert,
}

impl Family {
    /// Every supported family.
    pub const ALL: [Self; 6] =
        [Self::Bert, Self::DistilBert, Self::Electra, Self::ModernBert, Self::Roberta, Self::XlmRoberta];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::DistilBert => "distilbert",
            Self::Roberta => "roberta",
            Self::XlmRoberta => "xlm-roberta",
            Self::Electra => "electra",
            Self::ModernBert => "modernbert",
        }
    }

    /// The family of a `model_type`, if supported.
    pub fn from_model_type(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == name)
    }

    /// The supported `model_type`s, for error messages.
    pub fn supported_list() -> String {
        Self::ALL.map(Self::model_type).join(", ")
    }

    /// The transformers class that a saved directory declares (`architectures`).
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Bert => "BertForSequenceClassification",
            Self::DistilBert => "DistilBertForSequenceClassification",
            Self::Roberta => "RobertaForSequenceClassification",
            Self::XlmRoberta => "XLMRobertaForSequenceClassification",
            Self::Electra => "ElectraForSequenceClassification",
            Self::ModernBert => "ModernBertForSequenceClassification",
        }
    }

    /// The tensor names of the family's `...ForSequenceClassification`.
    pub(super) fn names(self) -> &'static Names {
        match self {
            Self::Bert => &BERT,
            Self::DistilBert => &DISTILBERT,
            Self::Roberta | Self::XlmRoberta => &ROBERTA,
            Self::Electra => &ELECTRA,
            Self::ModernBert => &MODERNBERT,
        }
    }

    /// Whether the head drops out its input before its dense layer too (RoBERTa's and ELECTRA's
    /// heads: `dropout, dense, act, dropout, out`; BERT's pooler, DistilBERT's pre_classifier and
    /// ModernBERT's head drop out only after it).
    pub(super) fn head_dropout_first(self) -> bool {
        matches!(self, Self::Roberta | Self::XlmRoberta | Self::Electra)
    }

    /// The activation of the head's dense layer, where the family fixes it (ModernBERT's comes
    /// from its config: see `EncoderConfig::head_activation`).
    pub(super) fn head_activation(self) -> Option<Activation> {
        match self {
            Self::Bert | Self::Roberta | Self::XlmRoberta => Some(Activation::Tanh),
            Self::DistilBert => Some(Activation::Relu),
            Self::Electra => Some(Activation::Gelu),
            Self::ModernBert => None,
        }
    }

    /// Whether the attention block's output is dropped out before its residual connection
    /// (DistilBERT drops out only the feed-forward output).
    pub(super) fn attention_output_dropout(self) -> bool {
        self != Self::DistilBert
    }

    /// Each token's position id for one right-padded row of ids (`row`, its real tokens first).
    /// RoBERTa's count from after the padding id, skipping tokens equal to it (transformers'
    /// `create_position_ids_from_input_ids`); the others' are the column.
    pub(super) fn positions(self, row: &[u32], pad: u32) -> Vec<u32> {
        match self {
            Self::Roberta | Self::XlmRoberta => {
                let mut count = 0;
                row.iter()
                    .map(|&id| {
                        if id == pad {
                            pad
                        } else {
                            count += 1;
                            pad + count
                        }
                    })
                    .collect()
            }
            Self::Bert | Self::DistilBert | Self::Electra | Self::ModernBert => {
                (0..row.len() as u32).collect()
            }
        }
    }
}

/// Tensor names. Encoder names are under `base` in a `...ForSequenceClassification` checkpoint and
/// without it in a bare base-model checkpoint; `{n}` stands for the layer index. ModernBERT's
/// pre-norm layer uses them for its own parts (see [`MODERNBERT`]).
pub(super) struct Names {
    /// The base model's prefix (`bert`).
    pub base: &'static str,
    /// The head's first name components, which are never under `base`.
    pub head_roots: &'static [&'static str],
    pub word: &'static str,
    pub position: &'static str,
    /// Token type embeddings (none in DistilBERT).
    pub token_type: &'static str,
    pub embeddings_norm: &'static str,
    /// ELECTRA's projection from the embedding width to the hidden size.
    pub projection: &'static str,
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attention_out: &'static str,
    pub attention_norm: &'static str,
    pub intermediate: &'static str,
    pub output: &'static str,
    pub output_norm: &'static str,
    /// The head's dense layer (BERT's pooler; full names).
    pub head_dense: &'static str,
    /// The head's output layer (full names).
    pub head_out: &'static str,
}

impl Names {
    /// `name` of layer `n`, or of the embeddings, under the base prefix.
    pub fn encoder(&self, name: &str, n: usize) -> String {
        format!("{}.{}", self.base, name.replace("{n}", &n.to_string()))
    }

    /// A checkpoint's tensor name in the form above: legacy `gamma`/`beta` LayerNorm names as
    /// `weight`/`bias`, and the base prefix added to encoder names that lack it.
    pub fn canonical(&self, name: &str) -> String {
        let name = name.replace(".gamma", ".weight").replace(".beta", ".bias");
        let root = name.split('.').next().unwrap_or_default();
        if root == self.base || self.head_roots.contains(&root) {
            name
        } else {
            format!("{}.{name}", self.base)
        }
    }
}

/// BERT, and the layer names that RoBERTa and ELECTRA share with it.
const BERT: Names = Names {
    base: "bert",
    head_roots: &["classifier"],
    word: "embeddings.word_embeddings",
    position: "embeddings.position_embeddings",
    token_type: "embeddings.token_type_embeddings",
    embeddings_norm: "embeddings.LayerNorm",
    projection: "embeddings_project",
    query: "encoder.layer.{n}.attention.self.query",
    key: "encoder.layer.{n}.attention.self.key",
    value: "encoder.layer.{n}.attention.self.value",
    attention_out: "encoder.layer.{n}.attention.output.dense",
    attention_norm: "encoder.layer.{n}.attention.output.LayerNorm",
    intermediate: "encoder.layer.{n}.intermediate.dense",
    output: "encoder.layer.{n}.output.dense",
    output_norm: "encoder.layer.{n}.output.LayerNorm",
    head_dense: "bert.pooler.dense",
    head_out: "classifier",
};

const ROBERTA: Names =
    Names { base: "roberta", head_dense: "classifier.dense", head_out: "classifier.out_proj", ..BERT };

const ELECTRA: Names =
    Names { base: "electra", head_dense: "classifier.dense", head_out: "classifier.out_proj", ..BERT };

const DISTILBERT: Names = Names {
    base: "distilbert",
    head_roots: &["pre_classifier", "classifier"],
    query: "transformer.layer.{n}.attention.q_lin",
    key: "transformer.layer.{n}.attention.k_lin",
    value: "transformer.layer.{n}.attention.v_lin",
    attention_out: "transformer.layer.{n}.attention.out_lin",
    attention_norm: "transformer.layer.{n}.sa_layer_norm",
    intermediate: "transformer.layer.{n}.ffn.lin1",
    output: "transformer.layer.{n}.ffn.lin2",
    output_norm: "transformer.layer.{n}.output_layer_norm",
    head_dense: "pre_classifier",
    head_out: "classifier",
    ..BERT
};

/// ModernBERT: `query` is the fused query/key/value layer (`Wqkv`), `intermediate` the GeGLU's
/// input and gate (`Wi`), `output` its `Wo`; `attention_norm` (absent in layer 0) and
/// `output_norm` come before their blocks (see `modernbert`, which also names the final norm and
/// the head's norm). No position or token type embeddings, no projection.
pub(super) const MODERNBERT: Names = Names {
    base: "model",
    head_roots: &["head", "classifier"],
    word: "embeddings.tok_embeddings",
    position: "",
    token_type: "",
    embeddings_norm: "embeddings.norm",
    projection: "",
    query: "layers.{n}.attn.Wqkv",
    key: "",
    value: "",
    attention_out: "layers.{n}.attn.Wo",
    attention_norm: "layers.{n}.attn_norm",
    intermediate: "layers.{n}.mlp.Wi",
    output: "layers.{n}.mlp.Wo",
    output_norm: "layers.{n}.mlp_norm",
    head_dense: "head.dense",
    head_out: "classifier",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_canonical() {
        let bert = Family::Bert.names();
        assert_eq!(bert.canonical("embeddings.LayerNorm.gamma"), "bert.embeddings.LayerNorm.weight");
        assert_eq!(bert.canonical("bert.pooler.dense.bias"), "bert.pooler.dense.bias");
        assert_eq!(bert.canonical("classifier.weight"), "classifier.weight");
        let distil = Family::DistilBert.names();
        assert_eq!(distil.canonical("pre_classifier.weight"), "pre_classifier.weight");
        assert_eq!(
            distil.canonical("transformer.layer.0.ffn.lin1.bias"),
            "distilbert.transformer.layer.0.ffn.lin1.bias"
        );
        assert_eq!(Family::Roberta.names().canonical("classifier.out_proj.bias"), "classifier.out_proj.bias");
        assert_eq!(distil.encoder(distil.query, 3), "distilbert.transformer.layer.3.attention.q_lin");
    }

    #[test]
    fn roberta_positions_start_after_the_padding_id_and_skip_it() {
        assert_eq!(Family::Roberta.positions(&[0, 5, 6, 1, 1], 1), vec![2, 3, 4, 1, 1]);
        assert_eq!(Family::Bert.positions(&[101, 5, 0], 0), vec![0, 1, 2]);
    }
}
