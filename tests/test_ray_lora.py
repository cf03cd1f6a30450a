"""LoRA on the Ray executor (4 fake GPUs on CPU): `--lora policy:r=8` with the policy
trained by FSDP2 on GPUs 0-1 (peft inside fully_shard: the base frozen, the adapters
trained), generation on replicas on GPUs 2-3 fed by an adapter-only reshard each step
(GRPO: the fast engine, decoding from the merged adapters; PPO: hf, peft unmerged),
and the reference as the policy's shared base: a forward on the policy's own FSDP
engine with the adapters off (no weights of its own anywhere).

Compared with the local backend at the tolerances of tests/test_ray_executor.py (fp32:
identical samples, losses to 1e-5; FSDP2 sums the two half-minibatch gradients in
another order than one process). The reshards move the adapters only: each generation
GPU receives ModelSpec.sync_bytes per step (the plan's figure), and after each the
generation copies equal the trained weights bit for bit, base included (built from the
same seed). A checkpointed Ray run resumes to the uninterrupted run's rows; its --save
is a PEFT adapter directory peft loads with the trained model's log-probs; in bf16 the
workers (FSDP2, or data-parallel hf replicas) hold a bf16 base with fp32 adapters and
fp32 Adam state for the adapters only. LoRA on megatron is refused before Ray starts;
an automatic Ray plan for a LoRA policy never picks it. LoRA on DeepSpeed inside a Ray
run: tests/test_ray_deepspeed_lora.py.
"""
from __future__ import annotations

import dataclasses
import io
import json

import pytest

pytest.importorskip("ray")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import graphrl as gr  # noqa: E402
from conftest import load_build  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.checkpoint import published  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.errors import UsageError  # noqa: E402
from graphrl.lora import is_adapter_tensor  # noqa: E402
from graphrl.runner import run_experiment  # noqa: E402

PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
             "policy.generate": {"gpus": "2-3"}}
# PPO's critic as data-parallel hf replicas (gradients all-reduced) beside generation
PPO_PLACEMENT = {**PLACEMENT, "critic.train": {"gpus": "2-3", "dp": 2, "zero": 0}}
LORA = ("policy:r=8",)
ITERATIONS, BATCH, SEED = 2, 8, 0
TIMEOUT = 60.0


def options(precision: str = "fp32", **kw) -> gr.RunOptions:
    return gr.RunOptions(batch_size=BATCH, seed=SEED, precision=precision, lora=LORA,
                         quiet=True, **{"iterations": ITERATIONS, **kw})


def experiment(name: str, precision: str = "fp32", engine: str = "hf"):
    """The example without its reward-model pre-training (both sides need the same
    reward model, not a trained one), its policy on `engine`."""
    exp = load_build(name)(options(precision))
    models = tuple(dataclasses.replace(m, engine=engine) if m.name == "policy" else m
                   for m in exp.models)
    return dataclasses.replace(exp, models=models, prepare=None, iterations=ITERATIONS)


def close(a, b, keys):
    """The local-vs-Ray tolerances of tests/test_ray_executor.py."""
    assert a["reward_mean"] == b["reward_mean"]              # identical samples
    assert a["rm_score/score_mean"] == pytest.approx(b["rm_score/score_mean"], rel=1e-6)
    for key in keys:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def logprobs(module, tokens):
    with torch.no_grad():
        logits = module(input_ids=tokens).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]


# -- GRPO on the fast engine: rows, engines, adapter-only reshards ------------------------
@pytest.fixture(scope="module")
def grpo(ray_session):
    """A Ray run and a local run of the GRPO example with LoRA, the policy on the fast
    engine (generation replicas decode from W + (alpha/r) B A, merged at each refresh
    after the adapters arrive); the Ray executor is closed (its GPUs free for the next
    runs) after its trained weights are fetched."""
    from graphrl.backends.ray.executor import RayExecutor

    exp = experiment("grpo", engine="fast")
    program = exp.with_precision(options()).program()
    plan = compile_graph(program.graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT).plan
    local = LocalExecutor(program, seed=SEED)
    local_rows = run_experiment(exp, options(), out=io.StringIO(), executor=local).rows
    ex = RayExecutor(program, plan, seed=SEED, timeout_s=TIMEOUT, check_reshards=True,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        out = io.StringIO()
        summary = run_experiment(exp, options(), out=out, executor=ex)
        ex.trained = ex.weights("policy")   # rank -> FSDP2's all-gathered shards
    finally:
        ex.close()
    return ex, summary.rows, out.getvalue(), local, local_rows, program


def test_grpo_with_lora_on_ray_gives_the_local_rows(grpo):
    ex, rows, _, local, local_rows, _ = grpo
    for a, b in zip(rows, local_rows, strict=True):
        close(a, b, ("policy_stats/loss", "policy_stats/kl"))
    want = local.engines["policy"].export_weights()
    for rank, got in ex.trained.items():
        assert list(got) == list(want)
        for k, w in want.items():
            if is_adapter_tensor(k):   # trained: to float error of the gradient sums
                assert torch.allclose(got[k], w, rtol=1e-4, atol=1e-6), (rank, k)
            else:                      # the frozen base: never changed, bit for bit
                assert torch.equal(got[k], w), (rank, k)
    assert any(not torch.equal(w, torch.zeros_like(w)) for k, w in want.items()
               if ".lora_B." in k)   # the adapters did train (B starts at zero)


def test_the_reference_is_the_policys_fsdp_engine_with_adapters_off(grpo):
    ex, _, out, _, _, _ = grpo
    specs = ex.engines.specs
    assert (specs["policy"].kind, specs["policy"].gpus) == ("fsdp", (0, 1))
    assert (specs["policy.gen"].kind, specs["policy.gen"].gpus) == ("replicas", (2, 3))
    ref = specs["reference"]
    assert (ref.base, ref.kind, ref.gpus) == ("policy", "fsdp", (0, 1))
    assert ex.layouts["reference"] is None   # holds no weights: nothing to reshard or save
    assert ex.engines.node_engine["%reference_logprobs"] == "reference"
    engines = ex.call_engines()
    for call in ("reference.forward", "policy.forward", "policy.train"):
        e = engines[call]   # the policy's engine, FSDP2 over GPUs 0-1, as planned
        assert (e["engine"], e["dp"], e["zero"], e["differs"]) == ("fast", 2, 3, []), call
    assert (engines["policy.generate"]["engine"], engines["policy.generate"]["dp"]) == \
        ("fast", 2)
    assert "reference.forward    0-1" in out


def test_reshards_move_only_the_adapters(grpo):
    ex, _, out, _, _, program = grpo
    spec = program.graph.model("policy").spec   # fp32 here: 4 bytes per adapter weight
    assert spec.sync_bytes == spec.trained_params * 4 < spec.num_params * 4 / 10
    records = ex.reshards
    assert [r.iteration for r in records] == list(range(ITERATIONS))
    for r in records:
        assert r.sync == "adapters"
        assert r.exact is True   # generation copies == trained weights, base included
        assert r.measured == r.transfer_plan == r.compiled
        assert {g: b for g, b in r.received.items() if b} == {2: spec.sync_bytes,
                                                               3: spec.sync_bytes}
        assert sum(r.measured.values()) == 2 * spec.sync_bytes
    assert "reshard[policy] (LoRA adapters only) bytes sent per GPU" in out
    assert (f"received per GPU, per step: {{2: {spec.sync_bytes}, 3: {spec.sync_bytes}}}"
            in out)


# -- PPO: rows, checkpoint and resume, --save and --save-merged -----------------------------
@pytest.fixture(scope="module")
def ppo(ray_session, tmp_path_factory):
    """PPO with LoRA through the runner on --backend ray (compiled for 1x4xcpu with the
    placement file), checkpointed every iteration, saved; the local run beside it."""
    d = tmp_path_factory.mktemp("ray_lora_ppo")
    exp = experiment("ppo")
    local = LocalExecutor(exp.with_precision(options()).program(), seed=SEED)
    local_rows = run_experiment(exp, options(), out=io.StringIO(), executor=local).rows
    placement = d / "placement.json"
    placement.write_text(json.dumps(PPO_PLACEMENT))
    ray = dict(backend="ray", cluster="1x4xcpu", placement=str(placement),
               call_timeout=TIMEOUT)
    out = io.StringIO()
    rows = run_experiment(exp, options(**ray, checkpoint_dir=str(d / "ckpt"),
                                       checkpoint_every=1, keep=ITERATIONS,
                                       save=str(d / "adapter"), save_merged=str(d / "merged")),
                          out=out).rows
    return exp, rows, out.getvalue(), local, local_rows, ray, d


def strip(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_ppo_with_lora_on_ray_gives_the_local_rows_and_resumes(ppo):
    exp, rows, out, _, local_rows, ray, d = ppo
    for a, b in zip(rows, local_rows, strict=True):
        close(a, b, ("policy_stats/loss", "policy_stats/approx_kl", "critic_stats/loss"))
    assert "reshard[policy] (LoRA adapters only)" in out
    first, last = published(d / "ckpt")
    state = torch.load(first / "models" / "policy.pt", weights_only=False)
    assert set(state["optimizer"]["state"]) == {k for k in state["weights"]
                                                if is_adapter_tensor(k)}
    assert "weights" not in torch.load(first / "models" / "reference.pt", weights_only=False)
    resumed = run_experiment(exp, options(**ray, resume=str(first)), out=io.StringIO())
    assert strip(resumed.rows) == strip(rows)   # the uninterrupted run, exactly


def test_ray_save_is_a_peft_adapter_with_the_trained_log_probs(ppo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from graphrl.backends.engines.hf import HFEngine

    exp, _, out, _, _, _, d = ppo
    adapter = d / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "critic" / "config.json").is_file() and "saved:" in out
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter / "base"),
                                       adapter)
    # the engine of the trained policy: the Ray run's last checkpoint (its final state)
    last = published(d / "ckpt")[-1]
    engine = HFEngine(exp.with_precision(options()).program().models["policy"].decl(), {})
    engine.load_state_dict(torch.load(last / "models" / "policy.pt", weights_only=False))
    tokens = torch.randint(0, 16, (4, 10), generator=torch.Generator().manual_seed(4))
    want = engine.forward({"tokens": tokens})["logprobs"][:, 1:]
    assert torch.allclose(logprobs(loaded, tokens), want, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(d / "merged")   # W + (alpha/r) B A
    assert torch.allclose(logprobs(merged, tokens), want, atol=1e-4)


# -- bf16: what the workers hold -------------------------------------------------------------
@pytest.mark.parametrize("zero,kind", [(3, "fsdp2"), (0, "replicas")])
def test_bf16_workers_hold_a_bf16_base_and_fp32_adapters(ray_session, tmp_path, zero, kind):
    """FSDP2 (zero=3) and data-parallel hf replicas (zero=0: adapter gradients
    all-reduced) train the policy in bf16 as one process does."""
    from graphrl.backends.engines.precision import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 kernels")
    exp = experiment("grpo", "bf16")
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({**PLACEMENT, "policy.train": {
        "gpus": "0-1", "dp": 2, "zero": zero}}))
    opts = options("bf16", backend="ray", cluster="1x4xcpu", placement=str(placement),
                   call_timeout=TIMEOUT, iterations=1, checkpoint_dir=str(tmp_path / "c"))
    out = io.StringIO()
    rows = run_experiment(dataclasses.replace(exp, iterations=1), opts, out=out).rows
    local = run_experiment(dataclasses.replace(exp, iterations=1),
                           dataclasses.replace(opts, backend="local", checkpoint_dir=None),
                           out=io.StringIO()).rows
    assert rows[0]["reward_mean"] == local[0]["reward_mean"]   # same base: same samples
    # bf16 autocast over batch halves rounds differently from one process: close only
    assert rows[0]["policy_stats/loss"] == pytest.approx(local[0]["policy_stats/loss"],
                                                         rel=2e-2)
    state = torch.load(published(tmp_path / "c")[-1] / "models" / "policy.pt",
                       weights_only=False)
    dtypes: dict = {}
    for k, t in state["weights"].items():
        dtypes.setdefault(is_adapter_tensor(k), set()).add(t.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
    moments = state["optimizer"]["state"]
    assert set(moments) == {k for k in state["weights"] if is_adapter_tensor(k)}
    assert {s["exp_avg"].dtype for s in moments.values()} == {torch.float32}
    import re

    assert re.search(rf"policy.train +0-1 .*engine=hf dp=2 .*zero={zero} micro_batches=1 "
                     r"offload=0 precision=bf16 yes", out.getvalue()), kind


# -- refused before launch: megatron only ------------------------------------------------
def test_lora_on_megatron_on_ray_is_refused_naming_the_call():
    """DeepSpeed runs LoRA on Ray (tests/test_ray_deepspeed_lora.py); megatron-core does
    not (no LoRA on its parallel linears): refused naming the call."""
    from graphrl.backends.ray.assign import refuse_lora_engines

    graph = experiment("grpo").with_precision(options()).program().graph
    calls = {n.name: n.call for n in graph.nodes if n.kind == "call"}
    for call, what in (("policy.train", r"\(policy.train\): model policy trains LoRA "
                                        r"adapters; on --backend ray .* not megatron"),
                       ("reference.forward", "is the shared base of policy")):
        chosen = {name: ("megatron" if c == call else "hf") for name, c in calls.items()}
        with pytest.raises(UsageError, match=what):
            refuse_lora_engines(graph, chosen)
    for engine in ("hf", "fast", "deepspeed"):
        refuse_lora_engines(graph, {name: engine for name in calls})


def test_a_ray_run_pinning_lora_to_megatron_is_refused_before_ray_starts(tmp_path):
    from graphrl.runner import make_executor

    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({**PLACEMENT, "policy.train": {
        "gpus": "0-1", "dp": 2, "engine": "megatron"}}))
    opts = options(backend="ray", cluster="1x4xcpu", placement=str(placement))
    with pytest.raises(UsageError, match=r"model policy: engine megatron cannot run this "
                                         r"llama model: it does not implement LoRA"):
        make_executor(experiment("grpo").with_precision(opts).program(), opts)


@pytest.mark.parametrize("cluster", ["1x4xcpu", "2x4xcpu"])
def test_an_automatic_ray_plan_for_lora_is_one_the_executor_runs(cluster):
    """`graphrl run --backend ray` compiles (graphrl.launch.compile_for) a plan whose
    engines the Ray executor accepts for a LoRA policy: never megatron (the search
    skips engines without LoRA: graphrl.architecture.ENGINE_FEATURES)."""
    from graphrl.backends.ray.assign import refuse_lora_engines
    from graphrl.engines import resolve_engines
    from graphrl.launch import compile_for

    opts = options(backend="ray", cluster=cluster)
    program = experiment("grpo").with_precision(opts).program()
    plan = compile_for(program, opts).plan
    chosen = resolve_engines(plan.graph, {n: m.engine for n, m in program.models.items()})
    assert "megatron" not in chosen.values()
    refuse_lora_engines(plan.graph, chosen)


def test_ray_checkpoints_list_the_local_backends_shapes():
    """A Ray checkpoint's manifest names the models' tensors as the local backend's does
    (the peft module's names, and for the shared base its owner's), so LoRA checkpoints
    resume across the backends."""
    from types import SimpleNamespace

    from graphrl.backends.ray.state import model_shapes

    program = experiment("grpo").with_precision(options()).program()
    local = LocalExecutor(program, seed=SEED).model_shapes()
    assert model_shapes(SimpleNamespace(program=program)) == local
    assert local["reference"] == local["policy"] and any(map(is_adapter_tensor,
                                                             local["policy"]))
