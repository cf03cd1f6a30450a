"""Sharded model state (backends/engines/shard_state.py): shards put together by name
and slice; a missing shard, an element no shard holds and a piece of the wrong size are
refused naming the file or the parameter (the engines' own shards: test_checkpoint_engines.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from graphrl.backends.engines.shard_state import (read_model_state, save_index,  # noqa: E402
                                                  save_shard)
from graphrl.errors import UsageError  # noqa: E402


def write(models, pieces, step=3.0):
    """A flat-format (DeepSpeed-style) state of one 2x3 parameter `w` (tied alias `v`)
    whose flattening ranks hold as `pieces`: rank -> (start, numel)."""
    full = torch.arange(6.0)
    folder = models / "m"
    for rank, (start, numel) in pieces.items():
        sl = slice(start, start + numel)
        save_shard(folder, rank, {
            "pieces": {"w": (start, numel)}, "weights": {"w": full[sl]},
            "exp_avg": {"w": full[sl] * 10}, "exp_avg_sq": {"w": full[sl] * 100},
            "step": step, "extra": {}})
    save_index(folder, {"format": "flat", "version": 2, "names": ["w", "v"],
                        "shapes": {"w": [2, 3]}, "params": ["w"], "aliases": {"v": "w"},
                        "extra_from": 0, "optimizer": True,
                        "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99]}],
                        "files": [f"rank{r}.pt" for r in sorted(pieces)]})
    return full.reshape(2, 3)


def test_flat_shards_make_the_full_state(tmp_path):
    full = write(tmp_path, {0: (0, 4), 1: (4, 2)})
    state = read_model_state(tmp_path, "m")
    assert state["version"] == 2 and list(state["weights"]) == ["w", "v"]
    assert torch.equal(state["weights"]["w"], full) and torch.equal(state["weights"]["v"], full)
    opt = state["optimizer"]
    assert torch.equal(opt["state"]["w"]["exp_avg_sq"], full * 100)
    assert float(opt["state"]["w"]["step"]) == 3.0
    assert opt["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]


def test_bad_shards_are_refused_naming_what(tmp_path):
    write(tmp_path / "a", {0: (0, 4), 1: (4, 2)})
    (tmp_path / "a" / "m" / "rank1.pt").unlink()
    with pytest.raises(UsageError, match="shard models/m/rank1.pt is missing"):
        read_model_state(tmp_path / "a", "m")
    write(tmp_path / "b", {0: (0, 3), 1: (4, 2)})   # element 3 in no shard
    with pytest.raises(UsageError, match="parameter w: element 3 is in 0 shards"):
        read_model_state(tmp_path / "b", "m")
    with pytest.raises(UsageError, match="no state of model 'x'"):
        read_model_state(tmp_path / "b", "x")
