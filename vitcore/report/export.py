"""Export a checkpoint as a folder that timm loads the way it loads a Hugging Face hub model.

    python -m vitcore.report.export --checkpoint runs/finetune/checkpoints/best --out exported/ [--image-size S [W]]

    model = timm.create_model("local-dir:exported/", pretrained=True)  # same outputs as ours
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

The folder holds `model.safetensors` (our weights under timm's `VisionTransformer` names), `config.json`
(timm's hub format: `architecture`, `model_args`, `num_classes`, `pretrained_cfg`) and a model card
`README.md`. Any checkpoint of ours exports, any variant: a classifier with its head and `label_names`,
an encoder without a head as `num_classes=0` (timm then returns the pooled features). `--image-size`
exports at another resolution, square or not; the position embeddings are resampled once, here.

`architecture` is the plain timm ViT nearest to ours (width, then patch, then resolution); `model_args`
spell out every size and option, so timm builds exactly our model whatever name is chosen.

Preprocessing: `pretrained_cfg` asks for bilinear resizing, crop_pct 0.875 and crop_mode "center" with
our mean and std (0.5), so that timm's eval transform is ours: resize the shorter side to
floor(size / 0.875), centre-crop, scale to [-1, 1]. For an image less than twice the resized size
(CIFAR's 32 px images at any size from 16 px up; a 224 px image at 224) the two give the same
tensor, bit for bit, at square sizes and, for square images, at any size. Two differences remain:
- a JPEG at least twice the resized size is decoded by ours at 1/2, 1/4 or 1/8 scale in the DCT
  domain (`Image.draft`) before the same resize; timm decodes it whole. Measured on 99 Imagenette
  validation images (224 px) at 64 px: inputs 1.05 grey levels apart on average (at most 26), a
  fine-tuned Nano/8's probabilities at most 0.0096 apart (logits 0.06), the same top-1 on 98 of 99.
- for a non-square size H x W, ours resizes the image's shorter side to floor(max(H, W) / 0.875);
  timm's `ResizeKeepRatio` scales it just enough to cover floor(H / 0.875) x floor(W / 0.875). The
  scales agree when the image's shorter side lies along the size's longer one (square images
  included), though timm rounds the other side where ours truncates; otherwise the crops differ: on
  40 landscape 112x80 images at 48x64, 37.5 grey levels apart on average, the same top-1 on 29 of
  40 (at 64x48, identical).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from vitcore import PROJECT, checkpoint, rundir
from vitcore.atomic import atomic_write_text, commit
from vitcore.data.index import read_index
from vitcore.model.inputs import EVAL_CROP_FRACTION, MEAN, STD
from vitcore.model.pretrained import load_model
from vitcore.model.vit import ViT

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# timm's plain ViT entry points (class token, learned positions, LayerNorm, GELU MLP), by their
# (embed_dim, patch_size, img_size) defaults; tests check that each is registered in timm.
TIMM_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny_patch16_224": (192, 16, 224), "vit_tiny_patch16_384": (192, 16, 384),
    "vit_small_patch8_224": (384, 8, 224), "vit_small_patch16_224": (384, 16, 224),
    "vit_small_patch16_384": (384, 16, 384), "vit_small_patch32_224": (384, 32, 224),
    "vit_small_patch32_384": (384, 32, 384), "vit_base_patch8_224": (768, 8, 224),
    "vit_base_patch16_224": (768, 16, 224), "vit_base_patch16_384": (768, 16, 384),
    "vit_base_patch32_224": (768, 32, 224), "vit_base_patch32_384": (768, 32, 384),
    "vit_large_patch14_224": (1024, 14, 224), "vit_large_patch16_224": (1024, 16, 224),
    "vit_large_patch16_384": (1024, 16, 384), "vit_large_patch32_224": (1024, 32, 224),
    "vit_large_patch32_384": (1024, 32, 384), "vit_huge_patch14_224": (1280, 14, 224),
}
TIMM_POOL = {"cls": "token", "avg": "avg"}  # our ViTConfig.pool -> timm's global_pool


def timm_architecture(dim: int, patch_size: int, image_size: tuple[int, int]) -> str:
    """The timm ViT name nearest to a model: the closest width, then patch size, then resolution
    (on a log scale), e.g. B/16 at 224 px -> "vit_base_patch16_224", Nano/8 -> "vit_tiny_patch16_224"."""
    def distance(name: str) -> tuple[float, float, float]:
        d, p, s = TIMM_ARCHITECTURES[name]
        return abs(math.log(dim / d)), abs(math.log(patch_size / p)), abs(math.log(max(image_size) / s))

    return min(TIMM_ARCHITECTURES, key=distance)


def timm_config(vit: ViT, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json for `vit` in timm's hub format; `meta` supplies the class names of a classifier."""
    cfg = vit.cfg
    h, w = cfg.image_size
    model_args: dict[str, Any] = {
        "img_size": h if h == w else [h, w], "patch_size": cfg.patch_size, "embed_dim": cfg.dim,
        "depth": cfg.depth, "num_heads": cfg.heads, "mlp_ratio": float(cfg.mlp_ratio), "qkv_bias": True,
        "class_token": True, "no_embed_class": False, "reg_tokens": 0, "pre_norm": False, "final_norm": True,
        # timm's default for "avg" normalises after pooling (fc_norm); ours pools the normalised tokens
        "global_pool": TIMM_POOL[cfg.pool], "fc_norm": False, "pool_include_prefix": False,
        "dynamic_img_size": False,
    }
    weights_cfg: dict[str, Any] = {
        "input_size": [3, h, w], "fixed_input_size": True, "interpolation": "bilinear",
        "crop_pct": EVAL_CROP_FRACTION, "crop_mode": "center", "mean": list(MEAN), "std": list(STD),
        "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
    }
    if cfg.num_classes > 0 and meta.get("classes"):
        weights_cfg["label_names"] = list(meta["classes"])
    return {"architecture": timm_architecture(cfg.dim, cfg.patch_size, cfg.image_size),
            "num_classes": cfg.num_classes, "num_features": cfg.dim, "global_pool": TIMM_POOL[cfg.pool],
            "model_args": model_args, "pretrained_cfg": weights_cfg}


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory of a checkpoint at <run>/checkpoints/<step>, or None."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def public(value: Any) -> Any:
    """`value` with every absolute path in it cut to its last two parts (`.../imagenette-112/train`;
    a checkpoint's three: `.../pretrain/checkpoints/best`): a card names runs and datasets, never the
    folders of the machine that exported it."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        parts = Path(value).parts
        keep = 3 if len(parts) > 2 and parts[-2] == "checkpoints" else 2  # a checkpoint by its run's name
        return ".../" + "/".join(parts[-keep:])
    return value


def front_matter(vit: ViT, recipe: dict[str, Any], measured: bool, license: str | None) -> list[str]:
    """The Hub's YAML header: library, license (only when given), tags, task, datasets where the
    shards name a Hub dataset (`hf:NAME` in their index.json), metrics when the run measured some."""
    header: dict[str, Any] = {"library_name": "timm"}
    if license:
        header["license"] = license
    header["tags"] = ["image-classification", "timm", PROJECT]
    header["pipeline_tag"] = "image-classification" if vit.cfg.num_classes else "image-feature-extraction"
    datasets = []
    for section in ("data", "eval"):
        shards = (recipe.get(section) or {}).get("shards")
        try:
            source = str(read_index(shards).get("source", "")) if isinstance(shards, str) else ""
        except (OSError, ValueError):
            source = ""  # shards moved or remote: the card says less, and nothing wrong
        if source.startswith("hf:") and source[3:] not in datasets:
            datasets.append(source[3:])
    if datasets:
        header["datasets"] = datasets
    if measured:
        header["metrics"] = ["accuracy"]
    return ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", ""]


def model_card(vit: ViT, meta: dict[str, Any], config: dict[str, Any], ckpt: Path, out: Path,
               license: str | None = None) -> str:
    """The README.md beside the weights, ready for the Hugging Face Hub: its YAML header, what the
    model is, how to load and upload it, its recipe, data, steps and the accuracy its run measured
    (from the run's summary.json, when the run finished). It names runs and dataset folders, never
    an absolute path."""
    cfg, arch, recipe = vit.cfg, meta["arch"], meta.get("config", {})
    h, w = cfg.image_size
    stored = "x".join(map(str, arch["image_size"]))
    head = (f"{cfg.num_classes}-class linear head on the {'[CLS] token' if cfg.pool == 'cls' else 'mean patch token'}"
            if cfg.num_classes else f"none: num_classes=0, the model returns {cfg.dim}-d pooled features")
    data = public(recipe.get("data", {}).get("shards", "?"))
    evaluation = public((recipe.get("eval") or {}).get("shards"))
    stage = meta.get("stage", "?")
    run = run_dir_of(ckpt)
    where = f"{run.name}/checkpoints/{ckpt.name}" if run is not None else ckpt.name
    measured = _measured(meta, ckpt)
    lines = front_matter(vit, recipe, not measured[0].startswith("No measured"), license) + [
        f"# {out.resolve().name}: ViT {arch.get('variant', '')} ({stage} checkpoint, step {meta['step']})", "",
        "Exported with `python -m vitcore.report.export`.", "",
        "| | |", "|---|---|",
        f"| architecture | ViT {arch.get('variant', '')}: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}, "
        f"patch {cfg.patch_size}, MLP ratio {cfg.mlp_ratio}; timm `{config['architecture']}` with `model_args` |",
        f"| input | {h}x{w} RGB, mean {list(MEAN)}, std {list(STD)} (pixels in [-1, 1]); bilinear resize of the "
        f"shorter side to size / {EVAL_CROP_FRACTION}, centre crop |",
        f"| head | {head} |",
        f"| checkpoint | `{where}` (stage {stage}, step {meta['step']}, "
        f"{meta.get('samples', '?')} samples; trained at {stored} px"
        + ("" if tuple(arch["image_size"]) == (h, w) else f", position embeddings resampled to {h}x{w} for export")
        + ") |",
        f"| training data | `{data}`" + (f"; evaluation data `{evaluation}`" if evaluation else "") + " |",
    ]
    if meta.get("init_from"):
        lines.append(f"| initialised from | `{public(str(meta['init_from']))}` |")
    if meta.get("classes") and cfg.num_classes:
        names = ", ".join(meta["classes"][:20]) + (", ..." if len(meta["classes"]) > 20 else "")
        lines.append(f"| classes | {names} |")
    steps = (recipe.get("run") or {}).get("steps")
    lines += ["", "## Use", "", "```python", "import timm", "from PIL import Image", "",
              f'model = timm.create_model("hf-hub:USER/{out.resolve().name}", pretrained=True).eval()'
              f'  # or "local-dir:{out.resolve().name}" from the folder that holds it',
              "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
              'out = model(transform(Image.open("image.jpg").convert("RGB"))[None])'
              + ("  # (1, classes) logits" if cfg.num_classes else "  # (1, dim) features"), "```", "",
              f"Upload this folder to the Hub (after `hf auth login`): `hf upload USER/{out.resolve().name} "
              f"{out.resolve().name} .`", "", "## Measured", ""]
    lines += measured
    lines += ["", "## Recipe", "",
              f"{meta['step']} steps" + (f" of a {steps}-step run" if steps else "")
              + f", {meta.get('samples', '?')} samples; the checkpoint's config (meta.json):", "",
              "```yaml", yaml.safe_dump(public(recipe), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _measured(meta: dict[str, Any], ckpt: Path) -> list[str]:
    """The run's own numbers from its summary.json, as `python -m vitcore.report` shows them."""
    run = run_dir_of(ckpt)
    try:
        if run is None:
            raise FileNotFoundError(f"{ckpt.name} is not inside a run's checkpoints/ directory, so no summary.json")
        result = rundir.read_run(run)
    except (FileNotFoundError, ValueError) as e:
        return [f"No measured accuracy: {e}."]
    summary, step = result["summary"], meta["step"]
    if summary.get("steps") == step:
        which = f"these weights (step {step})"
    else:
        which = f"the run's final weights (step {summary.get('steps')}), not this checkpoint (step {step})"
    lines = [f"From `{run.name}/summary.json`, for {which}. Training metrics are means over the run's last "
             "logging window, evaluation metrics the final weights' on the evaluation set, probe metrics "
             "the monitor's last scores.", "",
             "| metric | value |", "|---|---|"]
    for title, key, fmt in rundir.columns([result]):
        lines.append(f"| {title} | {fmt.format(result['last'][key])} |")
    ev = summary.get("eval")
    if ev:
        lines.append(f"| evaluated images | {ev.get('count')} |")
    best = summary.get("best") or {}
    if best.get("step") == step and summary.get("steps") != step:
        metric = best.get("metric", "")
        value = best.get(metric.partition("/")[2])
        lines += ["", f"This checkpoint is the run's best by {metric}: {value}."]
    return lines


def export(path: str | Path, out: str | Path, image_size: tuple[int, int] | None = None,
           license: str | None = None) -> Path:
    """Write `out`/model.safetensors, config.json and README.md (with `license` in its Hub header,
    when given) for the checkpoint at `path`; returns `out`."""
    ckpt = checkpoint.resolve(path)
    vit, meta = load_model(ckpt, image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = timm_config(vit, meta)
    weights = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}  # timm's names already
    tmp = out / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        save_file(weights, tmp, metadata={"format": "pt"})  # "pt": how timm's and HF's own exports mark it
        commit(tmp, out / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / CARD, model_card(vit, meta, config, ckpt, out, license))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint dir, `latest`, `best` or a run dir")
    parser.add_argument("--out", required=True, help="the folder to write (created; its three files replaced)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="S",
                        help="one size (square) or height width; default: the checkpoint's resolution")
    parser.add_argument("--license", help="the model card's license for the Hub (an id such as apache-2.0 or mit); "
                                           "default: none given (the weights' data has terms of its own)")
    args = parser.parse_args(argv)
    if args.image_size is not None and len(args.image_size) > 2:
        parser.error("--image-size takes one size (square) or two (height width)")
    size = None if args.image_size is None else (args.image_size[0], args.image_size[-1])
    try:
        out = export(args.checkpoint, args.out, size, args.license)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {checkpoint.resolve(args.checkpoint)} to {out} "
          f'(load with timm.create_model("local-dir:{out}", pretrained=True))')
    return out


if __name__ == "__main__":
    main()
