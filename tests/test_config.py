import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from finetune.config import DEMO_PRETRAINED, FinetuneConfig
from pretrain.config import PretrainConfig
from vitcore.config import ConfigError, load_config, save_config, to_dict
from vitcore.train.engine import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.image_size=65"], "model.image_size: 65 is not a positive multiple of the patch size 8"),
        (["optim.lr=fast"], "optim.lr: Value 'fast' of type 'str' could not be converted to Float"),
        (["optim.lrr=1e-3"], "optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["nonsense=1"], "nonsense: Key 'nonsense' not in 'PretrainConfig'"),
        (["mpp.mask_prob=0.7"], "mpp.mask_prob: mask_prob + random_prob + keep_prob must sum to 1, got 0.9"),
        (["run.mixed_precision=fp8"], "run.mixed_precision: 'fp8' is not one of no, bf16, fp16"),
        (["model.variant=Q/16"], "model.variant: unknown variant 'Q/16'"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0"),
        (["data.batch_size=0"], "data.batch_size: must be positive"),
        (["optim.betas=[0.9]"], "optim.betas: must be two numbers in [0, 1)"),
        (["mpp.target=depth"], "mpp.target: 'depth' is not one of mean_color, downsampled, pixels"),
        (["mpp.target=downsampled", "model.variant=Nano/6", "model.image_size=60"],
         "mpp.target: downsampled targets need a patch size divisible by 4, got 6"),
        (["optim.lr"], "optim.lr: overrides are written key=value"),
    ],
)
def test_bad_configs_stop_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, overrides)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file: .*nope.yaml"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")


def test_bad_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  nesterov: true\n")
    with pytest.raises(ConfigError, match="^optim.nesterov: Key 'nesterov' not in 'OptimConfig'"):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize("text,message", [
    ("model:\n  variant: [unclosed\n", r"--config: .*bad.yaml is not valid YAML \(line 3, column 1\)"),
    ("- model\n- data\n", r"--config: .*bad.yaml must hold a mapping of sections"),
    ("optim: 3\n", r"^optim: must be a section of keys, got 3$"),
])
def test_malformed_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(PretrainConfig, path)
    assert "\n" not in str(error.value)


def test_yaml_then_overrides_then_round_trip(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  variant: Ti/16\n  image_size: 224\noptim:\n  lr: 2.0e-4\n")
    cfg = load_config(PretrainConfig, path, ["optim.lr=5e-4", "data.batch_size=8"])
    assert (cfg.model.variant, cfg.model.image_size, cfg.optim.lr, cfg.data.batch_size) == ("Ti/16", 224, 5e-4, 8)
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    assert load_config(PretrainConfig, saved) == cfg
    assert to_dict(cfg)["optim"]["lr"] == 5e-4


def test_shipped_recipes_load():
    recipes = sorted(Path(__file__).parents[1].glob("configs/pretrain/*.yaml"))
    assert recipes, "no pretraining recipes in configs/pretrain"
    for path in recipes:
        load_config(PretrainConfig, path)


# ---- words YAML 1.1 would turn into booleans, through the whole command line --------------------

class _Loaded(Exception):
    """Raised by the task factory: the CLI parsed and validated the config, no training starts."""


def _cli(schema, argv):
    """The config a stage's entry point (`run.py [--config PATH] [key=value ...]`) would train with."""
    def capture(cfg):
        raise _Loaded(cfg)

    with pytest.raises(_Loaded) as loaded:
        main(schema, capture, list(argv))
    return loaded.value.args[0]


def _fake_checkpoints(root, *paths):
    """Empty stand-ins where `init_from` looks, so that finetune configs pass validation."""
    for path in (DEMO_PRETRAINED, *(p for p in paths if p is not None)):  # None: from scratch
        (root / path).mkdir(parents=True, exist_ok=True)
        for name in ("meta.json", "model.safetensors"):
            (root / path / name).touch()


@pytest.mark.parametrize("argv,key,expected", [
    (["run.mixed_precision=no"], "run.mixed_precision", "no"),
    (["run.mixed_precision=bf16"], "run.mixed_precision", "bf16"),
    (["run.mixed_precision=fp16"], "run.mixed_precision", "fp16"),
    (["run.resume=never"], "run.resume", "never"),
    (["run.resume=auto"], "run.resume", "auto"),
    (["run.resume=off"], "run.resume", "off"),  # a checkpoint dir may be called anything
    (["run.out_dir=1e3"], "run.out_dir", "1e3"),  # not "1000.0"
    (["eval.shards=null"], "eval.shards", None),
    (["run.compile=false"], "run.compile", False),
    (["run.compile=true"], "run.compile", True),
    (["run.compile=yes"], "run.compile", True),  # bool fields still take OmegaConf's words
    (["optim.lr=3e-4"], "optim.lr", 3e-4),
    (["optim.betas=[0.8,0.99]"], "optim.betas", [0.8, 0.99]),
])
def test_cli_values_reach_the_config_as_typed(argv, key, expected):
    section, name = key.split(".")
    assert getattr(getattr(_cli(PretrainConfig, argv), section), name) == expected


def test_cli_finetune_words(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_checkpoints(tmp_path)
    cfg = _cli(FinetuneConfig, ["finetune.randaugment=true", "run.mixed_precision=no", "finetune.mode=linear_probe"])
    assert (cfg.finetune.randaugment, cfg.run.mixed_precision, cfg.finetune.mode) == (True, "no", "linear_probe")
    assert _cli(FinetuneConfig, ["init_from=null"]).init_from is None


def test_yaml_file_words_are_yaml_1_2(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("run:\n  mixed_precision: no\n  resume: never\n  compile: true\n  out_dir: off\n"
                    "optim:\n  lr: 1e-3\n")
    cfg = _cli(PretrainConfig, ["--config", str(path)])
    assert (cfg.run.mixed_precision, cfg.run.resume, cfg.run.compile, cfg.run.out_dir) == ("no", "never", True, "off")
    assert cfg.optim.lr == 1e-3
    saved = tmp_path / "config.yaml"  # what a run writes reads back the same
    save_config(cfg, saved)
    assert load_config(PretrainConfig, saved) == cfg


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML \(line 3, column 3\): duplicate key 'lr'"):
        load_config(PretrainConfig, path)


# Every page a reader runs commands from: the README and the docs pages beside it.
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _documented_overrides():
    """Every `key=value` the README, the docs pages and the shipped recipes show, for a key of a stage's schema."""
    keys = {f for schema in (PretrainConfig, FinetuneConfig) for f in typing.get_type_hints(schema)}
    pattern = re.compile(r"(?<![\w.\-/$])((?:[a-z_]+\.)*[a-z_]+)=([^\s`),;]*)")
    texts = [*DOC_PAGES, *sorted((ROOT / "configs").rglob("*.yaml"))]
    found = {(m[1], m[2]) for path in texts for m in pattern.finditer(path.read_text())}
    return sorted((key, value) for key, value in found if key.split(".")[0] in keys)


DOCUMENTED = _documented_overrides()
# What a documented override needs beside it to pass validation alone (the docs show them together).
NEEDS = {"monitor.train_shards": ["monitor.val_shards=v"], "monitor.val_shards": ["monitor.train_shards=t"],
         "model.variant": ["model.image_size=224"]}  # 224: a multiple of every documented patch size


def test_the_docs_show_overrides():
    assert {("run.resume", "never"), ("init_from", "null"), ("mpp.target", "pixels")} <= set(DOCUMENTED)


@pytest.mark.parametrize("key,text", DOCUMENTED)
def test_every_documented_override_parses_as_written(key, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_checkpoints(tmp_path, *([text] if key == "init_from" and text != "null" else []))
    schema = FinetuneConfig if key.split(".")[0] in ("init_from", "finetune") else PretrainConfig
    cfg, kind = _cli(schema, [*NEEDS.get(key, []), f"{key}={text}"]), schema
    for name in key.split("."):
        cfg, kind = getattr(cfg, name), typing.get_type_hints(kind)[name]
    if kind in (str, str | None):
        assert cfg == (None if text == "null" else text)
        return
    if text == "null":
        assert cfg is None
        return
    kind = next(k for k in typing.get_args(kind) if k is not type(None)) if typing.get_args(kind) else kind
    assert cfg == {bool: lambda t: t == "true"}.get(kind, kind)(text)


def _documented_launch_lines():
    """(page, argv) of every indented `[VAR=value ...] accelerate launch ... {pretrain,finetune}/run.py` line of every doc page."""
    found = []
    for page in DOC_PAGES:
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # joined continuations
        found += [(page.relative_to(ROOT).as_posix(), shlex.split(line.split("#")[0])) for line in text.splitlines()
                  if re.match(r"\s+(\w+=\S*\s+)*accelerate launch .*(pretrain|finetune)/run\.py", line)]
    return found


DOC_COMMANDS = _documented_launch_lines()


def test_the_docs_show_launch_lines():
    """The launch-line test below must see lines: with none it would pass vacuously (parametrize skips)."""
    pages = {page for page, _ in DOC_COMMANDS}
    assert {"README.md", "docs/pretraining.md", "docs/finetuning.md", "docs/scaling.md"} <= pages, pages
    assert len(DOC_COMMANDS) >= 10, DOC_COMMANDS


@pytest.mark.parametrize("page,command", DOC_COMMANDS, ids=[f"{p}: {' '.join(c)}" for p, c in DOC_COMMANDS])
def test_every_documented_launch_line_loads(page, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = next(i for i, word in enumerate(command) if word.endswith("/run.py"))
    argv = [str(ROOT / w) if w.startswith("configs/") else w for w in command[script + 1:]]
    _fake_checkpoints(tmp_path, *[w.split("=", 1)[1] for w in argv if w.startswith("init_from=runs/")])
    _cli(FinetuneConfig if command[script].startswith("finetune") else PretrainConfig, argv)


def test_shipped_finetune_recipes_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipes = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
    assert recipes, "no fine-tuning recipes in configs/finetune"
    for path in recipes:
        _fake_checkpoints(tmp_path, yaml.safe_load(path.read_text())["init_from"])
        load_config(FinetuneConfig, path)
