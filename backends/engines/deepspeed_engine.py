"""A model engine on DeepSpeed ZeRO (Rajbhandari et al. 2020): stages 1, 2, 3, optional
CPU offload of the optimizer state (ZeRO-Offload, Ren et al. 2021).

`DeepSpeedEngine` is one data-parallel rank of a model over a mesh of ranks (a process
group of its own, handed to DeepSpeed as the data-parallel group of an `mpu`, so the
mesh may be part of a larger world). It wraps the seeded HF module that HFEngine builds
(same initial weights, same `_head`), with a torch AdamW (no DeepSpeed op to compile) and
gradient clipping set explicitly from the engine options (DeepSpeed's own default is 1.0).

Every call is a collective over the mesh (ZeRO-3 gathers parameters in forward; every
rank passes the whole batch and computes its equal slice). Training takes HFEngine's
minibatches (same seeded permutation), each rank its slice, split into the plan's
micro-batches as DeepSpeed gradient-accumulation steps; micro-batch losses are weighted
by their share of the minibatch's loss tokens, so the step equals the one-process step
on the whole minibatch's masked mean.

Precision (LoRA: below): bf16 with ZeRO 1-3 is DeepSpeed's `"bf16": {"enabled": true}` (the module in
bf16, fp32 master weights and Adam state in the ZeRO optimizer; runs on CPU with
DS_ACCELERATOR=cpu); bf16 with ZeRO-0 is bf16 autocast over fp32 weights (see
`_initialize`); fp32 is plain fp32. `degrees()` reports what the module computes in.

LoRA (graphrl.lora; the model spec's `lora`): HFEngine wraps the module through peft
(lora_hf.wrap: base frozen, requires_grad False, bf16 under bf16; adapters fp32), and only
the adapters go into the optimizer, so DeepSpeed's ZeRO optimizer holds fp32 masters and
Adam state for the adapters alone (its trainable-parameter groups skip frozen ones;
ZeRO-1/2 shard those over the mesh). The frozen base: a full copy per rank under ZeRO
0-2; under ZeRO-3 DeepSpeed partitions every module parameter, frozen ones included
(parameter_offload._convert_to_zero_parameters walks module.parameters()), and gathers
them in forward. bf16 under LoRA at every stage is the HF LoRA engine's own scheme, not
DeepSpeed's bf16 mode (which would cast the adapters in the module to bf16 beside fp32
masters): DeepSpeed's fp32 optimizer path over the fp32 adapters, the frozen base held
in bf16, forward and backward under bf16 autocast (HFEngine.compute), so the module's
adapters are the fp32 masters (what export_weights and local_arrays report) and the
log-probs before training equal the bf16 HF LoRA engine's bit for bit. `module` is the
peft model, so lora_hf.SharedBase (a reference that is the policy's base) runs this
engine's forward with the adapters off; `base_weights` is its export.

Set DS_ACCELERATOR=cpu in the process environment before DeepSpeed is imported on CPU
(`ensure_accelerator`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl

from .base import fit_micro_batches
from .train_loop import WeightedStats, loss_weights, micro_batches, train_epochs
from .hf import HFEngine


def ensure_accelerator(device: str, local_rank: int = 0) -> None:
    """DeepSpeed picks its accelerator once, at import: CPU needs DS_ACCELERATOR=cpu; it
    also insists on a LOCAL_RANK, which launchers set (this process may have none)."""
    if not device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))


# deepspeed 0.19.8 modules that call zero.utils.assert_ints_same_as_other_ranks by their
# own global name: ZeRO-3's check that every rank recorded the same module trace (at the
# start of a forward while it records one), and its optional safe-mode / sanity checks
TRACE_CHECKERS = ("deepspeed.runtime.zero.partitioned_param_coordinator",
                  "deepspeed.runtime.zero.partition_parameters",
                  "deepspeed.runtime.zero.stage3")


def same_on_mesh(group: Any, device: Any) -> Any:
    """`assert_ints_same_as_other_ranks` over `group`: the mesh's first rank broadcasts
    its list (length, then values) and every rank compares it with its own."""

    def check(ints: Sequence[int]) -> None:
        first = dist.get_global_rank(group, 0)
        n = torch.tensor([len(ints)], dtype=torch.long, device=device)
        dist.broadcast(n, src=first, group=group)
        theirs = torch.tensor(list(ints) if int(n) == len(ints) else [0] * int(n),
                              dtype=torch.long, device=device)
        dist.broadcast(theirs, src=first, group=group)
        if theirs.tolist() != list(ints):
            raise RuntimeError(f"DeepSpeed ZeRO-3: rank {dist.get_rank()} recorded "
                               f"{len(ints)} ids, the mesh's first rank {first} "
                               f"{int(n)} (or other ones): the ranks ran different modules")
    return check


@contextlib.contextmanager
def mesh_barriers(group: Any, device: Any = "cpu") -> Iterator[None]:
    """While inside, DeepSpeed's collectives that go to the whole world wait on `group`
    (the engine's mesh) instead, which would hang when the mesh is part of a larger
    world whose other ranks are not in this call (a ZeRO-3 critic on GPUs 2-3 beside a
    policy on 0-1; a LoRA policy's forward on 0-1 beside generation on 2-3):
    - `deepspeed.comm.barrier()` without a group (ZeRO-3 set-up, stage3.py);
    - ZeRO-3's trace check, `assert_ints_same_as_other_ranks`, which broadcasts from
      world rank 0 over the world at the start of a forward while the trace is recorded
      (the first two forwards, and again after the module order changed, e.g. a shared
      base's forward with the adapters off): `same_on_mesh` instead.
    Its other collectives already take the data-parallel group of the mpu. The patches
    are undone on exit (one call at a time per process)."""
    import importlib

    import deepspeed.comm as dscomm

    world_barrier = dscomm.barrier

    def barrier(group: Any = None, **kw: Any) -> Any:
        return world_barrier(group=group if group is not None else mesh, **kw)

    mesh = group
    check = same_on_mesh(group, device)
    patched = []
    for name in TRACE_CHECKERS if group is not None else ():   # None: the world
        module = importlib.import_module(name)
        if hasattr(module, "assert_ints_same_as_other_ranks"):
            patched.append((module, module.assert_ints_same_as_other_ranks))
            module.assert_ints_same_as_other_ranks = check
    dscomm.barrier = barrier
    try:
        yield
    finally:
        dscomm.barrier = world_barrier
        for module, original in patched:
            module.assert_ints_same_as_other_ranks = original


class _MeshMPU:
    """DeepSpeed's model-parallel-unit interface: no model parallelism, data parallelism
    over the engine's mesh group."""

    def __init__(self, group: Any, ranks: Sequence[int], rank: int):
        self.group, self.ranks, self.rank = group, tuple(ranks), rank
        self._self_group: Any = None   # a one-rank group (model parallelism of 1)

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self) -> Any:
        return self._self_group

    def get_data_parallel_rank(self) -> int:
        return self.ranks.index(self.rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_group(self) -> Any:
        return self.group

    # tensor-parallel aliases some DeepSpeed versions ask for
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


class DeepSpeedEngine:
    """One data-parallel rank of a DeepSpeed ZeRO model (see module doc)."""

    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], *, ranks: Sequence[int],
                 rank: int, group: Any, self_group: Any = None, zero: int = 1,
                 offload: bool = False, micro_batches: int = 1, device: str = "cpu",
                 seed: int = 0):
        if zero not in (0, 1, 2, 3):
            raise UsageError(f"model {decl.name}: ZeRO stage must be 0-3, got {zero}")
        if rank not in ranks:
            raise UsageError(f"model {decl.name}: rank {rank} is not in its mesh {list(ranks)}")
        ensure_accelerator(device, ranks.index(rank))
        # offload_optimizer: not `offload`, which names the engine's offload() method
        self.decl, self.zero, self.offload_optimizer = decl, zero, offload
        self.ranks, self.rank, self.group = tuple(ranks), rank, group
        self.dp, self.dp_rank = len(self.ranks), self.ranks.index(rank)
        self.micro_batches, self.device_name, self.seed = micro_batches, device, seed
        self.ran_micro_batches = micro_batches
        self.options = dict(options)
        self.self_group = self_group
        self.version = 0
        self.hf = HFEngine(decl, options, device=device, seed=seed)
        self.names = list(self.hf.module.state_dict())
        self.layout = self._make_layout()
        self._initialize()

    def _make_layout(self) -> Any:
        """ZeRO-3: each weight a flat slice of its row-major flattening per rank, padded
        at the end (DeepSpeed's `ds_tensor`); ZeRO 0-2: a full copy on every rank."""
        from graphrl.parallel import DeviceMesh, Strategy
        from graphrl.shard import ParamSpec, model_layout

        specs = [ParamSpec(k, tuple(v.shape), "replicate", None)
                 for k, v in self.hf.module.state_dict().items()]
        zero = 3 if self.zero == 3 else 0
        return model_layout(specs, DeviceMesh(self.ranks), Strategy(dp=self.dp, zero=zero),
                            num_layers=self.decl.spec.num_layers, zero_format="flat")

    def _initialize(self) -> None:
        import deepspeed

        o = self.hf.options
        # LoRA: the adapters only (HFEngine._trained); DeepSpeed keeps frozen parameters
        # out of its ZeRO optimizer's groups either way
        opt = torch.optim.AdamW(self.hf._trained().parameters(), lr=o["lr"],
                                betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        zero: dict[str, Any] = {"stage": self.zero}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            # bf16 with ZeRO 1-3: DeepSpeed's own mixed precision (bf16 module, fp32 master
            # weights and Adam state in its ZeRO optimizer). With ZeRO-0 its bf16 mode
            # wraps a torch optimizer in FP16_UnfusedOptimizer (dynamic loss scaling),
            # whose update we measured 3.4x further from fp32's than bf16 autocast's
            # (relative error 0.33 vs 0.097, tiny Llama, 4 AdamW steps): ZeRO-0 runs the
            # HF engine's bf16 autocast over fp32 weights instead. fp32: neither.
            # LoRA: the HF LoRA engine's bf16 at every stage (module doc)
            "bf16": {"enabled": self.hf.precision == "bf16" and self.zero >= 1
                     and self.decl.spec.lora is None},
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self._accumulation_steps(),
            "gradient_clipping": float(o["grad_clip"] or 0.0),   # explicit: DS defaults to 1
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        mpu = _MeshMPU(self.group, self.ranks, self.rank)
        mpu._self_group = self.self_group
        with mesh_barriers(self.group, self.hf.device):
            self.ds, self.optimizer, _, _ = deepspeed.initialize(
                model=self.hf.module, optimizer=opt, config=config, mpu=mpu,
                dist_init_required=False)

    def _accumulation_steps(self) -> int:
        """DeepSpeed gradient-accumulation steps: one per micro-batch, except under ZeRO-3,
        where deepspeed 0.19.8 on CPU accumulated wrong gradients over micro-batches in
        our differential test (tests/test_engine_deepspeed.py); there the micro-batches'
        weighted losses are summed into one backward (same numbers, the activations of
        all micro-batches held at once)."""
        return 1 if self.zero == 3 else self.micro_batches

    # -- inference ----------------------------------------------------------------------
    def _slice(self, n: int, what: str) -> slice:
        if n % self.dp:
            raise UsageError(f"{self.decl.name}.{what}: {n} rows do not split over its "
                             f"{self.dp} data-parallel ranks")
        k = n // self.dp
        return slice(self.dp_rank * k, (self.dp_rank + 1) * k)

    @torch.no_grad()
    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        """The head quantity for the whole batch on every rank (each its slice, gathered)."""
        n = next(iter(rollout.values())).shape[0]
        mine = self._slice(n, "forward")
        with mesh_barriers(self.group, self.hf.device):
            out = self.hf.forward({k: v[mine] for k, v in rollout.items()})
        self.ran_micro_batches = 1   # one pass over its slice
        key, local = next(iter(out.items()))
        full = [torch.zeros_like(local) for _ in range(self.dp)]
        dist.all_gather(full, local.contiguous(), group=self.group)
        return {key: torch.cat(full)}

    def generate(self, prompts: Mapping[str, Any], **_: Any) -> dict[str, Any]:
        raise UsageError(f"model {self.decl.name}: the deepspeed engine does not generate; "
                         "generation runs on the HF engine after a reshard")

    # -- training -----------------------------------------------------------------------
    def train(self, inputs: Mapping[str, Mapping[str, Any]], *, loss: Any, seed: int = 0,
              epochs: int = 1, minibatches: int = 1, shard: Any = None,
              **hyper: Any) -> dict[str, float]:
        """HFEngine.train's minibatches (train_loop.train_epochs); each rank its slice."""
        self.ds.train()
        self.hf.module.eval()   # no dropout (as HFEngine); DeepSpeed's train() flag only
        with mesh_barriers(self.group, self.hf.device):
            stats = train_epochs(self.decl.name, inputs, loss=loss, seed=seed,
                                 epochs=epochs, minibatches=minibatches, options=hyper,
                                 step=lambda fn, idx: self._minibatch(fn, inputs, idx,
                                                                      hyper))
        self.version += 1
        return stats

    def _dp_sum(self, t: torch.Tensor) -> None:
        if self.dp > 1:
            dist.all_reduce(t, group=self.group)

    def _minibatch(self, loss_fn: Any, inputs: Mapping[str, Mapping[str, Any]],
                   idx: torch.Tensor, hyper: Mapping[str, Any]) -> dict[str, float]:
        mine = idx[self._slice(idx.numel(), "train")]
        m = fit_micro_batches(mine.numel(), self.micro_batches)
        if self.zero != 3 and m != self.ds.gradient_accumulation_steps():
            # DeepSpeed's public setter: train batch = micro (1) x accumulation x dp
            self.ds.set_train_batch_size(m * self.dp)
        self.ran_micro_batches = m
        mbs = micro_batches(self.decl.name, inputs, mine, m, self.hf._to)
        weights = loss_weights(mbs, self._dp_sum, loss_fn.measure)
        sums = WeightedStats()
        summed = None
        for i, mb in enumerate(mbs):
            with torch.enable_grad(), self.hf._adapter_dropout():
                value, stats = loss_fn(self.hf.loss_forward(), mb, **hyper)
                # DeepSpeed averages gradients over dp: x dp makes it the weighted sum
                value = value * float(weights[i]) * self.dp
                if self._accumulation_steps() == 1 and m > 1:
                    summed = value if summed is None else summed + value
                else:
                    self.ds.backward(value, scale_wrt_gas=False)
                    self.ds.step()   # applies at the gradient-accumulation boundary only
            sums.add(float(weights[i]), stats)
        if summed is not None:
            with torch.enable_grad():
                self.ds.backward(summed, scale_wrt_gas=False)
            self.ds.step()
        return sums.result(self._dp_sum)

    # -- weights ------------------------------------------------------------------------
    def gathered(self) -> Any:
        """A context inside which `module` holds the full weights on every rank (ZeRO-3:
        deepspeed.zero.GatheredParameters, a collective of the mesh on entry and exit;
        ZeRO 0-2: nothing to do). For code that reads the HF module whole, e.g. a LoRA
        policy's --save: `with eng.gathered(): lora_hf.save_adapter(dir, eng, ...)`
        on every rank, the writing on one."""
        import contextlib

        if self.zero != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.hf.module.parameters()),
                                                 modifier_rank=None)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Full weights (ZeRO-3: an all-gather over the mesh, a collective); LoRA: the
        peft state dict, as the HF LoRA engine exports it (base as held, fp32 adapters)."""
        with self.gathered():
            return {k: v.detach().cpu().clone() for k, v in self.hf.module.state_dict().items()}

    @property
    def module(self) -> torch.nn.Module:
        """The HF module (LoRA: the peft model; lora_hf.SharedBase switches its adapters
        off around this engine's forward)."""
        return self.hf.module

    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def tokens(self) -> Any:
        return self.hf.tokens

    def ran_precision(self) -> str:
        return self.hf.ran_precision()

    def base_weights(self) -> dict[str, torch.Tensor]:
        """LoRA: the frozen base's weights under the HF module's own names (what
        lora_hf.SharedBase exports; ZeRO-3: gathered, a collective)."""
        from .lora_hf import merged_weights

        with self.gathered():
            return merged_weights(self.hf.module, adapters=False)

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """LoRA: the plain HF state dict with each target's W + (alpha / r) B A
        (lora_hf.merged_weights, as on the HF LoRA engine; ZeRO-3: a collective)."""
        from .lora_hf import merged_weights

        with self.gathered():
            return merged_weights(self.hf.module)

    def load_weights(self, named: Mapping[str, torch.Tensor]) -> None:
        """Replace the weights (every rank passes the same full ones). Allowed before the
        first training step only: DeepSpeed keeps its own fp32 master copies, so the
        engine is rebuilt around a fresh module holding these weights."""
        if self.version:
            raise UsageError(f"model {self.decl.name}: the deepspeed engine loads weights "
                             "only before training (its optimizer holds master copies)")
        self.hf = HFEngine(self.decl, self.options, device=self.device_name, seed=self.seed)
        self.hf.load_weights(named)
        self._initialize()

    def local_arrays(self) -> dict[str, list[torch.Tensor]]:
        """This rank's piece of every weight, as the layout (deepspeed_layout) says: the
        flat ZeRO-3 partition (`ds_tensor`), or the full tensor under ZeRO 0-2."""
        out = {}
        params = dict(self.hf.module.named_parameters())
        for name in self.names:
            p = params.get(name)
            if p is None:   # a tied name (GPT-2's lm_head): the parameter it shares
                p = _tied(self.hf.module, name)
            out[name] = [p.ds_tensor.data if self.zero == 3 else p.data]
        return out

    # -- checkpoints (deepspeed_state.py) ---------------------------------------------------
    def save_shards(self, folder: Any) -> list[str]:
        """Write the slices of weights and optimizer state this rank's ZeRO partition owns
        into `folder` (no collective); data-parallel rank 0 also writes the index."""
        from pathlib import Path

        from .deepspeed_state import save_shards

        return save_shards(self, Path(folder))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a full, placement-independent state (engine_state): rebuilt around its
        weights, then its Adam state (a collective of the mesh)."""
        from .deepspeed_state import load_state

        load_state(self, state)

    def offload(self) -> None:
        """Nothing to move on CPU; on CUDA DeepSpeed's own offload does this."""

    def onload(self) -> None:
        """See offload."""

    def degrees(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "dp": self.dp, "tp": 1, "pp": 1, "sp": False,
                "zero": self.zero, "offload": int(self.offload_optimizer),
                "micro_batches": self.ran_micro_batches,
                "precision": self.hf.ran_precision()}


def _tied(module: torch.nn.Module, name: str) -> torch.nn.Parameter:
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["DeepSpeedEngine", "ensure_accelerator"]
