"""Each loss against a hand computation on tiny tensors; schedules; EMA and GAN in a run."""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

from imgvae.config import LossConfig, load_config
from imgvae.io.paths import load_model
from imgvae.metrics.features import PerceptualDistance
from imgvae.models.base import DiagonalGaussian, VAEOutput
from imgvae.models.losses import (
    adaptive_gan_weight,
    discretized_log_likelihood,
    hinge_discriminator_loss,
    kl_weight,
    reconstruction_nll,
    vae_loss,
)
from imgvae.models.registry import build_model, decoder_scale
from imgvae.train.engine import train
from imgvae.train.optim import update_ema

from conftest import tiny_config, write_jpegs

X = torch.tensor([[[[-1.0, 0.2], [0.6, 1.0]]]]).expand(1, 3, 2, 2).clone()  # (1, 3, 2, 2)
MEAN = torch.full_like(X, 0.1)


def output(log_scale=None, mean=None, logvar=None):
    mean_z = torch.tensor([[0.5, -1.0, 0.0]]) if mean is None else mean
    logvar = torch.zeros_like(mean_z) if logvar is None else logvar
    return VAEOutput(MEAN, DiagonalGaussian(mean_z, logvar), mean_z, log_scale)


def test_gaussian_fixed_learned_scalar_and_per_pixel():
    d = X - MEAN
    assert reconstruction_nll(X, output(), LossConfig()).item() == pytest.approx(0.5 * (d**2).sum().item())
    s = torch.full_like(X, math.log(0.5))
    hand = (0.5 * (d / 0.5) ** 2 + math.log(0.5)).sum().item()
    assert reconstruction_nll(X, output(s), LossConfig(sigma="pixel")).item() == pytest.approx(hand)
    assert decoder_scale(LossConfig(sigma="scalar")) == "scalar" and decoder_scale(LossConfig()) == "none"
    assert decoder_scale(LossConfig(likelihood="logistic")) == "pixel"


def test_l1_and_discretised_logistic():
    l1 = reconstruction_nll(X, output(), LossConfig(likelihood="l1")).item()
    assert l1 == pytest.approx((X - MEAN).abs().sum().item())
    s = math.log(0.2)
    nll = reconstruction_nll(X, output(torch.full_like(X, s)), LossConfig(likelihood="logistic")).item()

    def cdf(v):
        return 1 / (1 + math.exp(-(v - 0.1) / 0.2))

    hand = 0.0
    for v in X.flatten().tolist():
        upper = 1.0 if v >= 1 else cdf(v + 1 / 255)
        lower = 0.0 if v <= -1 else cdf(v - 1 / 255)
        hand -= math.log(upper - lower)
    assert nll == pytest.approx(hand, rel=1e-6)
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for family in ("gaussian", "logistic", "laplace"):  # each is a distribution over the 256 levels
        total = discretized_log_likelihood(levels, torch.full_like(levels, 0.3), math.log(0.1), family).exp().sum()
        assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_beta_and_free_bits():
    out = output(mean=torch.tensor([[0.5, -1.0, 0.0], [0.1, 0.0, 0.0]]))
    x, out.x_hat = X.expand(2, 3, 2, 2), MEAN.expand(2, 3, 2, 2)
    kl = 0.5 * out.posterior.mean**2  # unit variances: KL = mu^2 / 2 per dim
    recon = 0.5 * ((X - MEAN) ** 2).sum().item()
    loss, stats = vae_loss(x, out, LossConfig(beta=3.0))
    assert loss.item() == pytest.approx(recon + 3.0 * kl.sum(1).mean().item())
    # Free bits 0.1 nats: batch-mean KL per dim is [0.065, 0.25, 0] -> [0.1, 0.25, 0.1].
    loss, stats = vae_loss(x, out, LossConfig(free_bits=0.1))
    assert loss.item() == pytest.approx(recon + 0.1 + 0.25 + 0.1)
    assert stats["kl"].item() == pytest.approx(kl.sum(1).mean().item())  # the reported KL is the plain one


def test_kl_warmup_weights():
    cfg = LossConfig(beta=2.0, kl_warmup=0.25)
    assert [kl_weight(cfg, step, 400) for step in (0, 50, 100, 300)] == [0.0, 1.0, 2.0, 2.0]
    assert kl_weight(LossConfig(beta=0.5), 0, 400) == 0.5


def test_hinge_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    recon, gan = (3 * w).sum(), (w**2).sum()  # gradients (3, 3) and (2, 4)
    weight = adaptive_gan_weight(recon, gan, w)
    assert weight.item() == pytest.approx(math.sqrt(18) / (math.sqrt(20) + 1e-4))


def test_perceptual_distance_is_zero_for_identical_and_differentiable():
    torch.manual_seed(0)
    distance = PerceptualDistance()
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).requires_grad_()
    assert torch.allclose(distance(a, a), torch.zeros(2))
    d = distance(a, b)
    assert (d > 0).all()
    d.sum().backward()
    assert b.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["resnet", "kl-f4", "kl-f8", "sharp"])
def test_presets_decrease_the_loss_on_a_fixed_batch(preset):
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg.model, 32, decoder_scale(cfg.loss))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    perceptual = PerceptualDistance() if cfg.loss.perceptual else None
    losses = []
    for _ in range(12):
        loss, _ = vae_loss(x, model(x), cfg.loss, perceptual=perceptual)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])


def test_ema_and_adversarial_run_resume_and_feed_evaluation(tmp_path):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    cfg = tiny_config([tmp_path / "photos"], [], "train.epochs=2", "train.ema=0.9", "loss.adversarial=0.5",
                      "loss.adversarial_start=2", "loss.sigma=scalar", "loss.kl_warmup=0.5")
    summary = train(cfg, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "checkpoints" / "last"
    raw, ema = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    assert summary["steps"] == 6 and (last / "discriminator.safetensors").is_file()
    assert not torch.equal(raw["log_scale"], ema["log_scale"])  # the average lags the weights
    model, _ = load_model(tmp_path / "run")
    assert torch.equal(model.log_scale.detach(), ema["log_scale"])  # evaluation and sampling use the EMA
    steps = (tmp_path / "run" / "steps.jsonl").read_text()
    assert '"generator"' in steps and '"sigma"' in steps


def test_ema_warmup_rule_first_copy_and_skipped_steps():
    model = torch.nn.BatchNorm1d(1)
    ema = AveragedModel(model, use_buffers=True)
    yes, no = torch.tensor(True), torch.tensor(False)
    with torch.no_grad():
        model.weight.fill_(5.0)
    update_ema(ema, model, 0.999, yes)  # the first update copies
    assert ema.module.weight.item() == 5.0 and ema.n_averaged.item() == 1
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
        model.num_batches_tracked.fill_(7)
    update_ema(ema, model, 0.999, no)  # a skipped step changes nothing
    assert ema.module.weight.item() == 0.0 and ema.n_averaged.item() == 1 and ema.module.num_batches_tracked == 0
    update_ema(ema, model, 0.999, yes)  # decay min(0.999, 2 / 11)
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11) and ema.module.num_batches_tracked == 7
    ema.n_averaged.fill_(100_000)
    with torch.no_grad():
        ema.module.weight.fill_(0.0)
    update_ema(ema, model, 0.999, yes)  # long runs: the configured decay
    assert ema.module.weight.item() == pytest.approx(0.001)
