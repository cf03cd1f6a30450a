"""Model engine on Hugging Face transformers models (random init, built in code).

LM heads use `LlamaForCausalLM` / `GPT2LMHeadModel`; value and score heads put a linear
layer on the bare `LlamaModel` / `GPT2Model`. Runs on CPU, or CUDA when asked. Generation
is a sampling loop over the model's own forward with its KV cache, driven by a seeded
torch.Generator so that a run is reproducible across backends.
"""
from __future__ import annotations

import inspect
import zlib
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl

from ..losses import LOSS_FUNCTIONS

DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "betas": (0.9, 0.95)}


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"--device {device!r}: use cpu or cuda")
    return torch.device(device)


class ScalarHead(nn.Module):
    """A transformer body with a linear layer to one scalar per position."""

    def __init__(self, body: nn.Module, hidden: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=tokens).last_hidden_state
        return self.head(hidden).squeeze(-1)


def build_module(decl: ModelDecl) -> nn.Module:
    import transformers

    config = decl.spec.hf_config()
    config._attn_implementation = "sdpa"
    if decl.spec.family == "gpt2":  # no dropout: RL needs the same function in every pass
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    if decl.spec.head == "lm":
        cls = (transformers.GPT2LMHeadModel if decl.spec.family == "gpt2"
               else transformers.LlamaForCausalLM)
        return cls(config)
    body = transformers.GPT2Model if decl.spec.family == "gpt2" else transformers.LlamaModel
    return ScalarHead(body(config), decl.spec.hidden_size)


def cache_argument(module: nn.Module) -> str:
    """The KV-cache keyword of this transformers version (`cache` from 5.2x on, before
    that `past_key_values`)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def seed_for(*parts: object) -> int:
    """A stable 31-bit seed from any labels (no Python hash randomisation)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def shifted(x: torch.Tensor) -> torch.Tensor:
    """Move per-position outputs one step right: out[:, t] comes from position t-1."""
    return F.pad(x[:, :-1], (1, 0))


class HFEngine:
    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], device: str = "cpu",
                 seed: int = 0):
        self.decl = decl
        self.device = resolve_device(device)
        self.options = {**DEFAULTS, **options}
        torch.manual_seed(seed_for(seed, decl.name))
        self.module = build_module(decl).to(self.device)
        self.module.eval()  # no dropout anywhere; train() only toggles autograd
        self.optimizer: torch.optim.Optimizer | None = None
        self.version = 0
        # called after each backward, before clipping: data-parallel gradient averaging
        self.after_backward: Callable[[], None] | None = None

    # -- inference ------------------------------------------------------------------------
    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head quantity of this model for each sequence, with gradients if enabled."""
        head = self.decl.spec.head
        if head == "lm":
            logits = self.module(input_ids=tokens, use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = lp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            return F.pad(picked, (1, 0))
        out = self.module(tokens).float()
        return shifted(out) if head == "value" else out[:, -1]

    @torch.no_grad()
    def forward(self, rollout: Mapping[str, Any]) -> dict[str, Any]:
        out = self._head(self._to(rollout["tokens"])).cpu()
        return {{"lm": "logprobs", "value": "values", "score": "score"}[self.decl.spec.head]: out}

    @torch.no_grad()
    def generate(self, prompts: Mapping[str, Any], *, max_new_tokens: int,
                 temperature: float = 1.0, samples: int = 1, seed: int = 0,
                 noise_rows: tuple[int, int] | None = None) -> dict[str, Any]:
        """Sample `max_new_tokens` per sequence. Each step draws one token per row by the
        exponential race argmax(p / E), E ~ Exp(1) from the seeded generator (the draw
        torch.multinomial(p, 1) makes on CPU, bit for bit). `noise_rows=(first, total)`
        says these prompts are rows first.. of a batch of `total` rollout rows split over
        data-parallel ranks: every step draws the noise of all `total` rows and uses this
        slice's, so a split batch samples exactly what the whole batch would."""
        if self.decl.spec.head != "lm":
            raise UsageError(f"model {self.decl.name} has a {self.decl.spec.head} head: "
                             "it cannot generate")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        cache_arg = cache_argument(self.module)
        ids = self._to(prompts["tokens"]).repeat_interleave(samples, dim=0)
        first, total = noise_rows if noise_rows is not None else (0, ids.shape[0])
        if not 0 <= first <= first + ids.shape[0] <= total:
            raise UsageError(f"generate: noise_rows {noise_rows} do not hold the "
                             f"{ids.shape[0]} rows of this slice")
        prompt_len = ids.shape[1]
        out = self.module(input_ids=ids, use_cache=True)
        past, logits = output_cache(out), out.logits[:, -1].float()
        for step in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                noise = torch.empty((total, probs.shape[-1]), dtype=probs.dtype,
                                    device=probs.device).exponential_(1, generator=gen)
                tok = (probs / noise[first:first + ids.shape[0]]).argmax(-1, keepdim=True)
            else:
                tok = logits.argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, tok], dim=1)
            if step + 1 < max_new_tokens:
                out = self.module(input_ids=tok, use_cache=True, **{cache_arg: past})
                past, logits = output_cache(out), out.logits[:, -1].float()
        mask = torch.zeros(ids.shape, dtype=torch.float32)
        mask[:, prompt_len:] = 1.0
        return {"tokens": ids.cpu(), "response_mask": mask}

    # -- training -------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            o = self.options
            self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=o["lr"],
                                               betas=tuple(o["betas"]),
                                               weight_decay=o["weight_decay"])
        return self.optimizer

    def train(self, inputs: Mapping[str, Mapping[str, Any]], *, loss: str, seed: int = 0,
              epochs: int = 1, minibatches: int = 1, shard: tuple[int, int] | None = None,
              **hyper: Any) -> dict[str, float]:
        """Optimise `loss` over `epochs` passes of `minibatches` random minibatches.
        `shard=(index, count)`: this process is data-parallel rank `index` of `count`
        that all see the whole batch: each minibatch is drawn from the same seeded
        permutation as in one process and this rank takes its `index`-th equal part;
        `after_backward` (if set) must then average the gradients over the ranks."""
        if loss not in LOSS_FUNCTIONS:
            raise UsageError(f"model {self.decl.name}: unknown loss {loss!r} "
                             f"(known: {', '.join(LOSS_FUNCTIONS)})")
        loss_fn = LOSS_FUNCTIONS[loss]
        opt = self._optimizer()
        batch = next(iter(inputs.values()))
        n = next(iter(batch.values())).shape[0]
        if n % minibatches:
            raise UsageError(f"{self.decl.name}.train: batch {n} does not split into "
                             f"{minibatches} minibatches")
        gen = torch.Generator().manual_seed(seed)
        totals: dict[str, float] = {}
        count = 0
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=gen).chunk(minibatches):
                if shard is not None:
                    rank, ranks = shard
                    if idx.numel() % ranks:
                        raise UsageError(f"{self.decl.name}.train: minibatch of "
                                         f"{idx.numel()} does not split into {ranks} "
                                         "equal data-parallel parts")
                    idx = idx.chunk(ranks)[rank]
                mb = {k: {f: self._to(t[idx]) for f, t in p.items()} for k, p in inputs.items()}
                with torch.enable_grad():
                    value, stats = loss_fn(self._head, mb, **hyper)
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                if self.after_backward is not None:
                    self.after_backward()
                if self.options["grad_clip"]:
                    nn.utils.clip_grad_norm_(self.module.parameters(), self.options["grad_clip"])
                opt.step()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        self.version += 1
        return {k: v / count for k, v in totals.items()}

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

    def _move(self, device: torch.device) -> None:
        self.module.to(device)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        state[k] = v.to(device)

    def offload(self) -> None:
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        self._move(self.device)
