"""Training metrics between two logging steps: accumulated on the device with no host sync, then
reduced over ranks in one sync, with throughput, data-wait fraction and model FLOPs utilisation
(big_vision's Chrono, nanoGPT's estimate_mfu)."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

# Dense bf16/fp16 tensor-core peak FLOP/s by device name (the first name contained in the device's
# wins, so variants come before their family), for model FLOPs utilisation under mixed precision;
# fp32 runs and unknown devices log TFLOP/s only.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12}


class TrainMeter:
    """Training metrics of one logging window, accumulated on the device (no host sync)."""

    def __init__(self, device: torch.device, nonfinite: int = 0) -> None:
        self.zero = torch.zeros((), device=device)
        self.nonfinite = self.zero + nonfinite  # run total, never reset
        self.streak = self.zero.clone()  # non-finite steps in a row, carried across windows
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.max_streak, self.grad_norm = self.zero.clone(), self.zero.clone()
        self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, metrics: dict[str, torch.Tensor], weight: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, self.zero) + v.float() * weight

    def step_done(self, grad_norm: torch.Tensor, found_inf: torch.Tensor, counts_streak: bool) -> None:
        self.streak = (self.streak + 1) * found_inf * counts_streak
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        self.nonfinite = self.nonfinite + found_inf
        self.grad_norm += torch.nan_to_num(grad_norm.float(), nan=0.0, posinf=0.0)
        self.steps += 1

    def scalars(self, accel: Accelerator, samples_per_step: int, flops_per_sample: int,
                mixed_precision: bool) -> tuple[dict[str, float], int]:
        """(the window's scalars, means over all ranks; the longest run of non-finite steps in it),
        in one host sync. `samples_per_step` is one rank's (batch x accumulation)."""
        elapsed = time.perf_counter() - self.start
        names = sorted(self.sums)
        means = accel.reduce(torch.stack([self.sums[k] for k in names]) / self.steps, "mean")
        extra = torch.stack([self.grad_norm / self.steps, self.nonfinite, self.max_streak])
        *values, gnorm, n_nonfinite, worst_streak = torch.cat([means, extra]).tolist()  # the sync
        img_s = samples_per_step * self.steps / elapsed
        scalars = dict(zip(names, values), grad_norm=gnorm, img_s=img_s * accel.num_processes, img_s_per_rank=img_s,
                       data_wait=self.wait / elapsed, nonfinite_steps=n_nonfinite,
                       tflops_per_rank=img_s * flops_per_sample / 1e12)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in device_name(accel.device)), None)
        if peak and mixed_precision:
            scalars["mfu"] = img_s * flops_per_sample / peak
        return scalars, int(worst_streak)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
