"""A synthetic RLHF task generated in code, small enough to learn on two CPU cores.

"Topic tokens": a prompt is random tokens whose first token is a topic marker. The
vocabulary's content tokens are split in two halves; a response is good in proportion to
how many of its tokens come from the half the topic asks for (topic even -> upper half,
odd -> lower half). A random policy scores ~0.5; a policy that reads its prompt can
reach 1.0. The score in [0, 1] is the ground truth; the reward model never sees it, only
preference pairs ranked by it (Bradley-Terry training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TopicTokensTask:
    vocab_size: int = 16
    prompt_len: int = 6
    response_len: int = 8

    @property
    def seq(self) -> int:
        return self.prompt_len + self.response_len

    def prompts(self, batch: int, seed: int) -> dict[str, Any]:
        import torch

        g = torch.Generator().manual_seed(seed)
        return {"tokens": torch.randint(0, self.vocab_size, (batch, self.prompt_len),
                                        generator=g),
                "attention_mask": torch.ones(batch, self.prompt_len),
                "row": torch.arange(batch)}

    def score(self, tokens: Any) -> Any:
        """Fraction of response tokens from the half of the vocabulary the topic asks for."""
        upper = (tokens[:, 0] % 2 == 0).unsqueeze(1)
        response = tokens[:, self.prompt_len:]
        in_upper = response >= self.vocab_size // 2
        return (in_upper == upper).float().mean(dim=1)

    def score_rollout(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """Rule-based scorer op kernel: Rollout -> Scores."""
        return {"score": self.score(rollout["tokens"])}

    def preference_pairs(self, n: int, seed: int) -> tuple[dict, dict]:
        """n (chosen, rejected) rollouts sharing a prompt, chosen scoring strictly higher.

        Responses are sampled with a varying share of good tokens so that every level of
        quality appears, as a reward model sees from a range of policies."""
        import torch

        g = torch.Generator().manual_seed(seed)
        prompts = self.prompts(n, seed)["tokens"]
        upper = (prompts[:, 0] % 2 == 0).unsqueeze(1)
        half = self.vocab_size // 2

        def sample() -> Any:
            p_good = torch.rand(n, 1, generator=g)
            good = torch.rand(n, self.response_len, generator=g) < p_good
            low = torch.randint(0, half, (n, self.response_len), generator=g)
            from_upper = good == upper
            resp = torch.where(from_upper, low + half, low)
            return torch.cat([prompts, resp], dim=1)

        a, b = sample(), sample()
        sa, sb = self.score(a), self.score(b)
        keep = sa != sb
        chosen = torch.where((sa > sb).unsqueeze(1), a, b)[keep]
        rejected = torch.where((sa > sb).unsqueeze(1), b, a)[keep]
        return {"tokens": chosen}, {"tokens": rejected}
