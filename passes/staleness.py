"""staleness{k=K}: asynchronous off-policy steps as a graph rewrite.

With staleness K >= 1 the rollouts generated at step n are consumed at step n+K: each
generate call on a trained model gets two more outputs (the behaviour policy's per-token
log-probs and each sequence's policy version), and every value the scoring and training
side reads from generation — plus every step input that side reads (the prompts, say) —
goes through a K-deep queue of graph inputs fed by carries:

    input %rollout_prev : Rollout[...]
    ...
    %rollout, %rollout_behaviour, %rollout_version = call generate[policy](%policy@0, %prompts) {behaviour=true, ...}
    %policy_logprobs = call forward[policy](%policy@0, %rollout_prev)
    ...
    carry %rollout_prev <- %rollout

So generation has no consumer inside the step: the placement search sees it independent
of the trainers and may run it on a disjoint pool at the same time (AReaL, Fu et al. 2025,
arXiv 2505.24298; verl's fully-async recipe), with the weights pushed to it after each
train. Trains of the generating model switch to the staleness-corrected (decoupled) form
of their loss, which also reads the behaviour log-probs and versions
(backends/losses.py). The first K steps of a run only generate (their queue inputs are
not yet filled): executors skip the nodes that need them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graphrl import signatures as sig
from graphrl.builtin_losses import BUILTIN, DECOUPLED
from graphrl.errors import GraphError, UsageError
from graphrl.graph import CALL, Graph, Node, Value

from .context import PassContext

BEHAVIOUR_CLIP = 2.0   # truncation of pi_prox / pi_behav (losses._decoupled_surrogate)


def stream_cut(max_new_tokens: int) -> int:
    """Where a streamed sequence switches to the next weights (backends/
    stream_generation.py): after half its response budget, at least 1 token."""
    return max(1, int(max_new_tokens) // 2)


def queue_name(value: str, stage: int) -> str:
    """`%rollout` at stage 1 is `%rollout_prev`, at stage j > 1 `%rollout_prev{j}`."""
    return f"{value}_prev" if stage == 1 else f"{value}_prev{stage}"


def pushed_name(model: str) -> str:
    """The generators' copy of a model's weights: `%policy@gen`."""
    return f"%{model}@gen"


def generation_nodes(g: Graph) -> list[Node]:
    """The calls that run on the generation side: generate on a trained model."""
    return [n for n in g.nodes if n.kind == CALL and n.target == "generate"
            and g.model(n.model).trainable]


def carry_rollouts(g: Graph, k: int, stream: bool = True) -> Graph:
    """The graph whose rollouts are consumed K steps after they are generated (module
    doc); k = 0 returns `g` unchanged. `stream`: generation streams across steps
    (attribute `stream_cut`, backends/stream_generation.py): a batch's first
    `stream_cut` response tokens use the weights of its step, the rest the next step's,
    so its long responses finish while the next batch starts."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UsageError(f"--staleness {k!r}: must be an int >= 0 (0: synchronous)")
    if k == 0:
        return g
    gens = generation_nodes(g)
    if not gens:
        raise UsageError(f"--staleness {k}: step @{g.name} has no generate call on a trained "
                         "model, so there is nothing to run ahead of training")
    if any(n.attr("behaviour") for n in gens) or any(c[0].endswith("_prev") for c in g.carries):
        raise UsageError(f"--staleness {k}: step @{g.name} is already rewritten for "
                         "asynchronous steps")
    producers = g.producers()
    gen_names = {n.name for n in gens}
    for n in gens:
        made = [i for i in n.inputs if i in producers]
        if made:
            raise UsageError(f"--staleness {k}: {n.name} ({n.call}) reads {made[0]}, made by "
                             f"{producers[made[0]].name} inside the step; asynchronous "
                             "generation may read only step inputs and weights")
    # 1. generation reads its own copy of the weights, pushed by a carry after each train
    #    (so the train may overwrite the trainer's copy while generation runs), and also
    #    returns behaviour log-probs and the policy version of each sequence
    feeds = dict(g.carries)
    pushed = {n.inputs[0]: Value(pushed_name(n.model), g.value(n.inputs[0]).spec)
              for n in gens}
    new_gens: dict[str, Node] = {}
    for n in gens:
        if n.inputs[0] not in feeds:
            raise UsageError(f"--staleness {k}: {n.name} ({n.call}) reads {n.inputs[0]}, "
                             f"which no train of {n.model} updates")
        rollout = n.outputs[0]
        extra = (Value(f"{rollout.name}_behaviour", sig.forward_spec("lm", rollout.spec)[0]),
                 Value(f"{rollout.name}_version",
                       sig.versions_spec(rollout.spec.batch, rollout.spec.seq)))
        new_gens[n.name] = replace(n, inputs=(pushed[n.inputs[0]].name,) + n.inputs[1:],
                                   outputs=(rollout,) + extra,
                                   attrs=tuple(sorted(n.attrs + (("behaviour", True),) + (
                                       (("stream_cut", stream_cut(
                                           n.attr("max_new_tokens", 1))),)
                                       if stream else ()))))
    # 2. what the other side reads from generation or from the step's data inputs
    gen_values = [v for n in new_gens.values() for v in n.outputs]
    data_inputs = [v for v in g.inputs if not v.spec.is_weights and any(
        v.name in n.inputs for n in g.nodes if n.name not in gen_names)]
    carried = gen_values + data_inputs
    last = {v.name: queue_name(v.name, k) for v in carried}
    # 3. readers move to the queue's last stage; trains of a generating model decouple
    generated_by = {n.outputs[0].name: new_gens[n.name] for n in gens}
    nodes = []
    for n in g.nodes:
        if n.name in new_gens:
            nodes.append(new_gens[n.name])
            continue
        n = replace(n, inputs=tuple(last.get(i, i) for i in n.inputs))
        if n.kind == CALL and n.target == "train":
            n = _decoupled_train(g, n, k, generated_by, last)
        nodes.append(n)
    inputs = list(g.inputs) + list(pushed.values()) + [
        Value(queue_name(v.name, j), v.spec) for v in carried for j in range(1, k + 1)]
    carries = list(g.carries) + [(p.name, feeds[w]) for w, p in pushed.items()] + [(queue_name(v.name, j),
                                  v.name if j == 1 else queue_name(v.name, j - 1))
                                 for v in carried for j in range(1, k + 1)]
    outputs = [last.get(o, o) for o in g.outputs]
    outputs += [last[v.name] for v in gen_values
                if v.spec.kind == sig.VERSIONS and last[v.name] not in outputs]
    out = replace(g, inputs=tuple(inputs), nodes=tuple(nodes), outputs=tuple(outputs),
                  carries=tuple(carries))
    if stream:   # calls that may start on a batch's head-finished groups (stream_train)
        from graphrl.stream_train import mark_head_parts

        out = mark_head_parts(out, k)
    return out


def _decoupled_train(g: Graph, n: Node, k: int, generated_by: dict[str, Node],
                     last: dict[str, str]) -> Node:
    """A train reading a stale rollout of its own model optimises the decoupled loss."""
    loss = n.attr("loss")
    stale = {v: gen for v, gen in generated_by.items() if last[v] in n.inputs}
    own = [gen for gen in stale.values() if gen.model == n.model]
    if not own:
        return n
    if loss not in DECOUPLED:
        raise UsageError(f"--staleness {k}: {n.name} ({n.call}) trains {n.model} with loss "
                         f"{loss!r} on rollouts {n.model} generated {k} step(s) earlier; "
                         f"only {', '.join(DECOUPLED)} have a staleness-corrected form")
    gen = own[0]
    new_loss = BUILTIN[DECOUPLED[loss]]
    untaken = sorted(a for a in n.attr_dict if a not in ("loss", "epochs", "minibatches")
                     and a not in new_loss.options)
    if untaken:
        raise UsageError(f"--staleness {k}: {n.name} ({n.call}) sets {', '.join(untaken)}, "
                         f"which the staleness-corrected loss {new_loss.name!r} does not take "
                         f"(it takes {', '.join(new_loss.options)})")
    named = dict(zip([name for name, _ in BUILTIN[loss].inputs], n.inputs[1:]))
    named["behaviour_logprobs"] = last[gen.outputs[1].name]
    named["versions"] = last[gen.outputs[2].name]
    wanted = new_loss.inputs
    attrs = dict(n.attrs, loss=new_loss.name, staleness=k)
    attrs.setdefault("behaviour_clip", BEHAVIOUR_CLIP)
    return replace(n, inputs=(n.inputs[0],) + tuple(named[name] for name, _ in wanted),
                   expects=(n.expects[0],) + tuple(kind for _, kind in wanted),
                   outputs=(n.outputs[0],
                            Value(n.outputs[1].name, sig.stats_spec(new_loss.stats))),
                   attrs=tuple(sorted(attrs.items())))


def queue_delays(g: Graph) -> dict[str, int]:
    """Value name -> how many steps before the current one the rollout it derives from
    was generated: the j-th stage of a carry queue is j steps old, a value computed in the
    step is as old as its oldest data input, step inputs and weights are 0."""
    feeds = dict(g.carries)
    inputs = {v.name: v for v in g.inputs}
    out: dict[str, int] = {}
    for v in g.inputs:
        hops, name = 0, v.name
        while name in feeds and not v.spec.is_weights:
            hops, name = hops + 1, feeds[name]
            if name not in inputs or hops > len(feeds):
                break
        out[v.name] = hops
    for n in g.nodes:
        age = max((out.get(i, 0) for i in n.inputs
                   if not (i in inputs and inputs[i].spec.is_weights)), default=0)
        out.update((v.name, age) for v in n.outputs)
    return out


def verify_staleness(g: Graph, k: int) -> Graph:
    """The async invariants of a rewritten graph, raising GraphError: no node but
    generation reads a generate output in the step (so generation overlaps training), and
    every node reads each piece of a rollout (tokens, behaviour log-probs, versions) from
    the same step, at most K steps old, and the same age for all of its inputs — so the
    trainer at step n sees samples of policy versions n-K..n only."""
    from graphrl.verify import verify_graph

    verify_graph(g)
    gens = {n.name: n for n in generation_nodes(g)}
    made_by_gen = {v.name for n in gens.values() for v in n.outputs}
    delays = queue_delays(g)
    for n in g.nodes:
        if n.name in gens:
            continue
        early = [i for i in n.inputs if i in made_by_gen]
        if early:
            raise GraphError(f"graph @{g.name}: node {n.name} ({n.call}) reads {early[0]} "
                             "in the step it is generated: generation cannot overlap "
                             "training", n.name)
        ages = {i: delays[i] for i in n.inputs if not g.value(i).spec.is_weights}
        if any(a > k for a in ages.values()):
            worst = max(ages, key=ages.get)
            raise GraphError(f"graph @{g.name}: node {n.name} ({n.call}) reads {worst}, "
                             f"{ages[worst]} steps old, over the staleness bound {k}", n.name)
        if len(set(ages.values())) > 1:
            raise GraphError(f"graph @{g.name}: node {n.name} ({n.call}) mixes inputs of "
                             "different steps: " + ", ".join(f"{i} ({a} old)"
                                                             for i, a in ages.items()), n.name)
        if n.target == "train" and n.attr("loss") in DECOUPLED.values():
            if n.attr("staleness") != k:
                raise GraphError(f"graph @{g.name}: node {n.name} ({n.call}) is marked "
                                 f"staleness={n.attr('staleness')}, the graph is rewritten "
                                 f"for {k}", n.name)
    return g


@dataclass(frozen=True)
class Staleness:
    """The rewrite as a pass: `staleness{k=1}` (k = 0 leaves the graph as it is)."""

    k: int = 0
    name: str = "staleness"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be an integer >= 0, got {self.k!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        out = carry_rollouts(graph, self.k)
        if self.k:
            verify_staleness(out, self.k)
        return out
