"""The engine registry (backends/engines/registry.py): one builder per engine the compiler
plans with, one-process engines built anywhere, multi-rank engines refused without a mesh
(naming the model and the engine), unknown names refused."""
from __future__ import annotations

import importlib.util

import pytest

import graphrl as gr
from graphrl.backends.engines import registry
from graphrl.engines import ENGINES


def decl(engine: str) -> gr.ModelDecl:
    spec = gr.ModelSpec("llama", 16, 32, 2, 2, 2, 64, 32, "lm", dtype="fp32")
    return gr.ModelDecl("actor", spec, "policy", True, engine)


def test_every_planned_engine_has_a_builder():
    assert set(registry.BUILDERS) == set(ENGINES) == set(registry.MULTI_RANK)


@pytest.mark.parametrize("engine,cls", [("hf", "HFEngine"), ("fast", "FastEngine")])
def test_one_process_engines_build_without_a_mesh(engine, cls):
    eng = registry.create_engine(engine, decl(engine), {}, "cpu", 0)
    assert type(eng).__name__ == cls and eng.version == 0


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_multi_rank_engines_need_a_mesh(engine):
    with pytest.raises(gr.UsageError, match=f"model actor: engine {engine} runs over a "
                                            "mesh.*--backend ray"):
        registry.create_engine(engine, decl(engine), {}, "cpu", 0)


def test_an_unknown_engine_is_refused_by_name():
    with pytest.raises(gr.UsageError, match="model actor: unknown engine 'nope'"):
        registry.create_engine("nope", decl("hf"), {})


def test_installed_follows_the_packages():
    assert registry.installed("hf") and registry.installed("fast")
    assert registry.installed("deepspeed") == (importlib.util.find_spec("deepspeed")
                                               is not None)


def test_the_local_executor_refuses_a_multi_rank_engine():
    import dataclasses

    from conftest import load_build
    from graphrl.backends.local import LocalExecutor

    program = load_build("grpo")(gr.RunOptions(batch_size=8)).program()
    models = dict(program.models)
    models["policy"] = dataclasses.replace(models["policy"], engine="deepspeed")
    with pytest.raises(gr.UsageError, match="model policy: engine deepspeed runs over a "
                                            "mesh"):
        LocalExecutor(dataclasses.replace(program, models=models))
