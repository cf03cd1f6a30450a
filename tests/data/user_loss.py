"""A user's own loss, in its own file (`--loss tests/data/user_loss.py:seq_mean_pg`): PPO's
clipped surrogate averaged per sequence, then over sequences (GRPO's aggregation, Shao et
al. 2024, eq. 3), written with plain torch and nothing of graphrl's loss internals. Its
weight is "rows": a micro-batch carries its share of the minibatch's sequences."""
import torch

import graphrl as gr
from graphrl.signatures import ADVANTAGES, LOGPROBS, ROLLOUT


@gr.loss("seq_mean_pg", inputs=(("rollout", ROLLOUT), ("old_logprobs", LOGPROBS),
                                ("advantages", ADVANTAGES)),
         stats=("loss", "ratio_mean"), options={"clip": 0.2}, weight="rows")
def seq_mean_pg(forward, mb, *, clip):
    mask = mb["rollout"]["response_mask"] > 0
    zero = torch.zeros(())
    new = forward(mb["rollout"])
    log_ratio = torch.where(mask, new - mb["old_logprobs"]["logprobs"], zero)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, mb["advantages"]["advantages"], zero)
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    per_seq = torch.where(mask, obj, zero).sum(1) / mask.sum(1).clamp(min=1)
    loss = -per_seq.mean()
    # stats are averaged over micro-batches and ranks with the loss's weight (rows here):
    # a per-sequence mean, as the loss is, so the average is the whole minibatch's
    ratio_mean = (torch.where(mask, ratio, zero).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return loss, {"loss": loss.item(), "ratio_mean": ratio_mean.item()}


@gr.loss("broken_loss", inputs=(("rollout", ROLLOUT), ("old_logprobs", LOGPROBS),
                                ("advantages", ADVANTAGES)), options={"clip": 0.2})
def broken_loss(forward, mb, *, clip):
    """Returns NaN: graphrl must stop with the loss's name, file and iteration."""
    value = forward(mb["rollout"]).sum() * float("nan")
    return value, {"loss": 0.0}
