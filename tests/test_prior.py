"""The fitted latent prior: its moments, its file, the fit-prior verb and prior.after_training."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imgvae.commands.cli import main
from imgvae.config import ConfigError
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import normalize
from imgvae.data.sources import SourceError
from imgvae.io.checkpoint import CheckpointError
from imgvae.models.base import VAE, DiagonalGaussian
from imgvae.models.generate import prior_noise
from imgvae.priors.gmm import LatentPrior, fit_prior, latents, load_prior

from conftest import tiny_config, train_tiny_run, write_jpegs


class FakeEncoder(VAE):
    """Posterior N(mu(x), 0.25 I) with mu(x) the mean of each of 3 channels times 1, 2 and
    a per-channel offset, spread over a (2, 3) latent; variance fixed."""

    latent_shape = (2, 3)

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        channels = x.mean((2, 3))  # (B, 3)
        mean = torch.stack([channels, 2 * channels.flip(1) + 1], 1)  # (B, 2, 3)
        return DiagonalGaussian(mean, torch.full_like(mean, np.log(0.25)))

    def decoder_output(self, z):
        return torch.zeros(len(z), 3, 32, 32) + 0 * self.dummy


def test_fit_prior_has_the_aggregate_posteriors_mean_and_covariance(tmp_path):
    write_jpegs(tmp_path / "train", 12, seed=3)
    cfg = tiny_config([tmp_path / "train"], [])
    dataset = build_dataset(cfg.data.train, cfg.data, train=True, seed=0)
    prior = fit_prior(FakeEncoder(), dataset, limit=0, batch_size=5, progress=False)
    # Independently: the posterior means of every image, their covariance plus the posterior variance.
    x = normalize(torch.stack([dataset[i][0] for i in range(len(dataset))])).double()
    channels = x.mean((2, 3)).numpy()
    mu = np.concatenate([channels, 2 * channels[:, ::-1] + 1], 1)
    expected_cov = np.cov(mu.T) + 0.25 * np.eye(6)
    assert prior.images == 12 and prior.weights.tolist() == [1.0]
    np.testing.assert_allclose(prior.mean[0].numpy(), mu.mean(0), rtol=1e-5)
    cov = (prior.scale_tril[0] @ prior.scale_tril[0].T).double().numpy()
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-4, atol=1e-6)
    assert torch.equal(prior.scale_tril, prior.scale_tril.tril())


def test_fit_prior_mixture_keeps_two_scenes_apart():
    # 8 dark and 12 bright images: a 2-component mixture finds each group's weight, mean
    # and (maximum-likelihood) covariance, plus the posterior variance and the relative ridge.
    rng = np.random.default_rng(0)
    levels = [30] * 8 + [220] * 12
    images = [torch.from_numpy(np.clip(level + rng.normal(0, 12, 3)[:, None, None] + rng.normal(0, 3, (3, 8, 8)),
                                       0, 255).astype(np.uint8)) for level in levels]
    prior = fit_prior(FakeEncoder(), [(x, i, None) for i, x in enumerate(images)], limit=0, components=2, batch_size=6,
                      progress=False)
    x = normalize(torch.stack(images)).double()
    channels = x.mean((2, 3)).numpy()
    mu = np.concatenate([channels, 2 * channels[:, ::-1] + 1], 1)
    ridge = 1e-3 * mu.var(0, ddof=1).mean()
    order = prior.mean[:, 0].argsort()  # dark first
    assert prior.images == 20
    np.testing.assert_allclose(prior.weights[order].numpy(), [0.4, 0.6], rtol=1e-5)
    for k, group in zip(order.tolist(), (mu[:8], mu[8:])):
        np.testing.assert_allclose(prior.mean[k].numpy(), group.mean(0), rtol=1e-4, atol=1e-6)
        cov = (prior.scale_tril[k] @ prior.scale_tril[k].T).double().numpy()
        np.testing.assert_allclose(cov, np.cov(group.T, bias=True) + (ridge + 0.25) * np.eye(6), rtol=1e-3, atol=1e-6)


def test_fit_prior_spreads_a_limited_subset_and_checks_its_arguments(tmp_path):
    write_jpegs(tmp_path / "train", 12, seed=3)
    cfg = tiny_config([tmp_path / "train"], [])
    dataset = build_dataset(cfg.data.train, cfg.data, train=True, seed=0)
    assert fit_prior(FakeEncoder(), dataset, limit=4, progress=False).images == 4
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        fit_prior(FakeEncoder(), dataset, limit=-1, progress=False)
    with pytest.raises(ConfigError, match="components must be >= 1"):
        fit_prior(FakeEncoder(), dataset, components=0, progress=False)
    with pytest.raises(SourceError, match="of 13 components needs at least 13 readable images"):
        fit_prior(FakeEncoder(), dataset, components=13, progress=False)
    big = FakeEncoder()
    big.latent_shape = (4, 64, 64)  # kl-f4 at 256 px: 16,384 dimensions
    with pytest.raises(ConfigError, match="too large"):
        fit_prior(big, dataset, progress=False)
    big.latent_shape = (4, 32, 32)  # 4,096 dimensions: one Gaussian fits, 5 do not
    with pytest.raises(ConfigError, match="5 full-covariance Gaussians over 4096 latent dimensions are too large"):
        fit_prior(big, dataset, components=5, progress=False)


def test_prior_transform_save_load_and_refusal(tmp_path):
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0])
    tril = torch.tensor([[1.0, 0, 0, 0], [0.5, 2.0, 0, 0], [0, 0, 0.1, 0], [0.3, 0, 0.2, 1.0]])
    prior = LatentPrior(torch.ones(1), mean[None], tril[None], images=7)
    noise = torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(0))
    z = prior.transform(noise)
    assert z.shape == (5, 2, 2)
    torch.testing.assert_close(z.flatten(1), mean + noise.flatten(1) @ tril.T)
    torch.testing.assert_close(prior.transform(torch.zeros(1, 2, 2)).flatten(), mean)
    with pytest.raises(CheckpointError, match="over 4 latent dimensions, this model has 6"):
        prior.transform(torch.zeros(1, 6))
    prior.save(tmp_path / "prior.safetensors")
    back = LatentPrior.load(tmp_path / "prior.safetensors")
    assert back.images == 7 and torch.equal(back.mean[0], mean) and torch.equal(back.scale_tril[0], tril)
    # A single-Gaussian file as written before mixtures existed still loads.
    save_file({"mean": mean, "scale_tril": tril}, str(tmp_path / "old.safetensors"), metadata={"images": "7"})
    old = LatentPrior.load(tmp_path / "old.safetensors")
    assert old.weights.tolist() == [1.0] and torch.equal(old.transform(noise), z)
    data = (tmp_path / "prior.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable fitted prior"):
        LatentPrior.load(tmp_path / "cut.safetensors")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("prior"), "train.epochs=1")


def test_fit_prior_verb_then_sample_and_evaluate_use_it(run, tmp_path, capsys):
    assert main(["sample", str(run), "-n", "4", "--prior", "fitted", "-o", str(tmp_path / "x")]) == 2
    assert "has no fitted prior: run `imgvae fit-prior" in capsys.readouterr().err
    assert main(["sample", str(run), "-n", "4", "-o", str(tmp_path / "before")]) == 0  # auto: N(0, I) for now

    assert main(["fit-prior", str(run), "--limit", "10", "--no-progress"]) == 0
    assert "(a Gaussian over 16 latent dimensions, fitted on 10 training images)" in capsys.readouterr().out
    prior = load_prior(run)
    assert prior.images == 10 and prior.mean.shape == (1, 16)

    for name, kind in (("auto", "auto"), ("fitted", "fitted"), ("standard", "standard")):
        assert main(["sample", str(run), "-n", "4", "--prior", kind, "-o", str(tmp_path / name)]) == 0
    read = lambda name: (tmp_path / name / "samples.png").read_bytes()  # noqa: E731
    assert read("auto") == read("fitted") != read("standard") == read("before")

    assert main(["evaluate", str(run), "-o", str(tmp_path / "m.json"), "--limit", "4", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"fd_effnet_samples", "fd_effnet_samples_fitted"} <= set(metrics["distribution"])
    assert "10 training images" in metrics["prior"]["samples_fitted"]

    assert main(["fit-prior", str(run), "--limit", "10", "--components", "2", "--no-progress"]) == 0
    assert "(a mixture of 2 Gaussians over 16 latent dimensions" in capsys.readouterr().out
    assert load_prior(run).mean.shape == (2, 16)
    assert main(["sample", str(run), "-n", "4", "-o", str(tmp_path / "mixture")]) == 0
    assert read("mixture") != read("fitted")


def test_prior_noise_through_a_fitted_prior_keeps_the_seed(run):
    from imgvae.io.paths import load_model

    model, _ = load_model(run)
    prior = LatentPrior(torch.ones(1), torch.full((1, 16), 2.0), 3 * torch.eye(16)[None], images=1)
    plain = prior_noise(model, 3, seed=5)
    torch.testing.assert_close(latents(model, 3, seed=5, prior=prior), 2 + 3 * plain)
    # A mixture: each latent from the component drawn after the noise, with the same generator.
    mixture = LatentPrior(torch.tensor([0.3, 0.7]), torch.stack([torch.full((16,), -5.0), torch.full((16,), 5.0)]),
                          torch.stack([torch.eye(16), 2 * torch.eye(16)]), images=1)
    generator = torch.Generator().manual_seed(5)
    torch.randn(6, 16, generator=generator)
    chosen = torch.multinomial(mixture.weights, 6, replacement=True, generator=generator)
    plain = prior_noise(model, 6, seed=5)
    expected = torch.where(chosen[:, None] == 0, -5 + plain, 5 + 2 * plain)
    torch.testing.assert_close(latents(model, 6, seed=5, prior=mixture), expected)
    assert chosen.unique().tolist() == [0, 1]


def test_prior_after_training_fits_at_the_end_and_reports_its_samples(tmp_path):
    out = train_tiny_run(tmp_path, "train.epochs=1", "prior.after_training=true", "prior.images=8",
                         "eval.after_training=true", n_train=12, n_eval=4)
    assert load_prior(out).images == 8
    assert (out / "grids" / "fitted_prior_samples.png").is_file()
    assert "fd_effnet_samples_fitted" in json.loads((out / "metrics.json").read_text())["distribution"]
    page = (out / "report.html").read_text()
    assert "Samples from the fitted prior" in page
    assert all((out / ref).is_file() for ref in re.findall(r'src="([^"]+)"', page))


def test_every_prior_section_has_a_registered_kind():
    from imgvae.config import PRIOR_CONFIGS
    from imgvae.priors import KINDS

    assert list(KINDS) == ["standard", "gmm", "flow", "tokens"]  # a model's own first, learned ones last
    assert set(KINDS) == {"standard", *PRIOR_CONFIGS}
    assert all(KINDS[name].section is cls for name, cls in PRIOR_CONFIGS.items())
