"""Writes the decoder parity fixtures in tests/fixtures/decoders (committed; tests need neither
torch nor the network).

    python scripts/make-decoder-fixtures.py [OUT]      (default tests/fixtures/decoders)

Needs torch and transformers from PyPI. For each of Llama, Qwen2 and Qwen3, a tiny random-init
`...ForCausalLM` (vocab 128, hidden 32, 2 layers, 4 query heads sharing 2 key/value heads,
intermediate 64, tied embeddings, eager attention) saved by transformers as `<name>/`
(config.json, model.safetensors), and `<name>-case.safetensors` with float64 references computed
from those float32 weights:

- `input_ids` `(4, 12)`, right-padded with 0 (real tokens never 0), `lengths` (12/9/5/2) and
  `loss_from`: the first position of each row whose token is predicted (a prompt before it, as in
  supervised fine-tuning; 0 = every token after the first);
- `expected.logits` `(tokens, vocab)`: the real tokens' logits, rows one after another;
- `expected.loss`: transformers' mean next-token cross-entropy with the ignore index (-100) on
  padding and prompts; `expected.grad_global_norm`; `grad.<name>` for every parameter;
- `adamw_const.{losses,lrs,param.<name>}`: 3 steps of `torch.optim.AdamW(lr=1e-3,
  weight_decay=0.01)` on that batch (weight decay on every parameter);
- `generate.prompt`, `generate.greedy`: up to 12 tokens of `model.generate(do_sample=False)` (float32;
  fewer when it reaches the end-of-sequence id, 2).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def decoders():
    return [
        ("llama", LlamaConfig(**COMMON)),
        # Qwen2's biases on q/k/v; a rotary base other than the default.
        ("qwen2", Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **COMMON)),
        # Qwen3's per-head q/k norms, with a head width set apart from hidden / heads.
        ("qwen3", Qwen3Config(head_dim=16, **COMMON)),
    ]


LENGTHS = [12, 9, 5, 2]
LOSS_FROM = [0, 4, 2, 1]


def batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.zeros((len(LENGTHS), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (n, start) in enumerate(zip(LENGTHS, LOSS_FROM)):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, :n] = 1
        labels[row, start:n] = ids[row, start:n]
    return ids, mask, labels


def make_decoder(out, name, config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.save_pretrained(out / name, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(out / name, attn_implementation="eager").eval()
    prompt = torch.tensor([[5, 17, 33, 9, 101]])
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    model = model.double()
    ids, mask, labels = batch(config.vocab_size, seed)
    case = {
        "input_ids": ids,
        "lengths": torch.tensor(LENGTHS),
        "loss_from": torch.tensor(LOSS_FROM),
        "generate.prompt": prompt[0],
        "generate.greedy": greedy[0, prompt.shape[1] :],
    }
    out_ = model(input_ids=ids, attention_mask=mask, labels=labels)
    out_.loss.backward()
    case["expected.logits"] = out_.logits.detach()[mask.bool()]
    case["expected.loss"] = out_.loss.detach().reshape(1)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm = torch.sqrt(sum((p.grad**2).sum() for _, p in trainable))
    case["expected.grad_global_norm"] = norm.reshape(1)
    for pname, p in trainable:
        case[f"grad.{pname}"] = p.grad.detach().clone()
    model.zero_grad()

    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, lrs = [], []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    case["adamw_const.losses"] = torch.tensor(losses, dtype=torch.float64)
    case["adamw_const.lrs"] = torch.tensor(lrs, dtype=torch.float64)
    for pname, p in trainable:
        case[f"adamw_const.param.{pname}"] = p.detach().clone()
    case = {k: v.contiguous() for k, v in case.items()}
    save_file(case, str(out / f"{name}-case.safetensors"))
    print(f"wrote {out / name} and {name}-case.safetensors")


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/decoders")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for seed, (name, config) in enumerate(decoders()):
        make_decoder(out, name, config, seed)


if __name__ == "__main__":
    main()
