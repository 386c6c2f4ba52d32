"""vitcore.report.intervals on numbers with a known answer."""

import math

import pytest
import torch

from vitcore.report.intervals import paired_bootstrap, paired_hits, t_interval, t_quantile


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)])
def test_t_quantiles_match_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_interval_of_three_seeds():
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, standard error 1/sqrt(3)
    assert (low + high) / 2 == pytest.approx(2.0)
    assert (high - low) / 2 == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)
    assert t_interval([0.5]) is None  # one seed has no spread to measure


def test_paired_bootstrap_is_deterministic_and_matches_the_normal_approximation():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(2, 4000, generator=g) < 0.6).double()  # two seeds of an arm right 60% of the time
    b = (torch.rand(2, 4000, generator=g) < 0.5).double()
    low, high = paired_bootstrap(a, b, seed=3)
    assert [low, high] == paired_bootstrap(a, b, seed=3)  # the same seed, the same interval
    assert [low, high] != paired_bootstrap(a, b, seed=4)
    per_image = (a - b).mean(0)
    mean, se = per_image.mean().item(), per_image.std().item() / math.sqrt(4000)
    assert low == pytest.approx(mean - 1.96 * se, abs=0.003) and high == pytest.approx(mean + 1.96 * se, abs=0.003)


def test_paired_bootstrap_of_a_sure_difference_is_a_point():
    a, b = torch.ones(500), torch.zeros(500)
    assert paired_bootstrap(a, b, resamples=1000) == [1.0, 1.0]


def test_paired_hits_need_the_same_images():
    rows = [{"key": k, "label": 1, "top5": [1, 0]} for k in ("a", "b")]
    a, b = paired_hits(rows, [{**rows[0], "top5": [0, 1]}, rows[1]])
    assert a.tolist() == [True, True] and b.tolist() == [False, True]
    with pytest.raises(ValueError, match="different images"):
        paired_hits(rows, rows[:1])
