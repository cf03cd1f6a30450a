"""Engines that hold one rank's part of a model, and the layouts their tensors follow.

Each engine here has a `layout` (graphrl.shard.ModelLayout over global GPU ids) and
`local_arrays()`: for every weight, the rank's tensors in `layout[name].pieces_on(gpu)`
order — writable views of the live weights, which is what `reshard.execute_plan` reads
and writes.

- `FSDPEngine`: an HF model wrapped by FSDP2, `fully_shard` per decoder layer and on the
  root, over the ranks of a process group (DESIGN.md, "Sharded training on CPU with
  gloo"). Every weight is a DTensor `Shard(0)`: even dim-0 chunks with torch.chunk
  semantics = `layout_for(..., zero=3, zero_format="dim0")`. Calls on it are collectives
  over its mesh: every rank of the mesh makes the same call.
  LoRA (graphrl.lora): the module is the peft model lora_hf.wrap makes (the frozen base
  in the planned precision, bf16 or fp32, requires_grad False; the adapters fp32
  masters), sharded as it is: FSDP2 gathers each weight in its own dtype and reduces
  gradients of the adapters only (the base has none), the optimizer holds the adapters
  only, and bf16 compute is the engine's autocast, as in one process (no
  MixedPrecisionPolicy: the base is bf16 already, the adapters are cast by autocast).
- `ReplicatedEngine`: a full HF model on each rank of its mesh (generation / inference).
- `ShardBuffers`: plain arrays for any layout (tensor-parallel, flat ZeRO, …) with no
  model behind them: a destination for layouts no engine here runs yet.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.shard import Box, ModelLayout, ParamSpec, llama_params, model_layout

from ..engines.hf import HFEngine, build_module


# -- layouts -------------------------------------------------------------------------------
def param_specs(decl: ModelDecl, module: Any = None, checkpoint: Any = None
                ) -> tuple[ParamSpec, ...]:
    """The weights of `decl`'s HF module in state_dict order: of `module` when given (an
    engine's own), else of the module of `checkpoint` (a local HF directory) or of the
    spec, built on the meta device (nothing allocated). Llama-family weights carry their
    tensor-parallel kinds and layers (graphrl.shard.llama_params, with the biases, q/k
    norms and head_dim of the module's own config); others are `replicate`, on every
    stage."""
    from graphrl.architecture import architecture

    if module is None:
        with torch.device("meta"):
            module = _meta_module(decl, checkpoint)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    known: dict[str, ParamSpec] = {}
    s = decl.spec
    if s.family == "llama":
        arch = architecture(module.config.to_dict())
        known = {p.name: p for p in llama_params(
            s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size,
            s.vocab_size, tie_embeddings=s.tie_embeddings, head_dim=arch.head_dim,
            qkv_bias=arch.qkv_bias, o_bias=arch.o_bias, qk_norm=arch.qk_norm,
            mlp_bias=arch.mlp_bias)}
    out = []
    for name, shape in shapes.items():
        p = known.get(name)
        out.append(p if p is not None and p.shape == shape
                   else ParamSpec(name, shape, "replicate", None))
    return tuple(out)


def _meta_module(decl: ModelDecl, checkpoint: Any) -> nn.Module:
    """The HF module of `decl` (from `checkpoint`'s config when given), weights not loaded;
    with LoRA, inside peft's wrapper (the names and shapes the engine holds)."""
    if checkpoint is None:
        module = build_module(decl)
    else:
        import transformers

        from ..engines.hf_classes import hf_class, inference_config

        config = transformers.AutoConfig.from_pretrained(str(checkpoint),
                                                         local_files_only=True)
        module = hf_class(decl.spec, auto=True).from_config(
            inference_config(config, decl.spec.head))
    if decl.spec.lora is not None:
        from peft import get_peft_model

        from ..engines.lora_hf import lora_config

        module = get_peft_model(module, lora_config(decl))
    return module


def fsdp_layout(specs: Sequence[ParamSpec], gpus: Sequence[int], num_layers: int = 1
                ) -> ModelLayout:
    """FSDP2 over `gpus` (mesh rank i = gpus[i]): every weight in even dim-0 chunks."""
    return model_layout(specs, DeviceMesh(tuple(gpus)), Strategy(dp=len(gpus), zero=3),
                        num_layers=num_layers, zero_format="dim0")


def replicated_layout(specs: Sequence[ParamSpec], gpus: Sequence[int], num_layers: int = 1
                      ) -> ModelLayout:
    """A full copy of every weight on each of `gpus`."""
    return model_layout(specs, DeviceMesh(tuple(gpus)), Strategy(dp=len(gpus)),
                        num_layers=num_layers)


def _arrays_for(layout: ModelLayout, gpu: int, named: Mapping[str, torch.Tensor],
                what: str) -> dict[str, list[torch.Tensor]]:
    """One tensor per weight, checked against the piece `gpu` holds (none: empty)."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, lay in layout.items():
        pieces = lay.pieces_on(gpu)
        t = named[name]
        if not pieces:
            if t.numel():
                raise ValueError(f"{what}: {name} holds {t.numel()} elements on GPU {gpu}, "
                                 "its layout says none")
            out[name] = []
            continue
        if len(pieces) != 1 or not isinstance(pieces[0], Box) or \
                tuple(t.shape) != pieces[0].extents:
            raise ValueError(f"{what}: {name} on GPU {gpu} has shape {tuple(t.shape)}, "
                             f"layout {lay.text()}")
        out[name] = [t]
    return out


def _check_decl(decl: ModelDecl, specs: Sequence[ParamSpec], module: nn.Module) -> None:
    got = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    if got != [(p.name, p.shape) for p in specs]:
        raise UsageError(f"model {decl.name}: weights differ from param_specs()")


# -- engines -------------------------------------------------------------------------------
class _WrapsEngine:
    """What a rank's engine here reads through to the one-process engine it wraps
    (`self.engine`): its version, and what lora_hf.SharedBase reads of the engine it runs
    a shared base on (module, device, tokens)."""

    engine: Any

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def tokens(self) -> Any:
        return self.engine.tokens


class ReplicatedEngine(_WrapsEngine):
    """A full engine of the model's declared kind (HFEngine, or FastEngine for
    engine=fast) on this rank; one of `gpus` replicas."""

    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], gpus: Sequence[int],
                 gpu: int, *, device: str = "cpu", seed: int = 0):
        if gpu not in gpus:
            raise UsageError(f"model {decl.name}: GPU {gpu} is not in its mesh {list(gpus)}")
        self.decl, self.gpu, self.gpus = decl, gpu, tuple(gpus)
        from ..engines.registry import create_engine

        self.engine = create_engine(decl.engine, decl, options, device, seed)
        self.specs = param_specs(decl, self.engine.module)
        self.layout = replicated_layout(self.specs, self.gpus, decl.spec.num_layers)

    def local_arrays(self) -> dict[str, list[torch.Tensor]]:
        named = dict(self.engine.module.state_dict(keep_vars=True))
        return _arrays_for(self.layout, self.gpu, {k: v.data for k, v in named.items()},
                           self.decl.name)

    def generate(self, prompts: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        return self.engine.generate(prompts, **kw)

    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        return self.engine.forward(rollout)

    def train(self, inputs: Mapping[str, Mapping[str, Any]], **kw: Any) -> dict[str, float]:
        return self.engine.train(inputs, **kw)

    def export_weights(self) -> dict[str, torch.Tensor]:
        return self.engine.export_weights()

    def load_weights(self, named: Mapping[str, torch.Tensor]) -> None:
        self.engine.load_weights(named)

    def ran_precision(self) -> str:
        return self.engine.ran_precision()

    def offload(self) -> None:
        self.engine.offload()

    def onload(self) -> None:
        self.engine.onload()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state)


def decoder_layers(module: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder layers (HF Llama `model.layers`, GPT-2 `transformer.h`)."""
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) == num_layers:
            return m
    raise UsageError(f"found no list of {num_layers} decoder layers in "
                     f"{type(module).__name__}")


class FSDPEngine(_WrapsEngine):
    """An HF model sharded by FSDP2 over the ranks `gpus` of process group `group`.

    Every rank builds the same seeded model, then `fully_shard` keeps its dim-0 chunk of
    each weight. `train` takes this rank's slice of the batch (`shard_batch`); gradients
    are averaged over the mesh, so equal slices give the single-process step on the whole
    batch. `train`, `forward`, `generate` and `export_weights` are collectives: every
    rank of the mesh must make the same call. Calls that do not run the root module's
    forward: a scalar head's body + head (HFEngine._scalar) runs as a registered forward
    method of the root; the fast engine scores through HF's forward (its fused kernels
    would read shards) and cannot generate here (its decode copy reads full weights).
    """

    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], gpus: Sequence[int],
                 gpu: int, group: Any, *, device: str = "cpu", seed: int = 0):
        from torch.distributed.device_mesh import DeviceMesh as TorchMesh
        from torch.distributed.fsdp import fully_shard

        if gpu not in gpus:
            raise UsageError(f"model {decl.name}: GPU {gpu} is not in its mesh {list(gpus)}")
        self.decl, self.gpu, self.gpus = decl, gpu, tuple(gpus)
        from ..engines.registry import create_engine

        self.engine = create_engine(decl.engine, decl, options, device, seed)
        self.specs = param_specs(decl, self.engine.module)
        _check_decl(decl, self.specs, self.engine.module)
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.mesh = TorchMesh.from_group(group, kind, mesh=list(self.gpus))
        module = self.engine.module
        # bf16: FSDP2 gathers bf16 copies of the fp32 (master) shards for compute and
        # reduces gradients in fp32 (MixedPrecisionPolicy); fp32: no policy
        mp = {}
        if self.engine.precision == "bf16" and decl.trainable and decl.spec.lora is None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)}
        for layer in decoder_layers(module, decl.spec.num_layers):
            fully_shard(layer, mesh=self.mesh, **mp)
        fully_shard(module, mesh=self.mesh, **mp)
        if decl.spec.head != "lm":
            self._scalar_through_root(module)
        if getattr(self.engine, "fused_forward", False):
            # the fast engine's fused kernels (fast_forward) read the module's parameters
            # directly, which are shards here: score and train through HF's forward of
            # the root (FastEngine._head's fallback) instead
            self.engine.fused_forward = False
        self.layout = fsdp_layout(self.specs, self.gpus, decl.spec.num_layers)
        self.local_arrays()   # checks the layout against the real shards

        def sum_over_ranks(t: torch.Tensor) -> None:   # the adaptive KL stat
            on = t.to(device)
            torch.distributed.all_reduce(on, group=group)
            t.copy_(on.cpu())
        self.engine.sum_over_ranks = sum_over_ranks

    def _scalar_through_root(self, module: nn.Module) -> None:
        """A scalar head (value, score) runs the HF body and the head Linear
        (HFEngine._scalar), not the root module's forward, so FSDP2's root pre-forward
        hook, which all-gathers the root's own weights (embeddings, final norm, the head)
        and after backward reduce-scatters their gradients, would not run: the body would
        compute on sharded DTensors. Registered as a forward method of the root
        (torch.distributed.fsdp.register_fsdp_forward_method), that call runs the root's
        pre/post-forward hooks as module(...) does, for forward and train alike."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        module.graphrl_scalar = self.engine._scalar   # a plain attribute: no weights
        register_fsdp_forward_method(module, "graphrl_scalar")
        self.engine._scalar = module.graphrl_scalar

    def _dtensors(self) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor, Shard

        out = {}
        for name, t in self.engine.module.state_dict(keep_vars=True).items():
            if not isinstance(t, DTensor) or tuple(t.placements) != (Shard(0),):
                raise ValueError(f"{self.decl.name}: {name} is not a Shard(0) DTensor")
            out[name] = t
        return out

    def local_arrays(self) -> dict[str, list[torch.Tensor]]:
        named = {k: v.data.to_local() for k, v in self._dtensors().items()}
        return _arrays_for(self.layout, self.gpu, named, self.decl.name)

    def train(self, inputs: Mapping[str, Mapping[str, Any]], **kw: Any) -> dict[str, float]:
        return self.engine.train(inputs, **kw)

    def ran_precision(self) -> str:
        return self.engine.ran_precision()

    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self.engine.forward(rollout)
        finally:
            self._reshard()

    def generate(self, prompts: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        if hasattr(self.engine, "_decoder"):   # FastEngine: decodes on a copy (FastLM)
            raise UsageError(f"model {self.decl.name}: engine fast cannot generate on "
                             "FSDP2 shards (its decode copy reads full weights); place "
                             f"{self.decl.name}.generate on GPUs of its own (replicas, "
                             "fed by a reshard) or use engine hf")
        try:
            return self.engine.generate(prompts, **kw)
        finally:
            self._reshard()

    def _reshard(self) -> None:
        """Free the all-gathered weights after a pass without backward. FSDP2 keeps the
        root module's parameters unsharded after forward (backward would need them);
        with no backward they would stay so, and the next training pass would compute
        with them while the optimizer updates the shards."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.engine.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Full weights on every rank of the mesh (all-gathers: a collective)."""
        return {k: v.full_tensor().detach().cpu().clone() for k, v in self._dtensors().items()}

    @torch.no_grad()
    def load_weights(self, named: Mapping[str, torch.Tensor]) -> None:
        """Take this rank's chunks of full weights (every rank passes the same ones)."""
        arrays = self.local_arrays()
        missing = sorted(set(arrays) - set(named))
        if missing:
            raise UsageError(f"model {self.decl.name}: weights lack {missing[:3]}")
        for name, arrs in arrays.items():
            for piece, a in zip(self.layout[name].pieces_on(self.gpu), arrs):
                a.copy_(named[name][piece.slices()])

    def offload(self) -> None:
        self.engine.offload()

    def onload(self) -> None:
        self.engine.onload()

    def state_dict(self) -> dict[str, Any]:
        """Full weights and full optimizer state (all-gathers: a collective of the mesh),
        in the placement-independent form of engines.engine_state."""
        from torch.distributed.tensor import DTensor

        from ..engines.engine_state import named_optimizer_state

        def full(t: Any) -> Any:
            return t.full_tensor().detach().cpu().clone() if isinstance(t, DTensor) else t
        return {"weights": self.export_weights(), "version": self.engine.version,
                "optimizer": named_optimizer_state(self.engine._trained(),
                                                   self.engine.optimizer, full),
                "kl_coef": self.engine.kl_control.coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take this rank's shards of a full state (every mesh rank passes the same)."""
        from torch.distributed.tensor import distribute_tensor

        from ..engines.engine_state import load_named_optimizer_state

        self.load_weights(state["weights"])
        self.engine.optimizer = None
        if state["optimizer"] is not None:
            params = dict(self.engine.module.named_parameters())

            def local(name: str, t: Any) -> Any:
                p = params[name]
                return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
            load_named_optimizer_state(self.engine._trained(), self.engine._optimizer(),
                                       state["optimizer"], local)
        self.engine.version = int(state["version"])
        self.engine.kl_control.coef = state.get("kl_coef")   # absent in older checkpoints


class ShardBuffers:
    """Zeroed local arrays of any layout, for data only (no model): `local_arrays()`."""

    def __init__(self, layout: ModelLayout, gpu: int, *, dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        from graphrl.shard import piece_local_shape

        self.layout, self.gpu, self.version = layout, gpu, 0
        self.arrays = {name: [torch.zeros(piece_local_shape(p), dtype=dtype, device=device)
                              for p in lay.pieces_on(gpu)] for name, lay in layout.items()}

    def local_arrays(self) -> dict[str, list[torch.Tensor]]:
        return self.arrays


def shard_batch(inputs: Mapping[str, Mapping[str, Any]], index: int, count: int
                ) -> dict[str, dict[str, Any]]:
    """Data-parallel slice `index` of `count` of every payload (equal slices along the
    batch dim, torch.chunk semantics; the batch must divide evenly)."""
    out: dict[str, dict[str, Any]] = {}
    for key, payload in inputs.items():
        out[key] = {}
        for f, t in payload.items():
            if t.shape[0] % count:
                raise UsageError(f"{key}.{f}: batch {t.shape[0]} does not split into "
                                 f"{count} equal data-parallel slices")
            out[key][f] = t.chunk(count)[index]
    return out


__all__ = ["param_specs", "fsdp_layout", "replicated_layout", "ReplicatedEngine",
           "FSDPEngine", "ShardBuffers", "shard_batch", "decoder_layers"]
