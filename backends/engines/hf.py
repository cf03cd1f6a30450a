"""Model engine on Hugging Face transformers models: random init built in code, or loaded
from a local Hugging Face directory.

LM heads are causal LMs (`LlamaForCausalLM`, `GPT2LMHeadModel`, or a checkpoint's own
class); value heads are token classification and score heads sequence classification
models with one label, so saved critics and reward models load with transformers' Auto
classes. Runs on CPU, or CUDA when asked. Generation is a sampling loop over the model's
own forward with its KV cache, driven by a seeded torch.Generator so that a run is
reproducible across backends; rows stop at EOS or stop strings.

Precision (backends/engines/precision.py): the model's planned precision. bf16: a
trainable model holds fp32 (master) weights and AdamW state and runs every forward and
backward under bf16 autocast; logits are cast to fp32 before log-softmax and the scalar
head runs in fp32 on fp32 hidden states; gradients (and their norm) are fp32. A frozen
model holds bf16 weights only. fp32: fp32 throughout.
"""
from __future__ import annotations

import contextlib
import inspect
import zlib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl

from .base import move_module_and_optimizer
from .hf_checkpoint import special_tokens
from .hf_classes import hf_class, inference_config
from .precision import (TORCH_DTYPES, autocast, check_precision, held_as, ran_precision,
                        sharded)
from .kl_control import KLControl
from .train_loop import TwoParts, bind_loss, micro_batches, rank_share, train_epochs

DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "betas": (0.9, 0.95)}


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"--device {device!r}: use cpu or cuda")
    return torch.device(device)


def build_module(decl: ModelDecl, checkpoint: str | None = None) -> nn.Module:
    """The HF module of `decl`: random init from its spec, or the weights of a local
    Hugging Face directory (never a hub download). A scalar head missing from the
    checkpoint (a causal-LM checkpoint used as reward or critic) starts fresh."""
    if checkpoint is None:
        config = inference_config(decl.spec.hf_config(), decl.spec.head)
        return hf_class(decl.spec)(config)
    from .hf_checkpoint import load_hf_module

    return load_hf_module(checkpoint, decl.spec.head,
                          lambda config: inference_config(config, decl.spec.head),
                          hf_class(decl.spec, auto=True), decl.name, decl.engine)


def scalar_parts(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head Linear) of a token/sequence classification model."""
    head = getattr(module, "score", None) or getattr(module, "classifier", None)
    if head is None:
        raise UsageError(f"{type(module).__name__} has no score/classifier head")
    return module.base_model, head


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token."""
    return mask.shape[1] - 1 - torch.flip(mask, [1]).argmax(dim=1)


def cache_argument(module: nn.Module) -> str:
    """The KV-cache keyword of this transformers version (`cache` from 5.2x on, before
    that `past_key_values`)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the probabilities outside the top-k tokens and outside the smallest set whose
    mass reaches top_p (nucleus sampling, Holtzman et al. 2020); the most likely token
    always stays. The result is unnormalised: argmax(p / E) samples it all the same."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs < kth, 0.0, probs)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def prompt_rows(prompts: Mapping[str, Any], n: int) -> torch.Tensor:
    """The prompts' data-row indices (0.. when a caller gave none)."""
    row = prompts.get("row")
    return torch.arange(n) if row is None else torch.as_tensor(row).cpu()


def seed_for(*parts: object) -> int:
    """A stable 31-bit seed from any labels (no Python hash randomisation)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def shifted(x: torch.Tensor) -> torch.Tensor:
    """Move per-position outputs one step right: out[:, t] comes from position t-1."""
    return F.pad(x[:, :-1], (1, 0))


class HFEngine:
    """options: engine settings (lr, weight_decay, grad_clip, betas) and `checkpoint`, a
    local Hugging Face directory to load the weights (and stop/pad token ids) from."""

    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], device: str = "cpu",
                 seed: int = 0):
        self.decl = decl
        self.device = resolve_device(device)
        self.options = {**DEFAULTS, **options}
        self.precision = check_precision(decl, self.device)
        checkpoint = self.options.get("checkpoint")
        torch.manual_seed(seed_for(seed, decl.name))
        self.module = build_module(decl, checkpoint).to(self.device)
        # no dropout anywhere (LoRA's adapter dropout: while training); train() only
        # toggles autograd
        self.module.eval()
        if not decl.trainable:   # frozen: held in its precision only (bf16: no fp32 copy)
            self.module.to(TORCH_DTYPES[self.precision])
        if decl.spec.lora is not None:   # adapters train, the base frozen (lora_hf.py)
            from .lora_hf import wrap

            self.module = wrap(self.module, decl, self.precision, checkpoint)
        self.tokens = special_tokens(checkpoint, self.module.config)
        self.optimizer: torch.optim.Optimizer | None = None
        self.version = 0
        # called after each backward, before clipping: data-parallel gradient averaging
        self.after_backward: Callable[[], None] | None = None
        # an in-place sum of a tensor over the data-parallel ranks (the adaptive KL stat)
        self.sum_over_ranks: Callable[[torch.Tensor], None] | None = None
        self.kl_control = KLControl()   # adaptive KL coefficient (kl_control.py)
        # generate runs every step even when all its rows have stopped (ranks of a
        # sharded engine must make the same number of collective forward passes)
        self.lockstep = False

    # -- precision ------------------------------------------------------------------------
    def compute(self) -> Any:
        """The context every forward/backward runs in (bf16 autocast over fp32 weights;
        LoRA: over the bf16 base and the fp32 adapters)."""
        if self.decl.spec.lora is not None and self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return autocast(self.device, self.precision, self.module)

    def ran_precision(self) -> str:
        """The precision this engine computes in, read off what it holds and runs (LoRA:
        what its frozen base holds, the adapters' fp32 under autocast)."""
        if self.decl.spec.lora is not None:
            held = {p.dtype for p in self.module.parameters() if not p.requires_grad}
            names = {torch.bfloat16: "bf16", torch.float32: "fp32"}
            return names.get(held.pop(), "mixed") if len(held) == 1 else "mixed"
        return ran_precision(self.module, self.precision == "bf16")

    def _generation_weights(self) -> Any:
        """The weights generate computes on: a bf16 model's as its generation copy holds
        them (precision.held_as: bf16, no autocast), so what is sampled does not depend
        on whether generation runs here or on a copy of its own (the Ray backend's, after
        a reshard). As held for fp32, LoRA (its base is bf16-held already), and FSDP2
        (its MixedPrecisionPolicy casts the gathered weights)."""
        if self.precision != "bf16" or self.decl.spec.lora is not None or \
                sharded(self.module):
            return contextlib.nullcontext()
        return held_as(self.module, torch.bfloat16)

    def hold_frozen(self) -> None:
        """After a set-up phase trained a frozen model (a reward model fitted before RL):
        hold it in its precision only again, with no optimizer state."""
        if not self.decl.trainable:
            self.optimizer = None
            self.module.to(TORCH_DTYPES[self.precision])

    # -- inference ------------------------------------------------------------------------
    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def _generation_rows(self, prompts: Mapping[str, Any], samples: int,
                         noise_rows: Any) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Prompt ids and mask repeated `samples` times per prompt, and the (first, total)
        rows of the sampling noise this slice draws from (UsageError if they do not fit)."""
        prompt_ids, prompt_mask = self._inputs(prompts)
        prompt_ids = prompt_ids.repeat_interleave(samples, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(samples, dim=0)
        rows = prompt_ids.shape[0]
        first, total = noise_rows if noise_rows is not None else (0, rows)
        if not 0 <= first <= first + rows <= total:
            raise UsageError(f"generate: noise_rows {noise_rows} do not hold the "
                             f"{rows} rows of this slice")
        return prompt_ids, prompt_mask, first, total

    def _inputs(self, payload: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, attention mask) of a payload; no mask means every token is real."""
        tokens = self._to(payload["tokens"])
        mask = payload.get("attention_mask")
        mask = torch.ones_like(tokens) if mask is None else self._to(mask).long()
        return tokens, mask

    def _head(self, payload: Mapping[str, Any]) -> torch.Tensor:
        """The head quantity of this model for each sequence, with gradients if enabled:
        per-token log-probs (lm), per-token values (value) or a score at each row's last
        real token (score). Padding is masked out of attention and positions."""
        tokens, mask = self._inputs(payload)
        pos = positions(mask)
        head = self.decl.spec.head
        if head == "lm":
            with self.compute():
                logits = self.module(input_ids=tokens, attention_mask=mask,
                                     position_ids=pos, use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)   # fp32 reduction
            picked = lp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            return F.pad(picked, (1, 0))
        # the compute context chosen here, on the weights as held (a sharded engine's
        # _scalar sees some gathered, some not: sharded.FSDPEngine)
        out = self._scalar(tokens, mask, pos, self.compute())
        if head == "value":
            return shifted(out)
        return out[torch.arange(out.shape[0], device=out.device), last_index(mask)]

    def _scalar(self, tokens: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                compute: Any) -> torch.Tensor:
        """A scalar head's output at every position (fp32): the HF body in the context
        `compute` (self.compute()), then the head Linear on its last hidden states. It
        calls the body and the head, not the root module: a sharded engine runs it as a
        forward of the root (sharded.FSDPEngine)."""
        body, linear = scalar_parts(self.module)
        with compute:
            hidden = body(input_ids=tokens, attention_mask=mask, position_ids=pos,
                          use_cache=False).last_hidden_state
        if linear.weight.dtype == torch.float32:   # the scalar head in fp32
            return linear(hidden.float()).squeeze(-1)
        return linear(hidden).squeeze(-1).float()  # bf16-held: its output cast to fp32

    def _heads(self, payloads: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
        """_head of each payload, in one forward pass when they have one width (a
        preference pair's chosen and rejected halves: half the module calls)."""
        if len({tuple(p["tokens"].shape[1:]) for p in payloads}) != 1:
            return [self._head(p) for p in payloads]
        parts = [self._inputs(p) for p in payloads]
        out = self._head({"tokens": torch.cat([t for t, _ in parts]),
                          "attention_mask": torch.cat([m for _, m in parts])})
        return list(out.split([t.shape[0] for t, _ in parts]))

    def _logprobs_and_entropy(self, payload: Mapping[str, Any]) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
        """An lm head's per-token log-probs and the entropy of each position's next-token
        distribution, H_t = -sum_v p(v) log p(v) (with gradients; 0 at t = 0, as the
        log-probs): one HF forward over the full logits."""
        tokens, mask = self._inputs(payload)
        with self.compute():
            logits = self.module(input_ids=tokens, attention_mask=mask,
                                 position_ids=positions(mask), use_cache=False).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)   # fp32 reduction
        picked = lp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        entropy = -(lp.exp() * lp).sum(-1)
        return F.pad(picked, (1, 0)), F.pad(entropy, (1, 0))

    def loss_forward(self) -> Callable[[Mapping[str, Any]], torch.Tensor]:
        """What a loss calls to run the model (losses.forward_each uses `many`; an lm
        head's `with_entropy` gives log-probs and token entropies in one pass)."""
        def forward(payload: Mapping[str, Any]) -> torch.Tensor:
            return self._head(payload)

        forward.many = self._heads   # type: ignore[attr-defined]
        if self.decl.spec.head == "lm":
            forward.with_entropy = self._logprobs_and_entropy   # type: ignore[attr-defined]
        return forward

    @torch.no_grad()
    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        out = self._head(rollout).cpu()
        return {{"lm": "logprobs", "value": "values", "score": "score"}[self.decl.spec.head]: out}

    @torch.no_grad()
    def generate(self, prompts: Mapping[str, Any], *, max_new_tokens: int,
                 temperature: float = 1.0, samples: int = 1, seed: int = 0,
                 top_p: float = 1.0, top_k: int = 0, stop: str = "",
                 stop_at_eos: bool = True, stop_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None,
                 noise_rows: tuple[int, int] | None = None) -> dict[str, Any]:
        """Sample up to `max_new_tokens` per sequence; a row stops at a stop token (the
        model's EOS unless `stop_at_eos` is false, `stop_token_ids`, or a one-token `stop`
        string) or when its ids end with a multi-token `stop` string. Later positions of a
        stopped row hold the pad id with both masks 0; the loop ends once all rows stop.

        Each step draws one token per row by the exponential race argmax(p / E),
        E ~ Exp(1) from the seeded generator (the draw torch.multinomial(p, 1) makes on
        CPU, bit for bit), after top-k / top-p (nucleus, Holtzman et al. 2020) filtering.
        `noise_rows=(first, total)` says these prompts are rows first.. of a batch of
        `total` rollout rows split over data-parallel ranks: every step draws the noise
        of all `total` rows and uses this slice's, so a split batch samples exactly what
        the whole batch would."""
        if self.decl.spec.head != "lm":
            raise UsageError(f"model {self.decl.name} has a {self.decl.spec.head} head: "
                             "it cannot generate")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        stops = self.tokens.stop_ids(stop_at_eos, stop_token_ids, stop)
        single = torch.tensor([s[0] for s in stops if len(s) == 1], dtype=torch.long,
                              device=self.device)
        multi = [torch.tensor(s, device=self.device) for s in stops if len(s) > 1]
        pad = self.tokens.pad_id if pad_token_id is None else int(pad_token_id)
        prompt_ids, prompt_mask, first, total = self._generation_rows(prompts, samples,
                                                                      noise_rows)
        rows, plen = prompt_ids.shape
        width = plen + max_new_tokens
        ids = torch.full((rows, width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        ids[:, :plen], mask[:, :plen] = prompt_ids, prompt_mask
        alive = torch.ones(rows, dtype=torch.bool, device=self.device)
        next_pos = prompt_mask.sum(-1, keepdim=True)
        with self._generation_weights():   # as its generation copy computes
            cache_arg = cache_argument(getattr(self.module, "get_base_model",
                                               lambda: self.module)())   # peft: HF module
            with self.compute():
                out = self.module(input_ids=prompt_ids, attention_mask=prompt_mask,
                                  position_ids=positions(prompt_mask), use_cache=True)
            for step in range(max_new_tokens):
                logits = out.logits[:, -1].float()
                if temperature > 0:
                    probs = filter_probs(torch.softmax(logits / temperature, dim=-1),
                                         top_k, top_p)
                    noise = torch.empty((total, probs.shape[-1]), dtype=probs.dtype,
                                        device=probs.device).exponential_(1, generator=gen)
                    tok = (probs / noise[first:first + rows]).argmax(-1)
                else:
                    tok = logits.argmax(dim=-1)
                col = plen + step
                tok = torch.where(alive, tok, pad)
                ids[:, col], mask[:, col] = tok, alive.long()
                alive &= ~torch.isin(tok, single)
                for seq in multi:
                    if col + 1 - plen >= len(seq):
                        alive &= ~(ids[:, col + 1 - len(seq):col + 1] == seq).all(-1)
                if step + 1 == max_new_tokens or not (alive.any() or self.lockstep):
                    break
                with self.compute():
                    out = self.module(input_ids=tok.unsqueeze(-1),
                                      attention_mask=mask[:, :col + 1],
                                      position_ids=next_pos + step, use_cache=True,
                                      **{cache_arg: output_cache(out)})
        response = torch.zeros((rows, width), dtype=torch.float32)
        response[:, plen:] = mask[:, plen:].float().cpu()
        return {"tokens": ids.cpu(), "attention_mask": mask.float().cpu(),
                "response_mask": response,
                "row": prompt_rows(prompts, rows // samples).repeat_interleave(samples)}

    # -- training -------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            if not self.decl.trainable:
                # a frozen model trained in a set-up phase trains on fp32 weights (its
                # master copy) until hold_frozen(); the optimizer state is fp32 either way
                self.module.float()
            o = self.options
            self.optimizer = torch.optim.AdamW(self._trained().parameters(), lr=o["lr"],
                                               betas=tuple(o["betas"]),
                                               weight_decay=o["weight_decay"])
        return self.optimizer

    def _trained(self) -> Any:
        """What the optimizer holds: the module, or under LoRA its adapters (a view
        whose named_parameters are the trainable ones)."""
        if self.decl.spec.lora is None:
            return self.module
        from .lora_hf import TrainableView

        return TrainableView(self.module)

    def train(self, inputs: Mapping[str, Mapping[str, Any]], *, loss: Any, seed: int = 0,
              epochs: int = 1, minibatches: int = 1, shard: tuple[int, int] | None = None,
              part: str = "", **hyper: Any) -> dict[str, float]:
        """Optimise `loss` over `epochs` passes of `minibatches` random minibatches
        (train_loop.train_epochs). `shard=(index, count)`: this process is data-parallel
        rank `index` of `count` that all see the whole batch: each minibatch is drawn from
        the same seeded permutation as in one process and this rank takes its `index`-th
        equal part; `after_backward` (if set) must then average the gradients over the
        ranks. `part`: one optimizer step over a batch given in two calls
        (train_loop.TwoParts: "head" accumulates the first part's gradient, "rest" adds
        the second's, each weighted by its share of the loss tokens, and steps)."""
        opt = self._optimizer()
        defn = bind_loss(self.decl.name, loss, hyper).defn
        given = hyper
        hyper = self.kl_control.options(defn, given)   # kl_coef: the engine's (adaptive)
        bound = bind_loss(self.decl.name, defn, hyper)
        bound.kl_controlled = True
        parts = TwoParts.begin(self, part, inputs, seed, epochs * minibatches, bound.measure)

        def step(loss_fn: Callable[..., Any], idx: torch.Tensor) -> Mapping[str, float]:
            share = 1.0
            if shard is not None:
                rank, ranks = shard
                if idx.numel() % ranks:
                    raise UsageError(f"{self.decl.name}.train: minibatch of {idx.numel()} "
                                     f"does not split into {ranks} equal data-parallel parts")
                # ranks' parts may hold unequal loss tokens (responses of varied lengths)
                share = rank_share(inputs, idx.chunk(ranks)[rank], idx, ranks,
                                   bound.measure)
                idx = idx.chunk(ranks)[rank]
            mb = micro_batches(self.decl.name, inputs, idx, 1, self._to)[0]
            with torch.enable_grad(), self._adapter_dropout():
                value, stats = loss_fn(self.loss_forward(), mb, **hyper)
                opt.zero_grad(set_to_none=True)
                w = share * (parts.weight() if parts else 1.0)
                (value * w if w != 1.0 else value).backward()
            if share != 1.0:   # the driver averages the ranks' stats
                stats = {k: float(v) * share for k, v in stats.items()}
            if self.after_backward is not None:
                self.after_backward()
            if parts is not None:
                stats = parts.finish(self._trained().parameters(), stats)
                if part == "head":   # the optimizer steps after the rest
                    return stats
            if self.options["grad_clip"]:
                nn.utils.clip_grad_norm_(list(self._trained().parameters()),
                                         self.options["grad_clip"])
            opt.step()
            return stats

        stats = train_epochs(self.decl.name, inputs, loss=bound, seed=seed, epochs=epochs,
                             minibatches=minibatches, step=step)
        if part != "head":
            self.version += 1
            stats = self.kl_control.update(self.decl.name, defn, given, stats,
                                           shard[1] if shard else 1, self.sum_over_ranks)
        return stats

    def _adapter_dropout(self) -> Any:
        if self.decl.spec.lora is None:
            import contextlib

            return contextlib.nullcontext()
        from .lora_hf import adapter_dropout

        return adapter_dropout(self.module)

    # -- weights and memory ---------------------------------------------------------------
    def export_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_weights(self, named: Mapping[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        missing = sorted(set(own) - set(named))
        extra = sorted(set(named) - set(own))
        if missing or extra:
            raise UsageError(f"model {self.decl.name}: weights do not match "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for k, v in own.items():
                if v.shape != named[k].shape:
                    raise UsageError(f"model {self.decl.name}: {k} has shape "
                                     f"{tuple(named[k].shape)}, expected {tuple(v.shape)}")
                v.copy_(named[k])

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs of this engine: weights, AdamW state (None before
        the first train step) and the version (completed train steps)."""
        from .engine_state import named_optimizer_state

        return {"weights": self.export_weights(), "version": self.version,
                "optimizer": named_optimizer_state(self._trained(), self.optimizer),
                "kl_coef": self.kl_control.coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict() returned (weights checked by name and shape)."""
        from .engine_state import load_named_optimizer_state

        self.load_weights(state["weights"])
        self.optimizer = None
        if state["optimizer"] is not None:
            load_named_optimizer_state(self._trained(), self._optimizer(), state["optimizer"])
        self.version = int(state["version"])
        self.kl_control.coef = state.get("kl_coef")   # absent in older checkpoints

    def _move(self, device: torch.device) -> None:
        move_module_and_optimizer(self.module, self.optimizer, device)

    def offload(self) -> None:
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        self._move(self.device)
