"""insert-reshard: move trained weights into the layout their next reader wants.

Wherever a model's weights are produced in one layout (the train call's mesh and
strategy) and consumed in another (its generate call's), a `reshard[model]` system node
is inserted before the consumer. Its attributes carry the symbolic transfer plan's
totals (bytes on the busiest link, total network bytes, the source layout) and the bytes
each GPU sends (`sent`, which lower prices); the plan itself (which source rank sends
which slice to which destination rank) is built from the shard algebra by
graphrl/reshard_plan.py. When both layouts share GPUs the generation ranks are ordered
for zero-redundancy grouping (HybridFlow §5.4). Reshards already in the graph (a placed
graph read back and re-placed) are replaced, not doubled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graphrl.cost import reshard_received_bytes
from graphrl.evaluation import EVAL_EVERY
from graphrl.graph import SYSTEM, Graph, Node, Placement, Value
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.shard import ModelLayout, model_layout, spec_params
from graphrl.types import DTYPE_BYTES, ModelSpec

from .context import PassContext
from graphrl.reshard_plan import ModelTransferPlan, plan_model_reshard, zero_redundancy_mesh


def weight_layout(spec: ModelSpec, mesh: DeviceMesh, strategy: Strategy,
                  layers: int | None = None) -> ModelLayout:
    """The weights' layout under a strategy: TP slices, pipeline stages, and for ZeRO-3
    FSDP2's even dim-0 chunks over data-parallel ranks (other stages replicate weights).
    `layers` limits the model to its first layers (see representative_plan)."""
    params = spec_params(spec)
    if layers is not None:
        params = tuple(p for p in params if p.layer_index is None or p.layer_index < layers
                       or p.layer_index == spec.num_layers or p.layer_index == -1)
    return model_layout(params, mesh, strategy, num_layers=spec.num_layers, zero_format="dim0")


@dataclass(frozen=True)
class ReshardTraffic:
    """Per-GPU bytes a reshard moves over the network."""

    sent: tuple[tuple[int, int], ...]
    received: tuple[tuple[int, int], ...]

    @property
    def max_link_bytes(self) -> int:
        return max([b for _, b in self.sent] + [b for _, b in self.received] + [0])

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in self.sent)

    def sent_by(self, gpu: int) -> int:
        return dict(self.sent).get(gpu, 0)

    def sent_text(self) -> str:
        """`gpu:bytes,...` of the GPUs that send (the reshard node's `sent` attribute)."""
        return ",".join(f"{g}:{b}" for g, b in self.sent if b)


def parse_sent(text: str) -> dict[int, int]:
    """A reshard node's `sent` attribute -> GPU -> bytes it sends."""
    out = {}
    for item in filter(None, str(text).split(",")):
        gpu, _, nbytes = item.partition(":")
        out[int(gpu)] = int(nbytes)
    return out


def strip_reshards(graph: Graph) -> Graph:
    """The graph without its reshard nodes, their readers reading the weights again."""
    for n in [n for n in graph.nodes if n.kind == SYSTEM and n.target == "reshard"]:
        out = n.outputs[0].name
        for c in graph.consumers().get(out, ()):
            graph = graph.rename_input(c.name, out, n.inputs[0])
        graph = graph.with_nodes(m for m in graph.nodes if m.name != n.name)
    return graph


def plan_traffic(spec: ModelSpec, src: Placement, dst: Placement,
                 exact: bool = True) -> ReshardTraffic:
    """Per-GPU traffic of the full transfer plan. Decoder layers of one model have the
    same shapes and, without pipeline stages, the same layouts: the plan of one layer is
    computed and scaled by the layer count (exact for pp == 1). Beyond
    EXACT_PLAN_MAX_GPUS GPUs, or without `exact`, the closed form of analytic_traffic."""
    if (not exact or len(set(src.mesh.gpus) | set(dst.mesh.gpus)) > EXACT_PLAN_MAX_GPUS
            or spec.lora is not None):   # LoRA: the adapters move, closed form over them
        return analytic_traffic(spec, src, dst)
    if src.strategy.pp == 1 and dst.strategy.pp == 1 and spec.num_layers > 1:
        one = _plan(spec, src, dst, layers=1)
        rest = _plan(spec, src, dst, layers=0)
        scale = spec.num_layers
        sent = {g: rest.bytes_sent_by(g) + scale * (one.bytes_sent_by(g) - rest.bytes_sent_by(g))
                for g in set(src.mesh.gpus) | set(dst.mesh.gpus)}
        recv = {g: rest.bytes_received_by(g)
                + scale * (one.bytes_received_by(g) - rest.bytes_received_by(g))
                for g in set(src.mesh.gpus) | set(dst.mesh.gpus)}
    else:
        full = _plan(spec, src, dst, layers=None)
        gpus = set(src.mesh.gpus) | set(dst.mesh.gpus)
        sent = {g: full.bytes_sent_by(g) for g in gpus}
        recv = {g: full.bytes_received_by(g) for g in gpus}
    return ReshardTraffic(tuple(sorted(sent.items())), tuple(sorted(recv.items())))


EXACT_PLAN_MAX_GPUS = 32  # larger reshards use the closed form below (the exact
                          # planner is O(source pieces x destination pieces) per tensor)


def analytic_traffic(spec: ModelSpec, src: Placement, dst: Placement) -> ReshardTraffic:
    """Closed-form per-GPU traffic (HybridFlow §5.4): each destination GPU receives its
    generation shard M/(t_g p_g) minus the part of it that it already holds of the
    training layout when it is one of the training GPUs (graphrl.cost.
    reshard_received_bytes); senders share the total evenly."""
    m = spec.sync_bytes
    st, sg = src.strategy, dst.strategy
    src_gpus = set(src.mesh.gpus)
    own = int(reshard_received_bytes(m, st, sg, colocated=True))
    other = int(reshard_received_bytes(m, st, sg, colocated=False))
    received = {g: own if g in src_gpus else other for g in dst.mesh.gpus}
    total = sum(received.values())
    sent = {g: total // len(src_gpus) for g in src_gpus}
    gpus = src_gpus | set(dst.mesh.gpus)
    return ReshardTraffic(tuple(sorted((g, sent.get(g, 0)) for g in gpus)),
                          tuple(sorted((g, received.get(g, 0)) for g in gpus)))


def _plan(spec: ModelSpec, src: Placement, dst: Placement, layers: int | None
          ) -> ModelTransferPlan:
    return plan_model_reshard(weight_layout(spec, src.mesh, src.strategy, layers),
                              weight_layout(spec, dst.mesh, dst.strategy, layers),
                              itemsize=DTYPE_BYTES[spec.dtype])


def generation_placement(train: Placement, gen: Placement) -> Placement:
    """Reorder a generation mesh on the training GPUs for zero-redundancy grouping."""
    if set(train.mesh.gpus) != set(gen.mesh.gpus) or train.mesh.size != gen.mesh.size:
        return gen
    try:
        return replace(gen, mesh=zero_redundancy_mesh(train.mesh, train.strategy, gen.strategy))
    except ValueError:
        return gen


RANKING_EXACT_GPUS = 16   # ranking finalists: exact plans up to this many GPUs, closed
                          # form beyond (the exact planner takes seconds on 32 GPUs with
                          # pipeline stages; the winner's is then planned exactly)


@dataclass(frozen=True)
class InsertReshard:
    exact: bool = True     # False: the closed form everywhere
    name: str = "insert-reshard"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        graph = strip_reshards(graph)
        exact = self.exact and not (ctx.ranking and ctx.cluster.num_gpus > RANKING_EXACT_GPUS)
        trains = {n.model: n for n in graph.nodes if n.target == "train" and n.placement}
        made: dict[tuple[str, Placement], str] = {}   # one reshard per weights and layout
        for n in list(graph.nodes):
            if n.target != "generate" or n.model not in trains or n.placement is None:
                continue
            src = trains[n.model].placement
            dst = generation_placement(src, n.placement)
            if dst != n.placement:
                graph = graph.replace_node(n.name, replace(n, placement=dst))
                n = graph.node(n.name)
            if src == dst:
                continue
            spec = graph.model(n.model).spec
            if ctx.cluster.gpu.name == "cpu":  # CPU engines send the fp32 master weights
                spec = replace(spec, dtype="fp32")
            weights = n.inputs[0]
            if (weights, dst) in made:   # e.g. an eval step's sampled and greedy generate
                graph = graph.rename_input(n.name, weights, made[(weights, dst)])
                continue
            traffic = plan_traffic(spec, src, dst, exact)
            taken = {v.name for v in graph.values()}
            name = next(f"{weights}.gen{k or ''}" for k in range(len(taken) + 2)
                        if k != 1 and f"{weights}.gen{k or ''}" not in taken)
            made[(weights, dst)] = name
            out = Value(name, graph.value(weights).spec)
            every = n.attr(EVAL_EVERY)   # a reshard for an eval generate runs when it does
            node = Node(SYSTEM, "reshard", (weights,), (f"Weights[{n.model}]",), (out,),
                        n.model, (("max_link_bytes", traffic.max_link_bytes),
                                  ("network_bytes", traffic.total_bytes),
                                  ("sent", traffic.sent_text()),
                                  ("src", f"{src.mesh.text()}:{src.strategy.text()}"))
                        + (((EVAL_EVERY, every),) if every is not None else ())
                        + ((("sync", "adapters"),) if spec.lora is not None else ()),
                        dst)
            graph = graph.insert_before(n.name, node).rename_input(n.name, weights, out.name)
        return graph
