"""Writes the encoder-family parity fixtures in tests/fixtures/families (committed; tests need
neither torch nor the network).

    python scripts/make-fixtures.py [OUT]      (default tests/fixtures/families)

Needs torch, transformers and tokenizers from PyPI. For each family, a tiny random-init
`...ForSequenceClassification` (vocab 128, hidden 32, 2 layers, 4 heads, intermediate 64, 3
labels, dropout 0, eager attention; ModernBERT with 3 layers, local and global) saved by transformers as `<family>/` (config.json,
model.safetensors), and `<family>-case.safetensors` with float64 references computed from those
float32 weights, the same shape as tests/fixtures/parity/bert-tiny-case.safetensors:

- `input_ids`, `attention_mask`, `token_type_ids`, `labels`: 4 rows of lengths 12/9/5/1 (ModernBERT:
  12/10/9/8, see `make_family`), right-padded with the family's padding id (real tokens never equal it);
- `expected.logits`, `expected.loss` (mean cross-entropy), `expected.grad_global_norm`;
- `grad.<name>`: the gradient of every parameter;
- `adamw_const.{losses,lrs,param.<name>}`: 3 steps of `torch.optim.AdamW(lr=1e-3, weight_decay=0.01)`
  on that batch (weight decay on every parameter; `losses[i]` is the loss before step i).

Tokenizer fixtures, `tokenizers/`: a byte-level BPE (RoBERTa's) and a Unigram (XLM-R's) trained
on a small corpus with the `tokenizers` package, and `cases.json`: varied strings with the ids
that transformers' `AutoTokenizer` gives for each (special tokens added, truncated to 16). The
Unigram trainer is not deterministic: a new run writes another tokenizer, with its own ids.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

COMMON = dict(vocab_size=128, max_position_embeddings=64, num_labels=3, initializer_range=0.2)
BERT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    classifier_dropout=0.0,
)


def families():
    """(name, config) of each fixture model."""
    return [
        (
            "distilbert",
            # Sinusoidal positions: transformers 5 initialises them so and then trains them, as
            # any other parameter (its `requires_grad = False` lands on a temporary).
            DistilBertConfig(
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
                sinusoidal_pos_embds=True,
                pad_token_id=0,
                **COMMON,
            ),
        ),
        ("roberta", RobertaConfig(pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5, **BERT_LIKE, **COMMON)),
        (
            # A vocabulary that holds the Unigram tokenizer's ids: the end-to-end test runs them.
            "xlm-roberta",
            XLMRobertaConfig(
                pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5, **BERT_LIKE, **(COMMON | {"vocab_size": 256})
            ),
        ),
        # An embedding width of 16 under a hidden size of 32: the projection is exercised.
        ("electra", ElectraConfig(embedding_size=16, pad_token_id=0, **BERT_LIKE, **COMMON)),
        # Global layers 0 and 2, a local one between them whose window (4 positions either side)
        # is narrower than the longest row; mean pooling; no biases (its defaults).
        (
            "modernbert",
            ModernBertConfig(
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                intermediate_size=48,
                global_attn_every_n_layers=2,
                local_attention=8,
                classifier_pooling="mean",
                embedding_dropout=0.0,
                attention_dropout=0.0,
                mlp_dropout=0.0,
                classifier_dropout=0.0,
                pad_token_id=0,
                **COMMON,
            ),
        ),
    ]


def batch(pad_id, vocab, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(lengths), width), dtype=torch.int64)
    for row, n in enumerate(lengths):
        real = torch.randint(3, vocab, (n,), generator=g)
        real[real == pad_id] = 3
        ids[row, :n] = real
        mask[row, :n] = 1
    labels = torch.tensor([0, 2, 1, 2])
    return ids, mask, torch.zeros_like(ids), labels


def loss_of(model, ids, mask, types, labels, family):
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if family not in ("distilbert", "modernbert"):
        kwargs["token_type_ids"] = types
    logits = model(**kwargs).logits
    return logits, torch.nn.functional.cross_entropy(logits, labels)


def make_family(out, family, config, seed):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model.eval()
    model.save_pretrained(out / family, safe_serialization=True)
    # The references start from the saved float32 weights, in float64.
    model = AutoModelForSequenceClassification.from_pretrained(out / family, attn_implementation="eager")
    model = model.double().eval()
    # ModernBERT's rows differ by at most its half window: transformers' eager attention gives a
    # padding query whose window holds no real key NaN (a softmax over nothing), and the NaN then
    # reaches every row through the values and the mean pooling (0 * NaN).
    lengths = [12, 10, 9, 8] if family == "modernbert" else [12, 9, 5, 1]
    ids, mask, types, labels = batch(config.pad_token_id, config.vocab_size, seed, lengths)
    case = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}

    logits, loss = loss_of(model, ids, mask, types, labels, family)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    case["expected.logits"] = logits.detach()
    case["expected.loss"] = loss.detach().reshape(1)
    norm = torch.sqrt(sum((p.grad**2).sum() for _, p in trainable))
    case["expected.grad_global_norm"] = norm.reshape(1)
    for name, p in trainable:
        case[f"grad.{name}"] = p.grad.detach().clone()
    model.zero_grad()

    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, lrs = [], []
    for _ in range(3):
        opt.zero_grad()
        _, loss = loss_of(model, ids, mask, types, labels, family)
        loss.backward()
        losses.append(loss.item())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    case["adamw_const.losses"] = torch.tensor(losses, dtype=torch.float64)
    case["adamw_const.lrs"] = torch.tensor(lrs, dtype=torch.float64)
    for name, p in trainable:
        case[f"adamw_const.param.{name}"] = p.detach().clone()
    case = {k: v.contiguous() for k, v in case.items()}
    save_file(case, str(out / f"{family}-case.safetensors"))
    print(f"wrote {out / family} and {family}-case.safetensors")


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A gripping, funny and moving film; the best of the year!",
    "Café au lait, naïve façade, jalapeño, Zürich, São Paulo, Kraków.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😀 😂 👍🏽 🇫🇷 ❤️ and symbols © ® ™ € £ ¥ ≤ ≥ ∞",
    "Numbers 1234567890, 3.14159, 1e-9, 0x1F and dates 2026-11-27.",
    "it's a don't-miss; won't you? I'd've said so... 'quoted' \"double\"",
    "Tabs\tand  double  spaces, trailing space ",
    "αβγ δεζ ηθι, русский текст, עברית, العربية, हिन्दी",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


EXTRA = [
    "e\u0301te\u0301 (combining accents) vs été",
    "ﬁ ligature, ｆｕｌｌｗｉｄｔｈ, ①②③, ㎏, Ⅻ",
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👋🏿 wave",
    "https://example.com/path?q=1&r=two#frag and user@example.org",
    "fn main() { println!(\"{}\", 1 + 2); } // code",
    "\t\ttabs\nnewlines\r\nand\u00a0no-break\u2003em space",
    "ALL CAPS SHOUTING!!! and lowercase whispers...",
    "mIxEd CaSe, CamelCase, snake_case, kebab-case",
    "¿Qué tal? ¡Muy bien! Ça va? Größe, Straße, ÆØÅ æøå",
    "ภาษาไทย ไม่มีช่องว่าง and Tiếng Việt có dấu",
    "日本語とEnglishが混ざった文、中文和English混合。",
    "$100.00, €50, ¥1,000, 50%, #hashtag, @mention",
    "a" * 3 + " " + "b" * 30 + " " + "c" * 300,
    " ".join(str(n) for n in range(40)),
]


def cases():
    """Strings to tokenize: the corpus and variations of it, edge cases and long ones (~300)."""
    out = ["", " ", "  ", "a", "A", "  leading", "trailing  ", "\n", "\t", "ü", "😀", "東", "...", "<s>", "</s> <pad>"]
    for line in CORPUS + EXTRA:
        words = line.split()
        out.append(line)
        out.append(line.lower())
        out.append(line.upper())
        out.append(line.title())
        out.append("  ".join(words))
        out.extend(" ".join(words[i : i + 3]) for i in range(0, len(words), 3))
        out.extend(words)
    for a, b in zip(CORPUS, reversed(EXTRA)):
        out.append(f"{a} {b}")
    out.append(" ".join(CORPUS) * 3)
    out.append("x" * 500)
    out.append("😀" * 40)
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def make_tokenizers(out):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    (out / "tokenizers").mkdir(parents=True, exist_ok=True)
    corpus = CORPUS * 20
    # RoBERTa: byte-level BPE with <s> ... </s> and a prefix space as roberta-base's tokenizer.json.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")), trim_offsets=True, add_prefix_space=False
    )
    # XLM-R: SentencePiece Unigram with the Metaspace pre-tokenizer.
    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    uni.train_from_iterator(corpus, trainer)
    uni.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", uni.token_to_id("<s>")), ("</s>", uni.token_to_id("</s>"))],
    )
    strings = cases()
    result = {"max_length": 16, "strings": strings}
    for name, tok, config in [("bpe", bpe, RobertaConfig()), ("unigram", uni, XLMRobertaConfig())]:
        d = out / "tokenizers" / name
        d.mkdir(parents=True, exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
        config.save_pretrained(d)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>"}
        (d / "tokenizer_config.json").write_text(json.dumps(special | {"model_max_length": 512}, indent=2) + "\n")
        hf = AutoTokenizer.from_pretrained(d)
        result[name] = {
            "full": [hf(s)["input_ids"] for s in strings],
            "truncated": [hf(s, truncation=True, max_length=16)["input_ids"] for s in strings],
        }
    (out / "tokenizers" / "cases.json").write_text(json.dumps(result, ensure_ascii=False) + "\n")
    print(f"wrote {out / 'tokenizers'} ({len(strings)} strings)")


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/families")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for seed, (family, config) in enumerate(families()):
        make_family(out, family, config, seed)
    make_tokenizers(out)


if __name__ == "__main__":
    main()
