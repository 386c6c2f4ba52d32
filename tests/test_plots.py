"""vitcore.report.plots on two hand-written runs (no training): the figures and the images logged to TensorBoard."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitcore.report import plots

pytest.importorskip("matplotlib")


def _fake_run(run: Path, stage: str, images: dict[str, torch.Tensor]) -> Path:
    """A run dir as the engine leaves it: metrics.jsonl (training and evaluation rows), summary.json,
    TensorBoard events with scalars and `images` {tag: (3, H, W)} logged at steps 2 and 5."""
    from torch.utils.tensorboard import SummaryWriter

    run.mkdir(parents=True)
    probe = lambda step: {"step": step, "samples": 8 * step,  # noqa: E731 (the monitor's rows)
                          **{f"probe/{p}_top1_{f}": 0.1 + 0.05 * step for p in ("knn", "linear")
                             for f in ("cls", "patch_mean")}}
    rows = [probe(0)] if stage == "pretrain" else []
    for step in range(1, 7):
        row = {"step": step, "samples": 8 * step, "loss": 2.0 / step, "lr": 1e-3}
        if stage == "pretrain":
            row.update(acc=0.1 * step, baseline_acc=0.2)
        else:
            row["acc"] = 0.1 * step
        rows.append(row)
        if stage == "finetune" and step % 3 == 0:
            rows.append({"step": step, "samples": 8 * step, "val/top1": 0.1 * step, "val/top5": 0.5,
                         "val/loss": 1.0, "val/count": 100.0, "val/ema_top1": 0.09 * step})
        if stage == "pretrain" and step % 3 == 0:
            rows.append(probe(step))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    declared = ({"title": "pretraining", "curves": [["train loss", ["loss"]], ["MPP accuracy", ["acc", "baseline_acc"]]]}
                if stage == "pretrain" else {"title": "fine-tuning", "curves": [["train loss", ["loss"]]],
                                             "evaluated": ["model", "ema"]})
    (run / "summary.json").write_text(json.dumps({"stage": stage, "steps": 6, "final": rows[-1], **declared}))
    writer = SummaryWriter(str(run))
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "samples"):
                writer.add_scalar(key, value, row["step"])
    for tag, image in images.items():
        writer.add_image(tag, torch.zeros(3, 8, 8), 2)  # an earlier image of another size: not the one kept
        writer.add_image(tag, image, 5)
    writer.close()
    return run


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    finetune = {"attention/rollout": torch.rand(3, 16, 24), "val/confusion": torch.rand(3, 20, 20)}
    return {"pretrained": _fake_run(tmp_path / "ft", "finetune", finetune),
            "mpp": _fake_run(tmp_path / "pt", "pretrain", {"mpp/predictions": torch.rand(3, 12, 40),
                                                           "probe/attention_heads": torch.rand(3, 30, 50)})}


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_plot_runs_writes_figures_and_logged_images(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "figures"
    paths = plots.plot_runs(list(runs.items()), out)
    assert sorted(p.name for p in paths) == sorted(
        ["training_curves.png", "val_top1.png", "probes.png", "pretrained_attention_rollout.png",
         "pretrained_val_confusion.png", "mpp_mpp_predictions.png", "mpp_probe_attention_heads.png"])
    assert all(p.parent == out and p.is_file() for p in paths)
    width, height = _size(out / "training_curves.png")  # three panels: pretrain loss, MPP acc, finetune loss
    assert width > 2 * height > 400
    width, height = _size(out / "val_top1.png")  # one panel: only the fine-tuning run has evaluations
    assert 400 < width < 2 * height
    assert _size(out / "pretrained_attention_rollout.png") == (24, 16)  # the last image, (W, H) as logged
    assert _size(out / "pretrained_val_confusion.png") == (20, 20)
    assert _size(out / "mpp_mpp_predictions.png") == (40, 12)
    assert _size(out / "mpp_probe_attention_heads.png") == (50, 30)
    width, height = _size(out / "probes.png")  # two panels: kNN and linear probe
    assert 2 * height < width < 3 * height


def test_cli_names_runs_and_prints_paths(runs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    plots.main(["--out", str(out), f"scratch={runs['pretrained']}", str(runs["mpp"])])  # unnamed: the dir name
    printed = capsys.readouterr().out.split()
    expected = {"training_curves.png", "val_top1.png", "probes.png", "scratch_attention_rollout.png",
                "scratch_val_confusion.png", "pt_mpp_predictions.png", "pt_probe_attention_heads.png"}
    assert {Path(p).name for p in printed} == expected
    assert all(Path(p).is_file() and _size(Path(p))[0] > 0 for p in printed)


def test_missing_summary_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "running").mkdir()
    with pytest.raises(SystemExit, match="no summary.json"):
        plots.main(["--out", str(tmp_path / "out"), str(tmp_path / "running")])


def test_missing_matplotlib_says_how_to_install(runs: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit, match=r"pip install matplotlib"):
        plots.main(["--out", str(tmp_path / "out"), str(runs["pretrained"])])
