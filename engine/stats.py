"""Confidence intervals for paired comparisons over fine-tuning seeds: the hierarchical bootstrap.

A gain measured on clips generated from the same initial noise before and after fine-tuning varies at two levels:
between fine-tuning seeds (what training happened to learn) and between clips within a seed (what the evaluation
happened to draw). Resampling seeds with replacement and then clips within each drawn seed keeps both in the
interval; resampling the pooled clips alone would report the clip-level spread only and be too narrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval, written ``mean [low, high]``."""

    mean: float
    low: float
    high: float
    confidence: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"mean": self.mean, f"ci{round(100 * self.confidence)}": [self.low, self.high]}

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], resamples: int = 10_000, confidence: float = 0.95,
                           seed: int = 0) -> Interval:
    """Mean over groups (fine-tuning seeds) of the mean within each group (clips), with a percentile interval
    from resampling groups with replacement and then values within each drawn group with replacement."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("hierarchical_bootstrap needs at least one group and a value in every group")
    counts = np.array([len(g) for g in groups])
    values = np.zeros((len(groups), counts.max()))
    for i, g in enumerate(groups):
        values[i, :len(g)] = np.asarray(g, dtype=np.float64)
    rng = np.random.default_rng(seed)
    drawn_groups = rng.integers(0, len(groups), size=(resamples, len(groups)))  # [R, S]
    within = (rng.random((resamples, len(groups), counts.max())) * counts[drawn_groups][..., None]).astype(np.int64)
    present = np.arange(counts.max()) < counts[drawn_groups][..., None]  # only a drawn group's own count of draws
    picked = values[drawn_groups[..., None], within]
    group_means = (picked * present).sum(-1) / counts[drawn_groups]
    statistics = group_means.mean(-1)
    low, high = np.quantile(statistics, [(1 - confidence) / 2, (1 + confidence) / 2])
    mean = float(np.mean([np.mean(g) for g in groups]))
    return Interval(mean, float(low), float(high), confidence)


def paired_gains(before: Sequence[dict[str, float]], after: Sequence[dict[str, float]], key: str) -> list[float]:
    """Per-clip gains ``after - before`` of one metric, the two lists aligned clip by clip (same noise, caption)."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison of {len(before)} clips against {len(after)}: the lists must align")
    return [a[key] - b[key] for b, a in zip(before, after)]
