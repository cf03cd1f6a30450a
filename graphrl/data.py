"""Prompt data from local files: JSONL or Parquet rows, tokenized and batched.

    rows = load_rows("train.jsonl", prompt_field="question")
    data = PromptData(rows, tokenizer, batch=16, seed=0)
    data.inputs(iteration)   # {"prompts": {"tokens", "attention_mask", "row"}}

Each row is a dict; `prompt_field` holds the prompt text and the other fields (an answer,
a test case) travel to reward functions by the row index every prompt and rollout carry.
Prompts are left-padded to one length (the longest prompt unless given) with the
tokenizer's pad id. Batches walk a permutation of the rows that depends only on the seed
and the epoch, so iteration i always sees the same prompts (a resumed run too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UsageError

FORMATS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Rows:
    """A file's rows, with where each came from (`line N` or `row N`) for errors."""

    path: str
    prompt_field: str
    rows: tuple[Mapping[str, Any], ...]
    where: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, index: int) -> str:
        return f"{self.path} {self.where[index]}"

    def prompt(self, index: int) -> str:
        return self.rows[index][self.prompt_field]


def _jsonl(path: Path) -> tuple[list[Any], list[str]]:
    from .text_lines import utf8_lines

    rows, where = [], []
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise UsageError(f"{path} line {lineno}: not valid JSON ({e.msg} at column "
                             f"{e.colno})") from None
        where.append(f"line {lineno}")
    return rows, where


def _parquet(path: Path) -> tuple[list[Any], list[str]]:
    import datasets
    import pyarrow.parquet as pq

    try:
        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise UsageError(f"--data {path}: no rows (an empty Parquet file)")
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - not Parquet at all: said below, by the reader
        pass
    try:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow raises many kinds; all mean "not a Parquet file"
        raise UsageError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    rows = table.to_list()
    return rows, [f"row {i}" for i in range(len(rows))]


def load_rows(path: str, prompt_field: str = "prompt", flag: str = "--data") -> Rows:
    """The rows of a JSONL (one JSON object per line) or Parquet file; every row must be
    an object whose `prompt_field` is a non-empty string. `flag`: the option errors name."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} {path}: {'is a directory' if file.is_dir() else 'no such file'}")
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"{flag} {path}: unknown format {suffix or '(no extension)'!r} "
                         f"(use {', '.join(FORMATS)})")
    rows, where = _parquet(file) if suffix == ".parquet" else _jsonl(file)
    for row, w in zip(rows, where):
        if not isinstance(row, dict):
            raise UsageError(f"{path} {w}: expected a JSON object, got {type(row).__name__}")
        if prompt_field not in row:
            raise UsageError(f"{path} {w}: no field {prompt_field!r} (fields: "
                             f"{', '.join(sorted(row)) or 'none'}; choose one with "
                             "--prompt-field)")
        value = row[prompt_field]
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{path} {w}: field {prompt_field!r} must be a non-empty "
                             f"string, got {value!r}"[:300])
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")
    return Rows(str(path), prompt_field, tuple(rows), tuple(where))


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """Token ids of one prompt: through the tokenizer's chat template (one user turn,
    generation prompt added) or as plain text."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat-template: the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    return list(tokenizer.encode(text))


class PromptData:
    """Batches of tokenized prompts: `inputs(iteration)` is that iteration's Prompts."""

    def __init__(self, rows: Rows, tokenizer: Any, *, batch: int, seed: int = 0,
                 prompt_len: int | None = None, chat_template: bool = False,
                 pad_id: int | None = None):
        self.rows, self.tokenizer, self.batch, self.seed = rows, tokenizer, batch, seed
        self.ids = [encode_prompt(tokenizer, rows.prompt(i), chat_template)
                    for i in range(len(rows))]
        for i, ids in enumerate(self.ids):
            if not ids:
                raise UsageError(f"{rows.describe(i)}: the prompt encodes to no tokens")
        longest = max(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        self.prompt_len = prompt_len or len(self.ids[longest])
        for i, ids in enumerate(self.ids):
            if len(ids) > self.prompt_len:
                raise UsageError(f"{rows.describe(i)}: the prompt has {len(ids)} tokens, "
                                 f"more than --prompt-len {self.prompt_len}")
        pad = pad_id if pad_id is not None else tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> list[int]:
        """The row order of one epoch: a permutation seeded by (seed, epoch)."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def position(self, iteration: int) -> tuple[int, int]:
        """(epoch, index within it) of the first prompt of `iteration`."""
        return divmod(iteration * self.batch, len(self.rows))

    def indices(self, iteration: int) -> list[int]:
        """Row indices of `iteration`'s batch: consecutive places in the stream of
        epoch permutations (a batch may span two epochs)."""
        out, orders = [], {}
        for k in range(iteration * self.batch, (iteration + 1) * self.batch):
            epoch, pos = divmod(k, len(self.rows))
            if epoch not in orders:
                orders[epoch] = self.order(epoch)
            out.append(orders[epoch][pos])
        return out

    def prompts(self, indices: Sequence[int]) -> dict[str, Any]:
        """Left-padded token ids, their attention mask and row indices."""
        import torch

        tokens = torch.full((len(indices), self.prompt_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), self.prompt_len))
        for b, i in enumerate(indices):
            ids = self.ids[i]
            tokens[b, self.prompt_len - len(ids):] = torch.tensor(ids)
            mask[b, self.prompt_len - len(ids):] = 1.0
        return {"tokens": tokens, "attention_mask": mask,
                "row": torch.tensor(list(indices), dtype=torch.long)}

    def inputs(self, iteration: int) -> dict[str, Any]:
        return {"prompts": self.prompts(self.indices(iteration))}
