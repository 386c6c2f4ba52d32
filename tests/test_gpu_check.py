"""benchmarks/gpu_check.py as far as a CPU can check it: the command line, the refusal without CUDA,
the budget split and throughput arithmetic, and its measuring code on a tiny model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402  (stdlib only at import: no torch here)


def cli(*args, **env):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_help_describes_the_parts_and_the_json():
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    assert "JSON" in result.stdout and "--budget-s" in result.stdout and "--out" in result.stdout
    assert "mpp_compile" in result.stdout and "--worker" not in result.stdout  # worker mode stays hidden


def test_without_cuda_one_line_exit_2_and_no_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = cli("--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gpu_check.py: error: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine"]
    assert result.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, wording", [
    (["--budget-s", "0"], "argument --budget-s: must be a positive number of seconds, got '0'"),
    (["--budget-s", "-5"], "argument --budget-s: must be a positive number of seconds, got '-5'"),
    (["--budget-s", "nan"], "argument --budget-s: must be a positive number of seconds, got 'nan'"),
    (["--budget-s", "soon"], "argument --budget-s: must be a number of seconds, got 'soon'"),
    (["--budget-s", "10"], "argument --budget-s: 10 s is under the 60 s minimum"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["--parts", "mpp,bogus"], "argument --parts: unknown part 'bogus'"),
])
def test_bad_arguments_are_refused_before_any_work(args, wording, tmp_path):
    result = cli(*args, "--out", str(tmp_path / "x.json"))
    assert result.returncode == 2 and result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"gpu_check.py: error: {wording}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_budget_split_follows_the_weights_and_hands_on_unused_time():
    weights = [1.0, 1.0, 2.0]
    caps = [gpu_check.part_cap(100.0, weights[0], sum(weights))]
    assert caps == [25.0]
    # the first part used 10 of its 25 s: the 15 left go to the later parts, by weight
    assert gpu_check.part_cap(90.0, 1.0, 3.0) == pytest.approx(30.0)
    assert gpu_check.part_cap(60.0, 2.0, 2.0) == 60.0  # the last part gets all that is left
    # parts that each use their whole cap never overrun the budget
    remaining, used = 480.0, 0.0
    for i, w in enumerate(weights):
        cap = gpu_check.part_cap(remaining, w, sum(weights[i:]))
        used, remaining = used + cap, remaining - cap
    assert used == pytest.approx(480.0) and remaining == pytest.approx(0.0, abs=1e-9)
    assert gpu_check.part_cap(-5.0, 1.0, 2.0) == 0.0  # an overrun leaves nothing, not a negative cap
    assert gpu_check.reserve_s(480) == 15.0 and gpu_check.reserve_s(100) == 5.0


def test_throughput_and_mfu_arithmetic():
    # per-step 0.10, 0.12, 0.09 s: the median block is 0.10 s per step
    blocks = [(1.0, 10), (1.2, 10), (0.9, 10)]
    r = gpu_check.throughput(128, 1, blocks, flops_per_image=3e9, peak=10e12)
    assert r["step_ms"] == pytest.approx(100.0)
    assert r["img_s"] == pytest.approx(1280.0) and r["img_s_per_gpu"] == pytest.approx(1280.0)
    assert r["tflops_per_gpu"] == pytest.approx(3.84)
    assert r["mfu"] == pytest.approx(0.384)  # 1280 img/s x 3 GFLOP / 10 TFLOP/s
    assert r["timed_steps"] == 30 and r["block_step_ms"] == pytest.approx([100.0, 120.0, 90.0])
    # two processes at the same per-process batch and step time: twice the images, the same MFU per GPU
    two = gpu_check.throughput(128, 2, blocks, 3e9, 10e12)
    assert two["img_s"] == pytest.approx(2560.0) and two["img_s_per_gpu"] == r["img_s_per_gpu"]
    assert two["mfu"] == r["mfu"]
    assert gpu_check.throughput(128, 1, blocks, 3e9, None)["mfu"] is None  # unknown GPU: no MFU


def test_scaling_and_peak_lookup():
    assert gpu_check.scaling(1800.0, 1000.0, 2) == {"vs_1_process": 1.8, "efficiency": 0.9}
    assert gpu_check.scaling(1800.0, None, 2) == {"vs_1_process": None, "efficiency": None}
    table = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # variants before their family
    assert gpu_check.peak_flops("NVIDIA H100 PCIe", table) == 756e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3", table) == 989e12
    assert gpu_check.peak_flops("Tesla T4", table) is None


def test_outcome_records_why_a_part_has_no_numbers():
    ok = {"status": "ok", "img_s": 1.0}
    assert gpu_check.outcome(0, ok, "", 60) == ok
    late = gpu_check.outcome(None, ok, "phase: reporting\n", 60)
    assert late["img_s"] == 1.0 and "killed at its 60 s cap" in late["warning"]
    timeout = gpu_check.outcome(None, None, "phase: building the model\nphase: warm-up and compilation\n", 120)
    assert timeout["status"] == "timeout"
    assert timeout["error"] == "no result within its 120 s cap (it was at: warm-up and compilation)"
    own = gpu_check.outcome(1, {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory"}, "trace", 60)
    assert own["status"] == "failed" and own["error"].startswith("OutOfMemoryError") and own["log_tail"] == "trace"
    crash = gpu_check.outcome(-9, None, "loading\nSegmentation fault\n\n", 60)
    assert crash["status"] == "failed"
    assert crash["error"] == "exited with status -9 without a result; last line: Segmentation fault"


def test_part_commands():
    result = Path("/tmp/r.json")
    two = gpu_check.part_command("mpp_2gpu", 100.0, 50, 5, result, 12345, python="py", accelerate="acc")
    script = two.index(str(SCRIPT))
    assert two[:script] == ["acc", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", "12345"]
    assert two[script + 1:] == ["--worker", "mpp", "--result", str(result), "--cap-s", "100.0", "--steps", "50",
                                "--warmup", "5", "--processes", "2"]
    compiled = gpu_check.part_command("mpp_compile", 200.0, 50, 5, result, 1, python="py")
    assert compiled[:2] == ["py", str(SCRIPT)] and compiled[-1] == "--compile"
    finetune = gpu_check.part_command("finetune", 80.0, 50, 5, result, 1, python="py")
    assert finetune[finetune.index("--worker") + 1] == "finetune" and "--compile" not in finetune
    assert gpu_check.part_list("mpp_compile, mpp") == ["mpp", "mpp_compile"]  # running order


def test_table_shows_numbers_and_reasons():
    parts = {"mpp": {"status": "ok", "config": {"batch_per_process": 128}, "img_s": 1500.0, "img_s_per_gpu": 1500.0,
                     "step_ms": 85.3, "tflops_per_gpu": 400.0, "mfu": 0.404, "wall_s": 31.0},
             "mpp_2gpu": {"status": "skipped", "reason": "1 CUDA device visible"},
             "mpp_compile": {"status": "timeout", "error": "no result within its 300 s cap", "wall_s": 300.0}}
    text = gpu_check.table(parts)
    assert "| mpp         | ok      |   128 |   1500.0 |" in text and "40.4%" in text
    assert "mpp_2gpu: 1 CUDA device visible" in text and "mpp_compile: no result within its 300 s cap" in text
    assert len({len(line) for line in text.splitlines()[:5]}) == 1  # the rows line up


SMOKE = """
import json, sys
sys.path.insert(0, "benchmarks")
import gpu_check
from vitcore.train.meter import PEAK_FLOPS
tiny = ["model.variant=Pico/8", "model.image_size=32", "data.batch_size=4"]
out = {kind: gpu_check.measure(kind, steps=3, warmup=1, cap_s=300, overrides=tiny) for kind in ("mpp", "finetune")}
out["h200_peak"] = gpu_check.peak_flops("NVIDIA H200", PEAK_FLOPS)
print(json.dumps(out))
"""


def test_the_measuring_code_runs_the_engine_step_on_a_tiny_model():
    """The worker's real path (recipe, engine build and step, timing, record) on CPU with Pico/8 at
    32 px: what the GPU run executes, short of CUDA."""
    result = subprocess.run([sys.executable, "-c", SMOKE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["h200_peak"] == 989e12
    for kind, recipe, optimizer in (("mpp", "configs/pretrain/vit_b16_mpp.yaml", "adamw"),
                                    ("finetune", "configs/finetune/vit_b16_384.yaml", "sgd")):
        r = out[kind]
        assert r["status"] == "ok" and r["timed_steps"] == 3 and r["steps_asked"] == 3
        c = r["config"]
        assert (c["recipe"], c["variant"], c["image_size"], c["batch_per_process"], c["processes"]) == (
            recipe, "Pico/8", 32, 4, 1)
        assert (c["mixed_precision"], c["compile"], c["optimizer"], c["accum_steps"]) == ("bf16", False, optimizer, 1)
        assert r["img_s"] > 0 and r["img_s"] == pytest.approx(4 * 1000 / r["step_ms"], rel=1e-3)
        assert r["mfu"] is None and r["peak_flops"] is None  # CPU: no datasheet peak
        assert math.isfinite(r["loss_mean"]) and r["nonfinite_steps"] == 0
        assert any("scaled_dot_product" in op for op in r["sdpa_ops"]), r["sdpa_ops"]
    assert out["finetune"]["config"]["ema_decay"] == 0.9999  # the recipe's EMA runs in the step
