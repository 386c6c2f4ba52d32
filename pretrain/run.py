"""Masked patch prediction pretraining.

    accelerate launch pretrain/run.py [--config configs/pretrain/vit_b16_mpp.yaml] [key=value ...]

With no --config it runs the embedded default recipe (pretrain/config.py): a Nano/8 ViT at 64 px
on Imagenette shards, sized for a 2-core CPU.
"""

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore.train.ending import run_process
from vitcore.train.engine import main

if __name__ == "__main__":
    run_process(lambda: main(PretrainConfig, MPPTask, description=__doc__))
