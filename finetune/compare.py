"""Pretrained against scratch, at the same fine-tuning budget and at the same total compute:

    python -m finetune.compare steps PRETRAIN_RUN FINETUNE_RUN   # scratch steps that cost both runs' FLOPs
                                                                 # (PRETRAIN_RUN/checkpoints/<step>: up to it)
    python -m finetune.compare best RUN [RUN ...]                # the run with the best final val top-1
    python -m finetune.compare results EXP_DIR --seeds 0 [1 ...] [--out PREFIX]

Compute is training FLOPs as the tasks count them (`train_flops` in each run's summary.json:
FLOPs per image times images trained on), so a match does not depend on the machine; wall times
are reported beside it. Reads finished runs only (summary.json and metrics.jsonl); nothing is
recomputed, so every number is one a run logged.

`results` reads the layout `make experiment` writes under EXP_DIR: `pretrain/`, for each label
regime (EXP_DIR itself for all labels, `labels_10pct/` for a tenth of them) and seed
`pretrained-s<seed>/`, `scratch-s<seed>/` and `scratch_same_compute-s<seed>/`, and the linear probes
`probe-pretrained/` and `probe-random/`. It writes PREFIX.json, PREFIX.md (the table the README
shows) and figures/compute.png beside them (validation top-1 against cumulative training compute).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from vitcore import checkpoint
from vitcore.atomic import atomic_write_text
from vitcore.report.intervals import runs_interval, t_interval
from vitcore.rundir import read_metrics, read_summary

ARMS = {  # key in results.json -> what the arm is
    "pretrained": "fine-tuned from the MPP encoder",
    "scratch": "from scratch, the same fine-tuning steps",
    "scratch_same_compute": "from scratch, the same total training compute",
}
GAINS = {"same_finetune_budget": "scratch", "same_compute": "scratch_same_compute"}  # gain -> the arm beaten
REGIMES = {"all": ("", "all labels"), "labels_10pct": ("labels_10pct", "10% of the labels")}
PROBES = {"pretrained": "linear probe, MPP encoder", "random": "linear probe, random encoder"}


def pretraining_flops(pretrain: Path) -> float:
    """The training compute of a pretraining run, or of the run up to one of its checkpoints (a
    checkpoint directory: the run's FLOPs per step times the checkpoint's step)."""
    if (pretrain / checkpoint.META).is_file():
        run = pretrain.resolve().parent.parent  # <run>/checkpoints/<step>
        summary = read_summary(run)
        return summary["train_flops"] / summary["steps"] * checkpoint.load_meta(pretrain)["step"]
    return read_summary(pretrain)["train_flops"]


def matched_steps(pretrain: Path, finetune: Path) -> int:
    """Steps of `finetune`'s recipe (from scratch: the same FLOPs per step) whose training compute
    equals `pretrain`'s (a run, or a run's checkpoint) plus `finetune`'s, rounded to the nearest step."""
    ft = read_summary(finetune)
    per_step = ft["train_flops"] / ft["steps"]
    return round((pretraining_flops(pretrain) + ft["train_flops"]) / per_step)


def best_run(runs: list[Path]) -> Path:
    """The run whose final evaluation has the highest top-1 (the first one on a tie)."""
    return max(runs, key=lambda run: read_summary(run)["eval"]["top1"])


def _run_row(run: Path, pretrain: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's final top-1/top-5 and its cost; with `pretrain`, the cost includes the pretraining."""
    s = read_summary(run)
    flops, wall = s["train_flops"], s["wall_time_s"]
    if pretrain is not None:
        flops, wall = flops + pretrain["train_flops"], wall + pretrain["wall_time_s"]
    return {"top1": s["eval"]["top1"], "top5": s["eval"]["top5"], "steps": s["steps"],
            "train_flops": flops, "wall_s": round(wall, 1)}


def _arm(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed rows, their means over seeds and the top-1's standard deviation (None for one seed)."""
    first = next(iter(rows.values()))
    top1 = [r["top1"] for r in rows.values()]
    return {**{k: mean(r[k] for r in rows.values()) for k in ("top1", "top5", "train_flops", "wall_s")},
            "top1_std": stdev(top1) if len(top1) > 1 else None, "steps": first["steps"], "per_seed": rows}


def _gain(name: str, a: dict[str, Any], b: dict[str, Any], runs: dict[str, tuple[Path, Path]]) -> dict[str, Any]:
    """Arm a's top-1 minus arm b's, paired by seed: the mean difference `name`, `name_per_seed`, the
    t-interval over seeds `name_ci95` and, when every run wrote its predictions, the paired bootstrap
    over validation images `name_bootstrap_ci95` (pooled over seeds); `runs`: seed -> (a's, b's run)."""
    per_seed = {seed: a["per_seed"][seed]["top1"] - b["per_seed"][seed]["top1"] for seed in runs}
    differences = list(per_seed.values())
    return {name: mean(differences), f"{name}_per_seed": per_seed, f"{name}_ci95": t_interval(differences),
            f"{name}_bootstrap_ci95": runs_interval(list(runs.values()))}


def results(exp: Path, seeds: list[str]) -> dict[str, Any]:
    pre = read_summary(exp / "pretrain")
    out: dict[str, Any] = {
        "pretrain": {"steps": pre["steps"], "train_flops": pre["train_flops"], "wall_s": pre["wall_time_s"],
                     "val_mpp_top1": (pre.get("eval") or {}).get("top1"), "probe": pre.get("probe"),
                     "probe_start": pre.get("probe_start")},
    }
    for regime, (folder, _) in REGIMES.items():
        arms = {arm: _arm({seed: _run_row(exp / folder / f"{arm}-s{seed}", pre if arm == "pretrained" else None)
                           for seed in seeds}) for arm in ARMS}
        gains = {}
        for name, baseline in GAINS.items():
            runs = {s: (exp / folder / f"pretrained-s{s}", exp / folder / f"{baseline}-s{s}") for s in seeds}
            gains.update(_gain(name, arms["pretrained"], arms[baseline], runs))
        entry = {**arms, "gains": gains}
        if regime == "all":
            out.update(entry)
        else:
            out[regime] = entry
    out["probes"] = {name: {k: read_summary(exp / f"probe-{name}")["eval"][k] for k in ("top1", "top5")}
                     for name in PROBES if (exp / f"probe-{name}").is_dir()}
    out["wall_s"] = round(sum(read_summary(p.parent)["wall_time_s"] for p in exp.glob("**/summary.json")), 1)
    out["seeds"] = seeds
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(res: dict[str, Any]) -> str:
    """The results table (one row per arm and label regime), as the README shows it."""
    pre = res["pretrain"]
    lines = ["| labels | run | steps | training compute | wall | val top-1 | val top-5 | gain |",
             "|---|---|---|---|---|---|---|---|"]
    for regime, (_, words) in REGIMES.items():
        entry = res if regime == "all" else res[regime]
        for arm, what in ARMS.items():
            a = entry[arm]
            steps = f"{pre['steps']} MPP + {a['steps']}" if arm == "pretrained" else str(a["steps"])
            seeds = " / ".join(_pct(r["top1"]) for r in a["per_seed"].values())
            top1 = _pct(a["top1"]) + (f" ± {100 * a['top1_std']:.1f} ({seeds})" if len(a["per_seed"]) > 1 else "")
            gain = {"scratch": "same_finetune_budget", "scratch_same_compute": "same_compute"}.get(arm)
            gain_text = f"{100 * entry['gains'][gain]:+.1f}" if gain else "-"
            lines.append(f"| {words} | {arm}: {what} | {steps} | {a['train_flops'] / 1e12:,.1f} TFLOP | "
                         f"{a['wall_s'] / 60:.1f} min | {top1} | {_pct(a['top5'])} | {gain_text} |")
    for name, what in PROBES.items():
        if name in res["probes"]:
            p = res["probes"][name]
            lines.append(f"| all labels | {what} | - | - | - | {_pct(p['top1'])} | {_pct(p['top5'])} | - |")
    return "\n".join(lines + gains_markdown(res))


def gains_markdown(res: dict[str, Any]) -> list[str]:
    """The gains with their intervals, a table below the results (none for results without them)."""
    lines = ["", "| labels | gain of the pretrained arm | mean | per seed | 95% interval over seeds (t) | "
             "95% interval over validation images (paired bootstrap) |", "|---|---|---|---|---|---|"]
    for regime, (_, words) in REGIMES.items():
        gains = (res if regime == "all" else res[regime])["gains"]
        for name, baseline in GAINS.items():
            if f"{name}_ci95" not in gains:
                return []
            seeds = " / ".join(f"{100 * g:+.1f}" for g in gains[f"{name}_per_seed"].values())
            over_seeds = _interval(gains[f"{name}_ci95"], "one seed")
            over_images = _interval(gains[f"{name}_bootstrap_ci95"], "no predictions")
            lines.append(f"| {words} | over {baseline} | {100 * gains[name]:+.1f} | {seeds} | {over_seeds} | "
                         f"{over_images} |")
    return lines


def _interval(ci: list[float] | None, missing: str) -> str:
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci is not None else f"- ({missing})"


def _curve(run: Path, offset: float) -> tuple[list[float], list[float]]:
    """(cumulative training TFLOPs, val top-1 %) at each of a run's evaluations."""
    s = read_summary(run)
    per_step = s["train_flops"] / s["steps"]
    rows = [r for r in read_metrics(run) if "val/top1" in r]
    return [(offset + r["step"] * per_step) / 1e12 for r in rows], [100 * r["val/top1"] for r in rows]


def compute_figure(exp: Path, res: dict[str, Any], path: Path) -> None:
    """Validation top-1 against cumulative training compute: one panel per label regime, the curves
    of seed `res["seeds"][0]` (the pretrained one starts where its pretraining ended) and every
    other seed's final top-1 as a point of the arm's colour: the seeds' spread."""
    from vitcore.report.plots import figure_panels

    seed = res["seeds"][0]
    pre_flops = res["pretrain"]["train_flops"]
    fig, axes = figure_panels(len(REGIMES))
    styles = {"pretrained": ("C0", "-"), "scratch": ("C1", ":"), "scratch_same_compute": ("C1", "-")}
    for ax, (regime, (folder, words)) in zip(axes, REGIMES.items()):
        for arm, (color, style) in styles.items():
            xs, ys = _curve(exp / folder / f"{arm}-s{seed}", pre_flops if arm == "pretrained" else 0.0)
            ax.plot(xs, ys, style, color=color, marker=".", label=arm.replace("_", " "))
            entry = res if regime == "all" else res[regime]
            others = [r for other, r in entry[arm]["per_seed"].items() if other != seed]
            if others:
                ax.plot([r["train_flops"] / 1e12 for r in others],  # the pretrained arm's counts its pretraining
                        [100 * r["top1"] for r in others], "d", color=color, mfc="none",
                        label=f"{arm.replace('_', ' ')}, other seeds (final)")
        ax.axvline(pre_flops / 1e12, color="0.6", lw=0.8, ls="--", label="end of MPP pretraining")
        if regime == "all":
            for name, marker in (("pretrained", "o"), ("random", "x")):
                run = exp / f"probe-{name}"
                if run.is_dir():
                    x = (pre_flops if name == "pretrained" else 0.0) + read_summary(run)["train_flops"]
                    ax.plot([x / 1e12], [100 * res["probes"][name]["top1"]], marker, color="C2" if name ==
                            "pretrained" else "0.4", label=f"linear probe, {name} encoder")
        ax.set(title=f"{words} (curves: seed {seed})", xlabel="cumulative training compute (TFLOP)",
               ylabel="val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _write(prefix: Path, text: str, data: dict[str, Any]) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prefix.with_suffix(".md"), text + "\n")
    atomic_write_text(prefix.with_suffix(".json"), json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("steps", help="from-scratch steps with the training compute of a pretraining and a fine-tuning")
    p.add_argument("pretrain", type=Path)
    p.add_argument("finetune", type=Path)
    p = sub.add_parser("best", help="print the run with the best final val top-1")
    p.add_argument("runs", nargs="+", type=Path)
    p = sub.add_parser("results", help="the experiment's results.json, table and compute figure")
    p.add_argument("exp", type=Path)
    p.add_argument("--seeds", nargs="+", required=True)
    p.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "steps":
            print(matched_steps(args.pretrain, args.finetune))
        elif args.command == "best":
            print(best_run(args.runs))
        else:
            res = results(args.exp, args.seeds)
            text = markdown(res)
            print(text)
            for regime, (_, words) in REGIMES.items():
                g = (res if regime == "all" else res[regime])["gains"]
                print(f"{words}: pretrained vs scratch {100 * g['same_finetune_budget']:+.1f} points at the same "
                      f"fine-tuning budget, {100 * g['same_compute']:+.1f} at the same total compute")
            if args.out:
                _write(args.out, text, res)
                compute_figure(args.exp, res, args.out.parent / "figures" / "compute.png")
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
