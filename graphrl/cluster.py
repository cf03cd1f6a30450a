"""Hardware descriptions: GPU kinds and clusters of identical nodes.

A `GPUType` holds datasheet ceilings (peak dense bf16 FLOP/s, HBM bandwidth, memory, and
the per-GPU bandwidth of the links between GPUs); the cost model (`graphrl.cost`) scales
these by efficiency factors fitted to measurements. A `ClusterSpec` is `nodes` nodes of
`gpus_per_node` GPUs each; global GPU ids are node-major (GPU g lives on node
g // gpus_per_node), as `graphrl.parallel.DeviceMesh` assumes.

Bandwidths are bytes per second in one direction per GPU, the figure a ring collective
sees (each GPU sends and receives at once).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

GiB = 2 ** 30


@dataclass(frozen=True)
class GPUType:
    """One accelerator kind: datasheet numbers and where they come from."""

    name: str
    peak_bf16_flops: float       # dense (no sparsity) bf16 tensor-core FLOP/s
    hbm_bandwidth: float         # device memory bandwidth, B/s
    memory_bytes: int            # device memory, bytes
    intra_node_bw: float         # GPU-to-GPU inside a node (NVLink), per GPU, per direction, B/s
    inter_node_bw: float         # across nodes (InfiniBand NIC per GPU), per direction, B/s
    source: str = ""
    host_bw: float = 25e9        # host <-> device (PCIe), per direction, B/s: offload/onload
    host_memory_bytes: int = 256 * 2**30  # host RAM per GPU: DGX A100/H100 have 2 TB for 8
    # dense fp32 FLOP/s without tensor cores (what an fp32 model computes at); 0: not
    # given, taken as the H100's ratio 67 / 989.4 of the bf16 peak (`peak_flops`)
    peak_fp32_flops: float = 0.0

    def __post_init__(self) -> None:
        for name in ("peak_bf16_flops", "hbm_bandwidth", "memory_bytes", "intra_node_bw",
                     "inter_node_bw"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPU {self.name!r}: {name} must be > 0, got "
                                 f"{getattr(self, name)!r}")

    def peak_flops(self, precision: str) -> float:
        """The peak a model of this precision (types.PRECISIONS) computes at: bf16
        tensor-core FLOP/s, or plain fp32 FLOP/s (fp32 matmuls here do not use TF32
        tensor cores: torch's default `allow_tf32 = False` for matmuls)."""
        if precision != "fp32":
            return self.peak_bf16_flops
        return self.peak_fp32_flops or self.peak_bf16_flops * 67e12 / 989.4e12

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def text(self) -> str:
        return (f"{self.name}{{bf16={self.peak_bf16_flops / 1e12:g}TF, "
                f"hbm={self.hbm_bandwidth / 1e12:g}TB/s, mem={self.memory_gib:g}GiB, "
                f"intra={self.intra_node_bw / 1e9:g}GB/s, inter={self.inter_node_bw / 1e9:g}GB/s}}")


A100_80G = GPUType(
    "A100-80G", peak_bf16_flops=312e12, hbm_bandwidth=2.039e12, memory_bytes=80 * GiB,
    intra_node_bw=300e9, inter_node_bw=25e9, host_bw=25e9,  # PCIe 4 x16: 32 GB/s peak
    peak_fp32_flops=19.5e12,
    source=("NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 312 TFLOPS BF16 dense, "
            "19.5 TFLOPS FP32, "
            "2,039 GB/s HBM2e, NVLink 3 600 GB/s bidirectional (300 GB/s per direction); "
            "one HDR InfiniBand 200 Gb/s NIC per GPU (DGX A100 user guide) = 25 GB/s"))

H100_80G = GPUType(
    "H100-80G", peak_bf16_flops=989.4e12, hbm_bandwidth=3.35e12, memory_bytes=80 * GiB,
    intra_node_bw=450e9, inter_node_bw=50e9, host_bw=47.8e9,  # calibration: pinned h2d
    peak_fp32_flops=67e12,
    source=("NVIDIA H100 Tensor Core GPU datasheet (SXM5 80GB): 989.4 TFLOPS BF16 dense "
            "(1,979 with sparsity), 67 TFLOPS FP32 (non-tensor-core), 3.35 TB/s HBM3, "
            "NVLink 4 900 GB/s bidirectional (450 GB/s per direction); one ConnectX-7 NDR "
            "400 Gb/s NIC per GPU (DGX H100 user guide) = 50 GB/s"))

H200 = GPUType(
    "H200", peak_bf16_flops=989.4e12, hbm_bandwidth=4.8e12, memory_bytes=141 * 10 ** 9,
    intra_node_bw=450e9, inter_node_bw=50e9, host_bw=47.8e9,  # same PCIe 5 host link
    peak_fp32_flops=67e12,
    source=("NVIDIA H200 Tensor Core GPU datasheet (SXM 141GB): 989 TFLOPS BF16 dense, "
            "67 TFLOPS FP32, "
            "4.8 TB/s HBM3e, 141 GB, NVLink 900 GB/s bidirectional (450 GB/s per "
            "direction); one NDR 400 Gb/s NIC per GPU (DGX H200) = 50 GB/s"))

CPU = GPUType(
    "cpu", peak_bf16_flops=1e12, hbm_bandwidth=50e9, memory_bytes=24 * GiB,
    intra_node_bw=10e9, inter_node_bw=1.25e9, host_bw=10e9, peak_fp32_flops=0.5e12,
    source=("local runs on host CPUs: assumed modest figures, not a datasheet: ~1 TFLOP/s "
            "of bf16 matmul (half that in fp32: AVX-512 BF16 dot products do two "
            "multiply-adds per fp32 lane), ~50 GB/s DRAM, 24 GiB per process, ~10 GB/s "
            "shared-memory copies between processes (gloo), 10 GbE (1.25 GB/s) between machines"))

GPU_TYPES: Mapping[str, GPUType] = MappingProxyType(
    {g.name: g for g in (A100_80G, H100_80G, H200, CPU)})

# Accepted spellings (compared case-insensitively) -> canonical preset name.
_ALIASES: Mapping[str, str] = MappingProxyType({
    "a100": "A100-80G", "a100-80g": "A100-80G", "a100-80gb": "A100-80G",
    "h100": "H100-80G", "h100-80g": "H100-80G", "h100-80gb": "H100-80G",
    "h200": "H200", "h200-141g": "H200", "h200-141gb": "H200",
    "cpu": "cpu",
})


def _presets_text() -> str:
    return ", ".join(GPU_TYPES) + " (aliases: " + ", ".join(sorted(_ALIASES)) + ")"


def gpu_type(name: str) -> GPUType:
    """The preset named `name` (case-insensitive, aliases accepted: H100 = H100-80G...)."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown GPU type {name!r}; presets: {_presets_text()}")
    return GPU_TYPES[_ALIASES[key]]


_CLUSTER_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\S+?)\s*$")


@dataclass(frozen=True)
class ClusterSpec:
    """`nodes` identical nodes of `gpus_per_node` GPUs of kind `gpu`."""

    nodes: int
    gpus_per_node: int
    gpu: GPUType = H100_80G

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"a cluster needs >= 1 node and >= 1 GPU per node, got "
                             f"{self.nodes}x{self.gpus_per_node}")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def _check(self, gpu: int) -> int:
        if not 0 <= gpu < self.num_gpus:
            raise ValueError(f"GPU id {gpu} out of range for {self.text()} "
                             f"(0..{self.num_gpus - 1})")
        return gpu

    def node_of(self, gpu: int) -> int:
        return self._check(gpu) // self.gpus_per_node

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)

    def bandwidth(self, src_gpu: int, dst_gpu: int) -> float:
        """Bytes/s from one GPU to another: NVLink inside a node, the NIC across nodes.

        A GPU to itself is a device-local copy at HBM bandwidth.
        """
        if self._check(src_gpu) == self._check(dst_gpu):
            return self.gpu.hbm_bandwidth
        if self.same_node(src_gpu, dst_gpu):
            return self.gpu.intra_node_bw
        return self.gpu.inter_node_bw

    def group_bandwidth(self, gpus: "tuple[int, ...] | list[int]") -> float:
        """The slowest link a ring over `gpus` uses: inter-node if it spans nodes."""
        nodes = {self.node_of(g) for g in gpus}
        if len(set(gpus)) <= 1:
            return self.gpu.hbm_bandwidth
        return self.gpu.intra_node_bw if len(nodes) == 1 else self.gpu.inter_node_bw

    def text(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}x{self.gpu.name}"

    @classmethod
    def parse(cls, text: str) -> "ClusterSpec":
        """`NODESxGPUSxTYPE`, e.g. `4x8xH100` or `1x8xa100-80g`; inverse of text()."""
        m = _CLUSTER_RE.match(str(text))
        if not m:
            raise ValueError(f"bad cluster spec {text!r}: expected NODESxGPUS_PER_NODExTYPE "
                             f"such as 4x8xH100; GPU presets: {_presets_text()}")
        nodes, per_node = int(m.group(1)), int(m.group(2))
        if nodes < 1 or per_node < 1:
            raise ValueError(f"bad cluster spec {text!r}: nodes and GPUs per node must be "
                             f">= 1; GPU presets: {_presets_text()}")
        try:
            gpu = gpu_type(m.group(3))
        except ValueError:
            raise ValueError(f"bad cluster spec {text!r}: unknown GPU type {m.group(3)!r}; "
                             f"presets: {_presets_text()}") from None
        return cls(nodes, per_node, gpu)


__all__ = ["GPUType", "ClusterSpec", "gpu_type", "GPU_TYPES", "A100_80G", "H100_80G", "H200",
           "CPU", "GiB"]
