"""The hierarchical bootstrap of paired gains (engine.stats): known intervals on hand-computed examples."""

import pytest

from engine.stats import Interval, hierarchical_bootstrap, paired_gains


def test_a_constant_gain_has_that_constant_as_its_interval():
    interval = hierarchical_bootstrap([[0.7] * 5, [0.7] * 3, [0.7] * 8])
    assert interval.mean == pytest.approx(0.7) and interval.low == pytest.approx(0.7) and interval.high == pytest.approx(0.7)


def test_one_seed_of_two_clips():
    """Resampling [0, 1] with replacement gives means 0, 0.5, 1 with chances 1/4, 1/2, 1/4: each end holds more
    than 2.5%, so the 95% interval is [0, 1] exactly."""
    interval = hierarchical_bootstrap([[0.0, 1.0]])
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.0, 1.0)


def test_seeds_are_resampled_too():
    """Two seeds of one clip each: clip resampling alone would give no spread; resampling the seeds gives
    [a, b] (means a, (a+b)/2, b with chances 1/4, 1/2, 1/4)."""
    interval = hierarchical_bootstrap([[2.0], [4.0]])
    assert (interval.mean, interval.low, interval.high) == (3.0, 2.0, 4.0)


def test_the_mean_is_over_seeds_of_the_means_within_seeds():
    """Seeds weigh equally whatever their clip counts: ([0, 0, 0] and [1]) -> 0.5, not 0.25."""
    interval = hierarchical_bootstrap([[0.0, 0.0, 0.0], [1.0]], resamples=2000)
    assert interval.mean == 0.5 and interval.low == 0.0 and interval.high == 1.0


def test_the_interval_narrows_with_more_clips_and_covers_the_mean():
    import random

    rng = random.Random(0)
    few = hierarchical_bootstrap([[rng.gauss(1, 1) for _ in range(8)] for _ in range(5)])
    many = hierarchical_bootstrap([[rng.gauss(1, 1) for _ in range(128)] for _ in range(5)])
    assert few.low < few.mean < few.high and many.low < many.mean < many.high
    assert many.high - many.low < few.high - few.low
    assert many.excludes_zero()


def test_output_forms_and_bad_input():
    interval = Interval(0.25, 0.1, 0.4)
    assert interval.as_dict() == {"mean": 0.25, "ci95": [0.1, 0.4]} and interval.format(2) == "+0.25 [+0.10, +0.40]"
    with pytest.raises(ValueError, match="at least one group"):
        hierarchical_bootstrap([[1.0], []])
    assert paired_gains([{"q": 1.0}, {"q": 2.0}], [{"q": 1.5}, {"q": 1.0}], "q") == [0.5, -1.0]
    with pytest.raises(ValueError, match="must align"):
        paired_gains([{"q": 1.0}], [], "q")
