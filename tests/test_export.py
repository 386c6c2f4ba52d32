"""`python -m vitcore.report.export`: checkpoints of both stages, trained for real, load into timm through
`local-dir:` and give our outputs to 1e-5 on real images, square and non-square; the model card."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import real_images
from vitcore import checkpoint
from vitcore.data.transforms import eval_transform, open_image
from vitcore.model.inputs import normalize
from vitcore.report.export import TIMM_ARCHITECTURES, main, timm_architecture
from vitcore.model.pretrained import load_model

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> torch.Tensor:
    """8 real images at 32 px, float pixels (0-255): our model's input; timm's is `normalize` of it."""
    folder = real_images(tmp_path_factory.mktemp("images"), 8)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return torch.stack([eval_transform(32)(open_image(f.read_bytes())) for f in files]).float()  # (8, 3, 32, 32)


@pytest.fixture(scope="module")
def avg_classifier(cifar_shards, pretrained, tmp_path_factory) -> Path:
    """A classifier on the mean patch token (timm's global_pool="avg"), 2 steps, no evaluation."""
    from finetune.config import FinetuneConfig
    from finetune.task import ClassifyTask
    from vitcore.train.engine import main as train

    out = tmp_path_factory.mktemp("avg") / "run"
    train(FinetuneConfig, ClassifyTask, [f"init_from={pretrained}", f"data.shards={cifar_shards}", "eval.shards=null",
                                         f"run.out_dir={out}", "model.variant=Pico/8", "model.image_size=32",
                                         "finetune.pooling=avg", "data.batch_size=16", "data.num_workers=0",
                                         "optim.lr=0.05", "optim.warmup_steps=1", "run.steps=2", "run.image_every=0"])
    return out / "checkpoints" / "latest"


def load_timm(folder: Path) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inputs at another size for the export at that size (any image goes: both models get the same)."""
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)


def test_every_architecture_name_is_a_timm_model():
    assert set(TIMM_ARCHITECTURES) <= set(timm.list_models("vit_*"))
    assert timm_architecture(768, 16, (224, 224)) == "vit_base_patch16_224"
    assert timm_architecture(768, 16, (384, 384)) == "vit_base_patch16_384"
    assert timm_architecture(1280, 14, (224, 224)) == "vit_huge_patch14_224"
    assert timm_architecture(384, 8, (96, 64)) == "vit_small_patch8_224"
    assert timm_architecture(64, 8, (32, 32)) == "vit_tiny_patch16_224"  # Pico/8: the nearest


@pytest.mark.parametrize("size", [None, (32, 48)], ids=["stored-32", "48x32"])
@pytest.mark.parametrize("pooling", ["cls", "avg"])
def test_a_classifier_round_trips_through_timm(classifier, avg_classifier, images, tmp_path, size, pooling):
    ckpt = classifier / "checkpoints" / "latest" if pooling == "cls" else avg_classifier
    out = tmp_path / "export"
    main(["--checkpoint", str(ckpt), "--out", str(out)] + (["--image-size", *map(str, size)] if size else []))
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert config["model_args"]["img_size"] == (32 if size is None else [32, 48])
    assert config["model_args"]["global_pool"] == {"cls": "token", "avg": "avg"}[pooling]

    theirs = load_timm(out)
    ours, meta = load_model(ckpt, size)
    assert theirs.num_classes == 10 and theirs.pretrained_cfg["label_names"] == meta["classes"]
    # strict: timm's model holds exactly our tensors, nothing left at its own initialisation
    sd = theirs.state_dict()
    assert sd.keys() == ours.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())
    x = images if size is None else resize(images, size)
    with torch.no_grad():
        logits, out_ours = theirs(normalize(x)), ours(x)  # our stem normalises; timm's input is normalised
        pooled = theirs.forward_head(theirs.forward_features(normalize(x)), pre_logits=True)
    assert out_ours.logits.abs().max() > 0.1  # a trained head: the comparison is not of zeros
    torch.testing.assert_close(logits, out_ours.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out_ours.pooled, atol=1e-5, rtol=1e-5)
    # timm's own data config is our evaluation preprocessing
    data = timm.data.resolve_data_config({}, model=theirs)
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    assert data == {"input_size": (3, *(size or (32, 32))), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                    "std": (0.5, 0.5, 0.5), "crop_pct": 0.875, "crop_mode": "center"}


@pytest.mark.parametrize("size", [None, (48, 32)], ids=["stored-32", "48x32"])
def test_an_encoder_exports_as_features(pretrained, images, tmp_path, size):
    out = tmp_path / "export"
    main(["--checkpoint", str(pretrained.parent.parent), "--out", str(out)]  # the run directory works too
         + (["--image-size", *map(str, size)] if size else []))
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and "label_names" not in config["pretrained_cfg"]
    theirs = load_timm(out)
    ours, _ = load_model(pretrained, size)
    assert theirs.num_classes == 0 and ours.cfg.num_classes == 0
    x = images if size is None else resize(images, size)
    with torch.no_grad():
        features, out_ours = theirs(normalize(x)), ours(x)  # (B, D): the [CLS] token after the final norm
        tokens = theirs.forward_features(normalize(x))  # (B, 1 + N, D)
    assert features.shape == (8, 64)
    torch.testing.assert_close(features, out_ours.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], out_ours.patches, atol=1e-5, rtol=1e-5)


def test_timm_transform_from_the_config_gives_our_evaluation_input(classifier, tmp_path):
    out = tmp_path / "export"
    main(["--checkpoint", str(classifier), "--out", str(out), "--image-size", "48"])
    theirs = load_timm(out)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=theirs))
    files = sorted(p for p in real_images(tmp_path / "images", 6).rglob("*") if p.is_file())
    for f in files:
        want = normalize(eval_transform(48)(open_image(f.read_bytes())))  # (3, 48, 48)
        assert torch.equal(transform(Image.open(f).convert("RGB")), want), f


def test_the_model_card_has_recipe_steps_and_measured_accuracy(classifier, tmp_path):
    out = tmp_path / "export"
    main(["--checkpoint", str(classifier / "checkpoints" / "latest"), "--out", str(out)])
    card = (out / "README.md").read_text()
    summary = json.loads((classifier / "summary.json").read_text())
    assert f"| val top-1 | {summary['eval']['top1']:.1%} |" in card
    assert "for these weights (step 4)" in card and "| evaluated images | 100 |" in card
    assert "lr: 0.05" in card and "steps: 4" in card and "pooling: cls" in card  # the recipe, as YAML
    assert 'timm.create_model("hf-hub:USER/export", pretrained=True)' in card and '"local-dir:export"' in card
    assert "`hf upload USER/export export .`" in card
    # Ready for the Hub: its YAML header, and no path of this machine (the runs and shards live in tmp_path)
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header == {"library_name": "timm", "tags": ["image-classification", "timm", "vit-mpp"],
                      "pipeline_tag": "image-classification", "metrics": ["accuracy"]}
    assert str(tmp_path.parent.parent) not in card and "/tmp" not in card
    assert f"`{classifier.name}/checkpoints/" in card and f"`{classifier.name}/summary.json`" in card

    # a checkpoint outside its run (no summary.json) says so; a license goes into the header
    alone = tmp_path / "copied"
    shutil.copytree(checkpoint.resolve(classifier), alone)
    main(["--checkpoint", str(alone), "--out", str(tmp_path / "export2"), "--license", "apache-2.0"])
    card = (tmp_path / "export2" / "README.md").read_text()
    assert "No measured accuracy" in card and "/tmp" not in card
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == "apache-2.0" and "metrics" not in header


def test_errors_are_one_line(classifier, tmp_path):
    with pytest.raises(SystemExit, match="error: no complete checkpoint at"):
        main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="error: image size 30x30 is not divisible by the patch size 8"):
        main(["--checkpoint", str(classifier), "--out", str(tmp_path / "x"), "--image-size", "30"])
