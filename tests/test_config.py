import pytest

from pretrain.config import PretrainConfig
from vitcore.config import ConfigError, load_config, save_config, to_dict


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
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].glob("configs/pretrain/*.yaml"))
    assert recipes, "no pretraining recipes in configs/pretrain"
    for path in recipes:
        load_config(PretrainConfig, path)
