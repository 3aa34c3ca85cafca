"""Representation alignment: a flow prior's hidden layer aligned to a frozen network's features of
the clean image (REPA, prior.align), the features stored once with the latents and refused when
stale, the projector dropped at sampling; an autoencoder's latent aligned to the same features
(VA-VAE's margin terms and adaptive weight, loss.align). Each a switch, tested on small runs."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from imgvae.commands.cli import main
from imgvae.config import ConfigError, FlowConfig
from imgvae.data.datasets import EpochViews, build_dataset
from imgvae.io.paths import load_model
from imgvae.metrics.features import RepresentationFeatures
from imgvae.priors.flow import FlowPrior, aligned_flow_loss
from imgvae.priors.learned import train_prior
from imgvae.train.align import margin_cosine, margin_distance_matrix
from test_engine import CrashAfter

from conftest import train_tiny_run

KL = ["model.name=kl-f4", "model.base_channels=8", "train.optimizer=adam", "train.epochs=1"]
ALIGNED = ["prior.width=16", "prior.depth=2", "prior.epochs=2", "prior.batch_size=16", "prior.steps=4",
           "prior.precision=fp32", "prior.ckpt_every_steps=1", "prior.align=0.5", "prior.align_layer=1"]


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("align"), *KL)


def test_the_alignment_loss_falls_and_its_gradient_stops_at_the_aligned_layer():
    torch.manual_seed(0)
    prior = FlowPrior(FlowConfig(width=16, depth=2, align=1.0, align_layer=0), (4, 16, 16))
    z, features = torch.randn(8, 4, 16, 16), torch.randn(8, 112, 8, 8)
    noise, t = torch.randn(8, 4, 16, 16), torch.rand(8)
    parts = aligned_flow_loss(prior, z, noise, t, None, features, 1.0)
    parts["align"].requires_grad_(False)
    _, projected = prior((1 - t.view(-1, 1, 1, 1)) * noise + t.view(-1, 1, 1, 1) * prior.normalise(z), t, align=True)
    target = torch.nn.functional.interpolate(features, size=projected.shape[-2:], mode="bilinear")
    align = -torch.nn.functional.cosine_similarity(projected, target, dim=1).mean()
    align.backward()
    net = prior.velocity.net
    reached = {name for name, p in prior.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("projector.") for n in reached) and any("down_blocks.0." in n for n in reached)
    assert any(n.startswith("velocity.net.conv_in") for n in reached)  # below the aligned layer
    assert not any("down_blocks.1." in n or "up_blocks" in n or "mid_block" in n for n in reached)  # above it
    assert net.down_blocks[1].resnets[0].conv1.weight.grad is None
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = aligned_flow_loss(prior, z, noise, t, None, features, 1.0)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        first = float(loss["align"]) if first is None else first
    assert float(loss["align"]) < first - 0.2


def test_an_aligned_prior_stores_the_features_resumes_and_samples_without_its_projector(kl_run, tmp_path, capsys):
    train_prior(kl_run, tmp_path / "straight", overrides=ALIGNED, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_prior(kl_run, tmp_path / "resumed", overrides=ALIGNED, progress=False,
                    callbacks=[CrashAfter("step_00000003")])
    train_prior(kl_run, tmp_path / "resumed", resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / name)) for r in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("projector.") for k in a), name
    history = [json.loads(line) for line in (tmp_path / "straight" / "history.jsonl").read_text().splitlines()]
    assert {"train/flow", "train/align"} <= set(history[-1])
    # The stored features are a fresh computation's (float16).
    latents = tmp_path / "straight" / "latents"
    model, cfg = load_model(kl_run)
    views = EpochViews(build_dataset(cfg.data.train, cfg.data, train=True, seed=cfg.train.seed), 1, mirror=True)
    stored = np.load(latents / "align_features.npy")
    fresh = RepresentationFeatures()(torch.stack([views[i][0] for i in (0, 5)]).float() / 255, 8)
    assert np.allclose(stored[[0, 5]], fresh.half().numpy(), atol=2e-3)
    assert json.loads((latents / "manifest.json").read_text())["align_features"] == RepresentationFeatures.record(8)
    # Sampling drops the projector: the same images with it and without it in the checkpoint.
    assert main(["sample", str(kl_run), "--prior-run", str(tmp_path / "straight"), "-n", "3", "-o",
                 str(tmp_path / "with")]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        file = tmp_path / "straight" / "checkpoints" / "last" / name
        save_file({k: v for k, v in load_file(str(file)).items() if not k.startswith("projector.")}, str(file))
    assert main(["sample", str(kl_run), "--prior-run", str(tmp_path / "straight"), "-n", "3", "-o",
                 str(tmp_path / "without")]) == 0
    assert (tmp_path / "with" / "samples.png").read_bytes() == (tmp_path / "without" / "samples.png").read_bytes()


def test_stale_or_missing_features_are_refused(kl_run, tmp_path):
    plain = [o for o in ALIGNED if not o.startswith("prior.align")]
    train_prior(kl_run, tmp_path / "p", overrides=plain, progress=False)
    with pytest.raises(ConfigError, match="holds none of the features alignment needs"):
        train_prior(kl_run, tmp_path / "p", overrides=["prior.align=0.5", "prior.epochs=3"], resume=True,
                    progress=False)
    manifest = tmp_path / "p" / "latents" / "manifest.json"
    values = json.loads(manifest.read_text())
    values["align_features"] = {**RepresentationFeatures.record(8), "block": 7}
    manifest.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="holds others"):
        train_prior(kl_run, tmp_path / "p", overrides=["prior.align=0.5", "prior.epochs=3"], resume=True,
                    progress=False)


@pytest.mark.parametrize("extra, message", [
    (["prior.align_layer=9"], "prior.align_layer: 9 is not a layer of this unet (its layers: 0 to 2)"),
    (["prior.align=nan"], "prior.align: expected a finite number"),
])
def test_alignment_refusals_are_one_line(kl_run, tmp_path, extra, message, capsys):
    assert main(["train-prior", str(kl_run), "-o", str(tmp_path / "p"), *ALIGNED, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "p").exists()


def test_a_flat_latents_mlp_prior_refuses_alignment(tmp_path, capsys):
    seed = train_tiny_run(tmp_path, "train.epochs=1")
    assert main(["train-prior", str(seed), "-o", str(tmp_path / "p"), *ALIGNED]) == 2
    assert "the MLP of a flat latent has no spatial hidden state to align" in capsys.readouterr().err


def test_the_margin_terms_are_zero_inside_their_margins_and_positive_outside():
    f = torch.randn(2, 112, 4, 4)
    assert margin_cosine(f, f) == 0 and margin_distance_matrix(f, f) == 0
    assert margin_cosine(-f, f) > 1 and margin_distance_matrix(torch.randn(2, 112, 4, 4), f) > 0


def test_an_aligned_autoencoder_trains_resumes_and_is_used_without_its_projection(tmp_path, capsys):
    run = train_tiny_run(tmp_path, *KL, "loss.align=0.1", "train.epochs=2", "eval.after_training=true")
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["train/align"]) and h["train/align_weight"] > 0 for h in history)
    assert any(k.startswith("align_projection.") for k in load_file(str(run / "checkpoints" / "last" /
                                                                        "model.safetensors")))
    assert json.loads((run / "metrics.json").read_text())["images"] == 6  # evaluated without the projection
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    assert main(["train", "--resume", str(copy), "--no-progress", "train.epochs=3"]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "export")]) == 0
    assert main(["train", "--resume", str(copy), "loss.align=0"]) == 2
    assert "loss.align" in capsys.readouterr().err


def test_alignment_of_a_latent_it_cannot_take_is_refused_before_any_work(tmp_path, capsys):
    assert main(["train", "-o", str(tmp_path / "r"), "loss.align=0.1"]) == 2  # the seed's flat latent
    assert "loss.align aligns a spatial continuous latent" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
