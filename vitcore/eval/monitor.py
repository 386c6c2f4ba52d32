"""The feature monitor (the `monitor` config section): while a model trains, how useful its
encoder's features are (kNN and linear-probe top-1, `vitcore.eval.probes`) on labelled shards
apart from the training data, and attention maps of a few validation images."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn as nn
from accelerate import Accelerator

from vitcore.config import MonitorConfig
from vitcore.data import ShardStream
from vitcore.data.classes import check_same_classes
from vitcore.data.stream import first_batch, naming
from vitcore.eval.attention import attention_maps
from vitcore.eval.loop import eval_mode
from vitcore.eval.probes import extract_features, probe_scores
from vitcore.model.vit import ViT


class FeatureMonitor:
    """Exactly-once labelled streams (a train subset, a validation set) built before any work, so
    that bad shards stop the run at once; `__call__` scores an encoder on them."""

    def __init__(self, cfg: MonitorConfig, accelerator: Accelerator, transform: Callable[[Any], torch.Tensor],
                 seed: int, pin_memory: bool, forwards_on_every_rank: bool) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.streams: list[ShardStream] = []
        for key in ("train_shards", "val_shards"):
            with naming(f"monitor.{key}"):
                self.streams.append(ShardStream.exactly_once(
                    getattr(cfg, key), transform, cfg.batch_size, rank=accelerator.process_index,
                    world_size=accelerator.num_processes, num_workers=cfg.num_workers, seed=seed, labeled=True,
                    pin_memory=pin_memory))
        with naming("monitor.val_shards"):
            check_same_classes(self.streams[0].classes, self.streams[1].classes,
                               f"monitor.train_shards: {cfg.train_shards}", f"monitor.val_shards: {cfg.val_shards}")
        self.images: torch.Tensor | None = None  # (n, 3, H, W) uint8 validation images for the attention maps
        if cfg.images and (accelerator.is_main_process or forwards_on_every_rank):  # FSDP: every rank runs them
            with naming("monitor.val_shards"):
                self.images = first_batch(cfg.val_shards, transform, cfg.images, labeled=True)["image"]
            self.images = self.images.to(accelerator.device)
        self.seconds = 0.0  # time spent monitoring, reported in summary.json

    def __call__(self, vit: ViT, prepared: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor], list[str]]:
        """(scores, {tag: attention image}, warnings) of the unwrapped encoder `vit` inside the
        prepared model. Every rank extracts its share of the features; all score the gathered ones."""
        start = time.perf_counter()
        with eval_mode(vit, prepared):  # under FSDP every rank runs both extractions and the maps
            train, val = (extract_features(self.accelerator, vit, stream, desc=f"monitor {name}")
                          for name, stream in zip(("train", "val"), self.streams))
            maps = attention_maps(vit, self.images) if self.images is not None else {}
        warnings = [p for name, f in (("train", train), ("val", val)) if (p := f.coverage_problem(name))]
        classes = self.streams[0].classes
        assert classes is not None  # labeled streams
        m = self.cfg
        scores = probe_scores(train, val, len(classes), m.knn_k, m.knn_temperature, m.probe_steps)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return {**scores, "seconds": seconds, "images": float(len(val.keys))}, maps, warnings

