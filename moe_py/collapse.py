"""Routing collapse you cannot miss: a watch over each layer's expert shares during training.

A layer is flagged when, for `steps` steps in a row, some expert's share of the assignments
stays below `low_share` x uniform (a dying expert), or the largest share stays above
`max_over_mean` x uniform (the load piles onto few experts). Each layer warns once.
"""
from __future__ import annotations

from typing import List, Optional


class CollapseWatch:
    def __init__(self, low_share: float, max_over_mean: float, steps: int):
        self.low_share, self.max_over_mean, self.steps = low_share, max_over_mean, steps
        self._run: List[int] = []
        self._warned: List[bool] = []

    def update(self, expert_share: List[List[float]]) -> List[str]:
        """Feed one step's shares per layer; returns the warnings that fire this step."""
        if len(self._run) != len(expert_share):
            self._run = [0] * len(expert_share)
            self._warned = [False] * len(expert_share)
        out = []
        for i, share in enumerate(expert_share):
            E = len(share)
            low, high = min(share) * E, max(share) * E
            bad = low < self.low_share or high > self.max_over_mean
            self._run[i] = self._run[i] + 1 if bad else 0
            if self._run[i] >= self.steps and not self._warned[i]:
                self._warned[i] = True
                out.append(f"routing collapse in layer {i}: for {self.steps} steps the smallest "
                           f"expert share was {low:.2f} x uniform (threshold {self.low_share}) or "
                           f"the largest {high:.2f} x uniform (threshold {self.max_over_mean})")
        return out


def worst_max_over_mean(expert_share: Optional[List[List[float]]]) -> float:
    """The largest max/mean expert load over the layers (1 = balanced)."""
    if not expert_share:
        return float("nan")
    return max(max(s) * len(s) for s in expert_share)
