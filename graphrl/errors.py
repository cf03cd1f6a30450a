"""graphrl's errors: each names what is wrong and where, never a deep traceback."""
from __future__ import annotations


class GraphRLError(Exception):
    """Base of every error graphrl raises on bad input."""


class GraphSyntaxError(GraphRLError):
    """The text form of a graph or plan does not parse."""


class GraphError(GraphRLError):
    """A graph breaks an invariant; the message names the node and shows the IR around it."""

    def __init__(self, message: str, node: str = "", context: str = ""):
        self.node = node
        self.context = context
        super().__init__(message + (f"\n{context}" if context else ""))


class TraceError(GraphRLError):
    """A step function did something graphrl cannot trace (wrong payload, unknown method)."""


class ExecutionError(GraphRLError):
    """A node failed while running; names the node, call and (on Ray) the rank."""


class OpError(ExecutionError):
    """An op's own function (user code, e.g. a reward) failed or misbehaved; the executor
    that ran it names the iteration (`at`)."""

    def at(self, iteration: int) -> ExecutionError:
        return type(self)(f"iteration {iteration}: {self}")


class UsageError(GraphRLError):
    """A bad command-line argument or option value."""
