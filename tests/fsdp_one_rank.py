"""Run in a subprocess by tests/test_ray_fsdp_critic.py: FSDPEngine over a one-rank gloo
group (its own process: torch.distributed's default group is process-global). Prints one
JSON line: per (engine, head), the forward outputs of the FSDP2 engine and of a plain
engine from the same seed, and generate's outcome."""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import graphrl as gr  # noqa: E402
from common import llama_config  # noqa: E402
from graphrl.backends.engines.registry import create_engine  # noqa: E402
from graphrl.backends.ray.sharded import FSDPEngine  # noqa: E402


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        tokens = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
        for engine, head in (("fast", "lm"), ("hf", "value"), ("hf", "score")):
            decl = gr.Model("m", llama_config(), role="policy" if head == "lm" else "critic",
                            head=head, trainable=True, engine=engine, precision="fp32").decl()
            sharded = FSDPEngine(decl, {}, [0], 0, dist.group.WORLD)
            plain = create_engine(engine, decl, {}, "cpu", 0)
            got, want = sharded.forward({"tokens": tokens}), plain.forward({"tokens": tokens})
            key = next(iter(want))
            res = {"diff": float((got[key] - want[key]).abs().max()),
                   "plain_fused": bool(getattr(plain, "fused_forward", False)),
                   "fused": bool(getattr(sharded.engine, "fused_forward", False))}
            if head == "lm":
                try:
                    sharded.generate({"tokens": tokens[:, :3]}, max_new_tokens=2)
                    res["generate"] = "ran"
                except gr.UsageError as e:
                    res["generate"] = str(e)
            out[f"{engine}/{head}"] = res
    finally:
        dist.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
