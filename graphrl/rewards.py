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
that holds the data (the driver, on the Ray backend too), once per sequence, each call
within a deadline (`timeout`, `--reward-timeout`, default 60 s). An error inside it (an
exception, SystemExit or KeyboardInterrupt included; no return before the deadline; a
result that is not a finite float32 number) stops the run with one line naming the
function (FILE.py:FUNCTION), the iteration and the data row it was scoring.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable

from .errors import OpError, UsageError
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


DEFAULT_TIMEOUT_S = 60.0
FLOAT32_MAX = 3.4028234663852886e38


def function_name(fn: Callable[..., Any]) -> str:
    """FILE.py:FUNCTION for a function defined in a file, else its name."""
    from pathlib import Path

    name = getattr(fn, "__name__", repr(fn))
    code = getattr(fn, "__code__", None)
    return f"{Path(code.co_filename).name}:{name}" if code is not None else name


def call_rows(fn: Callable[..., Any], calls: list[dict[str, Any]], timeout: float,
              where: Callable[[int], str], fn_name: str) -> list[float]:
    """fn(**kwargs) for each of `calls`, in a daemon thread, each call within `timeout`
    seconds: a call that does not return is abandoned (its thread left behind, never
    joined) and the run stops with an error naming the function and the data row, as it
    does when fn raises anything (SystemExit and KeyboardInterrupt included) or returns
    something other than a finite number."""
    import queue
    import threading

    results: queue.Queue = queue.Queue()
    stop = threading.Event()     # set once this call is over: no row is scored after it

    def work() -> None:
        for k, kwargs in enumerate(calls):
            if stop.is_set():
                return
            try:
                results.put((k, fn(**kwargs), None))
            except BaseException as e:  # noqa: BLE001 - sys.exit() in a reward is its error
                results.put((k, None, e))
                return

    threading.Thread(target=work, daemon=True, name=f"reward {fn_name}").start()
    try:
        return _collect(results, len(calls), timeout, where, fn_name)
    finally:
        stop.set()


def _collect(results: Any, n: int, timeout: float, where: Callable[[int], str],
             fn_name: str) -> list[float]:
    """The n values call_rows' worker puts in `results`, each within `timeout` s."""
    import queue

    out: list[float] = []
    for k in range(n):
        try:
            _, value, error = results.get(timeout=timeout)
        except queue.Empty:
            raise OpError(f"reward function {fn_name} did not return within {timeout:g} s "
                          f"on {where(k)} (--reward-timeout)") from None
        if error is not None:
            raise OpError(f"reward function {fn_name} raised on {where(k)}: "
                          f"{type(error).__name__}: {error}") from error
        if not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or abs(value) > FLOAT32_MAX:   # numbers.Real: bool and numpy numbers too
            raise OpError(f"reward function {fn_name} returned {value!r} on {where(k)}: "
                          "expected a finite number (within float32's range)")
        out.append(float(value))
    return out


def text_reward(fn: Callable[..., Any], data: Any, name: str = "text_reward",
                timeout: float | None = None) -> OpDef:
    """An op scoring each rollout row with `fn` (see the module docstring); `data` is
    the graphrl.data.PromptData the prompts came from (rows and tokenizer); each call of
    `fn` must return within `timeout` seconds (default DEFAULT_TIMEOUT_S)."""
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise UsageError(f"reward timeout {timeout!r}: expected seconds > 0")
    rows = data.rows
    fields = set().union(*(set(r) for r in rows.rows)) - {rows.prompt_field}
    named, rest = _arguments(fn, fields)
    fn_name = function_name(fn)

    def score(rollout: dict[str, Any]) -> dict[str, Any]:
        import torch

        calls, indices = [], []
        for b in range(rollout["tokens"].shape[0]):
            i = int(rollout["row"][b])
            if not 0 <= i < len(rows):
                raise OpError(f"reward function {fn_name}: rollout row {b} comes "
                              f"from data row {i}, outside the {len(rows)} rows of "
                              f"{rows.path}")
            row = rows.rows[i]
            response = rollout["tokens"][b][rollout["response_mask"][b] > 0].tolist()
            available = {**{k: v for k, v in row.items() if k != rows.prompt_field},
                         "prompt": rows.prompt(i),
                         "response": data.tokenizer.decode(response, skip_special_tokens=True)}
            calls.append(dict(available) if rest else {k: available[k] for k in named})
            indices.append(i)
        out = call_rows(fn, calls, timeout, lambda k: rows.describe(indices[k]), fn_name)
        return {"score": torch.tensor(out)}

    score.__name__ = getattr(fn, "__name__", "score")
    return op(name, (ROLLOUT,), ((name, SCORES, (Field("score", "f32", per_token=False),)),)
              )(score)
