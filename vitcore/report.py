"""A results table for finished runs: `python -m vitcore.report RUN_DIR [RUN_DIR ...]`.

Reads each run's summary.json and metrics.jsonl (nothing is recomputed), so the numbers printed
are the ones the run logged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vitcore.monitor import read_metrics

# (column, metrics key, format); a column is shown when some run logged its key.
COLUMNS = [
    ("loss", "loss", "{:.3f}"),
    ("MPP acc", "acc", "{:.1%}"),
    ("most-frequent-colour acc", "baseline_acc", "{:.1%}"),
]


def read_run(run: Path) -> dict[str, Any]:
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run}: no summary.json (the run has not finished)")
    summary = json.loads(summary_path.read_text())
    rows = read_metrics(run / "metrics.jsonl")
    return {"run": str(run), "summary": summary, "first": rows[0] if rows else {}, "last": summary.get("final") or {}}


def table(runs: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(c[1] in r["last"] for r in runs)]
    header = ["run", "stage", "steps", "images", "wall", "img/s"] + [c[0] for c in cols]
    lines = []
    for r in runs:
        s = r["summary"]
        cells = [r["run"], s.get("stage", "?"), str(s.get("steps", "?")), str(s.get("samples", "?")),
                 f"{s.get('wall_time_s', 0) / 60:.1f} min", f"{s.get('img_s', 0):.0f}"]
        for _, key, fmt in cols:
            if key not in r["last"]:
                cells.append("-")
                continue
            first = r["first"].get(key)
            change = f" (from {fmt.format(first)})" if first is not None and key in ("loss", "acc") else ""
            cells.append(fmt.format(r["last"][key]) + change)
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt_row(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt_row(header), sep, *map(fmt_row, lines)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a results table for finished runs.")
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        runs = [read_run(r) for r in args.runs]
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(table(runs))
    print("\nMetrics are means over each run's last logging window; (from ...) is the first window's.")
    print(f"TensorBoard: tensorboard --logdir {Path(args.runs[0]).parent}")


if __name__ == "__main__":
    main()
