"""The run directory's format, in one place: the logger writes through it, the report, the plots
and the export read through it.

    <run>/config.yaml      the resolved config (`vitcore.config.save_config`)
    <run>/metrics.jsonl    one JSON object per logging step: step, samples, the training scalars;
                           evaluation and monitor rows carry `val/...` and `probe/...` keys instead
    <run>/summary.json     written once, when the run finishes: final metrics, wall time, throughput,
                           the task's declared report columns ("columns") and figure panels
    <run>/predictions.jsonl  the final evaluation's prediction of every validation image, for a
                           task that gives them (classification): {"key", "label", "top5"} per
                           line, sorted by key; what paired comparisons of two runs resample
    <run>/checkpoints/     `vitcore.checkpoint`'s format
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitcore.atomic import atomic_write_text

CONFIG, METRICS, SUMMARY, PREDICTIONS = "config.yaml", "metrics.jsonl", "summary.json", "predictions.jsonl"
Column = tuple[str, str, str]  # (title, key, format): see `columns`
DEFAULT_COLUMNS: list[Column] = [("loss", "loss", "{:.3f}")]


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl ([] without one), passing over blank lines and the
    half-written last line a crash can leave."""
    path = run / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def is_training_row(row: dict[str, Any]) -> bool:
    """Whether a metrics.jsonl row is a training window's (evaluation and monitor rows carry
    `val/` and `probe/` keys only)."""
    return "loss" in row


def append_metrics(run: Path, row: dict[str, Any]) -> None:
    with (run / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run: Path, step: int) -> None:
    """Drop the rows an earlier run logged after `step`, so each step appears once after a resume."""
    if not (run / METRICS).exists():
        return
    kept = [row for row in read_metrics(run) if row["step"] <= step]
    atomic_write_text(run / METRICS, "".join(json.dumps(row) + "\n" for row in kept))  # the old file or the new


def read_summary(run: Path) -> dict[str, Any]:
    path = run / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {SUMMARY} (the run has not finished)")
    return json.loads(path.read_text())


def write_summary(run: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run / SUMMARY, json.dumps(summary, indent=2))


def write_predictions(run: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(run / PREDICTIONS, "".join(json.dumps(row) + "\n" for row in rows))


def read_predictions(run: Path) -> list[dict[str, Any]] | None:
    """A run's per-image predictions (see the format above), or None when it has none."""
    path = run / PREDICTIONS
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_run(run: Path, name: str | None = None) -> dict[str, Any]:
    """A finished run as the report shows it: {"run", "dir", "summary", "first", "last"}, where "last" maps
    each column key to its final value (the final training window's metrics, "eval.<name>",
    "eval_<prefix>.<name>" and "probe.<name>" from the summary) and "first" to its first value (the
    first training window; the monitor's scores of the randomly initialised encoder)."""
    summary = read_summary(run)
    train = [row for row in read_metrics(run) if is_training_row(row)]
    last = dict(summary.get("final") or {})
    for section, values in summary.items():
        if (section == "probe" or section.startswith("eval")) and isinstance(values, dict):
            last.update({f"{section}.{k}": v for k, v in values.items()})
    first = {**(train[0] if train else {}), **{f"probe.{k}": v for k, v in (summary.get("probe_start") or {}).items()}}
    return {"run": name or str(run), "dir": run, "summary": summary, "first": first, "last": last}


def columns(runs: list[dict[str, Any]]) -> list[Column]:
    """The union of the runs' declared columns, in order of first appearance, that some run has a
    value for. Tasks that title one key differently share its column ("MPP acc / train acc")."""
    titles: dict[str, list[str]] = {}
    formats: dict[str, str] = {}
    for r in runs:
        for title, key, fmt in r["summary"].get("columns") or DEFAULT_COLUMNS:
            if title not in titles.setdefault(key, []):
                titles[key].append(title)
            formats.setdefault(key, fmt)
    return [(" / ".join(t), key, formats[key]) for key, t in titles.items() if any(key in r["last"] for r in runs)]
