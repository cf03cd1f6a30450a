"""A model engine on megatron-core: tensor, sequence and pipeline parallelism, ZeRO-1.

`MegatronEngine` is one rank of a model split over a mesh of `dp * pp * tp` ranks, rank
order (dp, pp, tp) with tp fastest (graphrl.parallel.Strategy.coords, as Megatron-LM
orders its groups). It builds megatron-core's `GPTModel` (local, pure-PyTorch layer spec)
for its pipeline stage from the HF module's own config — Llama: RMSNorm, SwiGLU, RoPE, GQA,
and what graphrl.architecture names beyond it: Qwen2's q/k/v biases, Llama's
attention_bias / mlp_bias, Qwen3's q/k norms and head_dim, Llama-3 rope scaling
(megatron_arch.py; anything else is refused); GPT-2: LayerNorm, tanh-GELU, learned
positions, biases — and loads the weights of the seeded HF model (or checkpoint) the HF
engine would build, converted (megatron_convert.py), so both engines start from the same
numbers.

- forward: log-probs (LM head, vocab-parallel cross-entropy), values or scores; the
  batch is split over the dp groups and run through the pipeline in micro-batches.
- train: every loss of backends/losses.py, on the same minibatches as HFEngine.train;
  each minibatch is split over dp ranks and then into the plan's micro-batches, run in
  the 1F1B schedule (megatron_pipeline.py). Micro-batch losses are weighted by their
  share of the minibatch's loss tokens (response tokens; rows for pairwise losses), so
  the gradient equals the one of the whole minibatch's masked mean. Gradients are then
  finalised as Megatron-LM does: sequence-parallel norm weights summed over tp, tied
  embeddings summed over the first and last stage, everything summed over dp; clipped by
  the global norm (tensor-parallel duplicates counted once); AdamW steps (ZeRO-1: torch
  ZeroRedundancyOptimizer shards its state over dp).
- export_weights / load_weights: the full HF state (an all-gather over the mesh).

Every call is a collective over the engine's mesh: each rank passes the whole batch.
CPU needs one shim (megatron_cpu.py).

Precision: not megatron-core's own bf16 path (TransformerConfig(bf16=True) with
Float16Module, whose fp32 main grads live in megatron-core's DistributedDataParallel and
MixedPrecisionOptimizer, which this engine does not use: it finalises gradients and
steps a torch AdamW itself). bf16 here is torch autocast to bf16 over fp32 parameters
(the master weights; AdamW state and gradients fp32), with log-probs from fp32 logits;
activations cross pipeline stages in fp32. A frozen bf16 model holds bf16 parameters.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl
from graphrl.parallel import GROUP_KINDS, megatron_groups  # noqa: F401  (re-export)

from .base import fit_micro_batches, move_module_and_optimizer
from .train_loop import (TwoParts, WeightedStats, bind_loss, loss_weights, micro_batches,
                         split_rows, train_epochs)
from .hf import DEFAULTS, build_module, last_index, resolve_device, seed_for
from .megatron_arch import BiasedColumn, BiasedRow, read_architecture, rope_inv_freq
from .precision import TORCH_DTYPES, autocast, check_precision, ran_precision
from .megatron_convert import check_degrees, from_megatron, stage_layers, to_megatron
from .megatron_pipeline import Stage, forward_only, one_f_one_b


def _qk_norm(name: str) -> bool:
    return ".q_layernorm." in name or ".k_layernorm." in name


class Norm:
    """Norm layers for megatron-core's spec: torch's LayerNorm / RMSNorm (as megatron's
    WrappedTorchNorm, which refuses sequence parallelism), with weights marked
    `sequence_parallel` (Megatron-LM's flag) when it is on, so that their gradients,
    partial on each tensor-parallel rank, get summed over tp (`_finish_grads`)."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> nn.Module:
        norm = nn.RMSNorm if config.normalization == "RMSNorm" else nn.LayerNorm
        m = norm(hidden_size, eps=config.layernorm_epsilon)
        for p in m.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return m


class ScalarOutput(nn.Module):
    """Value/score head in place of GPTModel's output layer: hidden -> one scalar, the
    weight replicated on every tensor-parallel rank (hidden states gathered first under
    sequence parallelism)."""

    def __init__(self, hidden: int, sequence_parallel: bool, tp_group: Any, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden))
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None
        self.sequence_parallel, self.tp_group = sequence_parallel, tp_group

    def forward(self, hidden: torch.Tensor, weight: Any = None, **_: Any) -> tuple:
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import \
                gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        return F.linear(hidden, self.weight, self.bias), None


class MegatronEngine:
    """One rank of a megatron-core model (see module doc). `groups`: kind -> this rank's
    torch.distributed group of that kind (megatron_groups); `ranks`: the mesh's global
    ranks in mesh order."""

    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], *, ranks: Sequence[int],
                 rank: int, groups: Mapping[str, Any], dp: int = 1, tp: int = 1, pp: int = 1,
                 micro_batches: int = 1, zero: int = 0, sequence_parallel: bool = False,
                 device: str = "cpu", seed: int = 0, timeout_s: float = 120.0):
        from .megatron_cpu import allow_cpu

        if zero not in (0, 1):
            raise UsageError(f"model {decl.name}: the megatron engine runs ZeRO 0 or 1 "
                             f"(distributed optimizer), not {zero}; ZeRO 2/3: deepspeed")
        if rank not in ranks:
            raise UsageError(f"model {decl.name}: rank {rank} is not in its mesh {list(ranks)}")
        spec = decl.spec
        check_degrees(spec, tp, pp)
        self.decl, self.spec, self.version = decl, spec, 0
        self.options = {**DEFAULTS, **options}
        self.device = resolve_device(device)
        self.precision = check_precision(decl, self.device)
        if self.device.type == "cpu":
            allow_cpu()
        self.ranks, self.rank = tuple(ranks), rank
        self.dp, self.tp, self.pp, self.zero = dp, tp, pp, zero
        self.micro_batches = self.ran_micro_batches = micro_batches
        self.sp = bool(sequence_parallel and tp > 1)
        self.groups = dict(groups)
        local = self.ranks.index(rank)
        self.dp_rank, self.pp_rank, self.tp_rank = (local // (tp * pp), (local // tp) % pp,
                                                    local % tp)
        pp_ranks = [self.ranks[(self.dp_rank * pp + p) * tp + self.tp_rank] for p in range(pp)]
        self.stage = Stage(self.pp_rank, pp,
                           pp_ranks[self.pp_rank - 1] if self.pp_rank > 0 else None,
                           pp_ranks[self.pp_rank + 1] if self.pp_rank < pp - 1 else None,
                           self.groups["pp"], timeout_s)
        torch.manual_seed(seed_for(seed, decl.name))   # as HFEngine: same initial weights
        hf = build_module(decl, self.options.get("checkpoint"))
        self.hf_config = hf.config
        self.arch = read_architecture(decl, hf.config)
        self.hf_names = list(hf.state_dict())
        self.module = self._build(head_bias=any(k.endswith(("score.bias", "classifier.bias"))
                                                for k in self.hf_names))
        self.load_weights(hf.state_dict())
        self.layout = self._make_layout([(k, tuple(v.shape)) for k, v in hf.state_dict().items()])
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if not decl.trainable:   # frozen: held in its precision only
            self.module.to(TORCH_DTYPES[self.precision])

    # -- building -----------------------------------------------------------------------
    def _config(self) -> Any:
        from megatron.core.transformer.transformer_config import TransformerConfig

        s, hfc, arch = self.spec, self.hf_config, self.arch
        common = dict(
            num_layers=s.num_layers, hidden_size=s.hidden_size,
            num_attention_heads=s.num_heads, num_query_groups=s.num_kv_heads,
            ffn_hidden_size=s.intermediate_size, kv_channels=arch.head_dim,
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            sequence_parallel=self.sp, use_cpu_initialization=True,
            params_dtype=torch.float32, pipeline_dtype=torch.float32,
            hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
            bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
            gradient_accumulation_fusion=False, persist_layer_norm=False)
        if s.family == "llama":
            return TransformerConfig(**common, normalization="RMSNorm",
                                     layernorm_epsilon=float(hfc.rms_norm_eps),
                                     gated_linear_unit=True, activation_func=F.silu,
                                     add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
                                     qk_layernorm=arch.qk_norm)
        return TransformerConfig(**common, normalization="LayerNorm",
                                 layernorm_epsilon=float(hfc.layer_norm_epsilon),
                                 activation_func=lambda x: F.gelu(x, approximate="tanh"),
                                 add_bias_linear=True, add_qkv_bias=True)

    def _build(self, head_bias: bool) -> nn.Module:
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        from megatron.core import parallel_state

        if parallel_state._GLOBAL_MEMORY_BUFFER is None:   # megatron's per-process scratch
            parallel_state._set_global_memory_buffer()     # (attention, SP gathers)
        s = self.spec
        config = self._config()
        layer = get_gpt_layer_local_spec(normalization=config.normalization)
        layer.submodules.input_layernorm = Norm
        layer.submodules.pre_mlp_layernorm = Norm
        attn = layer.submodules.self_attention.submodules
        if self.arch.qk_norm:   # Qwen3: RMSNorm over each head's d_head, before rotary
            attn.q_layernorm = attn.k_layernorm = Norm
        if self.arch.o_bias:
            attn.linear_proj = BiasedRow
        if self.arch.mlp_bias:
            mlp = layer.submodules.mlp.submodules
            mlp.linear_fc1, mlp.linear_fc2 = BiasedColumn, BiasedRow
        per_stage = len(stage_layers(s, self.pp, self.pp_rank))
        block = TransformerBlockSubmodules(layer_specs=[layer] * per_stage, layer_norm=Norm)
        pgc = ProcessGroupCollection(tp=self.groups["tp"], pp=self.groups["pp"],
                                     cp=self.groups["cp"], embd=self.groups["embd"],
                                     dp=self.groups["dp"])
        first, last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        lm = s.head == "lm"
        kw: dict[str, Any] = dict(
            config=config, transformer_layer_spec=block, vocab_size=s.vocab_size,
            max_sequence_length=s.max_positions, pre_process=first, post_process=last,
            parallel_output=True, pg_collection=pgc,
            # Tied embeddings over pp > 1 stages: megatron would sync the two copies with a
            # `.cuda()` call; the last stage's output layer is loaded with the embedding
            # instead, and `_finish_grads` sums the two copies' gradients as megatron does.
            share_embeddings_and_output_weights=lm and s.tie_embeddings and self.pp == 1)
        if s.family == "llama":
            kw.update(position_embedding_type="rope", rotary_base=self.arch.rope_theta)
        else:
            kw.update(position_embedding_type="learned_absolute")
        model = GPTModel(**kw)
        if s.family == "llama":   # before any forward (megatron caches the embedding)
            model.rotary_pos_emb.inv_freq = rope_inv_freq(model.rotary_pos_emb, self.arch)
        if last and not lm:
            model.output_layer = ScalarOutput(s.hidden_size, self.sp, self.groups["tp"],
                                              head_bias)
        model.eval()   # no dropout anywhere (as HFEngine)
        return model.to(self.device)

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in self.module.named_parameters() if p.requires_grad]

    # -- weights ------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named: Mapping[str, torch.Tensor]) -> None:
        """Take this rank's part of full HF weights (every rank passes the same ones)."""
        missing = sorted(set(self.hf_names) - set(named)) if hasattr(self, "hf_names") else []
        if missing:
            raise UsageError(f"model {self.decl.name}: weights lack {missing[:3]}")
        local = to_megatron(named, self.spec, tp=self.tp, tp_rank=self.tp_rank, pp=self.pp,
                            pp_rank=self.pp_rank)
        own = dict(self._params())
        lacking = sorted(set(own) - set(local))
        if lacking:
            raise UsageError(f"model {self.decl.name}: conversion gave no {lacking[:3]}")
        for k, p in own.items():
            if tuple(p.shape) != tuple(local[k].shape):
                raise UsageError(f"model {self.decl.name}: {k} is {tuple(p.shape)} here, "
                                 f"{tuple(local[k].shape)} converted")
            p.copy_(local[k])

    def _make_layout(self, shapes: Sequence[tuple[str, Sequence[int]]]) -> Any:
        from graphrl.parallel import DeviceMesh, Strategy
        from graphrl.shard import megatron_params, model_layout

        return model_layout(megatron_params(shapes, self.spec.num_layers),
                            DeviceMesh(self.ranks), Strategy(self.dp, self.tp, self.pp),
                            num_layers=self.spec.num_layers)

    def local_arrays(self) -> dict[str, list[torch.Tensor]]:
        """This rank's pieces of every HF weight, in `layout[name].pieces_on(rank)` order
        (copies: a reshard source reads them; graphrl.shard.megatron_params)."""
        from .megatron_convert import layout_pieces, local_hf

        mine = local_hf(dict(self._params()), self.spec, tp=self.tp, pp=self.pp,
                        pp_rank=self.pp_rank)
        return layout_pieces(mine, self.layout, self.rank, self.decl.name)

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's megatron parameters (copies)."""
        return {k: p.detach().cpu().clone() for k, p in self._params()}

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The full HF weights, on every rank (all-gathers over the mesh: a collective)."""
        mine = self.local_state()
        gathered: list[Any] = [None] * len(self.ranks)
        dist.all_gather_object(gathered, (self.pp_rank, self.tp_rank, self.dp_rank, mine),
                               group=self._mesh_group())
        shards = {(p, t): st for p, t, d, st in gathered if d == 0}
        return from_megatron(shards, self.spec, self.tp, self.pp, order=self.hf_names)

    def _mesh_group(self) -> Any:
        if "mesh" not in self.groups:
            raise UsageError(f"model {self.decl.name}: no process group of the whole mesh")
        return self.groups["mesh"]

    # -- running the model --------------------------------------------------------------
    def _inputs(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple:
        """Position ids (cumsum(mask) - 1, clamped at 0) and megatron's boolean attention
        mask [b, 1, s, s], True = masked: causal, and padding keys."""
        b, s = tokens.shape
        if mask is None:
            mask = torch.ones(b, s)
        mask = mask.to(self.device)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(s, s, dtype=torch.bool, device=self.device).triu(1)
        att = causal[None, None] | (mask[:, None, None, :] < 0.5)
        return pos, att

    def _stage(self, tokens: torch.Tensor, mask: Optional[torch.Tensor],
               x: Optional[torch.Tensor]) -> torch.Tensor:
        """This stage on a micro-batch: the activation to send on, or on the last stage
        the head quantity per sequence (HFEngine._head's)."""
        tokens = tokens.to(self.device)
        pos, att = self._inputs(tokens, mask)
        held = next(self.module.parameters()).dtype
        self.module.set_input_tensor(x if x is None or x.dtype == held else x.to(held))
        head = self.spec.head
        with autocast(self.device, self.precision, self.module):
            out = self.module(tokens if self.pp_rank == 0 else None, pos, att)
        if self.pp_rank < self.pp - 1:
            return out.float()   # the pipeline's p2p buffers are fp32
        if head == "lm":
            return F.pad(self._logprobs(out, tokens[:, 1:]), (1, 0))
        out = out[..., 0].float()
        if head == "value":
            return F.pad(out[:, :-1], (1, 0))
        real = torch.ones_like(tokens) if mask is None else mask.to(self.device).long()
        return out[torch.arange(out.shape[0], device=out.device), last_index(real)]

    def _logprobs(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target) from vocab-parallel logits [b, s, V/tp] (positions 0..s-2), as
        megatron's vocab_parallel_cross_entropy computes it (which reads the global tp
        group; this uses the engine's): a max and a sum of exponentials all-reduced over
        tp, the target's logit from the rank whose vocabulary slice holds it."""
        from megatron.core.tensor_parallel.mappings import \
            reduce_from_tensor_model_parallel_region as tp_sum

        x = logits[:, :-1].float()
        if self.tp == 1:
            return torch.log_softmax(x, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        group = self.groups["tp"]
        width = x.shape[-1]
        lo = self.tp_rank * width
        top = x.detach().max(-1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        z = x - top
        total = tp_sum(z.exp().sum(-1), group=group)
        here = (target >= lo) & (target < lo + width)
        local = (target - lo).clamp(0, width - 1)
        picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1) * here
        return tp_sum(picked, group=group) - total.log()

    def _act_shape(self, rows: int, seq: int) -> tuple[int, int, int]:
        s = seq // self.tp if self.sp else seq
        if self.sp and seq % self.tp:
            raise UsageError(f"model {self.decl.name}: sequence length {seq} does not split "
                             f"over tensor-parallel {self.tp} (sequence parallel)")
        return (s, rows, self.spec.hidden_size)

    def _split(self, n: int, parts: int, what: str) -> list[slice]:
        return split_rows(self.decl.name, n, parts, what)

    @torch.no_grad()
    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        """The head quantity for the whole batch, on every rank (each dp group computes
        its rows in micro-batches; results are gathered over dp and sent from the last
        stage to every stage)."""
        tokens, mask = rollout["tokens"], rollout.get("attention_mask")
        n, seq = tokens.shape
        mine = self._split(n, self.dp, "forward")[self.dp_rank]
        # micro-batches feed the pipeline (pp > 1); one pass without one
        m = (self.micro_batches if self.pp > 1 and (n // self.dp) % self.micro_batches == 0
             else 1)
        self.ran_micro_batches = m
        parts = [slice(mine.start + s.start, mine.start + s.stop)
                 for s in self._split(n // self.dp, m, "forward")]

        def run(i: int, x: Optional[torch.Tensor]) -> torch.Tensor:
            sl = parts[i]
            return self._stage(tokens[sl], None if mask is None else mask[sl], x)

        outs = forward_only(self.stage, run, len(parts), self._act_shape(n // self.dp // m, seq),
                            torch.float32)
        shape = (n // self.dp,) + ((seq,) if self.spec.head != "score" else ())
        local = torch.cat(outs) if outs else torch.zeros(shape)
        if self.pp > 1:   # the last stage has it; the pipeline group sums zeros elsewhere
            dist.all_reduce(local, group=self.groups["pp"])
        full = [torch.zeros_like(local) for _ in range(self.dp)]
        dist.all_gather(full, local.contiguous(), group=self.groups["dp"])
        key = {"lm": "logprobs", "value": "values", "score": "score"}[self.spec.head]
        return {key: torch.cat(full).cpu()}

    # -- training -----------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            o = self.options
            params = [p for _, p in self._params()]
            kw = dict(lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
            if self.zero == 1 and self.dp > 1:   # ZeRO-1: optimizer state sharded over dp
                from torch.distributed.optim import ZeroRedundancyOptimizer

                self.optimizer = ZeroRedundancyOptimizer(
                    params, optimizer_class=torch.optim.AdamW,
                    process_group=self.groups["dp"], **kw)
            else:
                self.optimizer = torch.optim.AdamW(params, **kw)
        return self.optimizer

    def _finish_grads(self, clip: bool = True) -> None:
        """Megatron-LM's gradient finalisation (finalize_model_grads) and, with `clip`,
        clipping (`_clip_grads`)."""
        params = self._params()
        for _, p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Replicated weights whose gradient is partial on each tp rank get summed over tp
        # (megatron's _allreduce_non_tensor_model_parallel_grads): norms and row-parallel
        # biases under sequence parallelism (each rank saw its tokens), Qwen3's q/k norms
        # always (each rank saw its heads).
        if self.tp > 1:
            for name, p in params:
                if (self.sp and getattr(p, "sequence_parallel", False)) or _qk_norm(name):
                    dist.all_reduce(p.grad, group=self.groups["tp"])
        shared = self._tied_name()
        if shared:
            dist.all_reduce(dict(params)[shared].grad, group=self.groups["embd"])
        if self.dp > 1:
            flat = torch.cat([p.grad.reshape(-1) for _, p in params])
            dist.all_reduce(flat, group=self.groups["dp"])
            off = 0
            for _, p in params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        if clip:
            self._clip_grads()

    def _tied_name(self) -> str:
        """The embedding tied across the first and last stage held here ('' if none)."""
        tied = self.spec.head == "lm" and self.spec.tie_embeddings and self.pp > 1
        if tied and self.pp_rank in (0, self.pp - 1):
            return ("embedding.word_embeddings.weight" if self.pp_rank == 0
                    else "output_layer.weight")
        return ""

    def _clip_grads(self) -> None:
        """Clip the gradients' global norm (over tp and pp) to grad_clip."""
        params, shared = self._params(), self._tied_name()
        clip = self.options["grad_clip"]
        if clip:
            sq = torch.zeros(())
            for name, p in params:
                if name == shared and self.pp_rank == self.pp - 1:
                    continue   # the tied copy on the last stage counts once, on the first
                split = getattr(p, "tensor_model_parallel", False)   # megatron's flag
                if self.tp_rank == 0 or split:
                    sq += p.grad.float().pow(2).sum()
            if self.tp > 1:
                dist.all_reduce(sq, group=self.groups["tp"])
            if self.pp > 1:
                dist.all_reduce(sq, group=self.groups["pp"])
            coef = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)   # torch clip_grad_norm_
            for _, p in params:
                p.grad.mul_(coef)

    def train(self, inputs: Mapping[str, Mapping[str, Any]], *, loss: Any, seed: int = 0,
              epochs: int = 1, minibatches: int = 1, shard: Any = None, part: str = "",
              **hyper: Any) -> dict[str, float]:
        """HFEngine.train's minibatches (train_loop.train_epochs: the same seeded
        permutation); each split over dp and the plan's micro-batches. Every rank passes
        the whole batch (`shard` is ignored: the engine knows its dp rank). `part`: a
        batch in two calls with one optimizer step (train_loop.TwoParts)."""
        if hyper.get("entropy_coef"):   # before any stage runs: no rank waits on another
            raise UsageError(f"{self.decl.name}.train: entropy_coef needs token entropies, "
                             "which the megatron engine does not give (hf, fast and "
                             "deepspeed do; docs/algorithms.md)")
        self._optimizer()
        bound = bind_loss(self.decl.name, loss, hyper)
        parts = TwoParts.begin(self, part, inputs, seed, epochs * minibatches, bound.measure)

        def step(loss_fn: Callable, idx: torch.Tensor) -> dict[str, float]:
            stats = self._train_minibatch(loss_fn, inputs, idx, hyper, parts)
            self._optimizer().zero_grad(set_to_none=True)
            return stats

        stats = train_epochs(self.decl.name, inputs, loss=bound, seed=seed, epochs=epochs,
                             minibatches=minibatches, step=step)
        if part != "head":
            self.version += 1
        return stats

    def _dp_sum(self, t: torch.Tensor) -> None:
        if self.dp > 1:
            dist.all_reduce(t, group=self.groups["dp"])

    def _train_minibatch(self, loss_fn: Callable, inputs: Mapping[str, Mapping[str, Any]],
                         idx: torch.Tensor, hyper: Mapping[str, Any],
                         parts: Optional[TwoParts] = None) -> dict[str, float]:
        opt = self._optimizer()
        opt.zero_grad(set_to_none=True)
        mine = idx[self._split(idx.numel(), self.dp, "train")[self.dp_rank]]
        m = self.ran_micro_batches = fit_micro_batches(mine.numel(), self.micro_batches)
        mbs = micro_batches(self.decl.name, inputs, mine, m)
        fed = sorted(k for k in inputs if "tokens" in inputs[k])   # what the loss forwards
        weights = loss_weights(mbs, self._dp_sum, loss_fn.measure)
        stat_sums = WeightedStats()
        seq = inputs[fed[0]]["tokens"].shape[1]
        rows = mine.numel() // m

        def run(i: int, x: Optional[torch.Tensor]) -> torch.Tensor:
            mb = mbs[i]
            tokens = torch.cat([mb[k]["tokens"] for k in fed])
            masks = [mb[k].get("attention_mask") for k in fed]
            mask = None if all(a is None for a in masks) else torch.cat(
                [a if a is not None else torch.ones(mb[k]["tokens"].shape)
                 for a, k in zip(masks, fed)])
            out = self._stage(tokens, mask, x)
            if self.pp_rank < self.pp - 1:
                return out
            pieces = dict(zip(fed, out.split([mb[k]["tokens"].shape[0] for k in fed])))

            local = {k: {f: v.to(self.device) for f, v in p.items()} for k, p in mb.items()}

            def head(payload: Mapping[str, Any]) -> torch.Tensor:
                for k in fed:
                    if payload is local[k]:
                        return pieces[k]
                raise UsageError(f"{self.decl.name}.train: the loss forwards a payload the "
                                 "engine did not run")

            value, stats = loss_fn(head, local, **hyper)
            w = float(weights[i])
            stat_sums.add(w, stats)
            return value * (w * parts.weight() if parts is not None else w)

        one_f_one_b(self.stage, run, m, self._act_shape(rows * len(fed), seq), torch.float32)
        self._finish_grads(clip=parts is None)
        if parts is not None:   # clip the two parts' gradient together, after the rest
            stats = parts.finish([p for _, p in self._params()],
                                 self._reduce_stats(stat_sums))
            if parts.part == "head":
                return stats
            self._clip_grads()
            opt.step()
            return stats
        opt.step()
        return self._reduce_stats(stat_sums)

    def _reduce_stats(self, sums: WeightedStats) -> dict[str, float]:
        """Weighted stats from the last stage, summed over dp, on every rank."""
        names = sorted(sums.sums)
        if self.pp > 1:   # only the last stage knows the names
            holder = [names]
            dist.broadcast_object_list(holder, src=self.stage_ranks()[-1],
                                       group=self.groups["pp"])
            names = holder[0]

        def over_ranks(vec: torch.Tensor) -> None:
            if self.pp > 1:
                dist.all_reduce(vec, group=self.groups["pp"])
            self._dp_sum(vec)

        return sums.result(over_ranks, names)

    def stage_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, first stage first."""
        return [self.ranks[(self.dp_rank * self.pp + p) * self.tp + self.tp_rank]
                for p in range(self.pp)]

    # -- checkpoints (megatron_state.py) ---------------------------------------------------
    def save_shards(self, folder: Any) -> list[str]:
        """Write this rank's shard of weights and optimizer state into `folder` (no
        collective); the first rank also writes the index."""
        from pathlib import Path

        from .megatron_state import save_shards

        return save_shards(self, Path(folder))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take this rank's part of a full, placement-independent state (engine_state)."""
        from .megatron_state import load_state

        load_state(self, state)

    # -- memory -------------------------------------------------------------------------
    def _move(self, device: torch.device) -> None:
        move_module_and_optimizer(self.module, getattr(self.optimizer, "optim",
                                                       self.optimizer), device)

    def offload(self) -> None:
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        self._move(self.device)

    def generate(self, prompts: Mapping[str, Any], **_: Any) -> dict[str, Any]:
        raise UsageError(f"model {self.decl.name}: the megatron engine does not generate; "
                         "generation runs on the HF engine after a reshard")

    def degrees(self) -> dict[str, Any]:
        """What this engine runs: its engine name and parallel degrees."""
        return {"engine": "megatron", "dp": self.dp, "tp": self.tp, "pp": self.pp,
                "sp": self.sp, "zero": self.zero, "micro_batches": self.ran_micro_batches,
                "precision": ran_precision(self.module, self.precision == "bf16")}


__all__ = ["MegatronEngine", "megatron_groups", "GROUP_KINDS"]
