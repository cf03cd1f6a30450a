"""Weight reshards of a RayExecutor step (mixin): plan each reshard node's transfers on the
engines' real layouts, run them on their GPUs (torch.distributed point-to-point), and
record the bytes each GPU sent beside the compiled plan's figure.

A reshard node with sync="adapters" (a LoRA model: passes/insert_reshard.py) moves the
adapter tensors only (graphrl.lora.is_adapter_tensor): its TransferPlan covers the
generation engine's lora_A / lora_B and nothing else, since that engine holds the same
frozen base from the start (built from the same seed or model directory; a resumed
run loads it from the checkpoint)."""
from __future__ import annotations

from typing import Any

import ray

from graphrl.graph import Node
from graphrl.types import DTYPE_BYTES

from .group import gather
from .report import ReshardRecord
from .values import _Value

ITEMSIZE = 4   # engines hold float32 weights; reshards move them as float32


class ReshardSteps:
    """Reshard methods of RayExecutor (uses its graph, plan, engines, layouts, group,
    versions, timeout_s, reshards and _submit/_weights)."""

    def _plan_reshards(self) -> dict[str, tuple[Any, Any]]:
        """Reshard node -> (TransferPlan, its Ray object), on the engines' real layouts."""
        from graphrl.reshard_plan import plan_model_reshard

        out = {}
        for n in self.graph.nodes:
            if n.target != "reshard":
                continue
            src, dst = self.layouts.get(n.model), self.layouts.get(self.engines.gen_engine[n.model])
            if src is None or dst is None:     # noop engines
                out[n.name] = (None, None)
                continue
            if n.attr("sync") == "adapters":
                dst = adapter_layout(dst, n)
            tp = plan_model_reshard(src, dst, itemsize=ITEMSIZE)
            out[n.name] = (tp, ray.put(tp))
        return out

    def _run_reshard(self, n: Node, env: dict[str, _Value], iteration: int
                     ) -> dict[int, Any]:
        src, dst = n.model, self.engines.gen_engine[n.model]
        token = self._weights(n, env, src)
        tp, tp_ref = self._transfer_plans[n.name]
        if tp is None:   # noop engines: every GPU of the gang just stamps
            gang = sorted({w for w, i in self.plan.instrs() if i.op == "reshard"
                           and i.node == n.name})
        else:
            from .reshard import participants

            gang = list(participants(tp))
        stats = {}
        for rank in gang:
            r, _ = self._submit(rank, "reshard_node", n, n.name, n.call, n.model, iteration,
                                tp_ref, src, dst, timeout_s=self.timeout_s)
            stats[rank] = r
        self.versions[dst] = token.version
        env[n.outputs[0].name] = _Value(token=token)
        return stats

    def _check_reshard(self, n: Node) -> tuple[str, Any, Any]:
        src, dst = self.engines.specs[n.model], self.engines.specs[self.engines.gen_engine[n.model]]
        want = {r: self.group.actors[r].export_weights.remote(src.key) for r in src.gpus}
        got = {r: self.group.actors[r].export_weights.remote(dst.key) for r in dst.gpus}
        return n.name, want, got

    def _record_reshards(self, reshards: list[tuple[Node, dict[int, Any]]],
                         checks: list[tuple[str, Any, Any]], iteration: int) -> None:
        import torch

        exact: dict[str, bool] = {}
        for name, want, got in checks:
            w = gather(want, f"export_weights (check of {name})", self.timeout_s)
            gt = gather(got, f"export_weights (check of {name})", self.timeout_s)
            ref = next(iter(w.values()))
            # a bf16 generation copy holds the training (fp32 master) weights rounded to
            # bf16: exact means equal to that rounding, bit for bit
            exact[name] = all(list(ws) == list(ref) and all(
                torch.equal(ws[k], ref[k].to(ws[k].dtype)) for k in ref)
                for ws in list(w.values()) + list(gt.values()))
        for n, refs in reshards:
            stats = {r: ray.get(ref, timeout=self.timeout_s) for r, ref in refs.items()}
            tp = self._transfer_plans[n.name][0]
            compiled = {w: i.nbytes for w, i in self.plan.instrs()
                        if i.op == "reshard" and i.node == n.name}
            spec = self.graph.model(n.model).spec
            self.reshards.append(ReshardRecord(
                iteration, n.name, n.model,
                {r: (s.sent_bytes if s is not None else 0) for r, s in stats.items()},
                {r: tp.bytes_sent_by(r) for r in stats} if tp is not None else {},
                compiled, ITEMSIZE / self._planned_itemsize(spec), exact.get(n.name),
                str(n.attr("sync") or "weights"),
                {r: (s.received_bytes if s is not None else 0) for r, s in stats.items()}))

    def _planned_itemsize(self, spec: Any) -> int:
        """Bytes per weight the compiled plan counted: float32 on a cpu cluster (what the
        CPU engines hold), else the spec's serving dtype."""
        return 4 if self.plan.cluster.gpu.name == "cpu" else DTYPE_BYTES[spec.dtype]


def adapter_layout(layout: Any, n: Node) -> Any:
    """`layout` restricted to the LoRA adapter tensors (what an adapter sync moves)."""
    from graphrl.errors import ExecutionError
    from graphrl.lora import is_adapter_tensor
    from graphrl.shard import ModelLayout

    kept = tuple((k, v) for k, v in layout.items() if is_adapter_tensor(k))
    if not kept:
        raise ExecutionError(f"node {n.name} (reshard[{n.model}]) syncs adapters, but the "
                             f"generation engine of {n.model} holds no lora_A / lora_B "
                             "tensors")
    return ModelLayout(kept)
