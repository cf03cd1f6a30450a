"""GPU presets and cluster specs: parsing, text round trip, topology and bandwidths."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from graphrl.cluster import (A100_80G, CPU, GPU_TYPES, H100_80G, H200, ClusterSpec, GiB,
                             GPUType, gpu_type)


def test_presets_cite_a_source_and_are_frozen():
    assert set(GPU_TYPES) == {"A100-80G", "H100-80G", "H200", "cpu"}
    for g in GPU_TYPES.values():
        assert g.source, g.name
        assert g.intra_node_bw > g.inter_node_bw
    with pytest.raises(dataclasses.FrozenInstanceError):
        H100_80G.memory_bytes = 1   # type: ignore[misc]
    with pytest.raises(TypeError):
        GPU_TYPES["x"] = H100_80G   # type: ignore[index]


def test_preset_numbers():
    assert H100_80G.peak_bf16_flops == pytest.approx(989.4e12)
    assert H100_80G.hbm_bandwidth == pytest.approx(3.35e12)
    assert H100_80G.memory_bytes == 80 * GiB
    assert A100_80G.peak_bf16_flops == pytest.approx(312e12)
    assert H200.hbm_bandwidth > H100_80G.hbm_bandwidth
    assert H200.memory_bytes > H100_80G.memory_bytes
    assert CPU.memory_bytes == 24 * GiB
    assert CPU.peak_bf16_flops < A100_80G.peak_bf16_flops


@pytest.mark.parametrize("alias,name", [("H100", "H100-80G"), ("h100-80g", "H100-80G"),
                                        ("A100", "A100-80G"), ("a100-80G", "A100-80G"),
                                        ("h200", "H200"), ("CPU", "cpu")])
def test_aliases(alias, name):
    assert gpu_type(alias).name == name
    assert ClusterSpec.parse(f"2x4x{alias}").gpu.name == name


def test_gpu_type_rejects_unknown():
    with pytest.raises(ValueError, match="H100-80G"):
        gpu_type("V100")


def test_parse_and_text():
    c = ClusterSpec.parse("4x8xH100")
    assert (c.nodes, c.gpus_per_node, c.gpu) == (4, 8, H100_80G)
    assert c.num_gpus == 32
    assert c.text() == "4x8xH100-80G"
    assert ClusterSpec.parse(c.text()) == c
    assert ClusterSpec.parse(" 1X2Xcpu ") == ClusterSpec(1, 2, CPU)


@pytest.mark.parametrize("bad", ["4x8", "0x8xH100", "2x0xH100", "2x8xV999", "", "x8xH100",
                                 "-1x8xH100", "2x8xH100x3", "2.5x8xH100"])
def test_parse_rejects_bad_strings_listing_presets(bad):
    with pytest.raises(ValueError) as e:
        ClusterSpec.parse(bad)
    msg = str(e.value)
    for name in GPU_TYPES:
        assert name in msg, msg


def test_constructor_validates():
    with pytest.raises(ValueError):
        ClusterSpec(0, 8, H100_80G)
    with pytest.raises(ValueError):
        GPUType("x", 0, 1, 1, 1, 1)


def test_node_of_and_bandwidth():
    c = ClusterSpec(2, 4, A100_80G)
    assert [c.node_of(g) for g in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert c.bandwidth(0, 3) == A100_80G.intra_node_bw
    assert c.bandwidth(3, 4) == A100_80G.inter_node_bw
    assert c.bandwidth(5, 5) == A100_80G.hbm_bandwidth
    assert c.group_bandwidth([0, 1, 2]) == A100_80G.intra_node_bw
    assert c.group_bandwidth([2, 6]) == A100_80G.inter_node_bw
    with pytest.raises(ValueError):
        c.node_of(8)
    with pytest.raises(ValueError):
        c.bandwidth(-1, 0)


@given(st.integers(1, 16), st.integers(1, 16), st.sampled_from(sorted(GPU_TYPES)),
       st.data())
def test_properties(nodes, per_node, name, data):
    c = ClusterSpec(nodes, per_node, GPU_TYPES[name])
    assert ClusterSpec.parse(c.text()) == c
    a = data.draw(st.integers(0, c.num_gpus - 1))
    b = data.draw(st.integers(0, c.num_gpus - 1))
    assert c.bandwidth(a, b) == c.bandwidth(b, a)
    if a != b:
        expected = c.gpu.intra_node_bw if c.node_of(a) == c.node_of(b) else c.gpu.inter_node_bw
        assert c.bandwidth(a, b) == expected
    assert 0 <= c.node_of(a) < nodes
