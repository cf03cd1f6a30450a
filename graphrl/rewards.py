"""Rewards on text: a plain Python function over decoded strings and a data row's fields.

    def correct(prompt: str, response: str, answer: str) -> float:
        return float(last_number(response) == answer)

    score = gr.rewards.text_reward(correct, data)     # an op: Rollout -> Scores
    ...
    def step(prompts, policy, reference):
        rollout = policy.generate(prompts, max_new_tokens=32)
        scores = score(rollout)

The function's parameters are matched by name: `prompt` (the row's prompt text),
`response` (the generated text up to its stop, special tokens removed), and any field of
the row (`answer` above); `**fields` takes every field. It runs as an op, on the host
that holds the data (the driver, on the Ray backend too), once per sequence. An error
inside it names the function and the file row it was scoring.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from .errors import ExecutionError, UsageError
from .ops import op
from .signatures import ROLLOUT, SCORES
from .trace import OpDef
from .types import Field

TEXT = ("prompt", "response")


def _arguments(fn: Callable[..., Any], fields: set[str]) -> tuple[tuple[str, ...], bool]:
    """(the parameters fn takes by name, whether it takes **fields); checks that every
    required parameter is available."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise UsageError(f"reward function {name}: cannot read its signature") from None
    named, rest = [], False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            rest = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.name in TEXT or p.name in fields:
            named.append(p.name)
        elif p.default is p.empty:
            raise UsageError(f"reward function {name}: parameter {p.name!r} is neither "
                             f"prompt, response nor a field of the data rows "
                             f"({', '.join(sorted(fields)) or 'none'})")
    return tuple(named), rest


def text_reward(fn: Callable[..., Any], data: Any, name: str = "text_reward") -> OpDef:
    """An op scoring each rollout row with `fn` (see the module docstring); `data` is
    the graphrl.data.PromptData the prompts came from (rows and tokenizer)."""
    rows = data.rows
    fields = set().union(*(set(r) for r in rows.rows)) - {rows.prompt_field}
    named, rest = _arguments(fn, fields)
    fn_name = getattr(fn, "__name__", repr(fn))

    def score(rollout: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = []
        for b in range(rollout["tokens"].shape[0]):
            i = int(rollout["row"][b])
            if not 0 <= i < len(rows):
                raise ExecutionError(f"reward function {fn_name}: rollout row {b} comes "
                                     f"from data row {i}, outside the {len(rows)} rows of "
                                     f"{rows.path}")
            row = rows.rows[i]
            response = rollout["tokens"][b][rollout["response_mask"][b] > 0].tolist()
            available = {**{k: v for k, v in row.items() if k != rows.prompt_field},
                         "prompt": rows.prompt(i),
                         "response": data.tokenizer.decode(response, skip_special_tokens=True)}
            kwargs = dict(available) if rest else {k: available[k] for k in named}
            try:
                value = fn(**kwargs)
            except Exception as e:
                raise ExecutionError(f"reward function {fn_name} raised on "
                                     f"{rows.describe(i)}: {type(e).__name__}: {e}") from e
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ExecutionError(f"reward function {fn_name} returned {value!r} on "
                                     f"{rows.describe(i)}: expected a finite number")
            out.append(float(value))
        return {"score": torch.tensor(out)}

    score.__name__ = fn_name
    return op(name, (ROLLOUT,), ((name, SCORES, (Field("score", "f32", per_token=False),)),)
              )(score)
