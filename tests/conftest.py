"""Shared fixtures: the examples directory on sys.path, and small traced programs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def load_build(name: str):
    from graphrl.cli import load_example

    return load_example(str(EXAMPLES / f"{name}.py"))
