"""What each model method and each training loss takes and returns, as payload types.

This is the contract between tracing (which builds typed nodes), verify (which checks
producers against it) and the engines (which must return exactly these fields).

Conventions for a rollout of `seq` tokens (prompt then response):
  tokens[b, t]         token ids; prompts are left-padded, finished responses right-padded
                       (with the tokenizer's pad id)
  attention_mask[b, t] 1.0 where token t is real (a prompt token, or a generated token up
                       to and including the one that stopped the sequence), 0.0 on padding
  response_mask[b, t]  1.0 where token t was generated (up to and including the stop
                       token): the positions losses, advantages and KL count
  row[b]               index of the data row the prompt came from (a reward on text looks
                       the row's other fields up by it); a rollout repeats it per sample
  logprobs[b, t]       log p(token t | tokens < t) for t >= 1, 0 at t = 0
  values[b, t]         critic's value of the state that generated token t (t >= 1)
  score[b]             reward model's scalar for the whole sequence
"""
from __future__ import annotations

from .errors import UsageError
from .types import Field, PayloadSpec

PROMPTS = "Prompts"
ROLLOUT = "Rollout"
LOGPROBS = "LogProbs"
VALUES = "Values"
SCORES = "Scores"
ADVANTAGES = "Advantages"
RETURNS = "Returns"
STATS = "Stats"
VERSIONS = "Versions"   # per sequence: the policy version whose weights generated it

ROW = Field("row", "i64", per_token=False)
PROMPT_FIELDS = (Field("tokens", "i64"), Field("attention_mask", "f32"), ROW)
ROLLOUT_FIELDS = (Field("tokens", "i64"), Field("attention_mask", "f32"),
                  Field("response_mask", "f32"), ROW)
FORWARD_OUTPUT = {  # head -> (kind, fields, output name suffix)
    "lm": (LOGPROBS, (Field("logprobs", "f32"),), "logprobs"),
    "value": (VALUES, (Field("values", "f32"),), "values"),
    "score": (SCORES, (Field("score", "f32", per_token=False),), "scores"),
}

# The losses a train node optimises, with the payloads they take and the stats they
# report, are LossDefs: graphrl/loss_def.py, the built-ins in graphrl/builtin_losses.py.


def prompts_spec(batch: int, seq: int) -> PayloadSpec:
    """The Prompts payload of a step: `batch` prompts of `seq` tokens (both ints >= 1)."""
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"prompts_spec: {name}={value!r} must be an int >= 1")
    return PayloadSpec(PROMPTS, batch, seq, PROMPT_FIELDS)


def rollout_spec(batch: int, seq: int) -> PayloadSpec:
    return PayloadSpec(ROLLOUT, batch, seq, ROLLOUT_FIELDS)


def forward_spec(head: str, rollout: PayloadSpec) -> tuple[PayloadSpec, str]:
    kind, fields, suffix = FORWARD_OUTPUT[head]
    return PayloadSpec(kind, rollout.batch, rollout.seq, fields), suffix


def versions_spec(batch: int, seq: int) -> PayloadSpec:
    return PayloadSpec(VERSIONS, batch, seq, (Field("version", "i64", per_token=False),))


def stats_spec(names: tuple[str, ...]) -> PayloadSpec:
    """A train node's Stats payload: one f32 per stat its loss reports."""
    return PayloadSpec(STATS, 1, 1, tuple(Field(n, "f32", per_token=False) for n in names))
