"""The Ray backend, worker side: one actor per GPU rank, gloo/NCCL groups among them,
sharded engines inside, and a transfer-plan executor for resharding weights.

Modules (imported on demand; importing this package imports neither ray nor torch):
- `cluster`  start or connect Ray (`start_ray`, `RaySession`), mesh placement groups.
- `worker`   `RankWorker`, the per-rank actor class (plain Python; Ray wraps it).
- `group`    `RankGroup`, the driver's handle to the actors: calls with timeouts whose
             errors name the rank.
- `sharded`  `FSDPEngine` (FSDP2 over a mesh) and `ReplicatedEngine`, with the layouts
             (graphrl.shard) their local tensors follow.
- `reshard`  `execute_plan`: a TransferPlan run with torch.distributed point-to-point.

World rank == global GPU id: the actor of rank g holds GPU g, so a plan's `src_gpu` /
`dst_gpu` are process-group ranks of the world group.
"""
