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

# loss -> (named inputs with their payload kinds, stats fields it reports)
LOSSES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "ppo": ((("rollout", ROLLOUT), ("old_logprobs", LOGPROBS), ("advantages", ADVANTAGES)),
            ("loss", "clip_fraction", "approx_kl")),
    "grpo": ((("rollout", ROLLOUT), ("old_logprobs", LOGPROBS), ("ref_logprobs", LOGPROBS),
              ("advantages", ADVANTAGES)),
             ("loss", "clip_fraction", "kl")),
    "value": ((("rollout", ROLLOUT), ("old_values", VALUES), ("returns", RETURNS)),
              ("loss", "value_clip_fraction")),
    # staleness-corrected forms the async rewrite (passes/staleness.py) substitutes:
    # old_logprobs is the proximal policy, behaviour_logprobs the policy that generated
    "ppo_decoupled": ((("rollout", ROLLOUT), ("old_logprobs", LOGPROBS),
                       ("behaviour_logprobs", LOGPROBS), ("advantages", ADVANTAGES),
                       ("versions", VERSIONS)),
                      ("loss", "clip_fraction", "approx_kl", "behaviour_weight",
                       "behaviour_clip_fraction")),
    "grpo_decoupled": ((("rollout", ROLLOUT), ("old_logprobs", LOGPROBS),
                        ("ref_logprobs", LOGPROBS), ("behaviour_logprobs", LOGPROBS),
                        ("advantages", ADVANTAGES), ("versions", VERSIONS)),
                       ("loss", "clip_fraction", "kl", "behaviour_weight",
                        "behaviour_clip_fraction")),
}
# loss -> its staleness-corrected form (passes/staleness.py)
DECOUPLED = {"ppo": "ppo_decoupled", "grpo": "grpo_decoupled"}


# Inputs a loss may go without: on-policy PPO/GRPO (one optimizer pass over the rollout,
# epochs=1 and minibatches=1) take the train forward's own detached log-probs as the old
# ones, so the ratio is exactly 1 and its gradient the policy gradient (as TRL's
# GRPOTrainer does with num_iterations=1); this saves the old-log-prob forward.
OPTIONAL_INPUTS = {"ppo": ("old_logprobs",), "grpo": ("old_logprobs",)}


def train_input_names(loss: str, given: int) -> list[str]:
    """The names of a train node's `given` data inputs, in order (optional ones left
    out when fewer were given)."""
    names = [name for name, _ in LOSSES[loss][0]]
    optional = OPTIONAL_INPUTS.get(loss, ())
    if given == len(names) - len(optional):
        names = [n for n in names if n not in optional]
    return names


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


def stats_spec(loss: str) -> PayloadSpec:
    return PayloadSpec(STATS, 1, 1, tuple(Field(n, "f32", per_token=False)
                                          for n in LOSSES[loss][1]))
