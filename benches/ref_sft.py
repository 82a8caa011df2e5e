"""PyTorch's supervised fine-tuning of a causal LM, the reference for pipe's causal-LM train stage
(benches/sft.sh).

    python benches/ref_sft.py --gguf FILE --tokens TOKENS [--steps 20] [--batch-size 16]
                              [--lr 5e-5] [--threads 2] [--group-by-length] [--seed 0]

What a speed-minded PyTorch user writes: transformers' `AutoModelForCausalLM` loaded from the same
GGUF file (`gguf_file=`, dequantised to float32), `torch.optim.AdamW`, the loss on the completion
only (labels -100 on the prompt and the padding), each batch padded to its longest row
(DataCollatorForSeq2Seq's dynamic padding) and, with --group-by-length, rows grouped by length as
Trainer's `group_by_length` does (megabatches of 50 batches sorted longest first; the grouped batches
are then run in a seeded random order, so that a short timed run samples the whole epoch rather than
its longest rows). The rows are
pipe's own: the `train` split of a pipe tokenize stage's `tokens.safetensors` (`TOKENS`), so both
see the same token ids and lengths. Times `--steps` optimizer steps from the first one (its
one-time costs included, such as AdamW's lazily made moments, as pipe's train stage includes its
own) and prints one JSON line: real (non-pad) tokens per second, rows per second, the mean loss.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM


def rows(tokens):
    t = load_file(tokens)
    ids, offsets, starts = t["train.ids"], t["train.offsets"], t["train.labels"]
    return [(ids[offsets[i] : offsets[i + 1]].tolist(), int(starts[i])) for i in range(len(starts))]


def batches(data, batch_size, group_by_length, seed):
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    if group_by_length:
        mega = 50 * batch_size
        order = [i for m in range(0, len(order), mega) for i in sorted(order[m : m + mega], key=lambda i: -len(data[i][0]))]
    plan = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    if group_by_length:
        # Within a megabatch the batches run longest first: timing the first few would time only
        # the longest rows. A seeded shuffle of the grouped batches keeps their padding and makes
        # a short run a fair sample of the epoch.
        random.Random(seed + 1).shuffle(plan)
    return plan


def collate(data, batch, pad):
    width = max(len(data[i][0]) for i in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, i in enumerate(batch):
        row, start = data[i]
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        labels[r, start : len(row)] = torch.tensor(row[start:])
    return ids, mask, labels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-by-length", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gguf = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data = rows(args.tokens)
    plan = batches(data, args.batch_size, args.group_by_length, args.seed)[: args.steps]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens = seqs = 0
    losses = []
    start = time.perf_counter()
    for batch in plan:
        ids, mask, labels = collate(data, batch, pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(mask.sum())
        seqs += len(batch)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    print(json.dumps({
        "steps": len(plan), "seconds": seconds, "tokens_per_second": tokens / seconds,
        "rows_per_second": seqs / seconds, "mean_loss": float(np.mean(losses)),
        "group_by_length": args.group_by_length,
    }))


if __name__ == "__main__":
    main()
