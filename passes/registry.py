"""The passes `graphrl compile --pipeline` knows, by name (passes/base.py parses specs)."""
from __future__ import annotations

from .assign_devices import AssignDevices
from .choose_overlap import ChooseOverlap
from .insert_reshard import InsertReshard
from .lower import Lower
from .price_stream import PriceStream
from .staleness import Staleness

PASSES: dict[str, type] = {p.name: p for p in (Staleness, AssignDevices, ChooseOverlap,
                                               InsertReshard, PriceStream, Lower)}

__all__ = ["PASSES"]
