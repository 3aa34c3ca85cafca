"""The generator leaves imgvae: an autoencoder with its flow prior exported as a diffusers pipeline
that draws what `imgvae sample` draws for the same seed, loads where imgvae is not installed, and
carries a conditional prior's labels and guidance; every code block of every model card runs
against the folder it describes; what cannot go is refused in one line."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from imgvae.commands.cli import main
from imgvae.config import load_config
from imgvae.export.card import code_blocks
from imgvae.export.folder import ExportNotice, write_folder
from imgvae.export.pipeline import ImgvaeFlowPipeline
from imgvae.export.prior import time_map
from imgvae.io.paths import open_model
from imgvae.models.registry import build_vae
from imgvae.priors import SampleOptions, sampler
from imgvae.priors.learned import train_prior

from conftest import train_tiny_run, write_jpegs

KL = ["model.name=kl-f8", "model.base_channels=8", "train.optimizer=adam", "train.epochs=1"]
PRIOR = ["prior.width=16", "prior.depth=1", "prior.epochs=2", "prior.batch_size=8", "prior.steps=4",
         "prior.precision=fp32", "data.labels=folders"]
WITHOUT_IMGVAE = "import sys\nsys.modules['imgvae'] = None  # an import of imgvae fails from here on\n"


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A kl-f8 run with a conditional flow prior (labels red, blue), exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    for name, seed in (("red", 1), ("blue", 2)):
        write_jpegs(root / "photos" / name, 8, seed=seed)
    run = train_tiny_run(root, *KL)
    train_prior(run, sources=[str(root / "photos")], overrides=PRIOR, progress=False)
    assert main(["export", str(run), "-o", str(root / "pipeline"), "--no-progress"]) == 0
    return run, root / "pipeline"


def run_blocks(blocks: list[str], imgvae: bool = False) -> None:
    """Each block in a fresh namespace of one new process (imgvae blocked unless asked)."""
    script = "" if imgvae else WITHOUT_IMGVAE
    script += "".join(f"exec(compile({block!r}, 'block{i}', 'exec'), {{}})\n" for i, block in enumerate(blocks))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("labels, guidance, solver", [
    (None, None, None), (["red", "blue"], 1.0, None), (["red", "blue"], 2.5, None), ([("red", "blue")], 4.0, "euler"),
    (["blue"], 0.0, None),
])
def test_the_pipeline_draws_what_imgvae_samples_for_the_same_seed(generator, labels, guidance, solver):
    run, folder = generator
    pipe = ImgvaeFlowPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.labels == {"blue": 0, "red": 1} and type(pipe) is ImgvaeFlowPipeline
    asked = None if labels is None else tuple((c,) if isinstance(c, str) else c for c in labels)
    options = SampleOptions(guidance=guidance, solver=solver, labels=asked,
                            label_distribution="none" if labels is None else "train")
    model, _, _ = open_model(run, torch.device("cpu"))
    ours = sampler(model, "flow", options)(4, 7, asked)
    theirs = pipe(num_images=4, class_labels=labels, guidance_scale=guidance, solver=solver, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    assert ours.std() > 0.01  # images, not a constant


def test_the_pipeline_loads_and_its_card_runs_without_imgvae(generator):
    _, folder = generator
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ImgvaeFlowPipeline"] and index["id2label"] == {"0": "blue", "1": "red"}
    assert {p.name for p in folder.iterdir()} == {"README.md", "model_index.json", "pipeline.py", "scheduler", "unet",
                                                  "vae"}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "class-conditional" in card
    assert "Labels: blue, red" in card and "## The prior" in card and "  kind: flow" in card
    blocks = code_blocks(card, folder)
    assert len(blocks) == 1 and "trust_remote_code=True" in blocks[0]
    run_blocks([blocks[0] + "\nassert len(images) == 4 and images[0].size == (32, 32)"])


def test_exported_files_are_readable_as_the_umask_says(generator):
    _, folder = generator
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert modes["unet/diffusion_pytorch_model.safetensors"] == 0o666 & ~mask  # safetensors alone writes 0600
    assert set(modes.values()) == {0o666 & ~mask}


def test_the_pipeline_refuses_a_label_it_does_not_know(generator):
    pipe = ImgvaeFlowPipeline.from_pretrained(generator[1])
    with pytest.raises(ValueError, match="'green' is not a label of this pipeline: its labels are"):
        pipe(num_images=1, class_labels=["green"])


@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 0), (True, 1), (False, 1)])
def test_the_time_map_takes_diffusers_time_features_to_imgvaes(flip, shift):
    """features(1000 - s) = M features(s): the exported UNet's first time layer sees, for diffusers'
    1000 sigma, what imgvae's sees for 1000 t = 1000 (1 - sigma)."""
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=(32,), flip_sin_to_cos=flip, freq_shift=shift))
    m = time_map(unet)
    s = torch.tensor([0.0, 1.0, 137.5, 500.0, 999.0, 1000.0], dtype=torch.float64)

    def features(steps):
        return get_timestep_embedding(steps, 32, flip_sin_to_cos=flip, downscale_freq_shift=shift).double()

    torch.testing.assert_close(features(1000 - s), features(s) @ m.T, rtol=0, atol=1e-4)
    assert math.isclose(torch.linalg.det(m).abs().item(), 1, rel_tol=1e-9)  # a rotation per frequency


def scale_of(shift):
    return {"choice": "keep" if shift is None else "recompute", "scaling_factor": 0.5, "shift_factor": shift,
            "own": {"scaling_factor": 0.5, "shift_factor": None} if shift is None else None,
            "measured": {"scaling_factor": 0.5, "shift_factor": 0.1}}


STATS = {"scaling_factor": 0.5, "shift_factor": 0.1, "channel_mean": [0.0] * 4, "channel_std": [1.0] * 4}


@pytest.mark.parametrize("preset, overrides, fmt, shift, kind", [
    ("kl-f8", ["model.base_channels=8"], "diffusers", 0.1, "AutoencoderKL"),
    ("kl-f8", ["model.base_channels=8"], "diffusers", None, "AutoencoderKL"),  # a kept scale, no shift: an SD VAE's
    ("vq-f4", ["model.base_channels=8", "model.cosine=false"], "diffusers", None, "VQModel"),
    ("seed", ["model.latent_dim=16"], "safetensors", 0.1, "imgvae"),
])
def test_every_code_block_of_an_autoencoders_card_runs(tmp_path, preset, overrides, fmt, shift, kind):
    cfg = load_config(preset, ["data.image_size=32", *overrides])
    model = build_vae(cfg).eval()
    write_folder(model, cfg, tmp_path / "run", tmp_path / "out", fmt, STATS, 2, scale_of(shift), None)
    card = (tmp_path / "out" / "README.md").read_text()
    blocks = code_blocks(card, tmp_path / "out")
    assert card.startswith("---\nlibrary_name: ") and len(blocks) == 1
    assert f"from diffusers import {kind}" in blocks[0] if kind != "imgvae" else "from imgvae" in blocks[0]
    run_blocks(blocks, imgvae=kind == "imgvae")


@pytest.fixture(scope="module")
def transformer_prior(generator, tmp_path_factory):
    run, _ = generator
    folder = tmp_path_factory.mktemp("transformer") / "prior"
    train_prior(run, folder, overrides=[*PRIOR[:-1], "prior.backbone=transformer", "prior.width=32",
                                        "prior.patch_size=2", "prior.epochs=1"], progress=False)
    return folder


@pytest.mark.parametrize("args, message", [
    (["--prior", "tokens"], "--prior tokens: the token prior (tokens) cannot model a continuous latent"),
    (["--prior", "flow", "--prior-run", "{tmp}/nothing"], "has no flow prior in {tmp}/nothing"),
    (["--prior", "flow", "--format", "safetensors"], "--prior flow writes a diffusers pipeline: it needs --format "
                                                     "diffusers"),
    (["--prior", "flow", "--prior-run", "{transformer}"], "a flow prior's transformer backbone maps onto no "
                                                          "diffusers model class"),
])
def test_what_cannot_be_exported_is_refused_in_one_line(generator, transformer_prior, tmp_path, capsys, args,
                                                        message):
    run, _ = generator
    fill = {"tmp": tmp_path, "transformer": transformer_prior}
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(tmp_path / "out"), *[a.format(**fill) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**fill) in err, err
    assert not (tmp_path / "out").exists()


def test_auto_exports_the_autoencoder_alone_and_says_why_when_the_prior_cannot_go(generator, transformer_prior,
                                                                                  tmp_path, capsys):
    run, _ = generator
    with pytest.warns(ExportNotice, match="export: a flow prior's transformer backbone maps onto no diffusers model "
                                          "class; .*; the autoencoder alone is written"):
        assert main(["export", str(run), "-o", str(tmp_path / "out"), "--prior-run", str(transformer_prior),
                     "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 2  # not into a folder that holds files
    assert "exists and is not an empty folder" in capsys.readouterr().err
