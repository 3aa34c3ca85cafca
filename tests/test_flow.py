"""The flow prior: its objective learns a known distribution, it trains through the engine
(kill-and-resume to the same weights), samples deterministically, works on any autoencoder imgvae
opens (a diffusers folder too), is refused with the wrong weights or a backbone that does not fit,
and generation is measured with precision / recall and a memorisation check."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.config import ConfigError, FlowConfig
from imgvae.io.checkpoint import CheckpointError
from imgvae.io.paths import open_model
from imgvae.metrics.distances import memorised_share, precision_recall
from imgvae.priors import KINDS, runs
from imgvae.priors.flow import FlowPrior, draw_times, flow_loss
from imgvae.priors.learned import train_prior
from test_engine import CrashAfter
from test_interop import write_folder

from conftest import train_tiny_run, write_jpegs

KL = ["model.name=kl-f8", "model.base_channels=8", "train.optimizer=adam", "train.epochs=1"]
SMALL_PRIOR = ["prior.width=16", "prior.depth=1", "prior.epochs=2", "prior.batch_size=16", "prior.steps=4",
               "prior.precision=fp32", "prior.ckpt_every_steps=1"]


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("flow"), *KL)


@pytest.fixture(scope="module")
def kl_prior(kl_run):
    """kl_run with a flow prior in its default place, trained by the CLI (auto is the UNet, which
    the other tests train; this one is the transformer): the run folder the sampling tests use."""
    assert main(["train-prior", str(kl_run), "--no-progress", *SMALL_PRIOR, "prior.backbone=transformer"]) == 0
    return kl_run


def test_the_flow_objective_learns_a_mixture_of_two_gaussians():
    torch.manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    data = centres[torch.randint(0, 2, (4096,))] + 0.3 * torch.randn(4096, 2)
    prior = FlowPrior(FlowConfig(width=64, depth=3), (2,))
    prior.std.copy_(data.std(0))
    prior.mean.copy_(data.mean(0))
    opt = torch.optim.Adam(prior.parameters(), lr=2e-3, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
    generator = torch.Generator().manual_seed(1)
    for step in range(1000):
        z = data[torch.randint(0, len(data), (256,), generator=generator)]
        loss = flow_loss(prior, z, torch.randn(256, 2, generator=generator),
                         draw_times(256, "logit-normal", generator, "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    samples = prior.eval().sample(torch.randn(4000, 2, generator=torch.Generator().manual_seed(2)), 32, "heun")
    assert torch.allclose(samples.mean(0), data.mean(0), atol=0.1)
    assert torch.allclose(samples.std(0), data.std(0), atol=0.1)
    near = torch.cdist(samples, centres).min(1).values
    assert (near < 1.0).double().mean() > 0.9  # the samples sit at the two modes, not between them
    left = (samples[:, 0] < 0).double().mean()
    assert 0.45 < left < 0.55


@pytest.mark.parametrize("backbone", ["unet", "transformer"])
def test_the_cpu_attention_kernel_computes_the_default_kernels_velocity_and_gradients(backbone):
    torch.manual_seed(0)
    prior = FlowPrior(FlowConfig(backbone=backbone, width=32, depth=2), (4, 8, 8))
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    ours = prior(x, t)  # on a CPU: the plain matmul kernel
    ours_grads = torch.autograd.grad(ours.square().sum(), list(prior.parameters()))
    theirs = prior.velocity(x, t)  # PyTorch's default choice
    theirs_grads = torch.autograd.grad(theirs.square().sum(), list(prior.parameters()))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours_grads, theirs_grads))


def test_prior_training_resumes_to_the_weights_of_a_straight_run(kl_run, tmp_path):
    train_prior(kl_run, tmp_path / "straight", overrides=SMALL_PRIOR, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_prior(kl_run, tmp_path / "resumed", overrides=SMALL_PRIOR, progress=False,
                         callbacks=[CrashAfter("step_00000003")])
    summary = train_prior(kl_run, tmp_path / "resumed", resume=True, progress=False)
    assert summary["steps"] == 2 * (2 * 16 // 16)  # 32 views (16 photos, mirrored): 2 steps an epoch
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / name)) for r in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    values = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert values["source"]["weights_sha256"] and values["latents"] == 32


def test_sampling_is_deterministic_and_takes_euler_or_heun(kl_prior, tmp_path, capsys):
    kl_run = kl_prior
    assert (kl_run / "prior-flow" / "checkpoints" / "last").exists()
    assert (kl_run / "grids" / "flow_prior_samples.png").is_file()
    outs = []
    for i, extra in enumerate([[], [], ["--solver", "euler", "--steps", "3"]]):
        assert main(["sample", str(kl_run), "-n", "6", "-o", str(tmp_path / str(i)), "--prior", "flow", *extra]) == 0
        outs.append((tmp_path / str(i) / "samples.png").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert "6 samples from the flow prior" in capsys.readouterr().out
    assert main(["evaluate", str(kl_run), "--no-progress", "-o", str(tmp_path / "m.json"),
                 "eval.generation_images=8"]) == 0
    gen = json.loads((tmp_path / "m.json").read_text())["generation"]
    assert set(gen["priors"]) == {"standard", "flow"}
    assert gen["images"] == 8 and 0 <= gen["floor"]["precision"] <= 1


def test_a_prior_of_other_weights_or_a_backbone_that_does_not_fit_is_refused(kl_prior, tmp_path, capsys):
    kl_run = kl_prior
    other = train_tiny_run(tmp_path / "other", *KL, "train.seed=5")
    assert main(["sample", str(other), "--prior", "flow", "-o", str(tmp_path / "s"),
                 "--prior-run", str(kl_run / "prior-flow")]) == 2
    assert "is the flow prior of other weights" in capsys.readouterr().err
    assert main(["sample", str(other), "--prior", "flow", "-o", str(tmp_path / "s")]) == 2
    assert "has no flow prior" in capsys.readouterr().err
    (other / "prior-flow-small").symlink_to(kl_run / "prior-flow")  # a prior run under another name
    assert main(["sample", str(other), "--prior", "flow", "-o", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.endswith("first, or name one with --prior-run: prior-flow-small\n")
    # A prior run copied beside other weights is refused on resume too, before it trains or rewrites anything.
    shutil.copytree(kl_run / "prior-flow", other / "prior-flow")
    before = (other / "prior-flow" / "config.yaml").read_text()
    assert main(["train-prior", str(other), "--resume", "prior.epochs=3", "--no-progress"]) == 2
    assert "is the flow prior of other weights" in capsys.readouterr().err
    assert (other / "prior-flow" / "config.yaml").read_text() == before
    seed = train_tiny_run(tmp_path / "seed", "train.epochs=1")
    for backbone in ("unet", "transformer"):
        with pytest.raises(ConfigError, match=f"prior.backbone: {backbone} needs a spatial latent"):
            train_prior(seed, tmp_path / "p", overrides=[*SMALL_PRIOR, f"prior.backbone={backbone}"], progress=False)
    with pytest.raises(ConfigError, match=r"prior.patch_size: 3 does not divide this model's latent grid \(4, 4\)"):
        train_prior(kl_run, tmp_path / "p", overrides=[*SMALL_PRIOR, "prior.backbone=transformer",
                                                      "prior.patch_size=3"], progress=False)
    assert not (tmp_path / "p").exists()
    summary = train_prior(seed, tmp_path / "mlp", overrides=SMALL_PRIOR, progress=False)  # a flat latent: the MLP
    assert summary["steps"] == 4
    with pytest.raises(CheckpointError):
        train_prior(seed, tmp_path / "none", resume=True, progress=False)  # nothing to resume


def test_a_prior_run_from_before_the_transformer_loads_and_resumes_as_its_unet(kl_run, tmp_path):
    """Runs before the transformer backbone saved prior.backbone=auto for the UNet, no `backbone` or
    `kind`, a prior section of every kind's keys and their recipe as a `train` section."""
    out = tmp_path / "old"
    train_prior(kl_run, out, overrides=[*SMALL_PRIOR, "prior.backbone=unet"], progress=False)
    values = yaml.safe_load((out / "config.yaml").read_text())
    section = values.pop("prior")
    del values["kind"]
    values["train"] = {k: v for k, v in section.items() if k not in ("kind", "after_training", "width", "depth",
                                                                      "view_epochs", "steps", "backbone",
                                                                      "patch_size", "time_sampling", "solver")}
    values["prior"] = {"after_training": False, "kind": "gmm", "images": 10000, "components": 1, "backbone": "auto",
                       "width": 16, "depth": 1, "time_sampling": "logit-normal", "view_epochs": 1, "epochs": 2,
                       "batch_size": 16, "lr": 0.001, "ema": 0.999, "steps": 4, "solver": "heun"}
    (out / "config.yaml").write_text(yaml.safe_dump(values))
    loaded = runs.load(open_model(kl_run)[0], KINDS["flow"], "cpu", prior_run=out)
    assert loaded.network.backbone == "unet" and loaded.section.width == 16 and loaded.section.precision == "fp32"
    summary = train_prior(kl_run, out, resume=True, overrides=["prior.epochs=3"], progress=False)
    assert summary["steps"] == 6


def test_a_priors_train_keys_are_read_as_its_own_with_a_notice(kl_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["train-prior", str(kl_run), "-o", str(out), "--no-progress", *SMALL_PRIOR, "prior.epochs=1",
                 "train.time_limit=5", "train.lr=2e-3"]) == 0
    err = capsys.readouterr().err
    assert "a prior's training keys are prior.*: read train.time_limit, train.lr as prior.time_limit, prior.lr" in err
    section = yaml.safe_load((out / "config.yaml").read_text())["prior"]
    assert (section["time_limit"], section["lr"], section["kind"]) == (5.0, 2e-3, "flow")
    assert main(["train-prior", str(kl_run), "-o", str(tmp_path / "q"), "train.channels_last=true"]) == 2
    assert "train.channels_last is not a key of a prior's training" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_a_priors_time_limit_is_named_as_its_own_key_with_the_command_that_continues(kl_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["train-prior", str(kl_run), "-o", str(out), "--no-progress", *SMALL_PRIOR, "prior.epochs=50",
                 "prior.time_limit=1e-6"]) == 0
    said = "".join(capsys.readouterr())
    assert "imgvae: prior.time_limit of 1e-06 min reached at step " in said
    assert f"continue with imgvae train-prior {kl_run} --resume -o {out}" in said


@pytest.mark.parametrize("align", [0.0, 0.5], ids=["plain", "REPA"])
def test_a_prior_on_a_diffusers_folders_latents_end_to_end(tmp_path, align):
    folder = tmp_path / "tiny-vae"
    write_folder(folder)
    write_jpegs(tmp_path / "photos", 16, seed=3)
    assert main(["train-prior", str(folder), "--data", str(tmp_path / "photos"), "-o", str(tmp_path / "prior"),
                 "--no-progress", *SMALL_PRIOR, "data.image_size=32", f"prior.align={align}"]) == 0
    # REPA's features come from the images, so any autoencoder's latents can carry them.
    manifest = json.loads((tmp_path / "prior" / "latents" / "manifest.json").read_text())
    assert (manifest.get("align_features") is not None) == (align > 0)
    assert main(["sample", str(folder), "--prior", "flow", "--prior-run", str(tmp_path / "prior"), "-n", "4",
                 "-o", str(tmp_path / "s"), "data.image_size=32"]) == 0
    assert len(list((tmp_path / "s" / "samples").glob("sample_*.png"))) == 4


def test_precision_recall_and_memorisation_on_constructed_sets():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(200, 16, generator=generator)
    assert memorised_share(train, train.clone()) == 1.0  # copies of the training set
    assert precision_recall(train, train.clone()) == (1.0, 1.0)
    far = torch.randn(200, 16, generator=generator) + 100.0
    assert precision_recall(train, far) == (0.0, 0.0) and memorised_share(train, far) == 0.0  # disjoint
    fresh = torch.randn(200, 16, generator=generator)  # the same distribution, other points
    precision, recall = precision_recall(train, fresh)
    assert precision > 0.6 and recall > 0.6 and memorised_share(train, fresh) < 0.7
    collapsed = train[:5].repeat(40, 1) + 1e-3 * torch.randn(200, 16, generator=generator)  # 5 modes
    precision, recall = precision_recall(train, collapsed)
    assert precision == 1.0 and recall < 0.2
