"""How much pretraining pays: `make pretrain-curve`'s points, table, JSON and figure.

    python -m finetune.curve CURVE_DIR [--out PREFIX]

Reads the layout `make pretrain-curve` writes under CURVE_DIR: `pretrain/`, one MPP pretraining
whose checkpoints were kept (`checkpoints/step-*`, and `checkpoints/best`, chosen by the monitor's
probe), and for each point fine-tuned from (a checkpoint's name) and each label regime (`all`,
`labels_10pct`): `points/<checkpoint>/<regime>/pretrained/` (fine-tuned from it) and
`points/<checkpoint>/<regime>/scratch_same_compute/` (from scratch with the same total training
compute: the pretraining up to that checkpoint plus the fine-tuning). Each point's gain carries its
paired bootstrap interval over the validation images (`vitcore.report.intervals`). Writes
PREFIX.json (a list of points, by pretraining steps), PREFIX.md and figures/pretrain_curve.png
beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from finetune.compare import pretraining_flops
from vitcore import checkpoint
from vitcore.atomic import atomic_write_text
from vitcore.report.intervals import runs_interval
from vitcore.rundir import read_summary

REGIMES = {"all": "all labels", "labels_10pct": "10% of the labels"}
ARMS = ("pretrained", "scratch_same_compute")


def points(curve: Path) -> list[dict[str, Any]]:
    """One entry per point: the checkpoint, its pretraining steps and FLOPs, whether the probe chose
    it (`best`), and per regime both arms' top-1 and steps, the gain and its bootstrap interval."""
    checkpoints = curve / "pretrain" / "checkpoints"
    best = checkpoint.find_best(checkpoints)
    out = []
    for point in sorted(p for p in (curve / "points").iterdir() if p.is_dir()):
        ckpt = checkpoints / point.name
        entry: dict[str, Any] = {"checkpoint": point.name, "pretrain_steps": checkpoint.load_meta(ckpt)["step"],
                                 "pretrain_flops": pretraining_flops(ckpt),
                                 "probe_best": best is not None and ckpt.resolve() == best.resolve()}
        for regime in REGIMES:
            runs = {arm: point / regime / arm for arm in ARMS}
            summaries = {arm: read_summary(run) for arm, run in runs.items()}
            top1 = {arm: s["eval"]["top1"] for arm, s in summaries.items()}
            entry[regime] = {"top1": top1, "steps": {arm: s["steps"] for arm, s in summaries.items()},
                             "gain_same_compute": top1["pretrained"] - top1["scratch_same_compute"],
                             "gain_same_compute_bootstrap_ci95": runs_interval([tuple(runs.values())])}
        out.append(entry)
    return sorted(out, key=lambda e: (e["pretrain_steps"], e["checkpoint"] == "best"))


def markdown(entries: list[dict[str, Any]]) -> str:
    lines = ["| pretraining | compute | labels | pretrained | scratch, same compute | gain | 95% interval (images) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        name = f"{e['pretrain_steps']} steps" + (" (probe's best)" if e["probe_best"] else "")
        for regime, words in REGIMES.items():
            r = e[regime]
            ci = r["gain_same_compute_bootstrap_ci95"]
            interval = f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "- (no predictions)"
            lines.append(f"| {name} | {e['pretrain_flops'] / 1e12:,.1f} TFLOP | {words} | "
                         f"{100 * r['top1']['pretrained']:.1f}% | {100 * r['top1']['scratch_same_compute']:.1f}% "
                         f"({r['steps']['scratch_same_compute']} steps) | {100 * r['gain_same_compute']:+.1f} | "
                         f"{interval} |")
    return "\n".join(lines)


def figure(entries: list[dict[str, Any]], path: Path) -> None:
    """The gain at the same compute against pretraining compute, one panel per label regime, with
    each point's bootstrap interval; the probe's choice ringed."""
    from vitcore.report.plots import figure_panels

    fig, axes = figure_panels(len(REGIMES))
    for ax, (regime, words) in zip(axes, REGIMES.items()):
        xs = [e["pretrain_flops"] / 1e12 for e in entries]
        ys = [100 * e[regime]["gain_same_compute"] for e in entries]
        cis = [e[regime]["gain_same_compute_bootstrap_ci95"] or [e[regime]["gain_same_compute"]] * 2 for e in entries]
        errors = [[y - 100 * ci[0] for y, ci in zip(ys, cis)], [100 * ci[1] - y for y, ci in zip(ys, cis)]]
        ax.errorbar(xs, ys, yerr=errors, fmt="o-", color="C0", capsize=3, label="gain, 95% interval (images)")
        for x, y, e in zip(xs, ys, entries):
            if e["probe_best"]:
                ax.plot([x], [y], "o", ms=12, mfc="none", color="C3", label="the probe's best checkpoint")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(title=f"{words}: pretrained minus scratch", ylabel="gain at the same compute (points)",
               xlabel="pretraining compute (TFLOP)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("curve", type=Path, help="the folder `make pretrain-curve` writes")
    parser.add_argument("--out", type=Path, help="also write OUT.json, OUT.md and figures/pretrain_curve.png beside")
    args = parser.parse_args(argv)
    try:
        entries = points(args.curve)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    text = markdown(entries)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".md"), text + "\n")
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(entries, indent=2) + "\n")
        figure(entries, args.out.parent / "figures" / "pretrain_curve.png")


if __name__ == "__main__":
    main()
