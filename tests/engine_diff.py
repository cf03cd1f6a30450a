"""Differential checks of sharded training engines against a one-process HFEngine, run in
spawned gloo processes (tests/test_engine_megatron.py, test_engine_deepspeed.py).

Each rank builds the engine under test and an HFEngine on the same seeded weights, runs a
forward and several optimizer steps (2 epochs x 2 minibatches, lr 1e-2) on the same
batch, and rank 0 writes what it measured (max abs differences) to a JSON file.
Response masks have unequal lengths per row, so micro-batch weighting matters. In fp32
the lm head trains a user's loss from its own file (tests/data/user_loss.py: PPO's
surrogate as a per-sequence mean, weighted by rows), so every engine runs a loss it did
not ship with, through the LossDef path the built-ins take too, and the rows measure is
what weights its micro-batches, data-parallel ranks and two-part trains; in bf16 the
built-in ppo (token-weighted), with which the bf16 tolerances were measured.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from graphrl.backends.engines.spawn import init_rank, megatron_process_groups  # noqa: F401
from graphrl.backends.engines.spawn import ENGINE_MODULES
from graphrl.backends.engines.spawn import spawn as spawn_ranks

B, S, VOCAB = 8, 12, 32


def tiny_decl(family: str, head: str, precision: str = "fp32") -> Any:
    """The differential tests compare exactness: fp32 unless asked otherwise."""
    from graphrl.graph import ModelDecl
    from graphrl.types import ModelSpec

    kv = 2 if family == "llama" else 4   # GQA for Llama
    spec = ModelSpec(family, VOCAB, 64, 4, 4, kv, 128, 64, head,
                     tie_embeddings=family == "gpt2", dtype=precision)
    return ModelDecl("m", spec, "policy", True)


def batch(head: str, ref: Any, eng: Any = None) -> tuple[dict, Any]:
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
                 "advantages": {"advantages": torch.randn(B, S, generator=g)}},
                "ppo" if eng is not None and eng.degrees()["precision"] == "bf16"
                else user_loss())
    return ({"rollout": {"tokens": toks, "attention_mask": att, "response_mask": mask},
             "old_values": {"values": out},
             "returns": {"returns": torch.randn(B, S, generator=g)}}, "value")


def user_loss() -> Any:
    """tests/data/user_loss.py's seq_mean_pg, loaded as `--loss` loads it."""
    from pathlib import Path

    from graphrl.example_file import load_loss

    return load_loss(f"{Path(__file__).parent / 'data' / 'user_loss.py'}:seq_mean_pg")


def compare(eng: Any, ref: Any, head: str) -> dict[str, float]:
    import torch

    inputs, loss = batch(head, ref, eng)
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
    we = {k: v.float() for k, v in eng.export_weights().items()}   # bf16 modules: as fp32
    wr = ref.export_weights()
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
            if not torch.equal(a.reshape(want.shape).float(), want.float()):
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


def _megatron(rank: int, world: int, configs: list, groups_of: Any) -> list:
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.megatron import MegatronEngine

    results = []
    for config in configs:
        family, head, dp, tp, pp, sp, mb, zero = config[:8]
        precision = config[8] if len(config) > 8 else "fp32"
        gpus = list(range(dp * tp * pp))
        groups = megatron_process_groups(rank, gpus, dp, tp, pp)
        if rank not in gpus:
            continue
        decl = tiny_decl(family, head, precision)
        eng = MegatronEngine(decl, {"lr": 1e-2}, ranks=gpus, rank=rank, groups=groups, dp=dp,
                             tp=tp, pp=pp, sequence_parallel=sp, micro_batches=mb, zero=zero)
        ref = HFEngine(tiny_decl(family, head), {"lr": 1e-2})   # the fp32 reference
        results.append({"config": config, **compare(eng, ref, head),
                        **two_parts(eng, ref, head), **held(eng, eng.module)})
    return results


def held(eng: Any, module: Any) -> dict[str, Any]:
    """What an engine reports it ran in and what it holds: its parameters' and its
    optimizer state's dtypes (after training)."""
    opt = eng.optimizer
    inner = getattr(opt, "optim", None) or getattr(opt, "optimizer", None) or opt
    state = {str(v.dtype) for st in inner.state.values() for v in st.values()
             if hasattr(v, "dtype") and v.numel() > 1}
    return {"precision": eng.degrees()["precision"],
            "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            "state_dtypes": sorted(state)}


def family_decl(directory: str) -> Any:
    """The lm-head decl of a saved HF directory (graphrl.families checkpoints)."""
    from dataclasses import replace
    from pathlib import Path

    from graphrl.graph import ModelDecl
    from graphrl.types import ModelSpec

    config = json.loads((Path(directory) / "config.json").read_text())
    return ModelDecl("m", replace(ModelSpec.from_hf_config(config), dtype="fp32"), "policy",
                     True)


def _families(rank: int, world: int, configs: list, _: Any) -> list:
    """Per config [family, directory, tp, pp, sp, micro-batches]: the megatron engine on the
    checkpoint against the HF engine on it (compare) and against HF's own module
    (`hf_module`: log-probs' max difference at real positions)."""
    import torch

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
        keep = real_pairs(att)
        mine = eng.forward({"tokens": fed["tokens"], "attention_mask": att})["logprobs"]
        with torch.no_grad():
            own = hf_logprobs(hf_module(directory), fed["tokens"], att)
        results.append({"config": [family, tp, pp],
                        "hf_module": float((mine - own)[keep].abs().max()),
                        **compare(eng, ref, "lm")})
    return results



def two_parts(eng: Any, ref: Any, head: str) -> dict[str, float]:
    """A one-pass train given in two calls (train_loop.TwoParts: part="head", then
    "rest") against the reference's one call on the whole batch: the update's relative
    error and the loss's."""
    inputs, loss = batch(head, ref, eng)
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
    for config in configs:
        if len(config) == 2:   # [family, checkpoint directory]: tests/test_model_families.py
            results.append(_deepspeed_family(rank, world, *config, mesh, selfs[rank]))
            continue
        family, head, zero, mb, offload = config[:5]
        precision = config[5] if len(config) > 5 else "fp32"
        decl = tiny_decl(family, head, precision)
        eng = DeepSpeedEngine(decl, {"lr": 1e-2}, ranks=list(range(world)), rank=rank,
                              group=mesh, self_group=selfs[rank], zero=zero,
                              micro_batches=mb, offload=offload)
        ref = HFEngine(tiny_decl(family, head), {"lr": 1e-2})   # the fp32 reference
        results.append({"config": config, **compare(eng, ref, head),
                        **(entropy_step(eng, ref) if head == "lm" else {}),
                        "precision": eng.degrees()["precision"],
                        "param_dtypes": sorted({str(p.dtype)
                                                for p in eng.hf.module.parameters()})})
    return results


def entropy_step(eng: Any, ref: Any) -> dict[str, float]:
    """One ppo step with the entropy bonus (forward.with_entropy) on both engines, from
    the weights compare left them at: the losses' difference and the relative error of
    the engine's own update against the reference's."""
    import torch

    inputs, _ = batch("lm", ref)
    e0 = {k: v.float() for k, v in eng.export_weights().items()}
    r0 = ref.export_weights()
    s1 = eng.train(inputs, loss="ppo", seed=7, entropy_coef=0.1)
    s2 = ref.train(inputs, loss="ppo", seed=7, entropy_coef=0.1)
    e1 = {k: v.float() for k, v in eng.export_weights().items()}
    r1 = ref.export_weights()
    de = torch.cat([(e1[k] - e0[k]).reshape(-1) for k in r0])
    dr = torch.cat([(r1[k] - r0[k]).reshape(-1) for k in r0])
    return {"entropy_loss": abs(s1["loss"] - s2["loss"]),
            "entropy_update": float((de - dr).norm() / dr.norm())}


def hf_logprobs(module: Any, tokens: Any, att: Any) -> Any:
    """Per-token log-probs of Hugging Face's own causal-LM `module`, each row run alone
    on its real tokens (no padding, no mask: the reference for left-padded batches);
    0 at padding and at each row's first token, as the engines return them."""
    import torch

    out = torch.zeros(tokens.shape, dtype=torch.float32)
    for i in range(tokens.shape[0]):
        real = att[i].nonzero().squeeze(-1)
        ids = tokens[i, real].unsqueeze(0)
        lp = torch.log_softmax(module(input_ids=ids).logits.float()[0, :-1], -1)
        out[i, real[1:]] = lp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return out


def hf_module(directory: str) -> Any:
    """Hugging Face's own causal-LM module of a saved directory, fp32, eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32).eval()


def real_pairs(att: Any) -> Any:
    """Positions whose log-prob is read: a real token after a real one."""
    import torch

    return (att * torch.nn.functional.pad(att[:, :-1], (1, 0))) > 0


def _deepspeed_family(rank: int, world: int, family: str, path: str, mesh: Any,
                      self_group: Any) -> dict:
    """ZeRO-3 over all ranks on a checkpoint directory of a model family: its log-probs
    against HF's own module, then `compare` against HFEngine."""
    import torch

    import graphrl as gr
    from graphrl.backends.engines.deepspeed_engine import DeepSpeedEngine
    from graphrl.backends.engines.hf import HFEngine

    decl = gr.Model("m", path, role="policy", trainable=True, precision="fp32").decl()
    options = {"lr": 1e-2, "checkpoint": path}
    eng = DeepSpeedEngine(decl, options, ranks=list(range(world)), rank=rank, group=mesh,
                          self_group=self_group, zero=3)
    ref = HFEngine(decl, options)
    hf = hf_module(path)
    inputs, _ = batch("lm", ref)
    fed = {k: inputs["rollout"][k] for k in ("tokens", "attention_mask")}
    with torch.no_grad():
        want = hf_logprobs(hf, fed["tokens"], fed["attention_mask"])
    got = eng.forward(fed)["logprobs"]
    keep = real_pairs(fed["attention_mask"])
    return {"config": [family, path], "hf_module": float((got - want)[keep].abs().max()),
            **compare(eng, ref, "lm")}


def worker(rank: int, world: int, port: int, which: str, configs: list, out: str) -> None:
    import torch.distributed as dist

    init_rank(rank, world, port)
    try:
        fn = {"megatron": _megatron, "families": _families}.get(which, _deepspeed)
        results = fn(rank, world, configs, None)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def spawn(worker: Any, args: tuple, world: int, out: str, timeout_s: float, what: str) -> Any:
    """Spawn `world` ranks of worker(rank, world, port, *args) (graphrl's spawn: killed
    after `timeout_s`; forked from the fork server that imported ENGINE_MODULES once
    this session, not each rank anew); the JSON rank 0 wrote to `out`."""
    spawn_ranks(worker, args, world, timeout_s, what, preload=ENGINE_MODULES)
    with open(out) as f:
        return json.load(f)


def run(which: str, world: int, configs: list, out: str, timeout_s: float = 300.0) -> list:
    """Spawn `world` ranks running `configs`; rank 0's results."""
    return spawn(worker, (which, configs, out), world, out, timeout_s, f"{which} differential")


if __name__ == "__main__":   # manual run: python tests/engine_diff.py megatron 4 CONFIGS
    print(run(sys.argv[1], int(sys.argv[2]), eval(sys.argv[3]), "/tmp/engine_diff.json"))
