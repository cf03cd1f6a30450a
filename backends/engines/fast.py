"""The fast generation engine (`engine="fast"`): the HF engine for training, scoring and
weights, with generation on its own decode model (fast_model.FastLM) over a static KV
cache, with continuous batching.

Generation: every sequence (prompt x sample) waits in a queue; up to `slots` of them hold
a KV-cache slot at once. Newly admitted sequences are prefilled together, then all held
slots decode one token a step; a sequence that stops (a stop token, or its
`max_new_tokens`) frees its slot at once and the next waiting sequence takes it, so a
long-tailed batch never leaves slots idle while work waits. Sampling runs on the device
with counter-based noise (fast_sampling), so a sequence's tokens do not depend on its
batch-mates or slot: continuous batching reproduces one-at-a-time generation. On CUDA each
decode step replays a CUDA graph captured per batch bucket (fast_graphs); on CPU the same
code runs eagerly, attending only to the cache positions in use.

Scoring and training of Llama-family LMs run fast_forward (the module's own parameters
through fused kernels with closed-form backward passes: the same function, fewer
non-matmul operators; which features it runs itself is listed in its doc); other models
use the HF engine's forward.

Architectures (graphrl.architecture.ENGINE_FEATURES["fast"]; anything else is refused in
the constructor, naming model, engine and field): Llama-2, Llama-3.x (rope_type llama3),
Mistral (with or without a sliding window), Qwen2/2.5 (q/k/v biases; per-layer sliding
windows), Qwen3 (q/k RMSNorm, head_dim != hidden / heads), GPT-2; tied embeddings.

Precision: the decode copy of the weights and its KV cache are held in the model's
precision (bf16: no fp32 copy). Scoring and training of a bf16 model run fast_forward in
bf16 mixed precision without autocast: a trainable model's fp32 master weights are cast
to bf16 once per call (fused and folded first, so one cast per fused weight), matmuls and
activations in bf16, the residual stream, RMSNorm statistics, rotary and log-softmax (and
on CPU attention) in fp32, weight gradients accumulated into the fp32 masters' .grad; a frozen model runs on
its held bf16 weights. Other models run the HF engine's forward under bf16 autocast.

Engine options (besides the HF engine's): `slots` (most sequences decoding at once;
default 256), `cuda_graphs` (default true; only on CUDA) and `fused_forward` (default
true: fast_forward for scoring and training where the model supports it).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Sequence

import torch

from graphrl.errors import UsageError
from graphrl.graph import ModelDecl

from .fast_forward import fast_logprobs, supported
from .fast_model import FastLM
from .fast_sampling import Sampler
from .hf import HFEngine, positions, prompt_rows
from .precision import TORCH_DTYPES

DEFAULT_SLOTS = 256


def compact_left(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens moved to its front (order kept), padding after them."""
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order)


class FastEngine(HFEngine):
    def __init__(self, decl: ModelDecl, options: Mapping[str, Any], device: str = "cpu",
                 seed: int = 0):
        opts = dict(options)
        self.slots = int(opts.pop("slots", DEFAULT_SLOTS))
        self.cuda_graphs = bool(opts.pop("cuda_graphs", True))
        fused = bool(opts.pop("fused_forward", True))
        if self.slots < 1:
            raise UsageError(f"model {decl.name}: engine fast needs slots >= 1, "
                             f"got {self.slots}")
        super().__init__(decl, opts, device=device, seed=seed)
        self._refuse_unsupported()
        # bf16: the fused kernels run bf16 mixed precision themselves (fp32 masters cast to
        # bf16 once per call, fp32 norms / rotary / log-softmax), without autocast
        # (LoRA: HF's forward through peft; the fused kernels read the base weights only)
        self.fused_forward = (fused and decl.spec.head == "lm" and decl.spec.lora is None
                              and supported(self.module))
        self._lm: FastLM | None = None
        self._graphs: Any = None
        self.last_stats: dict[str, float] = {}

    def _refuse_unsupported(self) -> None:
        """UsageError naming the model, the engine and the feature, for an architecture
        feature the decode model does not implement (graphrl.architecture)."""
        from graphrl.architecture import architecture, refuse_unsupported

        try:
            arch = architecture(self.module.config.to_dict())
        except ValueError as e:
            raise UsageError(f"model {self.decl.name}: engine fast: {e}") from None
        refuse_unsupported(self.decl.name, "fast", arch)

    def _head(self, payload: Mapping[str, Any]) -> torch.Tensor:
        """Per-token log-probs through fast_forward where supported, else HF's forward."""
        if not self.fused_forward:
            return super()._head(payload)
        tokens, mask = self._inputs(payload)
        response = payload.get("response_mask")
        return fast_logprobs(self.module, tokens, mask, positions(mask),
                             None if response is None else self._to(response),
                             TORCH_DTYPES[self.precision])

    def _decoder(self, slots: int, max_len: int) -> FastLM:
        """The decode model, reusing the cache when it is large enough; weights are
        copied fresh from the trained module each call (in place)."""
        lm = self._lm
        p = next(self.module.parameters())
        dtype = TORCH_DTYPES[self.precision]   # the decode copy and KV cache: bf16 or fp32
        if (lm is None or lm.slots < slots or lm.max_len < max_len or lm.device != p.device
                or lm.dtype != dtype):
            from .lora_hf import decode_source

            # LoRA: the decode copy holds W + (alpha / r) B A, merged at each refresh
            module, merged = decode_source(self.module)
            lm = self._lm = FastLM(module, slots, max_len, dtype, merged=merged)
            self._graphs = None
            if lm.device.type == "cuda" and self.cuda_graphs:
                from .fast_graphs import GraphDecoder

                self._graphs = GraphDecoder(lm)
        else:
            lm.refresh()
        return lm

    @torch.no_grad()
    def generate(self, prompts: Mapping[str, Any], *, max_new_tokens: int,
                 temperature: float = 1.0, samples: int = 1, seed: int = 0,
                 top_p: float = 1.0, top_k: int = 0, stop: str = "",
                 stop_at_eos: bool = True, stop_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None,
                 noise_rows: tuple[int, int] | None = None) -> dict[str, Any]:
        """Same contract and output as HFEngine.generate (greedy output identical to it);
        sampled tokens follow the same distribution with counter-based noise."""
        if self.decl.spec.head != "lm":
            raise UsageError(f"model {self.decl.name} has a {self.decl.spec.head} head: "
                             "it cannot generate")
        if max_new_tokens < 0:
            raise UsageError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        stops = self.tokens.stop_ids(stop_at_eos, stop_token_ids, stop)
        pad = self.tokens.pad_id if pad_token_id is None else int(pad_token_id)
        prompt_ids, prompt_mask, first, total = self._generation_rows(prompts, samples,
                                                                      noise_rows)
        n, plen = prompt_ids.shape
        lens = prompt_mask.sum(-1)
        if n and int(lens.min()) < 1:
            bad = int((lens < 1).nonzero()[0, 0]) // samples
            raise UsageError(f"generate: prompt row {bad} has no real token "
                             "(its attention_mask is all 0)")
        out = torch.full((n + 1, max(max_new_tokens, 1)), pad, dtype=torch.long,
                         device=self.device)
        gen_len = torch.zeros(n, dtype=torch.long)
        if n and max_new_tokens:
            self._run(compact_left(prompt_ids, prompt_mask), lens, out, gen_len,
                      max_new_tokens, stops,
                      Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              first=first, n=n, max_new=max_new_tokens,
                              vocab=self.module.config.vocab_size, device=self.device))
        new = out[:n, :max_new_tokens]
        new_mask = (torch.arange(max_new_tokens)[None, :] < gen_len[:, None]).to(self.device)
        new = torch.where(new_mask, new, pad)
        ids = torch.cat([prompt_ids, new], dim=1).cpu()
        mask = torch.cat([prompt_mask, new_mask.long()], dim=1).float().cpu()
        response = torch.zeros_like(mask)
        response[:, plen:] = mask[:, plen:]
        return {"tokens": ids, "attention_mask": mask, "response_mask": response,
                "row": prompt_rows(prompts, n // max(samples, 1)).repeat_interleave(samples)}

    @staticmethod
    def _prefill(lm: FastLM, tokens: torch.Tensor, lens: torch.Tensor,
                 slot_idx: torch.Tensor) -> torch.Tensor:
        """lm.prefill of these prompts, each distinct prompt once (the samples of one
        prompt share it): its cache rows are copied to the slots of its repeats."""
        uniq, inverse = torch.unique(torch.cat([tokens, lens[:, None]], dim=1), dim=0,
                                     return_inverse=True)
        if uniq.shape[0] == tokens.shape[0]:
            return lm.prefill(tokens, lens, slot_idx)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        first = torch.full((uniq.shape[0],), tokens.shape[0], device=tokens.device)
        first = first.scatter_reduce(0, inverse, rows, "amin")
        logits = lm.prefill(tokens[first], lens[first], slot_idx[first])
        lm.copy_slots(slot_idx[first][inverse], slot_idx, tokens.shape[1])
        return logits[inverse]

    def _run(self, compact: torch.Tensor, lens: torch.Tensor, out: torch.Tensor,
             gen_len: torch.Tensor, max_new: int, stops: list[tuple[int, ...]],
             sample: Sampler) -> None:
        """Continuous batching: fill free slots from the queue (prefill), decode all held
        slots a step, free the slots of stopped sequences; until queue and slots are empty.
        Writes tokens into out[seq, step] and each sequence's length into gen_len."""
        dev = self.device
        n = compact.shape[0]
        lens_host = lens.tolist()
        slots = min(n, self.slots)
        lm = self._decoder(slots, max(lens_host) + max_new)
        single = torch.tensor([s[0] for s in stops if len(s) == 1], dtype=torch.long,
                              device=dev)
        multi = [torch.tensor(s, device=dev) for s in stops if len(s) > 1]
        queue = deque(range(n))
        held = [-1] * slots                   # slot -> sequence (-1: free)
        pos_host = [0] * slots                # slot -> position of its pending token
        tok = torch.zeros(slots, dtype=torch.long, device=dev)    # pending token per slot
        pos = torch.zeros(slots, dtype=torch.long, device=dev)
        step = torch.zeros(slots, dtype=torch.long, device=dev)   # its index in the response
        seq = torch.full((slots,), n, dtype=torch.long, device=dev)  # n: the dummy row
        decode_steps = prefills = 0

        def finished(t: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            """Which of the tokens t (at response steps s of sequences q) end them."""
            done = torch.isin(t, single) | (s + 1 >= max_new)
            for stop_seq in multi:
                m = len(stop_seq)
                idx = (s[:, None] - m + 1 + torch.arange(m, device=dev)).clamp(0, max_new - 1)
                done |= (out[q[:, None], idx] == stop_seq).all(-1) & (s + 1 >= m)
            return done

        def release(slot_list: list[int], done: list[bool], steps: list[int]) -> None:
            for slot, d, st in zip(slot_list, done, steps):
                if d:
                    gen_len[held[slot]] = st + 1
                    held[slot] = -1
                    seq[slot], pos[slot], pos_host[slot] = n, 0, 0

        while True:
            free = [s for s in range(slots) if held[s] < 0]
            while free and queue:   # admit: prefill waiting sequences into free slots
                take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                where, free = free[:len(take)], free[len(take):]
                width = max(lens_host[q] for q in take)
                q_dev = torch.tensor(take, device=dev)
                s_dev = torch.tensor(where, device=dev)
                logits = self._prefill(lm, compact[q_dev, :width], lens[q_dev], s_dev)
                zero = torch.zeros(len(take), dtype=torch.long, device=dev)
                t = sample(logits, q_dev, zero)
                out[q_dev, 0] = t
                done = finished(t, zero, q_dev).tolist()
                prefills += 1
                for slot, q in zip(where, take):
                    held[slot], pos_host[slot] = q, lens_host[q]
                tok[s_dev], pos[s_dev], step[s_dev], seq[s_dev] = t, lens[q_dev], 0, q_dev
                release(where, done, [0] * len(take))
                free += [s for s, d in zip(where, done) if d]
            active = [s for s in range(slots) if held[s] >= 0]
            if not active:
                break
            b = active[-1] + 1
            kv_len = max(pos_host[s] for s in active) + 1
            if self._graphs is not None:
                logits = self._graphs.decode(tok, pos, b)
            else:
                logits = lm.decode(tok[:b], pos[:b], kv_len)
            decode_steps += 1
            nstep = step[:b] + 1
            t = sample(logits, seq[:b], nstep)
            live = seq[:b] < n
            out[seq[:b], torch.where(live, nstep, 0)] = torch.where(live, t, out[n, 0])
            done = (finished(t, nstep, seq[:b]) & live).tolist()
            tok[:b], pos[:b] = t, torch.where(live, pos[:b] + 1, 0)
            step[:b] = torch.where(live, nstep, 0)
            for s in active:
                pos_host[s] += 1
            release(list(range(b)), done, (step[:b]).tolist())
        self.last_stats = {"decode_steps": float(decode_steps), "prefills": float(prefills),
                           "slots": float(slots)}
