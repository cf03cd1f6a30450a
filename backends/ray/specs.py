"""What the driver sends the rank workers: engines to build and calls to run, and the
stamps the workers send back (plain frozen dataclasses; neither torch nor Ray)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from graphrl.graph import ModelDecl
from graphrl.parallel import Strategy
from graphrl.types import PayloadSpec


@dataclass(frozen=True)
class EngineSpec:
    """One engine to build on each rank of `gpus` (the mesh of the calls it serves)."""

    key: str                    # the engine's name on the rank: "policy", "policy.gen"
    decl: ModelDecl
    options: Mapping[str, Any]
    kind: str                   # fsdp | replicas | megatron | deepspeed | noop
    gpus: tuple[int, ...]
    group: str = ""             # process group of the mesh (fsdp, data-parallel training)
    seed: int = 0
    init_from: Optional[ModelDecl] = None   # start from this model's initial weights
    init_checkpoint: Optional[str] = None   # ... loaded from this model directory
    engine: str = "hf"          # hf | megatron | deepspeed (graphrl.engines)
    strategy: Optional[Strategy] = None     # the degrees it runs (megatron, deepspeed)
    groups: tuple[str, ...] = ()            # process groups it needs (megatron, deepspeed)
    base: str = ""              # a shared base (LoRA): the key of the engine whose frozen
                                # base it is; it runs there with the adapters off, holds
                                # nothing of its own, and `kind` is that engine's


@dataclass(frozen=True)
class InputSpec:
    """A data input: `parts` consecutive arguments holding rows `first`.. of the payload."""

    parts: int
    first: int = 0


@dataclass(frozen=True)
class CallSpec:
    """This rank's share of one call node."""

    node: str
    call: str
    model: str
    method: str                 # generate | forward | train
    engine: str                 # engine key on the rank
    attrs: tuple[tuple[str, Any], ...]
    seed: int
    iteration: int
    inputs: tuple[InputSpec, ...]
    rows: Optional[tuple[int, int]] = None   # generate/forward: the rows this rank computes
    total: int = 0              # rows of the whole batch (generate: prompts)
    shard: Optional[tuple[int, int]] = None  # train: (dp index, dp count)
    output: Optional[PayloadSpec] = None     # what the node returns (noop engines)


@dataclass(frozen=True)
class Stamp:
    """What a rank ran: wall-clock times (time.time() of the rank) and bytes it sent."""

    node: str
    call: str
    model: str
    rank: int
    start: float
    end: float
    iteration: int
    nbytes: int = 0
    ran: str = ""               # the engine and degrees that ran it (engines.degrees_text)

def with_loss(attrs: tuple[tuple[str, Any], ...], program: Any) -> tuple[tuple[str, Any], ...]:
    """A train call's attributes with its loss's name replaced by the LossDef itself
    (graphrl/loss_def.py): the actor runs the step's own loss, a user's included (pickled
    by value when its file is not importable there), with no registry to look it up in."""
    return tuple((k, program.loss(v) if k == "loss" else v) for k, v in attrs)


__all__ = ["EngineSpec", "InputSpec", "CallSpec", "Stamp", "with_loss"]
