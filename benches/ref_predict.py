"""PyTorch's batched inference on a CSV, the reference for `pipe predict` in benches/compare.sh.

    python benches/ref_predict.py --model-dir DIR --input CSV [--batch-size 64] [--threads 2]

What a speed-minded PyTorch user writes: the CSV's `text` column tokenized (truncated at 128,
as pipe's recipe), batches padded to their longest row (DataCollatorWithPadding), the model in
eval mode under torch.inference_mode(), class probabilities by softmax. Prints one JSON line with
the rows, the tokenization and inference seconds, and inference rows/s (model loading and
imports excluded).
"""

import argparse
import csv
import json
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.input, newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=2).eval()
    collate = DataCollatorWithPadding(tokenizer)

    t0 = time.perf_counter()
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
    features = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
    tokenize_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    predicted = []
    with torch.inference_mode():
        for start in range(0, len(features), args.batch_size):
            batch = collate(features[start : start + args.batch_size])
            probabilities = model(**batch).logits.softmax(dim=-1)
            predicted.extend(probabilities.argmax(dim=-1).tolist())
    inference_s = time.perf_counter() - t0
    print(json.dumps({
        "rows": len(texts),
        "tokenize_s": tokenize_s,
        "inference_s": inference_s,
        "rows_per_s": len(texts) / inference_s,
    }))


if __name__ == "__main__":
    main()
