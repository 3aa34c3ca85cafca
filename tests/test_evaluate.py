"""Metrics against independent computations, on small tensors and fake models."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from imgvae.evaluation.evaluate import FewImages, evaluate, image_metrics
from imgvae.evaluation.report import metric_rows
from imgvae.metrics.distances import FeatureSet, frechet_distance, kernel_distance, precision_recall
from imgvae.metrics.features import EffNetFeatures
from imgvae.models.base import VAE, DiagonalGaussian
from imgvae.models.generate import lerp, slerp
from imgvae.models.losses import bits_per_dim, discretized_log_likelihood

from conftest import tiny_config, write_jpegs


def phi(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


def test_psnr_and_mse_of_known_noise():
    real = 0.1 + 0.8 * torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    d = torch.tensor([0.01, 0.05, 0.1])[:, None, None, None]
    signs = torch.randint(0, 2, real.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    metrics = image_metrics(real, real + d * signs)
    torch.testing.assert_close(metrics["mse"], d.flatten() ** 2)
    torch.testing.assert_close(metrics["psnr"], 10 * torch.log10(1 / d.flatten() ** 2))


def test_ssim_of_identical_images_is_one_and_lower_for_noisy():
    real = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_metrics(real, real)["ssim"], torch.ones(2))
    assert (image_metrics(real, (real + 0.2 * torch.randn_like(real)).clamp(0, 1))["ssim"] < 0.9).all()
    assert "ms_ssim" not in image_metrics(real, real)  # too small for 5 scales
    big = torch.rand(1, 3, 176, 176)
    torch.testing.assert_close(image_metrics(big, big)["ms_ssim"], torch.ones(1))


def test_discretized_gaussian_matches_erf_and_sums_to_one():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean, sigma = 0.3, 0.2
    log_p = discretized_log_likelihood(levels, torch.full_like(levels, mean), math.log(sigma))
    for k in (0, 100, 200, 255):
        x = k / 127.5 - 1
        lo = -math.inf if k == 0 else (x - 1 / 255 - mean) / sigma
        hi = math.inf if k == 255 else (x + 1 / 255 - mean) / sigma
        expected = (1.0 if hi == math.inf else phi(hi)) - (0.0 if lo == -math.inf else phi(lo))
        assert log_p[k].item() == pytest.approx(math.log(expected), rel=1e-7)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # 50 sigma out, erf underflows but the log mass stays accurate: the bin's mass is
    # the upper tail beyond its near edge a (the far edge adds e^-39 of it), and
    # log Q(a) = -a^2/2 - log(a sqrt(2 pi)) + log(1 - 1/a^2 + 3/a^4) (Mills ratio).
    far = discretized_log_likelihood(torch.tensor([0.0]), torch.tensor([-0.5]), math.log(0.01))
    a = (0.5 - 1 / 255) / 0.01
    expected = -a * a / 2 - math.log(a * math.sqrt(2 * math.pi)) + math.log(1 - 1 / a**2 + 3 / a**4)
    assert far.item() == pytest.approx(expected, rel=1e-6)


def test_bits_per_dim_hand_case():
    # 3 x 2 x 2 = 12 dimensions, 12 * ln 2 * 5 nats -> 5 bits/dim.
    assert bits_per_dim(12 * math.log(2) * 5, 12) == pytest.approx(5.0)


class FakeVAE(VAE):
    """Posterior means: `active` dims vary with the image, the rest are 0 (collapsed);
    log-variance 0; the decoder returns mid-grey whatever z is."""

    def __init__(self, active: int, latent: int):
        super().__init__()
        self.active, self.latent_shape = active, (latent,)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        brightness = x.mean((1, 2, 3))[:, None] * 10
        collapsed = torch.zeros(len(x), self.latent_shape[0] - self.active)
        mean = torch.cat([brightness * (i + 1) for i in range(self.active)] + [collapsed], 1)
        return DiagonalGaussian(mean, torch.zeros_like(mean))

    def decoder_output(self, z):
        return torch.zeros(len(z), 3, 32, 32) + 0 * self.dummy


def eval_views(folder):
    """The eval split's views of a tiny_config folder, with PIL: centre crop 64 (or the shorter side), resize 32."""
    images = []
    for path in sorted(folder.glob("*.jpg")):
        img = Image.open(path).convert("RGB")
        side = min(64, *img.size)
        left, top = round((img.width - side) / 2), round((img.height - side) / 2)
        crop = img.crop((left, top, left + side, top + side))
        images.append(np.asarray(crop.resize((32, 32), Image.Resampling.BILINEAR)))
    return np.stack(images)


def fake_eval(tmp_path, active, sample_reference=()):
    write_jpegs(tmp_path / "eval", 10, seed=5)
    cfg = tiny_config([tmp_path / "eval"], [tmp_path / "eval"], "data.exact_decode=true", "eval.iw_samples=4",
                      "eval.batch_size=4", f"eval.sample_reference={list(sample_reference)}")
    model = FakeVAE(active=active, latent=8)
    metrics = evaluate(model, cfg, [str(tmp_path / "eval")], progress=False)
    return metrics, eval_views(tmp_path / "eval")


def test_each_frechet_distance_has_its_kid_and_count_and_few_images_are_said_in_one_warning(tmp_path):
    with pytest.warns(FewImages, match=r"^fd_effnet rests on 10 images, fewer than its 1280 feature dimensions: "
                                       r"biased upwards, compare it only at equal n \(KID beside it is unbiased\)$"):
        metrics, _ = fake_eval(tmp_path, active=2)
    dist = metrics.distribution
    assert (dist.images, dist.sample_images) == (10, 10)
    assert dist.kid_effnet_recon is not None and dist.kid_effnet_samples is not None
    rows = dict(dist.rows())
    assert rows["fd_effnet_recon"].endswith("(n = 10)") and rows["kid_effnet_samples"].endswith("(n = 10)")


def test_evaluate_active_units_and_kl_per_dim_on_collapsed_model(tmp_path):
    metrics, _ = fake_eval(tmp_path, active=3)
    latent = metrics.latent
    assert latent.active_units == 3 and latent.dims == 8
    assert latent.kl_per_dim[3:] == [0.0] * 5
    assert all(v > 0 for v in latent.kl_per_dim[:3])
    # KL of N(mu, 1) from N(0, 1) is mu^2 / 2: dim i has mu = (i + 1) * mu_0.
    kl = latent.kl_per_dim
    assert kl[1] == pytest.approx(4 * kl[0]) and kl[2] == pytest.approx(9 * kl[0])
    assert metrics.likelihood.kl_nats == pytest.approx(sum(kl))


def test_evaluate_likelihood_and_psnr_by_hand(tmp_path):
    # All dims collapsed, q(z|x) = p(z): KL = 0 and every importance weight is p(x|z).
    # The decoder says N(0, 1) for every subpixel on the [-1, 1] scale, whatever z:
    # -log p(x|z) is a sum of log bin masses computed with erf.
    metrics, images = fake_eval(tmp_path, active=0)
    levels = images.astype(np.float64) / 127.5 - 1
    table = {k: -math.log((1.0 if k == 255 else phi(k / 127.5 - 1 + 1 / 255))
                          - (0.0 if k == 0 else phi(k / 127.5 - 1 - 1 / 255)))
             for k in range(256)}
    recon_nats = np.vectorize(table.get)(images).reshape(len(images), -1).sum(1).mean()
    lik = metrics.likelihood
    assert metrics.images == 10 and levels.shape == (10, 32, 32, 3)
    assert lik.recon_nats == pytest.approx(recon_nats, rel=1e-9)
    assert lik.kl_nats == 0.0 and metrics.latent.active_units == 0
    assert lik.neg_elbo_bpd == pytest.approx(recon_nats / (3 * 32 * 32 * math.log(2)), rel=1e-9)
    assert lik.neg_iw_nats == pytest.approx(recon_nats, rel=1e-9)
    # Reconstructions are mid-grey (0.5 rounds to 128/255): PSNR computed independently.
    mse = ((images / 255.0 - 128 / 255) ** 2).reshape(len(images), -1).mean(1)
    assert metrics.reconstruction.psnr.mean == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)
    assert metrics.reconstruction.mse.mean == pytest.approx(mse.mean(), rel=1e-5)
    assert metrics.reconstruction.ms_ssim is None
    assert metrics.distribution.fd_effnet_recon > 0


def test_samples_scored_against_a_reference_set(tmp_path):
    # The fake decoder gives mid-grey whatever z is: the samples are 128/255 images.
    write_jpegs(tmp_path / "train", 6, seed=9)
    held_out, _ = fake_eval(tmp_path, active=2)
    metrics, _ = fake_eval(tmp_path, active=2, sample_reference=[str(tmp_path / "train")])
    net = EffNetFeatures().eval()
    reference, grey = FeatureSet(), FeatureSet()
    with torch.no_grad():
        reference.add(net(torch.from_numpy(eval_views(tmp_path / "train")).permute(0, 3, 1, 2).float().div(255)))
        grey.add(net(torch.full((6, 3, 32, 32), 128 / 255)))
    dist = metrics.distribution
    assert dist.fd_effnet_samples == pytest.approx(frechet_distance(reference.tensor(), grey.tensor()), rel=1e-4)
    assert dist.kid_effnet_samples == pytest.approx(kernel_distance(reference.tensor(), grey.tensor()), rel=1e-4)
    assert (dist.images, dist.sample_images) == (10, 6)
    assert dist.fd_effnet_samples != pytest.approx(held_out.distribution.fd_effnet_samples, rel=1e-2)
    assert dist.fd_effnet_recon == held_out.distribution.fd_effnet_recon  # still against the held-out images
    assert metrics.samples_reference == {"sources": [str(tmp_path / "train")], "images": 6, "held_out": False}
    assert held_out.samples_reference["held_out"] and held_out.samples_reference["images"] == 10
    assert ("samples scored against", f"6 images from {tmp_path / 'train'}") in metric_rows(metrics)


def test_frechet_distance_against_scipy_and_imgvaes_own_formula():
    """torchmetrics' FID told the features: scipy's matrix square root, and the eigenvalue formula imgvae
    computed itself before (its figures are those of older runs), to 1e-6."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) * 0.5 + 1.0
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    root_trace = np.sqrt(np.linalg.eigvals(cov_a @ cov_b)).real.sum()
    own = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * root_trace
    fd = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert fd == pytest.approx(expected, rel=1e-8) and fd == pytest.approx(own, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-8)
    assert math.isnan(frechet_distance(torch.from_numpy(a), torch.full((3, 5), math.nan)))


def test_kid_is_the_unbiased_mmd_of_a_cubic_kernel_and_unbiased_at_small_n():
    """Sets no larger than the subset size: every subset is the whole set, KID is the exact unbiased
    estimate; and two samples of one distribution score about 0 at any n, where the Fréchet
    distance grows as n falls."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(50, 8)) + 0.3

    def k(x, y):
        return (x @ y.T / 8 + 1) ** 3

    m, n = len(a), len(a)
    b = b[:n]
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                - 2 * kxy.mean())
    assert kernel_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-9)
    one = torch.from_numpy(rng.normal(size=(4000, 16)))
    small = [kernel_distance(one[:30], one[2000:2030]), frechet_distance(one[:30], one[2000:2030])]
    large = [kernel_distance(one[:2000], one[2000:]), frechet_distance(one[:2000], one[2000:])]
    assert abs(small[0]) < 0.05 and abs(large[0]) < 0.005 and small[1] > 5 * large[1]


def test_precision_recall_against_a_brute_force_reference():
    """torch-fidelity's prc equals the definition: the k-th nearest other point's distance as each radius."""
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(60, 4)), rng.normal(size=(50, 4)) * 1.5 + 0.5

    def inside(points, centres, k=3):
        radii = [sorted(np.linalg.norm(centres - c, axis=1))[k] for c in centres]  # [0] is the point itself
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii)) for p in points])

    precision, recall = precision_recall(torch.from_numpy(real), torch.from_numpy(fake))
    assert (precision, recall) == (pytest.approx(inside(fake, real)), pytest.approx(inside(real, fake)))


def test_slerp_and_lerp_endpoints_and_norm():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    t = torch.linspace(0, 1, 5)
    path = slerp(a, b, t)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), torch.full((5,), 3.0))  # stays on the sphere
    torch.testing.assert_close(lerp(a, b, t)[2], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(slerp(a, 2 * a, t), lerp(a, 2 * a, t))  # parallel: falls back to linear
