"""Our fine-tuning loop trains as well as timm's: a short version of benchmarks/peer_parity.py
(from scratch, 300 steps, seed 0, all of Imagenette at 64 px) keeps the gap of issue 22 closed.
Before its fix (a zero-initialised head, the patch conv drawn from normal(0.02)) ours reached
36.2% where timm's loop reached 47.9% at 500 steps; after it, 47.4%."""

import json
import subprocess
import sys

import pytest

from conftest import SHARED_DATA
from launching import ROOT

IMAGENETTE = SHARED_DATA / "imagenette2-224.tar"


@pytest.mark.slow
def test_our_loop_trains_as_well_as_timms_reference_loop(tmp_path):
    assert IMAGENETTE.exists(), f"needs {IMAGENETTE} (the shared Imagenette archive)"
    shards = tmp_path / "imagenette-112"
    for split in ("train", "val"):
        subprocess.run([sys.executable, "-m", "vitcore.data.shards", "--source", str(IMAGENETTE), "--split", split,
                        "--resize", "112", "--out", str(shards / split)], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path / "parity.json"
    subprocess.run([sys.executable, "benchmarks/peer_parity.py", "--shards", str(shards), "--arms", "scratch",
                    "--steps-scratch", "300", "--seeds", "0", "--work", str(tmp_path / "work"), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    scratch = json.loads(out.read_text())["scratch"]
    ours, reference = scratch["ours"], scratch["reference"]
    assert abs(ours["top1"] - reference["top1"]) <= 0.03, scratch  # one seed at 300 steps: a noisy 3 points
    assert abs(ours["train_loss"] / reference["train_loss"] - 1) <= 0.05, scratch
