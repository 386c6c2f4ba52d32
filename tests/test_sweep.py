"""finetune.sweep: the search's rounds on scores with a known optimum, its table, and `make sweep`."""

import json
import math
import subprocess

import pytest

from finetune.sweep import Trial, markdown, search
from launching import ROOT


def bowl(best_lr, best_warmup=40, best_decay=0.75):
    """Held-out top-1 peaking at (best_lr, best_warmup, best_decay), falling off in log lr; the calls made."""
    calls = []

    def score(t: Trial) -> float:
        calls.append(t)
        return 0.5 - 0.05 * math.log2(t.lr / best_lr) ** 2 - 0.001 * abs(t.warmup_steps - best_warmup) \
            - 0.1 * abs(t.layer_decay - best_decay)
    return score, calls


def test_the_lr_grid_extends_past_a_winning_end_until_the_choice_is_interior():
    score, calls = bowl(best_lr=2.5e-4)  # below the starting grid 5e-4, 1e-3, 2e-3
    result = search(score, [5e-4, 1e-3, 2e-3], 40, [10, 100], [0.65, 0.75])
    assert [r["value"] for r in result["lr"]["tried"]] == [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3]
    assert result["lr"]["chosen"] == 2.5e-4 and result["lr"]["interior"]
    assert result["warmup_steps"]["chosen"] == 40 and result["warmup_steps"]["interior"]
    assert result["layer_decay"]["chosen"] == 0.75 and result["layer_decay"]["interior"]
    assert len(calls) == len(set(calls)) == 5 + 2 + 2  # a trial two rounds share runs once
    assert all(t.lr == 2.5e-4 for t in calls[5:]) and all(t.warmup_steps == 40 for t in calls[7:])


def test_upwards_too_and_a_capped_search_says_its_choice_is_not_interior():
    score, _ = bowl(best_lr=8e-3)
    result = search(score, [5e-4, 1e-3, 2e-3], 40, [10, 100], [0.65, 0.75], max_extend=1)
    assert [r["value"] for r in result["lr"]["tried"]] == [5e-4, 1e-3, 2e-3, 4e-3]
    assert result["lr"]["chosen"] == 4e-3 and not result["lr"]["interior"]


def test_the_docs_show_the_shipped_sweep():
    """docs/results.md's sweep table is the one finetune.sweep's format makes of docs/sweep-results.json."""
    data = json.loads((ROOT / "docs" / "sweep-results.json").read_text())
    assert markdown(data) in (ROOT / "docs" / "results.md").read_text()


@pytest.mark.slow
def test_make_sweep_end_to_end(make_data, tmp_path):
    """The make target itself, tiny: a 4-step pretraining, both arms at half their horizons in the
    experiment (the default SWEEP_FRACTION; the scratch arm's from the pretraining's compute), on CIFAR
    shards; a second call reuses every run."""
    args = ["make", "sweep", f"EXP_DATA={make_data}", f"EXP_RUNS={tmp_path / 'exp'}", f"SWEEP_RUNS={tmp_path / 'sweep'}",
            f"SWEEP_DOCS={tmp_path}", "EXP_PRETRAIN_STEPS=4", "EXP_FT_STEPS=4"]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    results = json.loads((tmp_path / "sweep-results.json").read_text())
    assert results["pretrained"]["horizon_steps"] == 2 and results["scratch"]["horizon_steps"] > 2
    assert set(results["scratch"]) == {"horizon_steps", "lr", "warmup_steps", "layer_decay"}
    runs = sorted((tmp_path / "sweep").glob("*/*/*/summary.json"))
    assert len(runs) >= 2 * (3 + 2 + 2)
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)  # every run reused
    assert sorted((tmp_path / "sweep").glob("*/*/*/summary.json")) == runs
