"""graphrl: a dataflow-graph compiler and scheduler for multi-model RL of language models.

Write one RL step as plain Python over model handles, trace it into a Graph, compile and
run it. `import graphrl` imports neither torch nor ray; backends load them when they run.
"""
from . import data, evaluation, ops, recipes, rewards, signatures
from .errors import (ExecutionError, GraphError, GraphRLError, GraphSyntaxError, TraceError,
                     UsageError)
from .example_file import load_loss
from .experiment import Experiment, RunOptions
from .graph import Graph, ModelDecl, Node, Placement, Value
from .loss_def import LossDef, loss
from .lora import LoRA
from .parallel import DeviceMesh, Strategy
from .parser import parse_graph
from .printer import print_graph
from .runner import run
from .signatures import prompts_spec
from .trace import Model, OpDef, Program, trace
from .types import Field, ModelSpec, PayloadSpec, llama2
from .verify import verify_graph

__version__ = "0.1.0"

__all__ = ["data", "evaluation", "ops", "recipes", "rewards", "run", "signatures", "ExecutionError", "GraphError", "GraphRLError",
           "GraphSyntaxError", "TraceError", "UsageError", "Experiment", "RunOptions", "Graph",
           "LoRA", "ModelDecl", "Node", "Placement", "Value", "DeviceMesh", "Strategy", "parse_graph",
           "print_graph", "prompts_spec", "Model", "OpDef", "Program", "trace", "Field",
           "ModelSpec", "PayloadSpec", "llama2", "verify_graph", "LossDef", "loss", "load_loss"]
