"""Writes transformers' references for the real SmolLM2 GGUF in tests/fixtures/smollm2 (committed, so
that the tests need no torch; they compare pipe with them wherever the model has been fetched).

    python scripts/make-smollm2-references.py [GGUF] [OUT]
        (defaults: models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, tests/fixtures/smollm2)

Needs torch, transformers, tokenizers, gguf and accelerate from PyPI. transformers loads the same file
(`gguf_file=`: dequantised to float32, Llama's q/k rows un-permuted) and writes:

- `tokenizer.json`: `strings` (the encoder families' ~380 test strings plus digit, whitespace and
  chat-markup cases) and `ids` for each, from transformers' GGUF tokenizer with SmolLM2's own
  pre-tokenizer (digits split individually, then byte-level without a prefix space: the released
  model's tokenizer.json and llama.cpp's `smollm`). transformers 5 does not know that pre-tokenizer
  and applies GPT-2's split alone; `stock_differs` lists the strings where its ids differ.
- `logits.safetensors`: for three prompts, the float32 logits of the last position
  (`prompt<i>.logits`, vocabulary-wide), and `prompt<i>.greedy`: 20 tokens of
  `generate(do_sample=False)` (no early stop);
- `prompts.json`: the prompts' ids.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("fixtures", HERE / "make-fixtures.py")
fixtures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixtures)

MORE = [
    " 123", "  42", "x 2026 y", "pi is 3.14159", "1,234,567.89", "a1b2c3", "v2.0.1-rc3", "\n7", "(555) 010-9999",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "<|im_end|><|im_end|>",
    "  ²³", "Ⅻ ① ²", "   spaces   ", "\n\n\n", "tab\t\tx", "😀😀 1", "é 9", "0", "00", " 0 0 ",
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nIs this movie review positive or negative? \"a gripping, funny film\"<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
]


def main():
    gguf = Path(sys.argv[1] if len(sys.argv) > 1 else "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/smollm2")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    strings = fixtures.cases() + MORE
    stock = [tok(s)["input_ids"] for s in strings]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    ids = [tok(s)["input_ids"] for s in strings]
    differs = [s for s, a, b in zip(strings, stock, ids) if a != b]
    (out / "tokenizer.json").write_text(
        json.dumps({"strings": strings, "ids": ids, "stock_differs": differs}, ensure_ascii=False) + "\n"
    )
    print(f"{len(strings)} strings; transformers' stock GGUF tokenizer differs on {len(differs)}")

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tensors, prompts = {}, []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        prompts.append(ids[0].tolist())
        with torch.no_grad():
            tensors[f"prompt{i}.logits"] = model(input_ids=ids).logits[0, -1].contiguous()
            greedy = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False
            )
        tensors[f"prompt{i}.greedy"] = greedy[0, ids.shape[1] :].contiguous()
        print(f"prompt {i}: {tok.decode(greedy[0, ids.shape[1]:])!r}")
    save_file(tensors, str(out / "logits.safetensors"))
    (out / "prompts.json").write_text(json.dumps({"prompts": PROMPTS, "ids": prompts}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
