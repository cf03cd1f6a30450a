"""benchmarks/published_setups.py's HybridFlow "split" column and the decode-cost physics
its ReaLHF section leans on."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from graphrl import cost
from graphrl.cluster import H100_80G
from graphrl.parallel import Strategy
from graphrl.serving import serve_generate
from graphrl.types import llama2


@pytest.fixture(scope="module")
def bench(root):
    path = root / "benchmarks" / "published_setups.py"
    spec = importlib.util.spec_from_file_location("published_setups_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_hybridflow_split_column_is_a_lowered_grouped_plan(bench):
    """Actor (+ generation) and reference on one pool, critic and reward on the other:
    a plan exists, it is no faster than `hybridflow`'s best grouping by more than the
    lowering's adjustments, and an impossible grouping reads as infeasible."""
    graph = bench.build("ppo", model_size="7b", prompt_len=128, response_len=128,
                        batch_size=64)
    grouped = bench.predict_grouped(graph, "1x8xH100", bench.HF_SPLIT)
    best, _ = bench.predict(graph, "1x8xH100", "hybridflow")
    assert grouped is not None and best is not None
    assert grouped >= best * 0.97
    five = [[u] for u in ("policy", "policy.generate", "reference", "critic", "reward")]
    assert bench.predict_grouped(graph, "1x4xH100", five) is None   # 5 pools, 4 GPUs


def test_decode_cost_grows_faster_than_the_tokens_when_kv_dominates():
    """Every decode step reads the whole KV cache (Pope et al. 2022 §2): at a large batch
    with a long context the step is KV-bound, so 3x the response tokens cost more than 3x
    the decode time; at batch 1 the weights dominate and it is about 3x."""
    spec = llama2("7b")
    s = Strategy(dp=1, tp=1)

    def decode(batch: int, new: int) -> float:
        r = serve_generate(spec, batch, 512, new, s, H100_80G, "graph")
        return dict(r.breakdown)["decode"]

    assert decode(128, 1536) > 3.3 * decode(128, 512)
    assert decode(1, 1536) == pytest.approx(3 * decode(1, 512), rel=0.08)
    step = [cost.generate_breakdown(spec, 128, ctx, 2, s, H100_80G, "graph")["decode_step"]
            for ctx in (512, 1024, 2048)]
    assert step[2] - step[1] == pytest.approx(2 * (step[1] - step[0]), rel=0.05)  # linear in KV


def test_partial_runs_never_replace_the_full_doc_and_name_their_commit(bench, tmp_path,
                                                                        capsys):
    """--only without --out is refused (the default doc holds every section); outside a
    git checkout the doc says so instead of an empty commit hash."""
    doc = bench.DEFAULT_OUT.read_text()
    with pytest.raises(SystemExit) as e:
        bench.main(["--only", "realhf"])
    assert e.value.code == 2 and "give --out FILE.md" in capsys.readouterr().err
    assert bench.DEFAULT_OUT.read_text() == doc
    assert bench.source_commit(tmp_path) == "an unknown commit (not a git checkout)"
    assert bench.source_commit(bench.ROOT).startswith("commit ")
