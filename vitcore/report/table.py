"""A results table for finished runs:

    python -m vitcore.report [NAME=]RUN_DIR [[NAME=]RUN_DIR ...] [--out PREFIX]

Reads each run's summary.json and metrics.jsonl (nothing is recomputed), so the numbers printed
are the ones the run logged. `--out` also writes the table to PREFIX.md and the numbers to
PREFIX.json as {NAME: {"top1": ..., "top5": ..., ...}} (fractions). `--gain A,B` (repeatable) adds
"gains": {"A - B": top-1 of A minus top-1 of B}, a line each under the table; when both runs wrote
their predictions (`predictions.jsonl`: classification runs do), also "A - B_bootstrap_ci95": the
95% paired bootstrap interval over the validation images (`vitcore.report.intervals`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vitcore.atomic import atomic_write_text
from vitcore.report.intervals import runs_interval
from vitcore.rundir import columns, read_run


def table(runs: list[dict[str, Any]]) -> str:
    cols = columns(runs)
    header = ["run", "stage", "steps", "images", "compute", "wall", "img/s"] + [c[0] for c in cols]
    lines = []
    for r in runs:
        s = r["summary"]
        flops = f"{s['train_flops'] / 1e12:,.1f} TFLOP" if "train_flops" in s else "?"
        cells = [r["run"], s.get("stage", "?"), str(s.get("steps", "?")), str(s.get("samples", "?")), flops,
                 f"{s.get('wall_time_s', 0) / 60:.1f} min", f"{s.get('img_s', 0):.0f}"]
        for _, key, fmt in cols:
            if key not in r["last"]:
                cells.append("-")
                continue
            first = r["first"].get(key)
            shows_change = key in ("loss", "acc") or key.startswith("probe.")  # probes: from the random init
            change = f" (from {fmt.format(first)})" if first is not None and shows_change else ""
            cells.append(fmt.format(r["last"][key]) + change)
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt_row(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt_row(header), sep, *map(fmt_row, lines)])


def numbers(runs: list[dict[str, Any]], gains: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """The table's numbers as plain JSON: per run its stage, steps, training FLOPs, wall time,
    throughput, final evaluation (top1, top5, count as fractions/counts) and the columns' values;
    for each (a, b) of `gains`, a's top-1 minus b's under "gains"."""
    out: dict[str, Any] = {}
    for r in runs:
        s = r["summary"]
        entry = {k: s.get(k) for k in ("stage", "steps", "samples", "train_flops", "wall_time_s", "img_s")}
        entry.update({k: v for k, v in (s.get("eval") or {}).items() if k in ("top1", "top5", "count")})
        entry.update({key: r["last"][key] for _, key, _ in columns(runs) if key in r["last"]})
        for other in s.get("evaluated", [])[1:]:  # weights evaluated beside the trained ones: "ema"
            if s.get(f"eval_{other}"):
                entry[other] = s[f"eval_{other}"]
        out[r["run"]] = entry
    by_name = {r["run"]: r for r in runs}
    for a, b in gains:
        if "top1" not in out.get(a, {}) or "top1" not in out.get(b, {}):
            raise ValueError(f"--gain {a},{b}: both runs need a final evaluation (top1)")
        out.setdefault("gains", {})[f"{a} - {b}"] = out[a]["top1"] - out[b]["top1"]
        try:
            interval = runs_interval([(by_name[a]["dir"], by_name[b]["dir"])])
        except ValueError as e:
            raise ValueError(f"--gain {a},{b}: {e}") from None
        if interval is not None:
            out["gains"][f"{a} - {b}_bootstrap_ci95"] = interval
    return out


def gain_line(pair: str, gains: dict[str, Any]) -> str:
    """"A - B: +2.3 points of val top-1", with its interval over validation images when there is one."""
    line = f"{pair}: {gains[pair] * 100:+.1f} points of val top-1"
    if (ci := gains.get(f"{pair}_bootstrap_ci95")) is not None:
        line += (" (95% interval over the validation images, paired bootstrap: "
                 f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})")
    return line + "."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a results table for finished runs.")
    parser.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR")
    parser.add_argument("--out", type=Path, help="also write the table to OUT.md and the numbers to OUT.json")
    parser.add_argument("--gain", action="append", default=[], metavar="A,B",
                        help="report run A's val top-1 minus run B's (repeatable)")
    args = parser.parse_args(argv)
    gains = [tuple(g.split(",", 1)) for g in args.gain]
    if any(len(g) != 2 for g in gains):
        parser.error("--gain takes two run names: A,B")
    named = [item.split("=", 1) if "=" in item else [None, item] for item in args.runs]
    try:
        runs = [read_run(Path(path), name) for name, path in named]
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    text = table(runs)
    notes = ["Training metrics are means over each run's last logging window; (from ...) is the first window's.",
             "val columns: the final weights on the whole validation set."]
    if any("probe" in r["summary"] for r in runs):
        notes.append("kNN / linear probe: top-1 of the encoder's features on the monitor's labelled sets at the "
                     "end of pretraining; (from ...) is the randomly initialised encoder's.")
    try:
        result = numbers(runs, gains)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    notes.append("compute: the run's training FLOPs (FLOPs per image x images trained on).")
    notes += [gain_line(pair, result["gains"]) for pair in result.get("gains", {}) if not pair.endswith("_ci95")]
    print(text + "\n\n" + "\n".join(notes))
    print(f"TensorBoard: tensorboard --logdir {Path(named[0][1]).parent}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".md"), text + "\n\n" + "\n".join(notes) + "\n")
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
