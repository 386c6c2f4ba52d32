"""README figures from finished runs:

    python -m vitcore.report.plots --out DIR [NAME=]RUN_DIR [[NAME=]RUN_DIR ...]

Writes into DIR, from each run's metrics.jsonl and summary.json (`vitcore.rundir`):
training_curves.png (the training panels each run's task declares, grouped by the task's title:
train loss, and whatever else the task plots), val_top1.png (validation top-1 vs step, one panel
per task title) and probes.png (the feature monitor's kNN and linear-probe top-1 vs step); and from
its TensorBoard events the last image of each image tag as <NAME>_<tag, / as _>.png (the PNG bytes
as logged: e.g. <NAME>_val_confusion.png, <NAME>_probe_attention_rollout.png).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vitcore.rundir import is_training_row, read_metrics, read_summary
from vitcore.train.task import metric_key

Rows = list[dict[str, Any]]
Run = tuple[str, dict[str, Any], Rows]  # (name, summary, metrics rows)
PROBES = {"knn": "weighted kNN top-1", "linear": "linear probe top-1"}  # probe -> panel title
FEATURES = {"cls": "[CLS]", "patch_mean": "mean patch token"}  # feature -> line label


def load_run(run: Path) -> tuple[dict[str, Any], Rows]:
    """A finished run's summary.json and metrics.jsonl rows."""
    return read_summary(run), read_metrics(run)


def figure_panels(count: int, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A Figure (no pyplot state) with `count` axes side by side."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or make setup)") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * count, height), dpi=120, layout="constrained")
    return fig, list(fig.subplots(1, count, squeeze=False)[0])


def _series(rows: Rows, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have `key`."""
    points = [(r["step"], r[key] * scale) for r in rows if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _title(summary: dict[str, Any]) -> str:
    """The word for a run's task in titles (its summary's "title")."""
    return str(summary["title"])


def _groups(runs: list[Run], key: str) -> list[str]:
    """The titles of the tasks whose runs have a `key` row, in the order the runs were given."""
    titles = [_title(s) for _, s, rows in runs if any(key in r for r in rows)]
    return list(dict.fromkeys(titles))


def training_curves(runs: list[Run], path: Path) -> Path | None:
    """The declared training panels (train loss first), one set per task title; None without training rows."""
    panels = []
    for title in _groups(runs, "loss"):
        declared = next(s.get("curves") for _, s, _ in runs if _title(s) == title) or [["train loss", ["loss"]]]
        panels += [(title, name, keys) for name, keys in declared]
    if not panels:
        return None
    fig, axes = figure_panels(len(panels))
    for ax, (title, name, keys) in zip(axes, panels):
        percent = list(keys) != ["loss"]  # accuracy-like panels in %
        for run, s, rows in runs:
            train = [r for r in rows if is_training_row(r) and _title(s) == title]
            if not train:
                continue
            color = None
            for key in keys:
                (line,) = ax.plot(*_series(train, key, 100 if percent else 1), color=color,
                                  ls="-" if color is None else "--", label=run if len(keys) == 1 else f"{run}: {key}")
                color = line.get_color()
        ax.set(title=f"{title}: {name}", xlabel="step", ylabel="%" if percent else "loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def val_top1(runs: list[Run], path: Path) -> Path | None:
    """Validation top-1 (%) vs step, a marker per evaluation, one panel per task title; None without
    evaluation rows."""
    titles = _groups(runs, "val/top1")
    if not titles:
        return None
    fig, axes = figure_panels(len(titles))
    for ax, title in zip(axes, titles):
        for name, s, rows in runs:
            if _title(s) != title or not any("val/top1" in r for r in rows):
                continue
            (line,) = ax.plot(*_series(rows, "val/top1", 100), marker="o", label=name)
            for other in s.get("evaluated", [])[1:]:  # weights evaluated beside the trained ones (an EMA)
                key = f"val/{metric_key(other, 'top1')}"
                if any(key in r for r in rows):
                    ax.plot(*_series(rows, key, 100), marker="s", ls="--", color=line.get_color(),
                            label=f"{name} ({other})")
        ax.set(title=f"{title}: validation top-1", xlabel=f"{title} step", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def probes(runs: list[Run], path: Path) -> Path | None:
    """The monitor's kNN and linear-probe top-1 (%) vs training step, a line per run and
    feature, the step-0 point being the randomly initialised encoder; None without probe rows."""
    if not any("probe/knn_top1_cls" in r for _, _, rows in runs for r in rows):
        return None
    fig, axes = figure_panels(len(PROBES))
    for ax, (probe, title) in zip(axes, PROBES.items()):
        for name, _, rows in runs:
            for feature, label in FEATURES.items():
                steps, values = _series(rows, f"probe/{probe}_top1_{feature}", 100)
                if steps:
                    ax.plot(steps, values, marker="o", label=f"{name}: {label}")
        ax.set(title=f"monitor: {title}", xlabel="step", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def logged_images(run: Path, name: str, out: Path) -> list[Path]:
    """The last image of each image tag in the run's TensorBoard events, as PNG files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    stem = _file_name(name)
    paths = []
    for tag in sorted(events.Tags()["images"]):
        last = max(events.Images(tag), key=lambda e: e.step)
        path = out / f"{stem}_{_file_name(tag)}.png"
        path.write_bytes(last.encoded_image_string)
        paths.append(path)
    return paths


def _file_name(text: str) -> str:
    """`text` usable in a file name: anything but letters, digits, `.` and `-` becomes `_`."""
    return re.sub(r"[^\w.-]", "_", text)


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
