"""Supervised fine-tuning from a pretrained encoder, at a higher resolution than pretraining.

    accelerate launch finetune/run.py [--config configs/finetune/vit_b16_384.yaml] [key=value ...]

With no --config it runs the embedded default recipe (finetune/config.py): the `make demo`
pretraining checkpoint (Nano/8 at 64 px) fine-tuned on Imagenette at 96 px, sized for a 2-core CPU.
`init_from=null` trains the same recipe from scratch (the baseline); `finetune.mode=linear_probe`
freezes the encoder.
"""

from finetune.config import FinetuneConfig
from finetune.task import ClassifyTask
from vitcore.train.ending import run_process
from vitcore.train.engine import main

if __name__ == "__main__":
    run_process(lambda: main(FinetuneConfig, ClassifyTask, description=__doc__))
