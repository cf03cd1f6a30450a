"""Arithmetic word problems generated in code, and a tiny Llama with a word-level tokenizer
saved as a local Hugging Face directory: what examples/text_grpo.py runs on when it is
given no model or data (no download, ever).

    "Tom has 3 apples and buys 4 more . How many apples does Tom have ?"  answer "7"
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

NAMES = ("Tom", "Ann", "Sam", "Mia", "Leo", "Ivy")
ITEMS = ("apples", "pens", "cards", "books", "coins", "shells")
TEMPLATES = (
    ("{n} has {a} {x} and buys {b} more . How many {x} does {n} have ?", "add"),
    ("{n} has {a} {x} and finds {b} more . How many {x} now ?", "add"),
    ("{n} had {a} {x} and gets {b} more . How many {x} in all ?", "add"),
)
MAX_OPERAND = 4
NUMBERS = [str(i) for i in range(2 * MAX_OPERAND + 1)]
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def problems(n: int, seed: int) -> list[dict[str, Any]]:
    """n word problems with their numeric answer (a string) as `answer`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template, _ = rng.choice(TEMPLATES)
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        text = template.format(n=rng.choice(NAMES), x=rng.choice(ITEMS), a=a, b=b)
        out.append({"prompt": text, "answer": str(a + b)})
    return out


def write_problems(path: Path, n: int = 2000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in problems(n, seed)))
    return path


def write_held_out(path: Path, train: Path, n: int = 64, seed: int = 1) -> Path:
    """n problems whose prompt is not in the `train` file (held out for --eval-every)."""
    seen = {json.loads(line)["prompt"] for line in train.read_text().splitlines() if line}
    fresh = [p for p in problems(20 * n, seed) if p["prompt"] not in seen]
    unique = list({p["prompt"]: p for p in fresh}.values())[:n]
    if len(unique) < n:
        raise ValueError(f"only {len(unique)} problems outside {train}; asked for {n}")
    path.write_text("".join(json.dumps(p) + "\n" for p in unique))
    return path


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def correct_answer(response: str, answer: str) -> float:
    """The reward: 1 if the last number in the response equals the answer, else 0."""
    return float(last_number(response) == str(answer))


def vocabulary() -> list[str]:
    words = set(NUMBERS) | set(NAMES) | set(ITEMS)
    for template, _ in TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return list(SPECIALS) + sorted(words)


def build_tokenizer() -> Any:
    """A word-level tokenizer over the problems' words (the `tokenizers` library): BOS
    first, whitespace-split words, </s> as EOS, <pad> as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def write_tiny_llama(directory: Path, seed: int = 0, hidden: int = 64, layers: int = 2,
                     heads: int = 4) -> Path:
    """A random tiny Llama and its tokenizer, saved with save_pretrained."""
    import torch
    import transformers

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    from graphrl.backends.engines.hf_checkpoint import no_progress_bars

    with no_progress_bars():
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
