import dataclasses

import pytest
import torch

from imgvae.config import MODEL_CONFIGS, LossConfig, TrainConfig, model_config
from imgvae.models.base import MODELS, SCALES, DiagonalGaussian, VAEOutput
from imgvae.models.losses import vae_loss
from imgvae.models.registry import build_model
from imgvae.train.optim import build_optimizer


def small_model(name, **keys):
    """The model section of architecture `name` with those of the keys (default: latent 16, 8 base
    channels) that it has."""
    has = {f.name for f in dataclasses.fields(MODEL_CONFIGS[name])}
    return model_config(name, **{k: v for k, v in (keys or {"latent_dim": 16, "base_channels": 8}).items() if k in has})


def test_every_registered_model_has_its_config_section():
    assert set(MODELS) == set(MODEL_CONFIGS)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_seed_parameter_count_matches_the_original():
    model = build_model(model_config(), image_size=64)
    encoder = count(model.encoder) + count(model.to_mean) + count(model.to_logvar)
    decoder = count(model.decoder_fc) + count(model.decoder)
    assert (encoder, decoder, count(model)) == (18_071_360, 4_693_155, 22_764_515)
    assert model.encoder[10].weight.shape == (1024, 16384)  # the 16384 -> 1024 linear


CONTINUOUS = [name for name in sorted(MODELS) if not name.startswith("vq-")]  # vq-f*: tests/test_quantized.py
SIZES = [(name, size) for name in CONTINUOUS for size in ((32, 64, 128) if name == "seed" else (64, 128, 256))]


@pytest.mark.parametrize("name, size", SIZES)
@pytest.mark.parametrize("scale", SCALES)
def test_shapes_at_several_sizes(name, size, scale):
    model = build_model(small_model(name), image_size=size, scale=scale)
    x = torch.rand(2, 3, size, size) * 2 - 1
    out = model(x)
    factor = {"kl-f4": 4, "kl-f8": 8, "autoencoder-kl": 8}.get(name)  # autoencoder-kl: 4 levels by default
    latent = (16,) if factor is None else (4, size // factor, size // factor)
    assert model.latent_shape == latent and out.z.shape == (2, *latent)
    assert out.x_hat.shape == x.shape
    assert (out.log_scale is None) == (scale == "none") and (scale == "none" or out.log_scale.shape == x.shape)
    if name == "seed":  # tanh output; the others' Gaussian mean is unbounded
        assert out.x_hat.abs().max() <= 1
    noise = torch.randn(2, *latent)
    torch.testing.assert_close(model(x, noise=noise).z, model(x, noise=noise).z)  # given eps, z is fixed
    model.eval()
    assert torch.equal(model(x, sample=False).z, model.encode(x).mean)  # deterministic mode
    assert model.decode(torch.randn(3, *model.latent_shape)).shape == (3, 3, size, size)


def test_registry_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match=r"unknown model 'vqvae'; available: \['autoencoder-kl', 'kl-f4', 'kl-f8', "
                                         r"'resnet', 'seed', 'vq-f4', 'vq-f8'\]"):
        build_model(model_config("vqvae"), 64)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model(model_config(), 60)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels = 16"):
        build_model(model_config("resnet", levels=4), 72)
    with pytest.raises(ValueError, match="'kl-f8' needs image_size divisible by 8"):
        build_model(model_config("kl-f8"), 36)


def test_seed_init_and_batchnorm_settings():
    model = build_model(model_config(), 64)
    bns = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    assert len(bns) == 8 and all(bn.momentum == 0.1 for bn in bns)
    weighted = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    linears = [m for m in model.modules() if isinstance(m, weighted)]
    assert all(m.bias is None or torch.all(m.bias == 0) for m in linears)
    assert [m.bias is None for m in linears].count(False) == 3  # mu, logvar, last conv


def test_kl_and_elbo_match_hand_computation():
    mean = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.2], [-0.4, 0.1]])
    post = DiagonalGaussian(mean, logvar)
    var = logvar.exp()
    kl_hand = 0.5 * (mean**2 + var - 1 - logvar)
    assert torch.allclose(post.kl(), kl_hand)
    x = torch.zeros(2, 3, 2, 2)
    x_hat = torch.full((2, 3, 2, 2), 0.5)
    loss, stats = vae_loss(x, VAEOutput(x_hat, post, mean), LossConfig(beta=2.0))
    recon = 0.5 * 12 * 0.25  # 12 pixels per image, each (0 - 0.5)^2
    kl = kl_hand.sum(1).mean()
    assert stats["recon"].item() == pytest.approx(recon)
    assert loss.item() == pytest.approx(recon + 2.0 * kl.item())


def test_reparametrisation_statistics():
    post = DiagonalGaussian(torch.full((20000, 1), 3.0), torch.full((20000, 1), 2 * torch.log(torch.tensor(0.5))))
    z = post.sample()
    assert z.mean().item() == pytest.approx(3.0, abs=0.02) and z.std().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name, train_cfg", [("seed", TrainConfig())] + [
    (name, TrainConfig(optimizer="adam", lr=1e-3)) for name in ("resnet", "kl-f4", "kl-f8", "autoencoder-kl")])
def test_loss_decreases_on_a_fixed_batch(name, train_cfg):
    torch.manual_seed(0)
    # autoencoder-kl: an f4 (its default is an f8 of 4 levels).
    model = build_model(small_model(name, latent_dim=16, base_channels=16, block_out_channels=[32, 64, 128]), 32)
    opt = build_optimizer(model, train_cfg)
    # Smooth photo-like images (4x4 colour fields upsampled), which a VAE can compress.
    x = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    losses = []
    for _ in range(60):
        loss, _ = vae_loss(x, model(x), LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
