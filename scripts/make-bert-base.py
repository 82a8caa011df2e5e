"""Writes a BERT-base-sized classifier with random weights, for speed and memory benchmarks.

    python scripts/make-bert-base.py [OUT]      (default models/bert-base-random)

12 layers, hidden 768, 12 heads, intermediate 3072 (transformers' BertConfig defaults), two
labels, seeded random initialisation saved by transformers as safetensors, with MiniLM's
tokenizer (the same uncased WordPiece vocabulary of 30,522 tokens). Speed does not depend on the
weights. Needs torch and transformers, and models/all-MiniLM-L6-v2 (scripts/fetch-model.sh).
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models/bert-base-random")
    minilm = Path("models/all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2))
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(minilm / name, out / name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
