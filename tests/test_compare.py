"""finetune.compare: the experiment's results.json, its table in the README, the compute match."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from finetune.compare import REGIMES, main, markdown, matched_steps, results

ROOT = Path(__file__).resolve().parents[1]


def fake_run(run: Path, top1: float, steps: int, flops_per_step: float, wall: float, predictions: bool = False) -> None:
    """A finished run as the engine leaves it: summary.json and evaluation rows in metrics.jsonl and,
    with `predictions`, predictions.jsonl: the first top1 x 100 of 100 images right."""
    run.mkdir(parents=True)
    if predictions:
        rows = [{"key": f"{i:03d}", "label": 1, "top5": [1 if i < round(100 * top1) else 0, 2]} for i in range(100)]
        (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"stage": "finetune", "steps": steps, "train_flops": flops_per_step * steps, "wall_time_s": wall,
               "eval": {"top1": top1, "top5": min(1.0, top1 + 0.3), "count": 100}}
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "samples": 64 * s, "val/top1": top1 * s / steps} for s in (steps // 2, steps)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_experiment(exp: Path, seeds: list[str], predictions: bool = False) -> None:
    fake_run(exp / "pretrain", 0.3, 100, 2e12, 60.0)
    for folder in ("", "labels_10pct"):
        for i, seed in enumerate(seeds):
            fake_run(exp / folder / f"pretrained-s{seed}", 0.6 + 0.01 * i, 50, 1e12, 30.0, predictions)
            fake_run(exp / folder / f"scratch-s{seed}", 0.4, 50, 1e12, 30.0, predictions)
            fake_run(exp / folder / f"scratch_same_compute-s{seed}", 0.5 - 0.02 * i, 250, 1e12, 150.0, predictions)
    fake_run(exp / "probe-pretrained", 0.45, 20, 1e11, 10.0)
    fake_run(exp / "probe-random", 0.35, 20, 1e11, 10.0)


def test_matched_steps_spend_the_pretraining_compute_on_more_steps(tmp_path):
    fake_run(tmp_path / "pre", 0.3, 100, 2e12, 60.0)  # 2e14 FLOPs
    fake_run(tmp_path / "ft", 0.6, 50, 1e12, 30.0)  # 5e13 FLOPs, 1e12 a step
    assert matched_steps(tmp_path / "pre", tmp_path / "ft") == 250


def test_results_have_every_arm_regime_and_gain(tmp_path):
    exp = tmp_path / "exp"
    fake_experiment(exp, ["0", "1"])
    res = results(exp, ["0", "1"])
    for entry in (res, res["labels_10pct"]):
        for arm in ("pretrained", "scratch", "scratch_same_compute"):
            assert set(entry[arm]) >= {"top1", "top5", "per_seed", "train_flops", "wall_s"}
        # the pretrained arm's compute and wall time include the pretraining's
        assert entry["pretrained"]["train_flops"] == 2e14 + 5e13 and entry["pretrained"]["wall_s"] == 90.0
        assert entry["scratch_same_compute"]["train_flops"] == entry["pretrained"]["train_flops"]
        assert entry["pretrained"]["top1"] == pytest.approx(0.605)  # the mean over seeds
        assert entry["gains"]["same_finetune_budget"] == pytest.approx(0.605 - 0.4)
        assert entry["gains"]["same_compute"] == pytest.approx(0.605 - 0.49)
        assert entry["gains"]["same_compute_per_seed"] == pytest.approx({"0": 0.1, "1": 0.13})
        assert entry["pretrained"]["top1_std"] == pytest.approx(0.01 / 2 ** 0.5)
        low, high = entry["gains"]["same_compute_ci95"]  # mean 0.115, standard error 0.015, t(0.975, 1) = 12.706
        assert (low + high) / 2 == pytest.approx(0.115) and (high - low) / 2 == pytest.approx(12.706 * 0.015, rel=1e-3)
        assert entry["gains"]["same_compute_bootstrap_ci95"] is None  # the runs wrote no predictions
    assert res["probes"]["pretrained"]["top1"] == 0.45 and res["probes"]["random"]["top1"] == 0.35
    table = markdown(res)
    assert "| all labels | pretrained: fine-tuned from the MPP encoder | 100 MPP + 50 | 250.0 TFLOP | 1.5 min | " \
           "60.5% ± 0.7 (60.0% / 61.0%) | 90.5% | - |" in table
    assert "| 10% of the labels | scratch_same_compute: from scratch, the same total training compute | 250 | " \
           "250.0 TFLOP | 2.5 min | 49.0% ± 1.4 (50.0% / 48.0%) | 79.0% | +11.5 |" in table
    assert "| all labels | over scratch_same_compute | +11.5 | +10.0 / +13.0 | [-7.6, +30.6] | - (no predictions) |" \
        in table


def test_the_bootstrap_pairs_every_seed_s_runs_on_the_same_images(tmp_path):
    """Seed 0: 60 of 100 images right against 50 (a subset of them); seed 1: 61 against 48. The
    pooled per-image difference has mean 0.115; its bootstrap interval is about 1.96 standard errors
    either side."""
    fake_experiment(tmp_path / "exp", ["0", "1"], predictions=True)
    gains = results(tmp_path / "exp", ["0", "1"])["gains"]
    low, high = gains["same_compute_bootstrap_ci95"]
    per_image = [(1.0 if i < 60 else 0.0) - (1.0 if i < 50 else 0.0) + (1.0 if i < 61 else 0.0) - (1.0 if i < 48 else 0.0)
                 for i in range(100)]
    per_image = [d / 2 for d in per_image]
    m = sum(per_image) / 100
    se = (sum((d - m) ** 2 for d in per_image) / 99) ** 0.5 / 10
    assert m == pytest.approx(0.115) and low == pytest.approx(m - 1.96 * se, abs=0.01)
    assert high == pytest.approx(m + 1.96 * se, abs=0.01)
    assert results(tmp_path / "exp", ["0", "1"])["gains"]["same_compute_bootstrap_ci95"] == [low, high]  # seeded


def test_the_compute_figure_shows_every_seed(tmp_path):
    fake_experiment(tmp_path / "exp", ["0", "1", "2"])
    main(["results", str(tmp_path / "exp"), "--seeds", "0", "1", "2", "--out", str(tmp_path / "exp" / "results")])
    assert (tmp_path / "exp" / "figures" / "compute.png").stat().st_size > 10_000


def test_cli_writes_json_table_and_compute_figure(tmp_path, capsys):
    exp = tmp_path / "exp"
    fake_experiment(exp, ["0"])
    main(["results", str(exp), "--seeds", "0", "--out", str(exp / "results")])
    out = capsys.readouterr().out
    assert "all labels: pretrained vs scratch +20.0 points at the same fine-tuning budget, +10.0 at the same" in out
    assert json.loads((exp / "results.json").read_text())["labels_10pct"]["scratch"]["top1"] == 0.4
    assert (exp / "figures" / "compute.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no summary.json"):
        main(["results", str(tmp_path / "missing"), "--seeds", "0"])


@pytest.mark.slow
def test_make_experiment_end_to_end_two_runs_at_a_time(make_data, tmp_path):
    """The make target itself, tiny: a 4-step pretraining, 2 seeds x 2 regimes x 3 arms of 2-step
    fine-tunings (scratch_same_compute once its pretrained run has finished) and the two probes,
    run 2 at a time (EXP_JOBS=2) on CIFAR shards; the results, the figures and each run's log."""
    exp = tmp_path / "exp"
    subprocess.run(["make", "experiment", f"EXP_DATA={make_data}", f"EXP_RUNS={exp}", f"EXP_DOCS={tmp_path / 'docs'}",
                    "SEEDS=0 1", "EXP_JOBS=2", "EXP_PRETRAIN_STEPS=4", "EXP_FT_STEPS=2", "EXP_FT10_STEPS=2",
                    "EXP_EVAL_EVERY=1"], cwd=ROOT, check=True, capture_output=True)
    res = json.loads((tmp_path / "docs" / "experiment-results.json").read_text())
    assert res["seeds"] == ["0", "1"]
    for regime in (res, res["labels_10pct"]):
        assert set(regime["pretrained"]["per_seed"]) == {"0", "1"}
        assert regime["scratch_same_compute"]["steps"] > regime["pretrained"]["steps"] == 2
        assert len(regime["gains"]["same_compute_ci95"]) == 2  # a t-interval: two seeds
    for run in ("pretrained-s0", "labels_10pct/scratch_same_compute-s1", "probe-random"):
        summary = json.loads((exp / run / "summary.json").read_text())
        assert summary["eval"]["count"] == 100 and (exp / f"{run}.log").stat().st_size > 0
    def evaluated_at(run: str) -> list[int]:
        rows = map(json.loads, (exp / run / "metrics.jsonl").read_text().splitlines())
        return [r["step"] for r in rows if "val/top1" in r]
    # the first seed evaluates along the way, the others only at the end
    assert evaluated_at("pretrained-s0") == [1, 2] and evaluated_at("pretrained-s1") == [2]
    assert (tmp_path / "docs" / "figures" / "experiment_compute.png").stat().st_size > 10_000


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_the_docs_show_the_shipped_experiment_results(page):
    """The results table of the README and of docs/results.md is the one `make experiment` wrote to docs/ at this commit."""
    res = json.loads((ROOT / "docs" / "experiment-results.json").read_text())
    assert set(REGIMES) - {"all"} <= res.keys()
    assert markdown(res) in (ROOT / page).read_text()
