"""Differential checks of sharded training engines against a one-process HFEngine, run in
spawned gloo processes (tests/test_engine_megatron.py, test_engine_deepspeed.py).

Each rank builds the engine under test and an HFEngine on the same seeded weights, runs a
forward and several optimizer steps (2 epochs x 2 minibatches, lr 1e-2) on the same
batch, and rank 0 writes what it measured (max abs differences) to a JSON file.
Response masks have unequal lengths per row, so micro-batch weighting matters.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

B, S, VOCAB = 8, 12, 32


def tiny_decl(family: str, head: str) -> Any:
    from graphrl.graph import ModelDecl
    from graphrl.types import ModelSpec

    kv = 2 if family == "llama" else 4   # GQA for Llama
    spec = ModelSpec(family, VOCAB, 64, 4, 4, kv, 128, 64, head,
                     tie_embeddings=family == "gpt2")
    return ModelDecl("m", spec, "policy", True)


def batch(head: str, ref: Any) -> tuple[dict, str]:
    import torch

    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, VOCAB, (B, S), generator=g)
    att = torch.ones(B, S)
    att[1::2, :2] = 0          # left padding on odd rows
    toks[att == 0] = 0
    mask = torch.zeros(B, S)
    mask[:, 6:] = 1
    mask[::2, 10:] = 0         # even rows stop early: their tail is padding
    att[::2, 10:] = 0
    if head == "score":
        return ({"chosen": {"tokens": toks, "attention_mask": att},
                 "rejected": {"tokens": toks.flip(1), "attention_mask": att.flip(1)}},
                "bradley_terry")
    out = next(iter(ref.forward({"tokens": toks, "attention_mask": att}).values()))
    if head == "lm":
        return ({"rollout": {"tokens": toks, "attention_mask": att, "response_mask": mask},
                 "old_logprobs": {"logprobs": out + 0.01 * torch.randn(B, S, generator=g)},
                 "advantages": {"advantages": torch.randn(B, S, generator=g)}}, "ppo")
    return ({"rollout": {"tokens": toks, "attention_mask": att, "response_mask": mask},
             "old_values": {"values": out},
             "returns": {"returns": torch.randn(B, S, generator=g)}}, "value")


def compare(eng: Any, ref: Any, head: str) -> dict[str, float]:
    import torch

    inputs, loss = batch(head, ref)
    start = ref.export_weights()
    fed = next(p for p in inputs.values() if "tokens" in p)
    fed = {k: fed[k] for k in ("tokens", "attention_mask")}
    f1 = next(iter(eng.forward(fed).values()))
    f2 = next(iter(ref.forward(fed).values()))
    att = fed["attention_mask"]   # outputs read at a real position from a real one: the
    keep = (att * torch.nn.functional.pad(att[:, :-1], (1, 0))) > 0   # others are unused
    if f1.dim() == 1:
        keep = torch.ones_like(f1, dtype=torch.bool)
    f1, f2 = f1[keep], f2[keep]
    s1 = eng.train(inputs, loss=loss, seed=3, epochs=2, minibatches=2)
    s2 = ref.train(inputs, loss=loss, seed=3, epochs=2, minibatches=2)
    we, wr = eng.export_weights(), ref.export_weights()
    return {"layout": _layout_error(eng, we),"forward": float((f1 - f2).abs().max()),
            "loss": abs(s1["loss"] - s2["loss"]),
            "weights": max(float((we[k] - wr[k]).abs().max()) for k in wr),
            "moved": max(float((wr[k] - start[k]).abs().max()) for k in wr),
            # the relative error of the whole update: Adam turns float noise in a
            # near-zero gradient into a full lr-sized step of either sign, so the max
            # difference of single weights is loose; the update as a whole is tight
            "update": _update_error(we, wr, start),
            "update_no_key_bias": _update_error(*(_drop_key_bias(w) for w in (we, wr, start))),
            "weights_no_key_bias": max(float((a - b).abs().max()) for a, b in zip(
                _drop_key_bias(we).values(), _drop_key_bias(wr).values())),
            "worst": max(wr, key=lambda k: float((we[k] - wr[k]).abs().max())),
            "same_names": list(we) == list(wr)}


def _layout_error(eng: Any, full: dict) -> str:
    """'' when this rank's local arrays hold exactly what the engine's layout (graphrl.shard)
    says of the full weights, else the first mismatch."""
    import torch

    from graphrl.shard import Box

    arrays = eng.local_arrays()
    if list(arrays) != list(full):
        return "names differ"
    for name, lay in eng.layout.items():
        for piece, a in zip(lay.pieces_on(eng.rank), arrays[name]):
            if isinstance(piece, Box):
                want = full[name][piece.slices()]
            else:
                flat = full[name].reshape(-1)
                want = torch.zeros(piece.stop - piece.start)
                got = flat[piece.start:piece.stop]
                want[:got.numel()] = got
            if not torch.equal(a.reshape(want.shape), want):
                return f"{name} {piece.text()}"
        if len(lay.pieces_on(eng.rank)) != len(arrays[name]):
            return f"{name}: {len(arrays[name])} arrays"
    return ""


def _drop_key_bias(weights: dict) -> dict:
    """The weights without the attention key biases (Qwen2's k_proj.bias, the middle third
    of GPT-2's c_attn.bias). Softmax over keys is invariant to a shift common to every key,
    and q . (k_j + b) shifts every score of a query by q . b, so the key bias's gradient is
    exactly 0 in exact arithmetic: each engine's is rounding noise, which Adam turns into
    lr-sized steps of either sign (up to 2 x steps x lr apart)."""
    out = {}
    for k, v in weights.items():
        if k.endswith("self_attn.k_proj.bias"):
            continue
        if k.endswith("attn.c_attn.bias"):
            h = v.shape[0] // 3
            v = torch_cat(v[:h], v[2 * h:])
        out[k] = v
    return out


def torch_cat(*ts: Any) -> Any:
    import torch

    return torch.cat(ts)


def _update_error(we: dict, wr: dict, start: dict) -> float:
    import torch

    diff = torch.cat([(we[k] - wr[k]).reshape(-1) for k in wr])
    step = torch.cat([(wr[k] - start[k]).reshape(-1) for k in wr])
    return float(diff.norm() / step.norm())


def megatron_process_groups(rank: int, gpus: list, dp: int, tp: int, pp: int) -> dict:
    """This rank's megatron process groups of a dp x tp x pp mesh over `gpus`, plus
    "mesh"; every rank creates every group (torch.distributed requires it)."""
    import torch.distributed as dist

    from graphrl.backends.engines.megatron import megatron_groups

    groups = {}
    for kind, lists in megatron_groups(gpus, dp, tp, pp).items():
        for g in lists:
            pg = dist.new_group(list(g))
            if rank in g:
                groups[kind] = pg
    groups["mesh"] = dist.new_group(gpus)
    return groups


def _megatron(rank: int, world: int, configs: list, groups_of: Any) -> list:
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.megatron import MegatronEngine

    results = []
    for family, head, dp, tp, pp, sp, mb, zero in configs:
        gpus = list(range(dp * tp * pp))
        groups = megatron_process_groups(rank, gpus, dp, tp, pp)
        if rank not in gpus:
            continue
        decl = tiny_decl(family, head)
        eng = MegatronEngine(decl, {"lr": 1e-2}, ranks=gpus, rank=rank, groups=groups, dp=dp,
                             tp=tp, pp=pp, sequence_parallel=sp, micro_batches=mb, zero=zero)
        ref = HFEngine(decl, {"lr": 1e-2})
        results.append({"config": [family, head, dp, tp, pp, sp, mb, zero],
                        **compare(eng, ref, head), **two_parts(eng, ref, head)})
    return results


def family_decl(directory: str) -> Any:
    """The lm-head decl of a saved HF directory (graphrl.families checkpoints)."""
    from pathlib import Path

    from graphrl.graph import ModelDecl
    from graphrl.types import ModelSpec

    config = json.loads((Path(directory) / "config.json").read_text())
    return ModelDecl("m", ModelSpec.from_hf_config(config), "policy", True)


def hf_module_logprobs(directory: str, tokens: Any, mask: Any) -> Any:
    """log p(token | prefix) of Hugging Face's own module loaded from `directory`
    (AutoModelForCausalLM, fp32), position ids counted from each row's first real token
    as every graphrl engine counts them; 0 at position 0."""
    import torch
    import transformers

    from graphrl.backends.engines.hf import positions

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask.long(),
                       position_ids=positions(mask)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


def _families(rank: int, world: int, configs: list, _: Any) -> list:
    """Per config [family, directory, tp, pp, sp, micro-batches]: the megatron engine on the
    checkpoint against the HF engine on it (compare) and against HF's own module
    (`hf_module`: log-probs' max difference at real positions)."""
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.megatron import MegatronEngine

    results = []
    for family, directory, tp, pp, sp, mb in configs:
        gpus = list(range(tp * pp))
        groups = megatron_process_groups(rank, gpus, 1, tp, pp)
        if rank not in gpus:
            continue
        decl = family_decl(directory)
        options = {"lr": 1e-2, "checkpoint": directory}
        eng = MegatronEngine(decl, options, ranks=gpus, rank=rank, groups=groups, tp=tp,
                             pp=pp, sequence_parallel=sp, micro_batches=mb)
        ref = HFEngine(decl, options)
        inputs, _ = batch("lm", ref)
        fed = inputs["rollout"]
        att = fed["attention_mask"]
        keep = (att * torch_pad(att)) > 0
        mine = eng.forward({"tokens": fed["tokens"], "attention_mask": att})["logprobs"]
        own = hf_module_logprobs(directory, fed["tokens"], att)
        results.append({"config": [family, tp, pp],
                        "hf_module": float((mine - own)[keep].abs().max()),
                        **compare(eng, ref, "lm")})
    return results


def torch_pad(att: Any) -> Any:
    """The mask shifted right by one (position i: was i - 1 a real token)."""
    import torch

    return torch.nn.functional.pad(att[:, :-1], (1, 0))


def two_parts(eng: Any, ref: Any, head: str) -> dict[str, float]:
    """A one-pass train given in two calls (train_loop.TwoParts: part="head", then
    "rest") against the reference's one call on the whole batch: the update's relative
    error and the loss's."""
    inputs, loss = batch(head, ref)
    n = next(iter(next(iter(inputs.values())).values())).shape[0]
    halves = [slice(0, n // 2), slice(n // 2, n)]
    start = ref.export_weights()
    for part, rows in zip(("head", "rest"), halves):
        s1 = eng.train({k: {f: t[rows] for f, t in p.items()} for k, p in inputs.items()},
                       loss=loss, seed=5, part=part)
    s2 = ref.train(inputs, loss=loss, seed=5)
    return {"parts_update": _update_error(eng.export_weights(), ref.export_weights(), start),
            "parts_loss": abs(s1["loss"] - s2["loss"])}


def _deepspeed(rank: int, world: int, configs: list, _: Any) -> list:
    import torch.distributed as dist

    from graphrl.backends.engines.deepspeed_engine import DeepSpeedEngine
    from graphrl.backends.engines.hf import HFEngine

    selfs = [dist.new_group([r]) for r in range(world)]
    mesh = dist.new_group(list(range(world)))
    results = []
    for family, head, zero, mb, offload in configs:
        decl = tiny_decl(family, head)
        eng = DeepSpeedEngine(decl, {"lr": 1e-2}, ranks=list(range(world)), rank=rank,
                              group=mesh, self_group=selfs[rank], zero=zero,
                              micro_batches=mb, offload=offload)
        ref = HFEngine(decl, {"lr": 1e-2})
        results.append({"config": [family, head, zero, mb, offload],
                        **compare(eng, ref, head)})
    return results


def worker(rank: int, world: int, port: int, which: str, configs: list, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn = {"megatron": _megatron, "families": _families}.get(which, _deepspeed)
        results = fn(rank, world, configs, None)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def spawn(worker: Any, args: tuple, world: int, out: str, timeout_s: float, what: str) -> Any:
    """Spawn `world` ranks of worker(rank, world, port, *args) on a free local port, kill
    them after `timeout_s`; the JSON rank 0 wrote to `out`."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(worker, args=(world, port, *args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what} ranks did not finish in {timeout_s} s")
    with open(out) as f:
        return json.load(f)


def run(which: str, world: int, configs: list, out: str, timeout_s: float = 300.0) -> list:
    """Spawn `world` ranks running `configs`; rank 0's results."""
    return spawn(worker, (which, configs, out), world, out, timeout_s, f"{which} differential")


if __name__ == "__main__":   # manual run: python tests/engine_diff.py megatron 4 CONFIGS
    print(run(sys.argv[1], int(sys.argv[2]), eval(sys.argv[3]), "/tmp/engine_diff.json"))
