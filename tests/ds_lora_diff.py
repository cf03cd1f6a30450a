"""LoRA on the DeepSpeed engine against the HF LoRA engine (peft), in spawned gloo ranks
(tests/test_deepspeed_lora.py; the process harness and `compare` of engine_diff.py).

Per config [zero, family, targets, precision, micro-batches(, "offload")] each rank builds a DeepSpeed
LoRA engine over all ranks and a one-process HF LoRA engine (fp32) on the same seeded
base and adapters, then measures (engine_diff.compare: forward, 4 AdamW steps, weights
and update against the reference) and what the engine holds: the base bit-unchanged by
training, the names of the parameters in DeepSpeed's optimizer and the elements of Adam
state on this rank, dtypes, the merged export against lora_hf.merged_weights of the
reference, and the shared base (lora_hf.SharedBase over the engine: adapters off)
against a plain HF engine of the base. "checkpoint": ckpt_engines._steps with LoRA (a
ZeRO-2 engine saves its shards, a ZeRO-2 engine resumes, a ZeRO-3 engine and the HF
LoRA engine load the same state). Rank 0 writes the results to a JSON file.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine_diff import batch, compare, family_decl, spawn, tiny_decl

from graphrl.backends.engines.spawn import init_rank

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_decl(family: str, targets: str, precision: str, folder: str) -> tuple[Any, dict]:
    """(decl, engine options): the tiny llama of engine_diff, or a saved tiny Qwen2
    checkpoint (q/k/v biases), with LoRA r=4 on q_proj,v_proj or all seven linears."""
    import graphrl as gr

    lora = gr.LoRA(r=4, alpha=8.0, targets=ALL if targets == "all" else ("q_proj", "v_proj"))
    options: dict[str, Any] = {"lr": 1e-2}
    if family == "llama":
        decl = tiny_decl("llama", "lm", precision)
    else:   # saved by `run` before the ranks start
        path = Path(folder) / family
        decl = family_decl(str(path))
        decl = replace(decl, spec=replace(decl.spec, dtype=precision))
        options["checkpoint"] = str(path)
    return replace(decl, spec=replace(decl.spec, lora=lora)), options


def held(eng: Any) -> dict[str, Any]:
    """What DeepSpeed's optimizer holds: the names of the parameters in its groups, the
    elements of Adam state on this rank (exp_avg), and dtypes."""
    from graphrl.backends.engines.deepspeed_state import _base

    opt = eng.ds.optimizer
    if eng.zero == 3:
        groups = opt.fp16_groups
    elif eng.zero:
        groups = opt.bit16_groups
    else:
        groups = [g["params"] for g in opt.param_groups]
    names = {id(p): n for n, p in eng.module.named_parameters()}
    state = [s for s in _base(eng).state.values() if s]
    return {"optimized": sorted(names[id(p)] for g in groups for p in g),
            "state_numel": sum(int(s["exp_avg"].numel()) for s in state),
            "state_dtypes": sorted({str(t.dtype) for s in state for k, t in s.items()
                                    if k != "step"}),
            "frozen_dtypes": sorted({str(p.dtype) for p in eng.module.parameters()
                                     if not p.requires_grad}),
            "precision": eng.degrees()["precision"]}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def one(rank: int, world: int, config: list, mesh: Any, self_group: Any,
        folder: str) -> dict[str, Any]:
    import torch

    from graphrl.backends.engines.deepspeed_engine import DeepSpeedEngine
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.engines.lora_hf import SharedBase, merged_weights
    from graphrl.graph import ModelDecl

    zero, family, targets, precision, mb = config[:5]
    offload = bool(config[5:] and config[5] == "offload")   # ZeRO-Offload of Adam's state
    decl, options = lora_decl(family, targets, precision, folder)
    eng = DeepSpeedEngine(decl, options, ranks=list(range(world)), rank=rank, group=mesh,
                          self_group=self_group, zero=zero, micro_batches=mb,
                          offload=offload)
    ref_decl, _ = lora_decl(family, targets, "fp32", folder)
    ref = HFEngine(ref_decl, options)   # the fp32 HF LoRA reference (peft)
    adapters = [n for n, p in ref.module.named_parameters() if p.requires_grad]
    inputs, _ = batch("lm", ref)
    fed = {k: inputs["rollout"][k] for k in ("tokens", "attention_mask")}
    untrained = eng.forward(fed)["logprobs"]   # B = 0: the base's function, as this engine
    before = eng.export_weights()
    out: dict[str, Any] = {"config": config, **compare(eng, ref, "lm")}
    # the HF LoRA engine in the engine's own precision (bf16: bf16 base, fp32 adapters,
    # autocast): the same log-probs before training, bit for bit
    same = HFEngine(decl, options).forward(fed)["logprobs"]
    out["forward_same_precision"] = float((untrained - same).abs().max())
    after = eng.export_weights()
    base_names = [k for k in after if k not in adapters]
    out["base_unchanged"] = all(torch.equal(before[k], after[k]) for k in base_names)
    out["adapters_moved"] = min(float((after[k].float() - before[k].float()).abs().max())
                                for k in adapters if ".lora_B." in k)
    out["export_dtypes"] = sorted({str(after[k].dtype) for k in adapters})
    out["adapter_names"] = sorted(adapters)
    out["adapter_numel"] = sum(int(after[k].numel()) for k in adapters)
    out["base_numel"] = sum(int(after[k].numel()) for k in base_names)
    out.update(held(eng))
    # the merged export (W + (alpha / r) B A): against peft's module of the reference
    mine, theirs = eng.merged_weights(), merged_weights(ref.module)
    out["merged_names"] = list(mine) == list(theirs)
    out["merged"] = _max_diff(mine, theirs)
    # the shared base: this engine's forward with the adapters off = the plain base's
    base_decl = replace(decl, spec=replace(decl.spec, lora=None))
    shared = SharedBase(ModelDecl("reference", base_decl.spec, "reference", False), eng)
    plain = HFEngine(replace(ref_decl, spec=replace(ref_decl.spec, lora=None)), options)
    keep = fed["attention_mask"].bool()
    got = shared.forward(fed)["logprobs"]
    want = plain.forward(fed)["logprobs"]
    trained = eng.forward(fed)["logprobs"]   # the adapters on again: not the base
    out["shared_forward"] = float((got - want)[keep].abs().max())
    # bit-exact against this engine before training (the base computed as it computes)
    out["shared_is_untrained"] = bool(torch.equal(got, untrained))
    out["trained_vs_base"] = float((trained - want)[keep].abs().max())
    mine = shared.export_weights()   # the base as held (bf16: the fp32 base rounded once)
    theirs = plain.export_weights()
    out["shared_export_names"] = list(mine) == list(theirs)
    if config[:4] == [3, "llama", "qv", "fp32"]:
        out.update(saved_adapter(eng, fed, Path(folder) / "adapter"))
    out["shared_export"] = max(float((mine[k].float() - theirs[k].to(mine[k].dtype).float())
                                     .abs().max()) for k in theirs)
    return out


def saved_adapter(eng: Any, fed: dict, target: Path) -> dict[str, Any]:
    """--save of a ZeRO-3 LoRA policy: every rank gathers the weights, rank 0 writes the
    PEFT adapter directory (lora_hf.save_adapter; the base built in code goes to
    target/base); peft's PeftModel.from_pretrained on that base gives the engine's
    log-probs (at real positions, each row run alone: engine_diff.hf_logprobs)."""
    import torch
    import torch.distributed as dist

    from engine_diff import hf_logprobs, real_pairs, hf_module
    from graphrl.backends.engines.lora_hf import save_adapter

    with eng.gathered():
        if eng.dp_rank == 0:
            save_adapter(str(target), eng, None, {}, None)
    dist.barrier(group=eng.group)
    mine = eng.forward(fed)["logprobs"]
    if eng.dp_rank:
        return {}
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_module(str(target / "base")), str(target)).eval()
    with torch.no_grad():
        theirs = hf_logprobs(model, fed["tokens"], fed["attention_mask"])
    keep = real_pairs(fed["attention_mask"])
    return {"saved_adapter": float((mine - theirs)[keep].abs().max()),
            "saved_files": sorted(p.name for p in target.iterdir())}


def checkpoint(rank: int, world: int, mesh: Any, self_group: Any, folder: str) -> dict:
    from ckpt_engines import _steps

    from graphrl.backends.engines.deepspeed_engine import DeepSpeedEngine
    from graphrl.backends.engines.hf import HFEngine

    decl, options = lora_decl("llama", "qv", "fp32", folder)

    def make(which: str) -> Any:
        return DeepSpeedEngine(decl, options, ranks=list(range(world)), rank=rank,
                               group=mesh, self_group=self_group,
                               zero=2 if which == "a" else 3, micro_batches=2)
    return _steps(make, HFEngine(decl, options), "lm", Path(folder) / "ckpt", "policy")


def worker(rank: int, world: int, port: int, configs: list, folder: str, out: str) -> None:
    import torch.distributed as dist

    init_rank(rank, world, port)
    try:
        selfs = [dist.new_group([r]) for r in range(world)]
        mesh = dist.new_group(list(range(world)))
        results = []
        for config in configs:
            if config == "checkpoint":
                results.append(checkpoint(rank, world, mesh, selfs[rank], folder))
            else:
                results.append(one(rank, world, config, mesh, selfs[rank], folder))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run(configs: list, folder: str, world: int = 2, timeout_s: float = 600.0) -> list:
    from graphrl.families import TINY, save_random_checkpoint

    for family in {c[1] for c in configs if isinstance(c, list) and c[1] != "llama"}:
        save_random_checkpoint(TINY[family], Path(folder) / family, seed=0)
    out = str(Path(folder) / "ds_lora.json")
    return spawn(worker, (configs, folder, out), world, out, timeout_s, "deepspeed LoRA")


if __name__ == "__main__":   # manual: python ds_lora_diff.py "[[1,'llama','qv','fp32',1]]"
    import sys
    import tempfile

    print(json.dumps(run(eval(sys.argv[1]), tempfile.mkdtemp()), indent=1))
