"""Engines built on the Ray driver for an Experiment's `prepare` (RayExecutor.prepare)."""
from __future__ import annotations

from typing import Any, Mapping

from graphrl.trace import Program


class DriverEngines(Mapping[str, Any]):
    """Engines built on the driver on first use, for an Experiment's `prepare` (e.g.
    reward-model training) and a run's --save (`holding`), seeded as the workers'
    engines are. A model declared on a multi-rank engine (megatron, deepspeed) gets the
    one-process hf engine here: the same HF module (LoRA: the same peft model), whose
    names those engines export their weights under."""

    def __init__(self, program: Program, seed: int):
        self.program, self.seed, self.built = program, seed, {}

    def __getitem__(self, name: str) -> Any:
        if name not in self.built:
            from graphrl.backends.engines.registry import MULTI_RANK, create_engine

            m = self.program.models[name]
            kind = "hf" if MULTI_RANK.get(m.engine) else m.engine
            eng = create_engine(kind, m.decl(), m.engine_options(), "cpu", self.seed)
            if m.init_from:
                eng.load_weights(self[m.init_from].export_weights())
            self.built[name] = eng
        return self.built[name]

    def holding(self, name: str, export: Any) -> Any:
        """The engine of model `name` with the weights `export(name)` gives loaded (those
        of the workers' engine: a trained model, LoRA adapters and all)."""
        eng = self[name]
        eng.load_weights(export(name))
        return eng

    def __iter__(self):
        return iter(self.program.models)

    def __len__(self) -> int:
        return len(self.program.models)


__all__ = ["DriverEngines"]
