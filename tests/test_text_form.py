"""The text form of a Graph: print/parse round trip, the PPO golden file, syntax errors."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import graphrl
from graphrl import (DeviceMesh, Field, Graph, GraphSyntaxError, ModelDecl, ModelSpec, Node,
                     PayloadSpec, Placement, Strategy, Value, parse_graph, print_graph,
                     verify_graph)
from graphrl.graph import NODE_KINDS
from graphrl.schedule import Schedule, Timing
from graphrl.types import DTYPE_BYTES, FAMILIES, HEADS, PRECISIONS, WEIGHTS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

GOLDEN = Path(__file__).resolve().parent / "golden" / "ppo_step.txt"
UPDATE_ENV = "GRAPHRL_UPDATE_GOLDEN"


@functools.lru_cache(maxsize=None)
def ppo_graph() -> Graph:
    from ppo import build

    return build(graphrl.RunOptions(batch_size=4)).program().graph


# -- random valid graphs ----------------------------------------------------------------
# Names must match the parser's lexer: identifiers [A-Za-z_][A-Za-z0-9_.-]*, values
# %[A-Za-z0-9_.@~]+.
_ID_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
_ID_REST = _ID_FIRST + "0123456789.-"
_VALUE_CHARS = _ID_FIRST + "0123456789.@~"

idents = st.builds(lambda a, b: a + b, st.sampled_from(_ID_FIRST),
                   st.text(_ID_REST, max_size=8))
value_names = st.text(_VALUE_CHARS, min_size=1, max_size=10).map(lambda s: "%" + s)
data_kinds = idents.filter(lambda k: k != WEIGHTS)
dtypes = st.sampled_from(sorted(DTYPE_BYTES))
sizes = st.integers(0, 1 << 20)

attr_values = st.one_of(st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                        st.booleans(), st.text(max_size=12),
                        st.sampled_from(['"', '{', '}', ', x=1', '\\', '"}) -> @[0]',
                                         'naïve ☃ \u2028 \x00 \n', "%a, %b", "", " "]))
attr_tuples = st.dictionaries(idents, attr_values, max_size=4).map(
    lambda d: tuple(sorted(d.items())))   # canonical order: the printer sorts by key

fields = st.builds(Field, idents, dtypes, st.booleans())
data_specs = st.builds(PayloadSpec, data_kinds, sizes, sizes,
                       st.lists(fields, max_size=4).map(tuple))


@st.composite
def model_specs(draw) -> ModelSpec:
    kv = draw(st.integers(1, 8))
    heads = kv * draw(st.integers(1, 4))
    hidden = heads * draw(st.integers(1, 128))
    return ModelSpec(draw(st.sampled_from(FAMILIES)), draw(st.integers(1, 200_000)), hidden,
                     draw(st.integers(1, 96)), heads, kv, draw(st.integers(1, 1 << 16)),
                     draw(st.integers(1, 1 << 17)), draw(st.sampled_from(HEADS)),
                     draw(st.booleans()), draw(st.sampled_from(PRECISIONS)))


meshes = st.one_of(
    st.builds(DeviceMesh.range, st.integers(0, 64), st.integers(1, 16)),
    st.lists(st.integers(0, 127), min_size=1, max_size=8, unique=True).map(
        lambda g: DeviceMesh(tuple(g))))
strategies = st.builds(Strategy, st.integers(1, 8), st.integers(1, 8), st.integers(1, 8),
                       st.integers(1, 16), st.integers(0, 3))
placements = st.builds(Placement, meshes, strategies)
seconds = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
byte_counts = st.integers(0, 1 << 45)
timings = st.builds(Timing, seconds, seconds, seconds, byte_counts, byte_counts, seconds)
schedules = st.builds(
    Schedule, st.sampled_from(["1x8xH100-80G", "4x8xA100-80G", "2x4xcpu"]),
    st.sampled_from(["hf", "graph"]),
    st.sampled_from(["", "fixed:512", "lognormal:mean=3072.5,max=16384,sigma=1.0",
                     "empirical:[3,1,4]"]),
    st.floats(0, 0.99), idents, st.integers(1, 8),
    st.lists(st.integers(0, 127), max_size=5, unique=True).map(lambda g: tuple(sorted(g))),
    seconds)


def _kind_of(spec: PayloadSpec) -> str:
    return f"{WEIGHTS}[{spec.model}]" if spec.is_weights else spec.kind


@st.composite
def graphs(draw) -> Graph:
    names: set[str] = set()

    def fresh(strategy=value_names) -> str:
        return draw(strategy.filter(lambda n: n not in names))

    models = []
    for _ in range(draw(st.integers(0, 3))):
        mname = draw(idents.filter(lambda n: n not in names))
        names.add(mname)
        models.append(ModelDecl(mname, draw(model_specs()), draw(idents), draw(st.booleans()),
                                draw(st.sampled_from(["hf", "vllm", "megatron", "x-1.2"]))))
    model_names = [m.name for m in models]
    names.clear()

    def spec() -> PayloadSpec:
        if model_names and draw(st.integers(0, 3)) == 0:
            return PayloadSpec(WEIGHTS, model=draw(st.sampled_from(model_names)),
                               weight_bytes=draw(st.integers(0, 1 << 40)))
        return draw(data_specs)

    inputs = []
    for _ in range(draw(st.integers(0, 4))):
        v = Value(fresh(), spec())
        names.add(v.name)
        inputs.append(v)
    defined = list(inputs)
    nodes = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(NODE_KINDS))
        if kind == "call" and model_names:
            model = draw(st.sampled_from(model_names))
        elif kind == "system" and model_names:
            model = draw(st.sampled_from([""] + model_names))
        else:
            model = ""
        args = draw(st.lists(st.sampled_from(defined), max_size=4)) if defined else []
        expects = tuple(draw(st.sampled_from(["*", _kind_of(a.spec)])) for a in args)
        outs = []
        for _ in range(draw(st.integers(1, 3))):
            v = Value(fresh(), spec())
            names.add(v.name)
            outs.append(v)
        nodes.append(Node(kind, draw(idents), tuple(a.name for a in args), expects,
                          tuple(outs), model, draw(attr_tuples),
                          draw(st.none() | placements), draw(st.just("") | idents),
                          draw(st.none() | timings)))
        defined += outs
    all_names = [v.name for v in defined]
    outputs = tuple(draw(st.lists(st.sampled_from(all_names), max_size=3))) if all_names else ()
    carries = ()
    if inputs:
        carries = tuple(draw(st.lists(st.tuples(st.sampled_from([v.name for v in inputs]),
                                                st.sampled_from(all_names)), max_size=2)))
    return Graph(draw(idents), tuple(models), tuple(inputs), tuple(nodes), outputs, carries,
                 draw(st.none() | schedules))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_round_trip(g: Graph):
    text = print_graph(g)
    back = parse_graph(text)
    assert print_graph(back) == text
    assert back == g


# -- the PPO step: golden text and round trip --------------------------------------------
def test_ppo_graph_matches_golden_text():
    text = print_graph(ppo_graph())
    if os.environ.get(UPDATE_ENV):
        GOLDEN.write_text(text)
    golden = GOLDEN.read_text()
    if text != golden:
        diff = "".join(difflib.unified_diff(golden.splitlines(keepends=True),
                                            text.splitlines(keepends=True),
                                            str(GOLDEN), "traced ppo_step"))
        pytest.fail(f"the traced PPO graph differs from {GOLDEN.name} (rerun with "
                    f"{UPDATE_ENV}=1 to accept):\n{diff}", pytrace=False)


def test_golden_text_reads_as_the_ppo_step():
    golden = GOLDEN.read_text()
    for piece in ("graph @ppo_step {",
                  "model policy = llama{", "role=policy trainable engine=hf",
                  "role=reference frozen", "head=score", "head=value",
                  "input %prompts : Prompts[4, seq=6]{tokens:i64[s], attention_mask:f32[s], row:i64}",
                  "%rollout = call generate[policy](%policy@0, %prompts)",
                  "%advantages, %returns = op gae(",
                  "%policy@1, %policy_stats = call train[policy](%policy@0, %rollout,",
                  "output %task_score, %rm_score, %policy_stats, %critic_stats",
                  "carry %policy@0 <- %policy@1", "carry %critic@0 <- %critic@1"):
        assert piece in golden, piece
    assert golden.endswith("}\n")


def test_ppo_graph_round_trips():
    g = ppo_graph()
    text = print_graph(g)
    back = parse_graph(text)
    assert back == g
    assert print_graph(back) == text
    assert verify_graph(back) == g
    assert parse_graph(GOLDEN.read_text()) == g


def test_placed_graph_round_trips():
    g = ppo_graph()
    where = Placement(DeviceMesh((0, 2, 5)), Strategy(dp=1, tp=3, zero=2))
    placed = g.with_nodes(dataclasses.replace(n, placement=where, group="g0")
                          if n.target == "forward" else n for n in g.nodes)
    text = print_graph(placed)
    assert "@[0,2,5]{dp=1,tp=3,pp=1,zero=2} par=g0" in text
    assert parse_graph(text) == placed


# -- syntax errors ---------------------------------------------------------------------
def _golden_lines() -> list[str]:
    return GOLDEN.read_text().splitlines()


def _syntax_error(lines: list[str]) -> GraphSyntaxError:
    with pytest.raises(GraphSyntaxError) as info:
        parse_graph("\n".join(lines) + "\n")
    return info.value


def _line_index(lines: list[str], start: str) -> int:
    return next(i for i, ln in enumerate(lines) if ln.strip().startswith(start))


def _check_position(err: GraphSyntaxError, lineno: int, line: str, column: int,
                    expected: str) -> None:
    msg = str(err)
    assert msg.startswith(f"line {lineno}, column {column}: expected {expected}"), msg
    shown, caret = msg.splitlines()[1:3]
    assert shown == "  " + line
    assert caret == "  " + " " * (column - 1) + "^"


END = object()   # the error is found at the end of the line


@pytest.mark.parametrize("start, old, new, at, expected", [
    # a missing comma between inputs: the caret sits on the second input
    ("%rollout =", "%policy@0, %prompts", "%policy@0 %prompts", "%prompts", "','"),
    # an attribute value that is neither number, bool nor string
    ("%rollout =", "max_new_tokens=8", "max_new_tokens=eight", "eight", "an attribute value"),
    # a value name without its %
    ("%rm_score =", "(%reward@0, %rollout)", "(%reward@0, rollout)", "rollout)",
     "a value name like %rollout"),
    # an unknown dtype in a payload field
    ("input %prompts", "tokens:i64[s]", "tokens:i63[s]", ", attention_mask",
     "a valid field"),
    # an unknown key in a model spec
    ("model policy", "ffn=128", "fnn=128", "=128", "one of vocab"),
    # zero heads in a model spec (used to escape as ZeroDivisionError)
    ("model policy", "heads=4,", "heads=0,", " role=", "a valid model spec"),
    # fewer output types than output names
    ("%advantages, %returns =", ", Returns[4, seq=14]{returns:f32[s]}", "", END,
     "2 output types"),
    # junk after the end of a node line
    ("%task_score =", "{score:f32}", "{score:f32} extra", "extra", "end of line"),
    # a bad placement: a GPU range that ends before it starts
    ("%rm_score =", "{score:f32}", "{score:f32} @[3-1]{dp=1}", END, "a valid placement"),
    # a carry without its arrow
    ("carry %policy@0", "<- %policy@1", "%policy@1", "%policy@1", "'<-'"),
])
def test_malformed_line_names_line_and_column(start, old, new, at, expected):
    lines = _golden_lines()
    k = _line_index(lines, start)
    assert old in lines[k]
    lines[k] = lines[k].replace(old, new, 1)
    err = _syntax_error(lines)
    column = len(lines[k]) + 1 if at is END else lines[k].index(at) + 1
    _check_position(err, k + 1, lines[k], column, expected)


def test_line_numbers_count_blank_lines():
    lines = _golden_lines()
    lines.insert(1, "")
    lines.insert(1, "   ")
    k = _line_index(lines, "%task_score =")
    lines[k] = lines[k].replace("op task_score", "op task score")
    err = _syntax_error(lines)
    _check_position(err, k + 1, lines[k], lines[k].index("score(") + 1, "'('")


def test_bad_header_unclosed_graph_and_trailing_text():
    lines = _golden_lines()
    err = _syntax_error(["graph ppo_step {"] + lines[1:])
    _check_position(err, 1, "graph ppo_step {", 7, "'@'")

    with pytest.raises(GraphSyntaxError, match=r"line 22: graph @ppo_step is not closed"):
        parse_graph("\n".join(lines[:-1]) + "\n")

    err = _syntax_error(lines + ["  output %rm_score"])
    _check_position(err, len(lines) + 1, "  output %rm_score", 1,
                    "nothing after the closing '}'")

    with pytest.raises(GraphSyntaxError, match="empty graph text"):
        parse_graph(" \n\n")


def test_syntax_errors_are_graphrl_errors():
    with pytest.raises(graphrl.GraphRLError):
        parse_graph("graph @g {\n  %x = call\n}\n")
