"""The search behind the experiment's recipes (`make sweep`), the same for both arms:

    python -m finetune.sweep --train SHARDS --holdout SHARDS --pretrained RUN --out DIR [--fraction F]
        [--launch "accelerate launch ..."]

Each arm (`pretrained`: fine-tuned from the MPP encoder RUN; `scratch`) trains on the training
images minus a held-out part and is scored on that part, never on the validation set the results
report, at the horizon it runs in the experiment (the pretrained arm `--steps` steps; the scratch
arm as many as the same total compute buys, as `make experiment`'s `scratch_same_compute`), both
times `--fraction`. The same rounds for both arms, each at the choices of the rounds before:

1. the peak lr on a grid of factors of 2 (`--lrs`, at `--warmup` steps and no layer decay): while
   the best is the lowest or the highest value tried, the next one past it is tried too (at most
   `--max-extend` more), so that the choice is interior: a lower and a higher value scored worse;
2. the warmup steps (`--warmups`);
3. the layer-wise lr decay (`--layer-decays`; 1.0 is none): BEiT and MAE fine-tune with 0.65-0.75.

A run is named by its settings and kept in DIR/<arm>/<steps>-steps/: a setting two rounds share
runs once, and a sweep started again reuses the finished runs (delete DIR to start afresh). Writes DIR/results.json and DIR/results.md: per arm
the horizon and, per setting, the values tried with their held-out top-1, the choice and whether
it is interior. The experiment's recipes (configs/finetune/experiment_<arm>.yaml) carry the choices.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

from finetune.compare import pretraining_flops
from vitcore.atomic import atomic_write_text
from vitcore.rundir import read_summary

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"lr": "peak lr", "warmup_steps": "warmup steps", "layer_decay": "layer-wise lr decay"}


class Trial(NamedTuple):
    lr: float
    warmup_steps: int
    layer_decay: float

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-warmup{self.warmup_steps}-decay{self.layer_decay:g}"


def search(score: Callable[[Trial], float], lrs: list[float], warmup: int, warmups: list[int],
           layer_decays: list[float], max_extend: int = 3) -> dict[str, Any]:
    """The three rounds, scoring each new trial once: {setting: {"tried": [{"value", "top1"}],
    "chosen", "interior"}} in the order searched."""
    scores: dict[Trial, float] = {}

    def tried(trials: list[Trial], setting: str) -> list[dict[str, float]]:
        for trial in trials:
            if trial not in scores:
                scores[trial] = score(trial)
        return [{"value": getattr(t, setting), "top1": scores[t]} for t in trials]

    def round_of(setting: str, rows: list[dict[str, float]]) -> dict[str, Any]:
        rows = sorted(rows, key=lambda r: r["value"])
        best = max(range(len(rows)), key=lambda i: rows[i]["top1"])  # the lowest value on a tie
        interior = 0 < best < len(rows) - 1 and rows[best - 1]["top1"] < rows[best]["top1"] > rows[best + 1]["top1"]
        return {"tried": rows, "chosen": rows[best]["value"], "interior": interior}

    grid, extensions = sorted(lrs), 0
    while True:
        lr_round = round_of("lr", tried([Trial(lr, warmup, 1.0) for lr in grid], "lr"))
        at_low, at_high = lr_round["chosen"] == grid[0], lr_round["chosen"] == grid[-1]
        if lr_round["interior"] or extensions == max_extend or not (at_low or at_high):
            break
        grid = [grid[0] / 2, *grid] if at_low else [*grid, grid[-1] * 2]  # one step past the winning end
        extensions += 1
    lr = lr_round["chosen"]
    warmup_round = round_of("warmup_steps", tried([Trial(lr, w, 1.0) for w in sorted({warmup, *warmups})],
                                                  "warmup_steps"))
    chosen_warmup = int(warmup_round["chosen"])
    decay_round = round_of("layer_decay", tried([Trial(lr, chosen_warmup, d) for d in sorted({1.0, *layer_decays})],
                                                "layer_decay"))
    return {"lr": lr_round, "warmup_steps": warmup_round, "layer_decay": decay_round}


def launched_run(launch: list[str], arm: str, common: list[str], out: Path, steps: int) -> Callable[[Trial], float]:
    """A trial as a fine-tuning run of the arm's experiment recipe under `launch`: its held-out top-1."""
    def score(trial: Trial) -> float:
        run = out / arm / f"{steps}-steps" / trial.name
        if not (run / "summary.json").is_file():
            subprocess.run([*launch, "finetune/run.py", "--config", f"configs/finetune/experiment_{arm}.yaml",
                            *common, f"optim.lr={trial.lr}", f"optim.warmup_steps={trial.warmup_steps}",
                            f"optim.layer_decay={trial.layer_decay}", f"run.steps={steps}", f"run.out_dir={run}"],
                           cwd=ROOT, check=True)
        return read_summary(run)["eval"]["top1"]
    return score


def markdown(results: dict[str, Any]) -> str:
    lines = ["| arm | horizon | setting | tried (held-out top-1) | chosen | interior |", "|---|---|---|---|---|---|"]
    for arm, entry in results.items():
        for setting, words in SETTINGS.items():
            if setting not in entry:
                continue
            r = entry[setting]
            tried = ", ".join(f"{row['value']:g}: {100 * row['top1']:.1f}%" for row in r["tried"])
            lines.append(f"| {arm} | {entry['horizon_steps']} steps | {words} | {tried} | {r['chosen']:g} | "
                         f"{'yes' if r['interior'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="the training images minus the held-out part (shards)")
    parser.add_argument("--holdout", required=True, help="the held-out training images (shards)")
    parser.add_argument("--pretrained", type=Path, required=True, help="the experiment's MPP pretraining run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000, help="the pretrained arm's steps in the experiment")
    parser.add_argument("--fraction", type=float, default=1.0, help="of each arm's horizon (the same for both)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--warmup", type=int, default=40, help="the lr round's warmup steps")
    parser.add_argument("--warmups", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--layer-decays", type=float, nargs="+", default=[0.65, 0.75])
    parser.add_argument("--max-extend", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["pretrained", "scratch"], choices=["pretrained", "scratch"])
    parser.add_argument("--launch", default=f"{sys.executable} -m accelerate.commands.launch --num_processes 1",
                        help="the command that runs finetune/run.py (split like a shell, never run by one)")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction: {args.fraction} is not in (0, 1]")
    common = [f"data.shards={args.train}", f"eval.shards={args.holdout}", f"model.image_size={args.image_size}",
              "run.eval_every=0", "run.image_every=0"]
    results: dict[str, Any] = {}
    for arm in args.arms:
        steps = args.steps
        if arm == "scratch":  # the same total compute: the pretraining's FLOPs buy extra steps
            try:
                steps = round(args.steps + pretraining_flops(args.pretrained) / _finetune_flops_per_step(args.out))
            except FileNotFoundError as e:
                raise SystemExit(f"error: {e}") from None
        horizon = max(1, round(args.fraction * steps))
        init = [f"init_from={args.pretrained if arm == 'pretrained' else 'null'}"]
        score = launched_run(shlex.split(args.launch), arm, common + init, args.out, horizon)
        results[arm] = {"horizon_steps": horizon, **search(score, args.lrs, args.warmup, args.warmups,
                                                           args.layer_decays, args.max_extend)}
        text = markdown(results)
        atomic_write_text(args.out / "results.md", text + "\n")
        atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    for arm, entry in results.items():
        print(f"{arm}: optim.lr={entry['lr']['chosen']:g} optim.warmup_steps={entry['warmup_steps']['chosen']} "
              f"optim.layer_decay={entry['layer_decay']['chosen']:g}")


def _finetune_flops_per_step(out: Path) -> float:
    """The fine-tuning's training FLOPs per step, from any finished pretrained-arm run (the arms
    share the model and batch: from scratch a step costs the same)."""
    for summary in sorted((out / "pretrained").glob("*/*/summary.json")):
        s = read_summary(summary.parent)
        return s["train_flops"] / s["steps"]
    raise FileNotFoundError(f"{out / 'pretrained'}: no finished run to take the FLOPs per step from "
                            "(the scratch arm's horizon is the pretrained arm's compute: sweep it first)")


if __name__ == "__main__":
    main()
