"""Writes SST-2 as prompt/completion pairs for supervised fine-tuning of a causal LM (committed in
data/sst2-sft; Python's standard library only):

    python3 scripts/make-sst2-sft.py

- `train-2000.csv`: the first 2,000 rows of data/sst2/train-4000.csv;
- `validation.csv`: the 872 rows of data/sst2/validation.csv.

Each row's `prompt` asks for the review's sentiment; its `completion` is the label word,
`positive` (label 1) or `negative` (label 0).
"""

import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"0": "negative", "1": "positive"}


def convert(source, dest, rows=None):
    with open(ROOT / source, newline="", encoding="utf-8") as f:
        data = list(csv.DictReader(f))[:rows]
    with open(ROOT / dest, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["prompt", "completion"])
        for row in data:
            prompt = f"Is this movie review positive or negative? Answer with one word.\nReview: {row['text'].strip()}"
            out.writerow([prompt, WORDS[row["label"].strip()]])
    print(f"wrote {dest}: {len(data)} rows")


convert("data/sst2/train-4000.csv", "data/sst2-sft/train-2000.csv", 2000)
convert("data/sst2/validation.csv", "data/sst2-sft/validation.csv")
