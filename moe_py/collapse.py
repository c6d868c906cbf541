"""Routing collapse you cannot miss, reported as episodes: a watch over each layer's expert
shares during training.

A step is bad for a layer when some expert's share of the assignments is below `low_share`
x uniform (a dying expert) or the largest share is above `max_over_mean` x uniform (the load
piles onto few experts). `steps` bad steps in a row make an episode, from the first of them
to the last; one good step ends it. The watch reports an episode when it is confirmed and
again when it ends, each quoting the value that crossed its threshold, and at the end of a
run summarises every episode per layer, since when all layers have been within thresholds,
and the experts with no assignment at the last step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional


@dataclass
class Episode:
    layer: int
    start: int  # first bad step of the streak
    end: Optional[int]  # last bad step; None while it lasts
    worst_low: float  # the smallest expert share seen in it, x uniform
    worst_high: float  # the largest expert share seen in it, x uniform


class CollapseWatch:
    def __init__(self, low_share: float, max_over_mean: float, steps: int):
        self.low_share, self.max_over_mean, self.steps = low_share, max_over_mean, steps
        self.episodes: List[Episode] = []  # confirmed ones, in order of their start
        self._streak: List[Optional[Episode]] = []  # per layer: the bad streak under way
        self.last_step = 0

    def _crossed(self, low: float, high: float) -> str:
        parts = []
        if low < self.low_share:
            parts.append(f"smallest expert share {low:.2f} x uniform (threshold {self.low_share})")
        if high > self.max_over_mean:
            parts.append(f"largest {high:.2f} x uniform (threshold {self.max_over_mean})")
        return " and ".join(parts)

    def update(self, step: int, expert_share: List[List[float]]) -> List[str]:
        """Feed step `step`'s shares per layer; returns the messages of this step: episodes
        confirmed (the streak reached `steps`) and episodes that ended."""
        if len(self._streak) != len(expert_share):
            self._streak = [None] * len(expert_share)
        self.last_step = step
        out = []
        for i, share in enumerate(expert_share):
            E = len(share)
            low, high = min(share) * E, max(share) * E
            ep = self._streak[i]
            if low < self.low_share or high > self.max_over_mean:
                if ep is None:
                    ep = self._streak[i] = Episode(i, step, None, low, high)
                ep.worst_low, ep.worst_high = min(ep.worst_low, low), max(ep.worst_high, high)
                if step - ep.start + 1 == self.steps:
                    self.episodes.append(ep)
                    out.append(f"routing collapse in layer {i} since step {ep.start}: "
                               f"{self._crossed(ep.worst_low, ep.worst_high)} for {self.steps} steps in a row")
            elif ep is not None:
                self._streak[i] = None
                if step - ep.start >= self.steps:  # a confirmed episode ends
                    ep.end = step - 1
                    out.append(f"layer {i} back within thresholds at step {step} after the collapse "
                               f"of steps {ep.start}-{ep.end} (worst: "
                               f"{self._crossed(ep.worst_low, ep.worst_high)})")
        return out

    def stable_since(self) -> Optional[int]:
        """The step since which every layer has been within thresholds: the step after the
        last episode's end (1 with no episode); None while an episode lasts."""
        if any(ep.end is None for ep in self.episodes):
            return None
        return max((ep.end + 1 for ep in self.episodes if ep.end is not None), default=1)

    def summary(self, expert_share: List[List[float]]) -> Dict[str, Any]:
        """Episodes, stable_since and the experts with no assignment in expert_share (the
        last step's), as stored in metrics.jsonl's last row."""
        return {"episodes": [asdict(ep) for ep in self.episodes], "stable_since": self.stable_since(),
                "dead_experts": [[e for e, s in enumerate(share) if s == 0] for share in expert_share],
                "thresholds": {"low_share": self.low_share, "max_over_mean": self.max_over_mean,
                               "steps": self.steps}}


def summary_lines(summary: Dict[str, Any], last_step: int) -> List[str]:
    """The end-of-run report of a CollapseWatch.summary."""
    lines = []
    by_layer: Dict[int, List[dict]] = {}
    for ep in summary["episodes"]:
        by_layer.setdefault(ep["layer"], []).append(ep)
    for layer in sorted(by_layer):
        eps = ", ".join(f"steps {ep['start']}-{'…' if ep['end'] is None else ep['end']} "
                        f"(min {ep['worst_low']:.2f}, max {ep['worst_high']:.2f} x uniform)"
                        for ep in by_layer[layer])
        lines.append(f"collapse episodes, layer {layer}: {eps}")
    stable = summary["stable_since"]
    if not summary["episodes"]:
        lines.append(f"routing: no collapse episode in steps 1-{last_step}")
    elif stable is None:
        lines.append(f"routing: a collapse episode is still under way at step {last_step}")
    else:
        lines.append(f"routing: all layers within thresholds since step {stable}")
    dead = [f"layer {i}: {d}" for i, d in enumerate(summary["dead_experts"]) if d]
    lines.append("dead experts at the last step: " + ("; ".join(dead) if dead else "none"))
    return lines


def worst_max_over_mean(expert_share: Optional[List[List[float]]]) -> float:
    """The largest max/mean expert load over the layers (1 = balanced)."""
    if not expert_share:
        return float("nan")
    return max(max(s) * len(s) for s in expert_share)
