"""README figures from finished runs:

    python -m vitcore.report.plots --out DIR [NAME=]RUN_DIR [[NAME=]RUN_DIR ...]

Writes into DIR, from each run's metrics.jsonl and summary.json: training_curves.png (train loss
vs step, one panel per stage; for pretraining also MPP accuracy vs the most-frequent-colour
baseline), val_top1.png (validation top-1 vs step, one panel per stage) and probes.png (the
pretraining monitor's kNN and linear-probe top-1 vs step); and from its TensorBoard events the
last image of each image tag: <NAME>_mpp_predictions.png, <NAME>_attention_rollout.png,
<NAME>_confusion.png, <NAME>_monitor_rollout.png, <NAME>_monitor_heads.png (the PNG bytes as logged).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from vitcore.train.logger import read_metrics

Rows = list[dict[str, Any]]

STAGES = {"pretrain": "pretraining", "finetune": "fine-tuning"}  # stage -> the word in titles
IMAGE_TAGS = {"pretrain/examples": "mpp_predictions", "finetune/examples": "attention_rollout",
              "val/confusion": "confusion", "probe/attention_rollout": "monitor_rollout",
              "probe/attention_heads": "monitor_heads"}
PROBES = {"knn": "weighted kNN top-1", "linear": "linear probe top-1"}  # probe -> panel title
FEATURES = {"cls": "[CLS]", "patch_mean": "mean patch token"}  # feature -> line label


def load_run(run: Path) -> tuple[str, Rows]:
    """A run's stage (summary.json's "stage") and its metrics.jsonl rows."""
    if not (run / "summary.json").is_file():
        raise FileNotFoundError(f"{run}: no summary.json (the run has not finished)")
    stage = json.loads((run / "summary.json").read_text()).get("stage", "?")
    metrics = run / "metrics.jsonl"
    return stage, read_metrics(metrics) if metrics.is_file() else []


def _axes(panels: int, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A Figure (no pyplot state) with `panels` axes side by side."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or make setup)") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * panels, height), dpi=120, layout="constrained")
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _series(rows: Rows, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have `key`."""
    points = [(r["step"], r[key] * scale) for r in rows if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _stages(runs: list[tuple[str, str, Rows]], key: str) -> list[str]:
    """The stages of the runs with a `key` row, pretraining first."""
    found = {stage for _, stage, rows in runs if any(key in r for r in rows)}
    order = list(STAGES)
    return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))


def training_curves(runs: list[tuple[str, str, Rows]], path: Path) -> Path | None:
    """Train loss vs step per stage, plus MPP accuracy vs its baseline; None without training rows."""
    panels = [(stage, what) for stage in _stages(runs, "loss")
              for what in (("loss", "acc") if stage == "pretrain" else ("loss",))]
    if not panels:
        return None
    fig, axes = _axes(len(panels))
    for ax, (stage, what) in zip(axes, panels):
        for name, s, rows in runs:
            train = [r for r in rows if "loss" in r and s == stage]  # evaluation rows carry val/ keys only
            if not train:
                continue
            if what == "loss":
                ax.plot(*_series(train, "loss"), label=name)
            else:
                (line,) = ax.plot(*_series(train, "acc", 100), label=f"{name}: MPP")
                ax.plot(*_series(train, "baseline_acc", 100), ls="--", color=line.get_color(),
                        label=f"{name}: most-frequent colour")
        title = STAGES.get(stage, stage)
        ax.set(title=f"{title}: {'train loss' if what == 'loss' else 'MPP accuracy'}", xlabel="step",
               ylabel="loss" if what == "loss" else "accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def val_top1(runs: list[tuple[str, str, Rows]], path: Path) -> Path | None:
    """Validation top-1 (%) vs step, a marker per evaluation, one panel per stage; None without
    evaluation rows."""
    stages = _stages(runs, "val/top1")
    if not stages:
        return None
    fig, axes = _axes(len(stages))
    for ax, stage in zip(axes, stages):
        for name, s, rows in runs:
            if s != stage or not any("val/top1" in r for r in rows):
                continue
            (line,) = ax.plot(*_series(rows, "val/top1", 100), marker="o", label=name)
            if any("val/ema_top1" in r for r in rows):
                ax.plot(*_series(rows, "val/ema_top1", 100), marker="s", ls="--", color=line.get_color(),
                        label=f"{name} (EMA)")
        what = "validation MPP accuracy" if stage == "pretrain" else "validation top-1"
        ax.set(title=f"{STAGES.get(stage, stage)}: {what}", xlabel=f"{STAGES.get(stage, stage)} step", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def probes(runs: list[tuple[str, str, Rows]], path: Path) -> Path | None:
    """The monitor's kNN and linear-probe top-1 (%) vs pretraining step, a line per run and
    feature, the step-0 point being the randomly initialised encoder; None without probe rows."""
    if not any("probe/knn_top1_cls" in r for _, _, rows in runs for r in rows):
        return None
    fig, axes = _axes(len(PROBES))
    for ax, (probe, title) in zip(axes, PROBES.items()):
        for name, _, rows in runs:
            for feature, label in FEATURES.items():
                steps, values = _series(rows, f"probe/{probe}_top1_{feature}", 100)
                if steps:
                    ax.plot(steps, values, marker="o", label=f"{name}: {label}")
        ax.set(title=f"monitor: {title}", xlabel="pretraining step", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def logged_images(run: Path, name: str, out: Path) -> list[Path]:
    """The last image of each tag in IMAGE_TAGS from the run's TensorBoard events, as PNG files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    stem = re.sub(r"[^\w.-]", "_", name)  # a file name whatever the run's name
    paths = []
    for tag, suffix in IMAGE_TAGS.items():
        if tag not in events.Tags()["images"]:
            continue
        last = max(events.Images(tag), key=lambda e: e.step)
        path = out / f"{stem}_{suffix}.png"
        path.write_bytes(last.encoded_image_string)
        paths.append(path)
    return paths


def plot_runs(runs: list[tuple[str, Path]], out: Path) -> list[Path]:
    """All the figures for (name, run dir) pairs, written into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = [(name, *load_run(run)) for name, run in runs]
    paths = [p for p in (training_curves(loaded, out / "training_curves.png"), val_top1(loaded, out / "val_top1.png"),
                         probes(loaded, out / "probes.png")) if p is not None]
    for name, run in runs:
        paths += logged_images(run, name, out)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write README figures (PNG) for finished runs.")
    parser.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    runs = [(item.split("=", 1)[0], Path(item.split("=", 1)[1])) if "=" in item else (Path(item).name, Path(item))
            for item in args.runs]
    try:
        paths = plot_runs(runs, args.out)
    except (FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print("\n".join(map(str, paths)) if paths else "no figures: the runs have no metrics or images")


if __name__ == "__main__":
    main()
