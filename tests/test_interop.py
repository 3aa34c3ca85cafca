"""diffusers AutoencoderKL folders in and out, fine-tuning from them, latents for a second-stage
model and LPIPS: on tiny random-init models written to a temp dir, nothing downloaded."""

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.commands.verbs import encode_latents
from imgvae.config import PRESET_DIR, DataConfig, load_config
from imgvae.data import cache
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import normalize
from imgvae.data.sources import read_keys
from imgvae.export import folder as export_folder
from imgvae.io.paths import load_model, open_model
from imgvae.metrics.features import LPIPS
from imgvae.models.autoencoder_kl import AutoencoderKL
from imgvae.models.registry import build_vae

from conftest import train_tiny_run, write_jpegs

TINY_KL = {"block_out_channels": (8, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}
KL_RUN = ["model.name=autoencoder-kl", "model.block_out_channels=[8,16]", "model.norm_num_groups=4",
          "train.optimizer=adam", "train.lr=1e-3"]


def write_folder(path, **extra):
    torch.manual_seed(0)
    levels = len(TINY_KL["block_out_channels"])
    net = DiffusersAutoencoderKL(**TINY_KL, down_block_types=("DownEncoderBlock2D",) * levels,
                                 up_block_types=("UpDecoderBlock2D",) * levels, sample_size=32, **extra)
    net.save_pretrained(path)
    return net.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    write_jpegs(root / "photos", 24, seed=1)
    return root, write_folder(root / "tiny-vae")


def batch(photos, size=32, n=4):
    """The first n photos of a folder, preprocessed as held-out views, normalised."""
    views = build_dataset([str(photos)], DataConfig(image_size=size, crop_size=64), train=False, seed=0)
    return normalize(torch.stack([views.load(i) for i in range(n)]))


def test_a_diffusers_folder_is_an_imgvae_model_with_the_same_outputs(folder):
    root, net = folder
    model, cfg, path = open_model(root / "tiny-vae")
    assert isinstance(model, AutoencoderKL) and path == root / "tiny-vae"
    assert cfg.model.block_out_channels == [8, 16] and cfg.model.norm_num_groups == 4 and cfg.data.image_size == 32
    x = batch(root / "photos")
    with torch.no_grad():
        theirs = net.decode(net.encode(x).latent_dist.mode()).sample
        torch.testing.assert_close(model(x, sample=False).x_hat, theirs)
        posterior = model.encode(x)
        torch.testing.assert_close(posterior.logvar, net.encode(x).latent_dist.logvar)
    # Any resolution its downsampling divides: a 64 px model from the same weights.
    model64, cfg64, _ = open_model(root / "tiny-vae", overrides=["data.image_size=64"])
    assert cfg64.data.image_size == 64 and model64.latent_shape == (4, 32, 32)
    assert model64(batch(root / "photos", 64), sample=False).x_hat.shape == (4, 3, 64, 64)


def test_evaluate_and_reconstruct_a_diffusers_folder(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "m.json"
    assert main(["evaluate", str(root / "tiny-vae"), "--data", str(root / "photos"), "data.image_size=64",
                 "--iw-samples", "2", "-o", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 24 and metrics["image_size"] == 64 and metrics["checkpoint"] == str(root / "tiny-vae")
    assert metrics["reconstruction"]["psnr"]["mean"] > 0 and "scale 1" in metrics["likelihood"]["discretisation"]
    photo = sorted((root / "photos").glob("*.jpg"))[0]
    assert main(["reconstruct", str(root / "tiny-vae"), str(photo), "-o", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / f"{photo.stem}_reconstruction.png").is_file()
    assert main(["evaluate", str(root / "tiny-vae"), "--no-progress"]) == 2  # a folder has no held-out data
    assert "no evaluation data: pass --data SOURCE" in capsys.readouterr().err


def test_fine_tune_from_a_diffusers_folder_starts_from_its_weights(folder, tmp_path):
    root, net = folder
    start = train_tiny_run(tmp_path / "start", "model.name=autoencoder-kl", f"model.pretrained={root / 'tiny-vae'}",
                           "train.epochs=1", "train.optimizer=adam", "train.lr=1e-9")
    cfg_yaml = (start / "config.yaml").read_text()
    assert "- 8\n  - 16" in cfg_yaml and "norm_num_groups: 4" in cfg_yaml  # its architecture, recorded for resumes
    weights = load_file(str(start / "checkpoints" / "last" / "model.safetensors"))
    for key, value in net.state_dict().items():
        torch.testing.assert_close(weights[f"net.{key}"], value, atol=1e-6, rtol=0)
    tuned = train_tiny_run(tmp_path / "tuned", "model.name=autoencoder-kl", f"model.pretrained={root / 'tiny-vae'}",
                           "train.epochs=2", "train.optimizer=adam", "train.lr=3e-3", "train.freeze_encoder=true")
    losses = [json.loads(line)["loss"] for line in (tuned / "steps.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    weights = load_file(str(tuned / "checkpoints" / "last" / "model.safetensors"))
    frozen = {k: v for k, v in net.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    assert frozen and all(torch.equal(weights[f"net.{k}"], v) for k, v in frozen.items())  # the latent space kept
    assert not torch.equal(weights["net.decoder.conv_out.weight"], net.state_dict()["decoder.conv_out.weight"])


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("kl"), *KL_RUN, "loss.sigma=pixel", "train.epochs=1",
                          "eval.after_training=true", "eval.iw_samples=2")


def test_export_diffusers_round_trip_with_scaling_from_training_latents(kl_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(kl_run), "-o", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    net = DiffusersAutoencoderKL.from_pretrained(out, local_files_only=True).eval()
    model, cfg = load_model(kl_run)
    x = batch(kl_run.parent / "train", 32, 6)
    with torch.no_grad():
        theirs = net.decode(net.encode(x).latent_dist.mode()).sample
        torch.testing.assert_close(theirs, model(x, sample=False).x_hat, rtol=1e-4, atol=1e-5)
        # The aggregate posterior of the training views, computed here: mean and variance of z ~ q(z|x).
        views = build_dataset(cfg.data.train, cfg.data, train=True, seed=0)
        posterior = model.encode(normalize(torch.stack([views.load(i) for i in range(len(views))])))
        mean = posterior.mean.double().mean()
        var = posterior.mean.double().var(unbiased=False) + posterior.logvar.double().exp().mean()
    assert net.config.shift_factor == pytest.approx(float(mean), rel=1e-5)
    assert net.config.scaling_factor == pytest.approx(float(1 / var.sqrt()), rel=1e-5)
    card = (out / "README.md").read_text()
    for text in ("## Use", "AutoencoderKL.from_pretrained", "## Training", "## Latent scaling", "## Metrics",
                 "PSNR", "```yaml"):
        assert text in card, text


KL_PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")
                    if load_config(p.stem).model.name in ("kl-f4", "kl-f8", "autoencoder-kl"))


@pytest.mark.parametrize("preset", KL_PRESETS)
def test_every_kl_preset_exports_to_a_diffusers_folder_with_the_same_reconstructions(preset, tmp_path):
    """One KL architecture (diffusers' blocks): each preset's model, weights randomised, written
    by export.folder.write_folder and read back by diffusers.AutoencoderKL.from_pretrained."""
    assert {"kl-f4", "kl-f8", "sharp", "diffusers-f4", "sd-f8"} <= set(KL_PRESETS)
    cfg = load_config(preset, ["data.image_size=64"])
    torch.manual_seed(0)
    model = build_vae(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # not the init: norms, zero-initialised parts and all
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    stats = {"scaling_factor": 0.5, "shift_factor": 0.1, "channel_mean": [0.0], "channel_std": [1.0]}
    scale = {"choice": "recompute", "scaling_factor": 0.5, "shift_factor": 0.1, "own": None,
             "measured": {"scaling_factor": 0.5, "shift_factor": 0.1}}
    export_folder.write_folder(model, cfg, tmp_path / "run", tmp_path / "export", "diffusers", stats, 2, scale, None)
    net = DiffusersAutoencoderKL.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(net.decode(net.encode(x).latent_dist.mode()).sample, model(x, sample=False).x_hat,
                                   rtol=1e-4, atol=1e-5)
    assert (net.config.scaling_factor, net.config.shift_factor) == (0.5, 0.1)


def test_a_kl_f4_run_exports_through_the_cli(tmp_path):
    run = train_tiny_run(tmp_path, "model.name=kl-f4", "model.base_channels=8", "train.epochs=1")
    assert main(["export", str(run), "-o", str(tmp_path / "export"), "--no-progress"]) == 0
    net = DiffusersAutoencoderKL.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    model, _ = load_model(run)
    x = batch(tmp_path / "train", 32, 4)
    with torch.no_grad():
        torch.testing.assert_close(net.decode(net.encode(x).latent_dist.mode()).sample, model(x, sample=False).x_hat,
                                   rtol=1e-4, atol=1e-5)


def test_export_seed_model_as_safetensors_and_read_it_back(tmp_path, capsys):
    run = train_tiny_run(tmp_path, "train.epochs=1")
    assert main(["export", str(run), "--format", "diffusers", "-o", str(tmp_path / "x")]) == 2
    assert "no diffusers class fits model 'seed' (latent 16): use --format safetensors" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "seed"), "--no-progress"]) == 0  # safetensors by default
    assert sorted(p.name for p in (tmp_path / "seed").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    exported, _, _ = open_model(tmp_path / "seed")
    original, _ = load_model(run)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), original.state_dict().values()))
    assert main(["evaluate", str(tmp_path / "seed"), "--data", str(tmp_path / "eval"), "-o", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0


def test_encode_latents_against_a_direct_computation_and_resume(kl_run, tmp_path, monkeypatch):
    photos = kl_run.parent / "train"
    (photos / "broken.jpg").write_text("not an image")
    real_write, calls = cache.ChunkedOutput.write, []

    def dies_after_one_chunk(self, c, values, skipped):
        if calls:
            raise KeyboardInterrupt
        calls.append(c)
        return real_write(self, c, values, skipped)

    monkeypatch.setattr(cache.ChunkedOutput, "write", dies_after_one_chunk)
    settings = {"logvar": True, "overrides": {"eval": {"batch_size": 4}}, "chunk": 8, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        encode_latents(kl_run, tmp_path / "z", [str(photos)], **settings)
    assert (tmp_path / "z.partial").is_dir() and not (tmp_path / "z").exists()
    resumed = []
    monkeypatch.setattr(cache.ChunkedOutput, "write", lambda self, c, *a: resumed.append(c) or real_write(self, c, *a))
    manifest = encode_latents(kl_run, tmp_path / "z", [str(photos)], **settings)
    assert calls == [0] and resumed == [1, 2]  # 17 rows in chunks of 8: the first was not encoded again
    assert (manifest["count"], manifest["rows"]) == (16, 17)
    assert list(manifest["skipped"]) == [str(photos / "broken.jpg")]
    z = np.load(tmp_path / "z" / "latents.npy", mmap_mode="r")
    logvar = np.load(tmp_path / "z" / "logvar.npy")
    valid = np.load(tmp_path / "z" / "valid.npy")
    keys = read_keys(tmp_path / "z")
    model, cfg = load_model(kl_run)
    views = build_dataset([str(photos)], cfg.data, train=False, seed=0)  # one centre view each: the folder's auto
    with torch.no_grad():
        posterior = model.encode(normalize(torch.stack([views.load(int(i)) for i in valid])))
    assert z.shape == (17, 4, 16, 16) and keys[0].endswith("000000000000.jpg")
    np.testing.assert_allclose(z[valid], posterior.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logvar[valid], posterior.logvar.numpy(), rtol=1e-4, atol=1e-5)
    stats = manifest["statistics"]
    means = posterior.mean.double()
    np.testing.assert_allclose(stats["channel_mean"], means.mean((0, 2, 3)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats["channel_std"], means.transpose(0, 1).flatten(1).std(1, unbiased=False).numpy(),
                               rtol=1e-4)
    total_var = means.var(unbiased=False) + posterior.logvar.double().exp().mean()
    assert stats["scaling_factor"] == pytest.approx(float(1 / total_var.sqrt()), rel=1e-5)
    assert json.loads((tmp_path / "z" / "manifest.json").read_text())["statistics"] == stats


def test_lpips_from_a_local_backbone_file(kl_run, tmp_path, capsys):
    import torchvision

    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet.pth")  # random: the plumbing
    with pytest.warns(UserWarning, match="not comparable with published ones"):
        lpips = LPIPS(tmp_path / "alexnet.pth")
    real = torch.rand(3, 3, 32, 32)
    assert torch.allclose(lpips(real, real), torch.zeros(3)) and (lpips(real, real.flip(-1)) > 0).all()
    out = tmp_path / "m.json"
    digest = hashlib.sha256((tmp_path / "alexnet.pth").read_bytes()).hexdigest()
    # Checked at the start: random weights are not torchvision's alexnet-owt-7be5be79.pth, said in one line.
    with pytest.warns(UserWarning, match=re.escape(f"SHA-256 {digest[:8]}... is not that of alexnet-owt-7be5be79.pth "
                                                   "(7be5be79...): its scores are not comparable")):
        assert main(["evaluate", str(kl_run), "--lpips-weights", str(tmp_path / "alexnet.pth"), "--iw-samples", "2",
                     "-o", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["reconstruction"]["lpips"]["mean"] > 0
    assert metrics["feature_weights"]["lpips"] == {"file": str(tmp_path / "alexnet.pth"), "sha256": digest,
                                                   "published": False}
    assert "LPIPS" in capsys.readouterr().out
    (tmp_path / "bad.pth").write_bytes(b"junk")
    assert main(["evaluate", str(kl_run), "--lpips-weights", str(tmp_path / "bad.pth")]) == 2
    assert "not torchvision AlexNet or VGG16 weights" in capsys.readouterr().err


def test_a_decoder_fine_tune_keeps_the_folders_latent_scale_and_fields(tmp_path, capsys):
    """Stable Diffusion's case: a folder with scaling_factor 0.18215, its decoder fine-tuned at
    another size; the export keeps the folder's scale, sample_size and fields unless asked to
    recompute, and encode and the model card record the folder's and the measured scale."""
    sd = tmp_path / "sd-vae"
    write_folder(sd, scaling_factor=0.18215, force_upcast=False)  # sample_size 32
    run = train_tiny_run(tmp_path, "model.name=autoencoder-kl", f"model.pretrained={sd}", "data.image_size=64",
                         "train.epochs=1", "train.optimizer=adam", "train.lr=3e-3", "train.freeze_encoder=true")
    kept, fresh = tmp_path / "kept", tmp_path / "fresh"
    assert main(["export", str(run), "-o", str(kept), "--no-progress"]) == 0
    assert main(["export", str(run), "-o", str(fresh), "--latent-scale", "recompute", "--no-progress"]) == 0
    ours = DiffusersAutoencoderKL.from_pretrained(kept, local_files_only=True).config
    assert (ours.scaling_factor, ours.shift_factor, ours.sample_size, ours.force_upcast) == (0.18215, None, 32, False)
    measured = DiffusersAutoencoderKL.from_pretrained(fresh, local_files_only=True).config
    assert measured.scaling_factor != pytest.approx(0.18215, rel=0.01) and measured.shift_factor is not None
    assert measured.sample_size == 32  # the folder's, not the training size
    card = (kept / "README.md").read_text()
    assert "scaling_factor 0.18215, shift_factor none (the model's own, kept; measured: scaling_factor " \
           f"{measured.scaling_factor:.5g}, shift_factor {measured.shift_factor:.5g})" in card, card
    assert "its own was scaling_factor 0.18215" in (fresh / "README.md").read_text()
    capsys.readouterr()
    assert main(["encode", str(sd), "--data", str(tmp_path / "train"), "-o", str(tmp_path / "z"),
                 "--no-progress"]) == 0
    assert "scaling_factor 0.18215, shift_factor none (the model's own, kept; measured" in capsys.readouterr().out
    scale = json.loads((tmp_path / "z" / "manifest.json").read_text())["latent_scale"]
    assert scale["choice"] == "keep" and scale["scaling_factor"] == scale["own"]["scaling_factor"] == 0.18215
    assert scale["measured"]["scaling_factor"] > 0 and scale["measured"]["shift_factor"] is not None


def test_latent_scale_keep_is_refused_where_the_model_has_none(kl_run, tmp_path, capsys):
    for verb in ("export", "encode"):
        assert main([verb, str(kl_run), "-o", str(tmp_path / verb), "--latent-scale", "keep"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has no latent scale of its own" in err and "recompute" in err, err
        assert not (tmp_path / verb).exists()


@pytest.mark.parametrize("make, args, message", [
    (None, ["evaluate", "{path}", "--data", "{photos}"], "checkpoint '{path}' does not exist"),
    (lambda p: p.mkdir() or (p / "config.json").write_text("{broken"), ["evaluate", "{path}"],
     "config.json: not a readable JSON file"),
    (lambda p: p.mkdir() or (p / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}'),
     ["evaluate", "{path}"], "a diffusers UNet2DConditionModel folder; imgvae reads AutoencoderKL folders"),
    (lambda p: write_folder(p) and (p / "diffusion_pytorch_model.safetensors").unlink(), ["evaluate", "{path}"],
     "not a readable diffusers AutoencoderKL folder"),
    (write_folder, ["train", "-o", "{tmp}/run", "model.pretrained={path}"],
     "set model.name=autoencoder-kl (not 'seed')"),
    (None, ["train", "-o", "{tmp}/run", "model.name=autoencoder-kl", "model.pretrained=stabilityai/sd-vae-ft-mse"],
     "model.pretrained: stabilityai/sd-vae-ft-mse is neither a checkpoint nor a model folder"),
])
def test_refusals_are_one_line(folder, tmp_path, make, args, message, capsys):
    path = tmp_path / "vae"
    if make:
        make(path)
    values = {"path": path, "photos": folder[0] / "photos", "tmp": tmp_path}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**values) in err, err
