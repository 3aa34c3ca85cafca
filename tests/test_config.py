import dataclasses

import pytest
import torch
import yaml

from imgvae.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    center_crop_size,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from imgvae.train.precision import run_precision


def test_seed_preset_is_the_seed_recipe():
    cfg = load_config("seed")
    assert cfg.model.name == "seed" and cfg.model.latent_dim == 128 and cfg.data.image_size == 64
    assert (cfg.data.crop, cfg.data.crop_size, cfg.data.hflip) == ("center", 375, True)
    assert center_crop_size(cfg.data) == 375  # the seed's
    assert cfg.data.train == ["coco/train2017.zip", "coco/test2017.zip"] and cfg.data.eval == ["coco/val2017.zip"]
    t = cfg.train
    assert (t.optimizer, t.lr, t.rmsprop_alpha, t.eps, t.weight_decay, t.lr_gamma, t.batch_size) == (
        "rmsprop", 1e-3, 0.9, 1e-8, 0.0, 0.75, 64)
    assert cfg.loss.beta == 1.0 and cfg.model.bn_momentum == 0.1
    assert t.precision == "fp32" and Config().train.precision == "auto"  # the original's fp32, also on GPUs


def test_precision_auto_is_bf16_where_the_device_has_it_natively(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert run_precision("fp16", gpu) == "fp16" and run_precision("fp32", cpu) == "fp32"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: native)
        monkeypatch.setattr("imgvae.train.precision.cpu_has_native_bf16", lambda: not native)
        assert run_precision("auto", gpu) == expected and run_precision("auto", cpu) != expected
    monkeypatch.undo()
    assert run_precision("auto", cpu) in ("bf16", "fp32")  # torch's own CPU probes answer


def test_demo_preset_uses_embedded_photos():
    cfg = load_config("configs/demo.yaml")
    assert cfg.data.train == ["embedded:train"] and cfg.data.eval == ["embedded:eval"]


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config("seed", ["train.epochs=3", "model.latent_dim=64", "data.train=[a.zip,b]",
                               "data.crop_scale=[0.5, 1]", "data.hflip=false", "train.lr=3e-4"])
    assert cfg.train.epochs == 3 and cfg.model.latent_dim == 64 and cfg.data.train == ["a.zip", "b"]
    assert cfg.data.crop_scale == (0.5, 1.0) and cfg.data.hflip is False and cfg.train.lr == 3e-4
    assert load_config("seed", ["data.num_workers=3"]).data.num_workers == 3
    assert load_config("seed", ["data.num_workers=auto"]).data.num_workers == "auto"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", r"unknown config key\(s\) \['train.epoch'\]; valid keys in train: \[.*'epochs'"),
        ("trian.epochs=3", r"unknown config key\(s\) \['trian'\]"),
        ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
        ("train.epochs=0", "train.epochs must be > 0"),
        ("prior.components=0", "prior.components must be > 0"),
        ("train.optimizer=sgd", r"train.optimizer: 'sgd' is not one of \['rmsprop', 'adam', 'adamw'\]"),
        ("data.crop_scale=[0.5, 2]", "crop_scale must satisfy"),
        ("data.hflip=yes please", "data.hflip: expected true/false"),
        ("epochs3", "not of the form section.key=value"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("data.memory_cache_gb=-1", "data.memory_cache_gb must be >= 0, got -1"),
        ("data.num_workers=some", "data.num_workers: 'some' is not an integer or 'auto'"),
    ],
)
def test_bad_values_fail_with_one_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("seed", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  latnet_dim: 3\n")
    with pytest.raises(ConfigError, match="model.latnet_dim"):
        load_config(path)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml_and_frozen(tmp_path):
    cfg = load_config("demo", ["train.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5
    assert Config() == from_dict({})


def test_seed_preset_lists_every_key():
    listed = yaml.safe_load((PRESET_DIR / "seed.yaml").read_text())
    for section in (f.name for f in dataclasses.fields(Config)):
        keys = {f.name for f in dataclasses.fields(type(getattr(Config(), section)))}
        assert keys == set(listed[section]), section


def test_keys_that_moved_section_are_read_from_their_old_place(tmp_path):
    old = {"train": {"epochs": 2, "grid_size": 3, "final_eval": False, "prior_images": 8, "prior_components": 4}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(tmp_path / "old.yaml")
    assert (cfg.train.epochs, cfg.eval.grid_size, cfg.eval.after_training) == (2, 3, False)
    assert (cfg.prior.after_training, cfg.prior.images, cfg.prior.components) == (True, 8, 4)
    assert load_config(None, ["train.prior_images=0"]).prior == load_config().prior  # 0 meant off
    # An old key in an override replaces the new key from the file below it.
    assert load_config("sharp", ["train.prior_components=3"]).prior.components == 3
    assert load_config(None, ["train.grid_size=3", "eval.grid_size=4"]).eval.grid_size == 4  # the later one wins
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"train": {"grid_size": 3}, "eval": {"grid_size": 4}}))
    with pytest.raises(ConfigError, match="train.grid_size is now eval.grid_size: give only the new key"):
        load_config(tmp_path / "both.yaml")
    assert "grid_size" not in to_dict(cfg)["train"]  # saved under the new names


def test_a_key_the_chosen_model_does_not_use_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model.levels is not a key of model 'kl-f8'; its keys: \['name', "):
        load_config("kl-f8", ["model.levels=3"])
    with pytest.raises(ConfigError, match="model.latent_dim is not a key of model 'autoencoder-kl'"):
        load_config(None, ["model.name=autoencoder-kl", "model.latent_dim=16"])
    assert load_config("resnet", ["model.levels=4"]).model.levels == 4  # resnet has it
    from imgvae.commands.cli import main

    assert main(["train", "-o", str(tmp_path / "run"), "--config", "kl-f8", "model.levels=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgvae: error: model.levels is not a key of model 'kl-f8'") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before any work


def test_each_architecture_saves_only_its_own_keys_and_old_flat_sections_still_load():
    for name, keys in [("seed", {"latent_dim", "bn_momentum"}), ("resnet", {"latent_dim", "base_channels", "levels",
                       "blocks"}), ("kl-f4", {"base_channels", "blocks", "latent_channels"})]:
        saved = to_dict(load_config(None, [f"model.name={name}"]))["model"]
        assert set(saved) == {"name", "pretrained"} | keys
    flat = {"name": "kl-f8", "latent_dim": 128, "bn_momentum": 0.1, "base_channels": 16, "levels": 3, "blocks": 2,
            "latent_channels": 8, "block_out_channels": [32, 64], "pretrained": None}  # as runs before 2026-12-01 saved
    model = from_dict({"model": flat}).model
    assert (model.name, model.base_channels, model.blocks, model.latent_channels) == ("kl-f8", 16, 2, 8)
    assert not hasattr(model, "levels")


def test_every_key_declares_its_rule_and_help_and_the_reference_lists_them(capsys):
    from imgvae.commands.cli import main
    from imgvae.config.reference import config_reference, sections

    for _, cls, prefix in sections():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help"
    rows = {r["key"]: r for _, found in config_reference() for r in found}
    assert rows["train.lr"]["bounds"] == "> 0, <= 10" and rows["prior.components"]["default"] == 1
    assert main(["config", "prior.time_limit"]) == 0
    out = capsys.readouterr().out
    assert "[prior (kind flow: the flow prior)]" in out and "prior.time_limit = 0.0  (a number, >= 0" in out
    assert main(["config", "train.nope"]) == 2
    assert "no config key or section 'train.nope'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["prior.width=32"], r"prior.width is not a key of prior 'gmm'; its keys: \['kind', 'after_training', 'images'"),
    (["prior.kind=mixture"], "prior.kind: 'mixture' is not one of"),
    (["prior.kind=flow", "prior.lr=nan"], "prior.lr: expected a finite number"),
    (["prior.kind=flow", "prior.width=12"], "prior.width must be auto or a power of 2 from 8 to 2048, got 12"),
    (["train.ema=1"], "train.ema must be < 1, got 1.0"),
])
def test_a_prior_section_is_its_kinds_and_checked_as_every_other(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    flow = load_config(None, ["prior.kind=flow", "prior.width=32", "prior.time_limit=2"]).prior
    assert (flow.width, flow.time_limit, flow.optimizer, flow.ema, flow.title) == (32, 2.0, "adamw", 0.999,
                                                                                   "flow prior")


def test_yaml_errors_and_deep_nesting_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 3, column 1 not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="override train.lr: values nested more than 16 levels deep"):
        load_config(None, ["train.lr=" + "[" * 500 + "]" * 500])
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  lr: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: values nested"):
        load_config(deep)
