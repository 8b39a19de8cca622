"""DistiLLM's adaptive off-policy student-generated outputs (SGO): the per-step choice and the replay buffer
(contra_kd.md §5.3).

    schedule = AdaptiveSGO(init_threshold=0.0, loss_eps=0.1, replay_ratio="decreasing")
    schedule.prev_loss = dev_ce(start checkpoint)              # before the first epoch
    source = schedule.choose(step, total_iters, r, len(buffer))  # "generate" | "replay" | "ground_truth";
                                                               # step counted from 0 (ours)
    ...
    schedule.update(dev_ce(after epoch))                       # θ += 0.1 when the dev CE rose by loss_eps

Both are plain state that a checkpoint stores (state_dict / load_state_dict), so a resumed run makes the
same choices.
"""
import random
from collections import deque

from common.cli import UserError

REPLAY_RATIOS = ("decreasing", "constant", "increasing")


class AdaptiveSGO:
    def __init__(self, init_threshold: float = 0.0, loss_eps: float = 0.1, capacity: int = 1000,
                 replay_ratio: str = "decreasing"):
        if replay_ratio not in REPLAY_RATIOS:
            raise UserError(f"--replay-ratio {replay_ratio!r}: use one of {', '.join(REPLAY_RATIOS)}")
        self.threshold, self.loss_eps, self.capacity, self.replay_ratio = init_threshold, loss_eps, capacity, replay_ratio
        self.prev_loss = None

    def sample_ratio(self, step: int, total_iters: int) -> float:
        if self.replay_ratio == "decreasing":
            return self.threshold * (1 - step / total_iters)
        if self.replay_ratio == "constant":
            return 0.5 * self.threshold
        return self.threshold * step / total_iters

    def choose(self, step: int, total_iters: int, r: float, buffer_len: int) -> str:
        """r ~ U(0, 1) drawn once per optimiser step (the same on every rank); `step` = optimiser steps done
        before this one. The ratio uses step + 1: DistiLLM / CONTRA count `global_step` from 1."""
        if r < self.sample_ratio(step + 1, total_iters) or (r < self.threshold and buffer_len < self.capacity):
            return "generate"
        if r < self.threshold:
            return "replay"
        return "ground_truth"

    def update(self, dev_loss: float) -> bool:
        """Once per epoch with the dev CE: θ = min(θ + 0.1, 1) and prev = curr when curr ≥ prev + loss_eps."""
        if self.prev_loss is None:
            self.prev_loss = dev_loss
            return False
        if dev_loss >= self.prev_loss + self.loss_eps:
            self.threshold = min(self.threshold + 0.1, 1.0)
            self.prev_loss = dev_loss
            return True
        return False

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.prev_loss = state["threshold"], state["prev_loss"]


def distillm2_beta(step: int, total_iters: int, gradual: bool) -> float:
    """DistiLLM-2's β for the step after `step` completed ones: 1, or with --gradual-beta 1 + 0.5·min(1, 2·s/N)
    with s = step + 1 (CONTRA's loop counts `global_step` from 1)."""
    return 1.0 + 0.5 * min(1.0, 2 * (step + 1) / total_iters) if gradual else 1.0


class ReplayBuffer:
    """FIFO of at most `capacity` student-generated items (prompt ids, response ids), kept on CPU."""

    def __init__(self, capacity: int = 1000):
        self.items = deque(maxlen=capacity)

    def __len__(self):
        return len(self.items)

    def push(self, items) -> None:
        self.items.extend((list(p), list(r)) for p, r in items)

    def sample(self, n: int, rng: random.Random) -> list:
        """n items drawn uniformly without replacement (all of them when the buffer holds fewer)."""
        return [self.items[i] for i in rng.sample(range(len(self.items)), min(n, len(self.items)))]

    def state_dict(self) -> dict:
        return {"capacity": self.items.maxlen, "items": [[p, r] for p, r in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items = deque(((p, r) for p, r in state["items"]), maxlen=state["capacity"])
