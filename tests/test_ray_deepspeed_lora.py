"""LoRA on DeepSpeed inside a Ray run (4 fake GPUs on CPU): `--lora policy:r=8` with the
GRPO policy's train pinned to DeepSpeed ZeRO-3 (dp 2, GPUs 0-1) by a placement file,
generation on hf replicas on GPUs 2-3, started as `graphrl run --backend ray` starts it
(graphrl.launch.start_executor: compiled, checked, then Ray).

The reference is the policy's shared base: lora_hf.SharedBase over each rank's
DeepSpeedEngine, its forward a collective of the DeepSpeed mesh with the adapters off.
Compared with the local backend's hf LoRA run at the DeepSpeed-vs-local tolerances of
tests/test_ray_engines.py; each step's reshard moves the adapters only (out of ZeRO-3's
flat partitions): ModelSpec.sync_bytes to each generation GPU, the generation copies then
equal to the trained weights bit for bit. The run's sharded checkpoint resumes on Ray
onto DeepSpeed ZeRO-2; its --save is a PEFT adapter peft loads with the trained
log-probs, its --save-merged a plain HF model with them. Without a placement file the
compiler itself puts this LoRA policy on DeepSpeed ZeRO-1 beside its generation; that plan
runs too.
"""
from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("deepspeed")

from test_ray_lora import ITERATIONS, PLACEMENT, TIMEOUT, experiment, logprobs, options  # noqa: E402,I001

torch = pytest.importorskip("torch")

from graphrl.backends.engines.shard_state import read_model_state  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.checkpoint import published  # noqa: E402
from graphrl.lora import is_adapter_tensor  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

ZERO3 = {**PLACEMENT, "policy.train": {"engine": "deepspeed", "gpus": "0-1", "dp": 2,
                                       "zero": 3}}
ZERO2 = {**PLACEMENT, "policy.train": {"engine": "deepspeed", "gpus": "0-1", "dp": 2,
                                       "zero": 2}}


def ray_options(placement, **kw):
    return options(backend="ray", cluster="1x4xcpu", placement=str(placement),
                   call_timeout=TIMEOUT, **kw)


def run_on_ray(exp, opts):
    """`exp` on an executor started as `graphrl run --backend ray` starts one (reshards
    checked after each); returns (summary, output, executor facts), the executor closed."""
    from graphrl.launch import start_executor

    ex = start_executor(exp.with_precision(opts).program(), opts, out=None,
                        check_reshards=True)
    try:
        out = io.StringIO()
        summary = run_experiment(exp, opts, out=out, executor=ex)
        facts = {"trained": ex.weights("policy"), "engines": ex.call_engines(),
                 "reshards": list(ex.reshards), "specs": dict(ex.engines.specs),
                 "layouts": dict(ex.layouts)}
    finally:
        ex.close()
    return summary, out.getvalue(), facts


@pytest.fixture(scope="module")
def local():
    exp = experiment("grpo")
    ex = LocalExecutor(exp.with_precision(options()).program(), seed=0)
    rows = run_experiment(exp, options(), out=io.StringIO(), executor=ex).rows
    return ex, rows


@pytest.fixture(scope="module")
def zero3(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_ds_lora")
    placement = d / "zero3.json"
    placement.write_text(json.dumps(ZERO3))
    exp = experiment("grpo")
    opts = ray_options(placement, checkpoint_dir=str(d / "ckpt"), checkpoint_every=1,
                       keep=ITERATIONS, save=str(d / "adapter"), save_merged=str(d / "merged"))
    return (exp, d) + run_on_ray(exp, opts)


def close_to_local(rows, local_rows):
    """tests/test_ray_engines.py's DeepSpeed-vs-local tolerances."""
    for r, l in zip(rows, local_rows, strict=True):
        assert r["reward_mean"] == pytest.approx(l["reward_mean"], abs=1e-6)
        for key in ("policy_stats/loss", "policy_stats/kl"):
            assert r[key] == pytest.approx(l[key], rel=1e-3, abs=1e-5), key


def test_deepspeed_zero3_lora_on_ray_gives_the_local_rows(zero3, local):
    _, _, summary, _, facts = zero3
    local_ex, local_rows = local
    close_to_local(summary.rows, local_rows)
    assert any(r["policy_stats/kl"] != 0 for r in summary.rows[1:])   # the adapters moved
    want = local_ex.engines["policy"].export_weights()
    for rank, got in facts["trained"].items():   # ZeRO-3 gathered on every rank
        assert list(got) == list(want), rank
        for k, w in want.items():
            if is_adapter_tensor(k):
                assert torch.allclose(got[k], w, rtol=1e-3, atol=1e-5), (rank, k)
            else:   # the frozen base, never changed
                assert torch.equal(got[k], w), (rank, k)


def test_the_reference_runs_on_the_deepspeed_engine_with_adapters_off(zero3):
    _, _, _, out, facts = zero3
    specs = facts["specs"]
    assert (specs["policy"].kind, specs["policy"].gpus) == ("deepspeed", (0, 1))
    ref = specs["reference"]
    assert (ref.base, ref.kind, ref.gpus) == ("policy", "deepspeed", (0, 1))
    assert facts["layouts"]["reference"] is None   # holds nothing of its own
    for call in ("reference.forward", "policy.forward", "policy.train"):
        e = facts["engines"][call]
        assert (e["engine"], e["dp"], e["zero"], e["differs"]) == ("deepspeed", 2, 3, []), \
            (call, e)
    assert facts["engines"]["policy.generate"]["engine"] == "hf"


def test_reshards_move_only_the_adapters_out_of_zero3(zero3):
    exp, _, _, out, facts = zero3
    spec = exp.with_precision(options()).program().graph.model("policy").spec
    assert spec.sync_bytes == spec.trained_params * 4 < spec.num_params * 4 / 10
    records = facts["reshards"]
    assert [r.iteration for r in records] == list(range(ITERATIONS))
    for r in records:
        assert (r.sync, r.exact) == ("adapters", True)   # gen copies == trained, base too
        assert r.measured == r.transfer_plan == r.compiled
        assert {g: b for g, b in r.received.items() if b} == {2: spec.sync_bytes,
                                                               3: spec.sync_bytes}
        # ZeRO-3: each rank sends its flat half of every adapter
        assert sum(r.measured.values()) == 2 * spec.sync_bytes
        assert r.measured[0] > 0 and r.measured[1] > 0
    assert (f"received per GPU, per step: {{2: {spec.sync_bytes}, 3: {spec.sync_bytes}}}"
            in out)


def test_the_zero3_checkpoint_resumes_on_zero2(zero3, local):
    """Every rank wrote its shard; the adapters alone have Adam state; resumed on Ray
    onto DeepSpeed ZeRO-2 from the first checkpoint, the run continues as the
    uninterrupted one (and the local run) within the tolerances above."""
    exp, d, summary, _, _ = zero3
    first = published(d / "ckpt")[0]
    manifest = json.loads((first / "manifest.json").read_text())
    for f in ("rank0.pt", "rank1.pt", "index.json"):
        assert f"models/policy/{f}" in manifest["files"], f
    assert "models/reference.pt" in manifest["files"]
    state = read_model_state(first / "models", "policy")
    assert set(state["optimizer"]["state"]) == {k for k in state["weights"]
                                                if is_adapter_tensor(k)}
    placement = d / "zero2.json"
    placement.write_text(json.dumps(ZERO2))
    resumed, out, facts = run_on_ray(exp, ray_options(placement, resume=str(first)))
    assert "resumed from" in out
    assert facts["engines"]["policy.train"]["zero"] == 2
    assert facts["engines"]["reference.forward"]["engine"] == "deepspeed"
    assert resumed.rows[0] == summary.rows[0]   # restored from the checkpoint
    close_to_local(resumed.rows, local[1])
    r, u = resumed.rows[-1], summary.rows[-1]
    assert r["reward_mean"] == u["reward_mean"]
    assert r["policy_stats/loss"] == pytest.approx(u["policy_stats/loss"], rel=1e-5, abs=1e-7)
    for rec in facts["reshards"]:   # ZeRO-2: a full copy per rank, adapters only moved
        assert (rec.sync, rec.exact) == ("adapters", True)
        assert rec.measured == rec.transfer_plan == rec.compiled


def test_ray_save_of_a_deepspeed_policy_is_a_peft_adapter(zero3):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from graphrl.backends.engines.hf import HFEngine

    exp, d, _, out, _ = zero3
    assert (d / "adapter" / "adapter_config.json").is_file() and "saved:" in out
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(d / "adapter" / "base"), d / "adapter")
    last = published(d / "ckpt")[-1]   # the final state, as the DeepSpeed ranks wrote it
    engine = HFEngine(exp.with_precision(options()).program().models["policy"].decl(), {})
    engine.load_state_dict(read_model_state(last / "models", "policy"))
    tokens = torch.randint(0, 16, (4, 10), generator=torch.Generator().manual_seed(4))
    want = engine.forward({"tokens": tokens})["logprobs"][:, 1:]
    assert torch.allclose(logprobs(loaded, tokens), want, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(d / "merged")   # W + (alpha/r) B A
    assert torch.allclose(logprobs(merged, tokens), want, atol=1e-4)


def test_the_automatic_ray_plan_runs_lora_on_deepspeed_zero1(ray_session, local):
    """Without a placement file the compiler puts this LoRA policy on DeepSpeed ZeRO-1
    over GPUs 0-3 beside its generation (the plan `graphrl run --backend ray` makes);
    it runs and gives the local rows, adapters alone resharded into the generation
    copies on the same GPUs."""
    exp = experiment("grpo")
    opts = options(backend="ray", cluster="1x4xcpu", call_timeout=TIMEOUT)
    summary, _, facts = run_on_ray(exp, opts)
    train = facts["engines"]["policy.train"]
    assert (train["engine"], train["dp"], train["zero"], train["differs"]) == \
        ("deepspeed", 4, 1, [])
    assert facts["engines"]["reference.forward"]["engine"] == "deepspeed"
    close_to_local(summary.rows, local[1])
    for r in facts["reshards"]:   # ZeRO-1: every rank holds the adapters whole
        assert (r.sync, r.exact) == ("adapters", True)
        assert r.measured == r.transfer_plan == r.compiled
        assert set(r.received.values()) == {0}   # copied on each GPU, nothing sent


def test_the_driver_copy_of_a_policy_declared_on_deepspeed_is_the_hf_peft_model():
    """--save of a Ray run writes from a driver-side engine (RayExecutor.driver_engine):
    for a policy declared engine="deepspeed" that is the one-process hf engine over the
    same peft model, loading the names the DeepSpeed ranks export."""
    from graphrl.backends.engines.hf import HFEngine
    from graphrl.backends.ray.driver_engines import DriverEngines

    program = experiment("grpo", engine="deepspeed").with_precision(options()).program()
    assert program.models["policy"].engine == "deepspeed"
    trained = LocalExecutor(experiment("grpo").with_precision(options()).program(),
                            seed=1).engines["policy"].export_weights()
    eng = DriverEngines(program, seed=0).holding("policy", lambda name: trained)
    assert isinstance(eng, HFEngine) and hasattr(eng.module, "disable_adapter")
    got = eng.export_weights()
    assert list(got) == list(trained)
    assert all(torch.equal(got[k], w) for k, w in trained.items())
