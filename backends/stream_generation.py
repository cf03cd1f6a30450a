"""Streamed generation for asynchronous steps (`--staleness K`, passes/staleness.py).

A generate node marked `stream_cut=C` runs on a GenerationStream that lives across
steps on its engine (one per rank on Ray). The stream is a continuous-batching loop over
the fast engine's primitives (fast_model.FastLM prefill/decode over a static KV cache,
fast_sampling.Sampler's counter-based noise) that can hold sequences of two batches at
once. Its one rule, which makes every result independent of scheduling:

    each sequence of the batch generated at step n samples its first C response tokens
    with the weights of step n (version v) and the rest with the next weights (v + 1).

A step's generate call runs in two halves around the weight push:

- `head` (before the push, weights v): batch n's sequences run until each has C tokens
  or has stopped; then their per-token log-probs under v are taken (behaviour log-probs
  of the first C tokens).
- `tail` (after the train and the push, weights v + 1): in-flight sequences are
  interrupted at the weight switch and their KV cache is recomputed with the new
  weights (AReaL, Fu et al. 2025, arXiv 2505.24298, §4.1 "interruptible rollout
  workers": generation is interrupted for a weight update, the KV caches computed with
  the old weights are discarded and recomputed); batch n's sequences longer than C
  finish under v + 1 while the prompts of batch n + 1 (if the caller passes them) take
  the KV slots they free and run up to their own C tokens; the tail ends when batch n is
  complete, so a batch's long responses overlap the next batch's first tokens instead
  of leaving the engine idle. The log-probs of tokens C.. under v + 1 complete the
  behaviour log-probs.

Versions: a sequence carries the version it started with (v), so the train at step
n + K (weights v + K) sees a lag of K — within the bound, as without streaming; tokens
C.. are even fresher (lag K - 1). Because of the rule, which of batch n + 1's tokens
were computed in step n's tail or in step n + 1's head only changes timing: the local
and the Ray backend (each data-parallel rank streaming its own rows, with the noise rows
of the whole batch) sample the same tokens, and a run resumed from a checkpoint (the
stream's in-flight sequences are not saved) samples what the uninterrupted run did.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from graphrl.errors import ExecutionError, UsageError

DEFAULT_SLOTS = 256
WAIT, RUN, CUT, DONE = 0, 1, 2, 3   # a sequence's state


@dataclass
class _Batch:
    """One step's sequences (this rank's rows) on the stream."""

    iteration: int
    version: int
    prompt_ids: Any            # [n, P] left-padded, repeated `samples` times
    prompt_mask: Any
    compact: list[list[int]]   # each sequence's real prompt tokens
    rows: Any                  # data row per sequence
    sampler: Any
    switched: bool = False     # its tail (weights v + 1) has begun
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)   # each token's, sampled
    state: list[int] = field(default_factory=list)
    head_done: bool = False

    def __len__(self) -> int:
        return len(self.compact)


class GenerationStream:
    """The stream of one generate node on one engine (module doc). `attrs`: the node's
    generate attributes (max_new_tokens, temperature, samples, top_p, top_k, stop, ...)."""

    def __init__(self, engine: Any, attrs: Mapping[str, Any], cut: int):
        a = dict(attrs)
        self.engine = engine
        self.max_new = int(a.pop("max_new_tokens"))
        self.samples = int(a.pop("samples", 1))
        self.temperature = float(a.pop("temperature", 1.0))
        self.top_p, self.top_k = float(a.pop("top_p", 1.0)), int(a.pop("top_k", 0))
        stop, at_eos = str(a.pop("stop", "")), bool(a.pop("stop_at_eos", True))
        extra, pad = a.pop("stop_token_ids", None), a.pop("pad_token_id", None)
        if a:
            raise UsageError(f"streamed generation: unknown generate option(s) {sorted(a)}")
        if not 1 <= cut:
            raise UsageError(f"streamed generation: stream_cut {cut} must be >= 1")
        self.cut = min(int(cut), max(self.max_new, 1))
        self.stops = engine.tokens.stop_ids(at_eos, extra, stop)
        self.pad = engine.tokens.pad_id if pad is None else int(pad)
        self.slots_max = int(getattr(engine, "slots", DEFAULT_SLOTS))
        self.batches: dict[int, _Batch] = {}
        self.lm: Any = None
        self.lm_version: Optional[int] = None
        self.held: list[Optional[tuple[int, int]]] = []   # slot -> (iteration, sequence)
        self.pos_host: list[int] = []                      # slot -> its pending position
        self.tok = self.pos = self.seq = self.step = None  # per-slot device tensors
        self.stats = {"decode_steps": 0, "prefills": 0}
        self.finished: dict[int, Any] = {}   # iteration -> behaviour log-probs (Ray)

    # -- the two halves of a step --------------------------------------------------------
    def head(self, iteration: int, prompts: Mapping[str, Any], seed: int, version: int,
             noise_rows: Optional[tuple[int, int]] = None) -> None:
        """Batch `iteration` (admitted now, or already running since the previous tail)
        runs with weights `version` until each sequence has `cut` tokens or stopped."""
        b = self.batches.get(iteration)
        if b is None:
            b = self._admit(iteration, prompts, seed, version, noise_rows)
        elif b.version != version:
            raise ExecutionError(f"streamed generation: batch {iteration} started with "
                                 f"weights version {b.version}, its head runs with {version}")
        self._weights(version)
        self._loop([b], until=b)
        b.head_done = True

    def tail(self, iteration: int, version: int,
             upcoming: Optional[tuple[int, Mapping[str, Any], int,
                                      Optional[tuple[int, int]]]] = None
             ) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """Batch `iteration` finishes with weights `version` (the pushed ones); the next
        batch (`upcoming` = (iteration, prompts, seed, noise_rows), if given) enters the
        freed slots. Returns (rollout, behaviour log-probs, version per sequence)."""
        import torch

        b = self.batches.get(iteration)
        if b is None or not b.head_done:
            raise ExecutionError(f"streamed generation: the tail of batch {iteration} "
                                 "runs before its head")
        self._weights(version)
        b.switched = True
        for i, s in enumerate(b.state):
            if s == CUT:
                b.state[i] = WAIT
        order = [b]
        if upcoming is not None:
            it, prompts, seed, rows = upcoming
            nxt = self.batches.get(it) or self._admit(it, prompts, seed, version, rows)
            order.append(nxt)
        self._loop(order, until=b)
        rollout = self._rollout(b)
        behaviour = {"logprobs": self._behaviour(b)}
        del self.batches[iteration]
        return rollout, behaviour, torch.full((len(b),), b.version, dtype=torch.int64)

    def head_part(self, iteration: int, offset: int = 0) -> dict[str, Any]:
        """After batch `iteration`'s head: its groups of `samples` sequences that all
        finished (graphrl/stream_train.py), {"index": their sequence indices + `offset`,
        "rollout": their rows of the rollout}."""
        import torch

        b = self.batches.get(iteration)
        if b is None or not b.head_done:
            raise ExecutionError(f"streamed generation: the head part of batch {iteration} "
                                 "is asked for before its head ran")
        g = max(self.samples, 1)
        index = [i for i in range(len(b)) if all(s == DONE for s in b.state[i - i % g:
                                                                             i - i % g + g])]
        rows = torch.tensor(index, dtype=torch.long)
        return {"index": rows + int(offset), "version": b.version,
                "rollout": {f: t[rows] for f, t in self._rollout(b).items()},
                "behaviour": {"logprobs": self._behaviour(b)[rows]}}

    # -- internals ------------------------------------------------------------------------
    def _admit(self, iteration: int, prompts: Mapping[str, Any], seed: int, version: int,
               noise_rows: Optional[tuple[int, int]]) -> _Batch:
        from .engines.fast_sampling import Sampler
        from .engines.hf import prompt_rows

        eng = self.engine
        ids, mask, first, _ = eng._generation_rows(prompts, self.samples, noise_rows)
        n = ids.shape[0]
        compact = [[int(t) for t, m in zip(r, mr) if m] for r, mr in
                   zip(ids.tolist(), mask.tolist())]
        bad = [i for i, c in enumerate(compact) if not c]
        if bad:
            raise UsageError(f"generate: prompt row {bad[0] // self.samples} has no real "
                             "token (its attention_mask is all 0)")
        sampler = Sampler(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          seed=seed, first=first, n=n, max_new=max(self.max_new, 1),
                          vocab=eng.module.config.vocab_size, device=eng.device)
        b = _Batch(iteration, int(version), ids, mask, compact,
                   prompt_rows(prompts, n // max(self.samples, 1)).repeat_interleave(
                       self.samples), sampler, tokens=[[] for _ in range(n)],
                   logprobs=[[] for _ in range(n)], state=[WAIT if self.max_new else DONE] * n)
        self.batches[iteration] = b
        return b

    def _weights(self, version: int) -> None:
        """Load the engine's current weights into the decode model when they changed;
        sequences holding a slot then have their KV recomputed (they go back to wait)."""
        if self.lm is not None and self.lm_version == version:
            return
        if self.lm is not None:
            self.lm.refresh()
            for slot, owner in enumerate(self.held):
                if owner is not None:
                    it, i = owner
                    self.batches[it].state[i] = WAIT
                    self.held[slot] = None
        self.lm_version = version

    def _decoder(self) -> Any:
        """The decode model: slots for two batches at once (the tail's), a new cache only
        when a longer prompt needs one (held sequences then recompute their KV)."""
        import torch

        from .engines.fast_model import FastLM

        plen = max(b.prompt_ids.shape[1] for b in self.batches.values())
        biggest = max(len(b) for b in self.batches.values())
        lm = self.lm
        if lm is None or lm.max_len < plen + self.max_new:
            for owner in self.held:
                if owner is not None:
                    self.batches[owner[0]].state[owner[1]] = WAIT
            slots = max(1, min(self.slots_max, 2 * biggest))
            from .engines.lora_hf import decode_source

            module, merged = decode_source(self.engine.module)   # LoRA: merged weights
            self.lm = FastLM(module, slots, plen + max(self.max_new, 1), merged=merged)
            self.held, self.pos_host = [None] * slots, [0] * slots
            self.tok, self.pos, self.seq, self.step = (
                torch.zeros(slots, dtype=torch.long, device=self.lm.device) for _ in range(4))
        return self.lm

    def _finished(self, seq: list[int]) -> bool:
        if len(seq) >= self.max_new:
            return True
        return any(len(seq) >= len(s) and tuple(seq[-len(s):]) == s for s in self.stops)

    def _after_token(self, b: _Batch, i: int, tok: int, lp: float) -> bool:
        """Record token `tok` (log-prob `lp`) of sequence i; True if it keeps its slot."""
        seq = b.tokens[i]
        seq.append(tok)
        b.logprobs[i].append(lp)
        if self._finished(seq):
            b.state[i] = DONE
            return False
        if not b.switched and len(seq) >= self.cut:
            b.state[i] = CUT   # waits for the next weights (its tail)
            return False
        return True

    def _loop(self, order: list[_Batch], until: _Batch) -> None:
        """Continuous batching: free slots go to waiting sequences of the batches in
        `order` (earlier batches first), every held slot decodes a token a step; until
        `until` has no sequence waiting or running."""
        import torch

        lm = self._decoder()
        dev = lm.device
        while any(s in (WAIT, RUN) for s in until.state):
            free = [s for s, o in enumerate(self.held) if o is None]
            take = [(b, i) for b in order for i, s in enumerate(b.state) if s == WAIT]
            take = take[:len(free)]
            if take:   # prefill: prompt + tokens so far (a resumed sequence's KV anew)
                seqs = [b.compact[i] + b.tokens[i] for b, i in take]
                width = max(map(len, seqs))
                toks = torch.zeros(len(seqs), width, dtype=torch.long, device=dev)
                for r, q in enumerate(seqs):
                    toks[r, :len(q)] = torch.tensor(q, dtype=torch.long)
                lens = [len(q) for q in seqs]
                where = free[:len(take)]
                logits = lm.prefill(toks, torch.tensor(lens, device=dev),
                                    torch.tensor(where, device=dev))
                self.stats["prefills"] += 1
                steps = torch.tensor([len(b.tokens[i]) for b, i in take], device=dev)
                seq_idx = torch.tensor([i for _, i in take], device=dev)
                sampled, lps = self._sample(logits, take, seq_idx, steps)
                for slot, (b, i), t, lp, n in zip(where, take, sampled, lps, lens):
                    b.state[i] = RUN
                    if self._after_token(b, i, t, lp):
                        self.held[slot] = (b.iteration, i)
                        self.pos_host[slot] = n
                        self.tok[slot], self.pos[slot] = t, n
                        self.seq[slot], self.step[slot] = i, len(b.tokens[i])
            active = [s for s, o in enumerate(self.held) if o is not None]
            if not active:
                if take:
                    continue
                raise ExecutionError("streamed generation: sequences wait but no slot "
                                     "is free or running (a scheduler bug)")
            width = active[-1] + 1
            kv_len = max(self.pos_host[s] for s in active) + 1
            logits = lm.decode(self.tok[:width], self.pos[:width], kv_len)
            self.stats["decode_steps"] += 1
            idx = torch.tensor(active, device=dev)
            who = [(self.batches[self.held[s][0]], self.held[s][1]) for s in active]
            sampled, lps = self._sample(logits[idx], who, self.seq[idx], self.step[idx])
            self.tok[idx] = torch.tensor(sampled, device=dev)
            self.pos[idx] += 1
            self.step[idx] += 1
            for s, (b, i), t, lp in zip(active, who, sampled, lps):
                if self._after_token(b, i, t, lp):
                    self.pos_host[s] += 1
                else:
                    self.held[s] = None

    def _sample(self, logits: Any, who: list[tuple[_Batch, int]], seqs: Any, steps: Any
                ) -> tuple[list[int], list[float]]:
        """One token per row, each drawn by its own batch's sampler (its seed and noise
        rows) for sequence seqs[r] at response step steps[r], and its log-prob under the
        model (log-softmax of the logits, temperature 1: what the engine's forward
        returns, so these are the behaviour log-probs)."""
        import torch

        groups = {id(b): b for b, _ in who}
        if len(groups) == 1:
            drawn = next(iter(groups.values())).sampler(logits, seqs, steps)
        else:
            drawn = torch.zeros(len(who), dtype=torch.long, device=logits.device)
            for b in groups.values():
                rows = torch.tensor([r for r, (bb, _) in enumerate(who) if bb is b],
                                    device=logits.device)
                drawn[rows] = b.sampler(logits[rows], seqs[rows], steps[rows])
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, drawn[:, None])[:, 0]
        return [int(t) for t in drawn.tolist()], lp.tolist()

    def _rollout(self, b: _Batch) -> dict[str, Any]:
        """The batch as a Rollout payload (the fast engine's layout)."""
        import torch

        n = len(b)
        new = torch.full((n, self.max_new), self.pad, dtype=torch.long)
        lens = torch.zeros(n, dtype=torch.long)
        for i, seq in enumerate(b.tokens):
            if seq:
                new[i, :len(seq)] = torch.tensor(seq[:self.max_new], dtype=torch.long)
            lens[i] = min(len(seq), self.max_new)
        new_mask = torch.arange(self.max_new)[None, :] < lens[:, None]
        ids = torch.cat([b.prompt_ids.cpu(), new], dim=1)
        mask = torch.cat([b.prompt_mask.cpu(), new_mask.long()], dim=1).float()
        response = torch.zeros_like(mask)
        plen = b.prompt_ids.shape[1]
        response[:, plen:] = mask[:, plen:]
        return {"tokens": ids, "attention_mask": mask, "response_mask": response,
                "row": b.rows}

    def _behaviour(self, b: _Batch) -> Any:
        """[n, P + R] log-probs of each sampled token under the weights that sampled it
        (0 at prompt and padding positions, which no loss reads)."""
        import torch

        plen = b.prompt_ids.shape[1]
        out = torch.zeros(len(b), plen + self.max_new)
        for i, lps in enumerate(b.logprobs):
            if lps:
                out[i, plen:plen + len(lps)] = torch.tensor(lps[:self.max_new])
        return out


def streams_of(holder: Any) -> dict[tuple[str, str], GenerationStream]:
    """The (engine key, node) -> stream table kept on an executor or a rank worker."""
    table = getattr(holder, "_generation_streams", None)
    if table is None:
        table = {}
        holder._generation_streams = table
    return table


def stream_for(holder: Any, key: str, node: str, engine: Any,
               attrs: Mapping[str, Any]) -> GenerationStream:
    """The stream of generate node `node` on engine `key` (made at first use); `attrs`:
    the node's attributes (stream_cut, behaviour and the compiler's price of the stream,
    graphrl/stream_train.py, are not generate options)."""
    from graphrl.stream_train import HEAD_SECONDS, HEAD_SHARE, TAIL_SECONDS

    table = streams_of(holder)
    s = table.get((key, node))
    if s is None or s.engine is not engine:
        opts = {k: v for k, v in attrs.items() if k not in (
            "stream_cut", "behaviour", HEAD_SECONDS, TAIL_SECONDS, HEAD_SHARE)}
        s = table[(key, node)] = GenerationStream(engine, opts, int(attrs["stream_cut"]))
    return s


def stream_nodes(graph: Any) -> list[Any]:
    """The generate nodes of `graph` that stream (passes/staleness marks them)."""
    return [n for n in graph.nodes if n.target == "generate" and n.attr("stream_cut")]


def local_head(holder: Any, n: Any, engine: Any, prompts: Mapping[str, Any], seed: int,
               version: int, iteration: int) -> None:
    """The local backend's head of a streamed generate node (module doc)."""
    stream_for(holder, n.model, n.name, engine, n.attr_dict).head(iteration, prompts, seed,
                                                                   version)


def local_tail(holder: Any, n: Any, engine: Any, version: int, iteration: int,
               upcoming: Optional[Mapping[str, Any]], seed_of: Any) -> list[Any]:
    """The local backend's tail: [rollout, behaviour log-probs, {"version": ...}];
    `upcoming`: the next step's inputs (or None), `seed_of(iteration)` its seed."""
    nxt = None
    key = n.inputs[1].lstrip("%")
    if upcoming is not None and key in upcoming:
        nxt = (iteration + 1, upcoming[key], seed_of(iteration + 1), None)
    stream = stream_for(holder, n.model, n.name, engine, n.attr_dict)
    rollout, behaviour, versions = stream.tail(iteration, version, nxt)
    return [rollout, behaviour, {"version": versions}]
