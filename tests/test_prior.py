"""The fitted latent prior: its moments, its file, the fit-prior verb and train.prior_images."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import tiny_config, train_tiny_run, write_jpegs
from imgvae.checkpoint import CheckpointError
from imgvae.cli import main
from imgvae.config import ConfigError
from imgvae.data import build_dataset, normalize
from imgvae.models import VAE, DiagonalGaussian
from imgvae.prior import LatentPrior, fit_prior, load_prior
from imgvae.sample import prior_noise


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
    assert prior.images == 12
    np.testing.assert_allclose(prior.mean.numpy(), mu.mean(0), rtol=1e-5)
    cov = (prior.scale_tril @ prior.scale_tril.T).double().numpy()
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-4, atol=1e-6)
    assert torch.equal(prior.scale_tril, prior.scale_tril.tril())


def test_fit_prior_spreads_a_limited_subset_and_checks_its_arguments(tmp_path):
    write_jpegs(tmp_path / "train", 12, seed=3)
    cfg = tiny_config([tmp_path / "train"], [])
    dataset = build_dataset(cfg.data.train, cfg.data, train=True, seed=0)
    assert fit_prior(FakeEncoder(), dataset, limit=4, progress=False).images == 4
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        fit_prior(FakeEncoder(), dataset, limit=-1, progress=False)
    big = FakeEncoder()
    big.latent_shape = (4, 64, 64)  # kl-f4 at 256 px: 16,384 dimensions
    with pytest.raises(ConfigError, match="too large"):
        fit_prior(big, dataset, progress=False)


def test_prior_transform_save_load_and_refusal(tmp_path):
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0])
    tril = torch.tensor([[1.0, 0, 0, 0], [0.5, 2.0, 0, 0], [0, 0, 0.1, 0], [0.3, 0, 0.2, 1.0]])
    prior = LatentPrior(mean, tril, images=7)
    noise = torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(0))
    z = prior.transform(noise)
    assert z.shape == (5, 2, 2)
    torch.testing.assert_close(z.flatten(1), mean + noise.flatten(1) @ tril.T)
    torch.testing.assert_close(prior.transform(torch.zeros(1, 2, 2)).flatten(), mean)
    with pytest.raises(CheckpointError, match="over 4 latent dimensions, this model has 6"):
        prior.transform(torch.zeros(1, 6))
    prior.save(tmp_path / "prior.safetensors")
    back = LatentPrior.load(tmp_path / "prior.safetensors")
    assert back.images == 7 and torch.equal(back.mean, mean) and torch.equal(back.scale_tril, tril)
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
    assert "fitted on 10 images" in capsys.readouterr().out
    prior = load_prior(run)
    assert prior.images == 10 and prior.mean.shape == (16,)

    for name, kind in (("auto", "auto"), ("fitted", "fitted"), ("standard", "standard")):
        assert main(["sample", str(run), "-n", "4", "--prior", kind, "-o", str(tmp_path / name)]) == 0
    read = lambda name: (tmp_path / name / "samples.png").read_bytes()  # noqa: E731
    assert read("auto") == read("fitted") != read("standard") == read("before")

    assert main(["evaluate", str(run), "-o", str(tmp_path / "m.json"), "--limit", "4", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"fd_effnet_samples", "fd_effnet_samples_fitted"} <= set(metrics["distribution"])
    assert "10 training images" in metrics["prior"]["samples_fitted"]


def test_prior_noise_through_a_fitted_prior_keeps_the_seed(run):
    from imgvae.checkpoint import load_model

    model, _ = load_model(run)
    prior = LatentPrior(torch.full((16,), 2.0), 3 * torch.eye(16), images=1)
    plain = prior_noise(model, 3, seed=5)
    torch.testing.assert_close(prior_noise(model, 3, seed=5, prior=prior), 2 + 3 * plain)


def test_train_prior_images_fits_at_the_end_and_reports_its_samples(tmp_path):
    out = train_tiny_run(tmp_path, "train.epochs=1", "train.prior_images=8", "train.final_eval=true", n_train=12, n_eval=4)
    assert load_prior(out).images == 8
    assert (out / "grids" / "fitted_prior_samples.png").is_file()
    assert "fd_effnet_samples_fitted" in json.loads((out / "metrics.json").read_text())["distribution"]
    page = (out / "report.html").read_text()
    assert "Samples from the fitted prior" in page
    assert all((out / ref).is_file() for ref in re.findall(r'src="([^"]+)"', page))
