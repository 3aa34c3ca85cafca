"""Discrete latents (vq-f4 / vq-f8 with VQ, FSQ and LFQ from vector-quantize-pytorch): shapes and
straight-through gradients, codebook health counted over a whole set, dead codes restarted,
resume with an EMA codebook, the VQGAN recipe on a short run, and the refusals."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.config import ConfigError, LossConfig, load_config, model_config
from imgvae.data.sources import read_keys
from imgvae.evaluation.evaluate import codebook_health
from imgvae.evaluation.report import format_table
from imgvae.evaluation.results import Metrics
from imgvae.models.base import Quantized
from imgvae.models.losses import vae_loss
from imgvae.models.quantized import code_usage, grid_entropy
from imgvae.models.registry import build_model
from imgvae.train.engine import train
from imgvae.train.records import epoch_line

from conftest import tiny_config, train_tiny_run, write_jpegs

SMALL = {"vq": {"codebook_size": 64}, "fsq": {"fsq_levels": [4, 4, 4], "latent_channels": 3},
         "lfq": {"codebook_size": 64, "latent_channels": 6}}
VQ_RUN = ["model.name=vq-f4", "model.base_channels=8", "model.codebook_size=32", "model.latent_channels=4",
          "train.optimizer=adam", "train.lr=1e-3", "prior.after_training=false"]


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq"])
@pytest.mark.parametrize("name, side", [("vq-f4", 8), ("vq-f8", 4)])
def test_shapes_and_straight_through_gradients(quantizer, name, side):
    torch.manual_seed(0)
    keys = {"base_channels": 8, "latent_channels": 4, "quantizer": quantizer} | SMALL[quantizer]
    model = build_model(model_config(name, **keys), 32, "scalar")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    posterior = out.posterior
    assert isinstance(posterior, Quantized) and out.x_hat.shape == (2, 3, 32, 32)
    assert posterior.indices.shape == (2, side, side)
    assert posterior.mean.shape == (2, keys["latent_channels"], side, side)
    assert 0 <= int(posterior.indices.min()) and int(posterior.indices.max()) < model.codebook_size
    # The rate: log2(codebook size) bits per token, as the KL of a one-hot posterior under a uniform prior.
    assert float(posterior.kl().sum((1, 2, 3))[0]) == pytest.approx(side * side * math.log(model.codebook_size))
    loss, stats = vae_loss(x, out, LossConfig())
    assert float(loss) == pytest.approx(float(stats["recon"] + stats["quantizer"]))  # the rate is a constant
    loss.backward()
    # Gradients reach the encoder through the quantiser (straight-through / rotation trick).
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert ("commitment" in stats) == (quantizer in ("vq", "lfq")) and ("entropy" in stats) == (quantizer == "lfq")


def test_usage_is_counted_over_a_whole_set_on_constructed_indices():
    counts = torch.bincount(torch.tensor([0, 0, 1, 3]), minlength=8)
    health = code_usage(counts)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert health == {"size": 8, "used": 3, "dead": 5, "usage": 3 / 8, "perplexity": pytest.approx(math.exp(entropy))}
    # Two batches that each use 2 codes use 4 together: usage is over the set, not a batch.
    both = torch.bincount(torch.tensor([0, 1]), minlength=8) + torch.bincount(torch.tensor([2, 3]), minlength=8)
    book = codebook_health(both, tokens=64)
    assert book.used == 4 and book.usage == 0.5 and book.bits_per_image == 64 * 3 and book.set_tokens == 4


def test_a_dead_code_is_restarted_from_the_batch_and_used_again():
    torch.manual_seed(0)
    model = build_model(model_config("vq-f4", base_channels=8, codebook_size=16, latent_channels=4), 16).train()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    model.encode(x)  # k-means initialisation from the first batch
    book = model.quantizer._codebook
    with torch.no_grad():  # code 3: far from every input, and (by its EMA count) unused for long
        book.embed[0, 3] = torch.tensor([0.0, 0.0, 0.0, -1.0])
        book.cluster_size[0, 3] = 0.0
    dead = book.embed[0, 3].clone()
    used = [int((model.encode(x).indices == 3).sum()) for _ in range(3)]
    assert not torch.equal(book.embed[0, 3], dead) and used[-1] > 0, used


DIVERSITY_MODELS = {  # 64 codes each; no k-means, restarts or commitment: only model.diversity moves the encoder
    "vq": dict(codebook_size=64, latent_channels=4, commitment=0.0, dead_code_threshold=0.0, kmeans_init=False),
    "fsq": dict(quantizer="fsq", fsq_levels=[4, 4, 4], latent_channels=3),
}


@pytest.mark.parametrize("diversity", [0.0, 1.0])
@pytest.mark.parametrize("quantizer, start", [("vq", 56), ("fsq", 16)])
def test_the_diversity_loss_spreads_the_encoder_over_every_code(quantizer, start, diversity):
    """VQ's codebook (vector-quantize-pytorch's loss) and FSQ's grid (imgvae's grid_entropy)."""
    torch.manual_seed(0)
    keys = dict(base_channels=8, diversity=diversity) | DIVERSITY_MODELS[quantizer]
    model = build_model(model_config("vq-f4", **keys), 16).train()
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(model.encoder.parameters(), 1e-2)
    used = []
    for _ in range(60):
        q = model.encode(x)
        used.append(int(q.indices.unique().numel()))
        if diversity:
            opt.zero_grad()
            q.aux_loss.backward()
            opt.step()
    assert ("diversity" in q.stats) == (diversity > 0) and used[0] < start, used
    if diversity:  # the weighted loss is minus an entropy, reported unweighted
        minus_entropy = float(q.stats["diversity"])
        assert minus_entropy < 0 and float(q.aux_loss.detach()) == pytest.approx(minus_entropy)
        # From ~80 % (vq) or a sixth (fsq) of the 64 codes to over 90 % (vq: 60 on torch 2.11, 63 on 2.14).
        assert sum(used[-10:]) / 10 > 0.9 * 64, used
    else:  # the EMA codebook alone moves a code or two; FSQ's grid none
        assert used[-1] < start, used


@pytest.mark.parametrize("preset, overrides, message", [
    ("vq-f4", ["model.quantizer=lfq"],  # the preset's own diversity 0.1
     r"model.diversity weighs a codebook's or a grid's entropy: quantizer 'vq' or 'fsq', not 'lfq' \(it has its own "
     r"entropy loss\): set model.diversity=0"),
    ("vq-f8", ["model.diversity=-1"], r"model.diversity must be >= 0, got -1.0"),
    ("vq-f8", ["model.diversity=nan"], r"model.diversity: expected a finite number, got nan"),
])
def test_a_diversity_weight_that_cannot_apply_is_refused(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, overrides)


def test_the_epoch_line_of_a_discrete_latent_adds_up():
    record = {"epoch": 3, "train/loss": -90.0, "train/recon": -100.0, "train/kl": 1774.46, "train/quantizer": 10.0,
              "skipped_steps": 0, "img_per_s": 30.0}
    assert epoch_line(record) == "epoch 3: train loss -90.00 (recon -100.00, rate 1774.46, quantiser 10.00), 30.0 img/s"


def test_the_fsq_grid_entropy_is_the_entropy_of_its_own_codes_when_sharp():
    """model.diversity on FSQ soft-assigns each channel to its levels by FSQ's own bound: at a low
    temperature the batch's entropy over the grid is that of the codes FSQ itself picks."""
    torch.manual_seed(0)
    model = build_model(model_config("vq-f8", base_channels=8, quantizer="fsq", fsq_levels=[8, 5, 3],
                                     latent_channels=3, diversity=0.1), 16)
    h = torch.randn(32, 3, 4, 4) * 1.5
    counts = torch.bincount(model.quantizer(h)[1].flatten(), minlength=120)
    assert grid_entropy(model.quantizer, h, temperature=1e-4) == pytest.approx(
        math.log(code_usage(counts)["perplexity"]), abs=1e-4)
    assert grid_entropy(model.quantizer, torch.zeros(8, 3, 4, 4)) < 1.0  # one code: near 0


@pytest.mark.parametrize("levels", ["[2,4,4]", "[1,4,4]", "[]", "[1024,1024,2]", "[65536,65536]"])
def test_fsq_levels_the_quantiser_cannot_take_are_refused(levels):
    """vector-quantize-pytorch's FSQ asserts on a channel of 2 levels, and builds a table of every
    code (32 GiB for 65,536^2): refused before, in one line."""
    with pytest.raises(ConfigError, match=r"model.fsq_levels: 1 to 16 channels of at least 3 levels each \(2 levels "
                                          r"a channel: quantizer 'lfq'\), at most 1,048,576 codes in all, got \["):
        load_config("fsq-f8", [f"model.fsq_levels={levels}", "model.latent_channels=3"])


def test_resume_with_an_ema_codebook_equals_a_straight_run(tmp_path):
    write_jpegs(tmp_path / "photos", 16, seed=1)
    photos = [tmp_path / "photos"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(photos, photos, *VQ_RUN, "train.epochs=4", "train.ckpt_every=0"), straight, progress=False)
    train(tiny_config(photos, photos, *VQ_RUN, "train.epochs=2", "train.ckpt_every=0"), resumed, progress=False)
    assert main(["train", "--resume", str(resumed), "--no-progress", "train.epochs=4"]) == 0
    a, b = (load_file(str(r / "checkpoints" / "last" / "model.safetensors")) for r in (straight, resumed))
    assert any("_codebook.embed" in k for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_vqgan_recipe_trains_stably_when_the_discriminator_starts(tmp_path, recwarn):
    """The vqgan preset, small: the PatchGAN starts at step 4 of 12; no divergence, no collapse,
    and every view has the codebook: history, metrics.json, the printed table."""
    run = train_tiny_run(tmp_path, "--config", "vqgan", *VQ_RUN, "loss.adversarial_start=4", "train.epochs=6",
                         "eval.after_training=true", "eval.iw_samples=2", "model.usage_warning=0.25", n_train=24)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert len(history) == 6 and all(math.isfinite(s["loss"]) for s in steps)
    assert "generator" not in steps[2] and all("generator" in s and "gan_weight" in s for s in steps[4:]), steps[-1]
    assert history[-1]["train/recon"] < history[0]["train/recon"]
    assert all(h["eval/codebook_usage"] >= 0.25 for h in history[1:]), [h["eval/codebook_usage"] for h in history]
    metrics = json.loads((run / "metrics.json").read_text())
    book = metrics["codebook"]
    assert book["size"] == 32 and book["used"] + book["dead"] == 32 and book["bits_per_image"] == 64 * 5
    assert book["set_tokens"] == 64 * metrics["images"]  # every held-out image's 8 x 8 tokens, counted
    table = format_table(Metrics.from_dict(metrics))
    assert f"over the whole set ({book['set_tokens'] / 32:.0f} tokens per code" in table
    assert not [w for w in recwarn.list if "codebook collapse" in str(w.message)]


@pytest.mark.parametrize("extra, codes, keys", [
    ([], 32, "model.cosine=true, a lower model.codebook_dim, model.dead_code_threshold > 0, model.diversity > 0"),
    (["model.quantizer=fsq", "model.latent_channels=3", "model.fsq_levels=[4,4,4]"], 64, "model.diversity > 0"),
])
def test_collapse_is_warned_each_epoch_with_the_keys_that_help(tmp_path, extra, codes, keys):
    with pytest.warns(UserWarning, match=rf"epoch 1: the held-out images use .*% of the {codes} codes, below "
                                         rf"model.usage_warning=1 \(codebook collapse: try {keys}"):
        train_tiny_run(tmp_path, *VQ_RUN, "train.epochs=1", "model.usage_warning=1", *extra)


@pytest.mark.parametrize("args, message", [
    (["fit-prior", "{run}"], "fit-prior: the fitted prior (gmm) cannot model a discrete latent"),
    (["train-prior", "{run}", "-o", "{tmp}/prior", "prior.kind=flow"],
     "train-prior: the flow prior (flow) cannot model a discrete latent"),
])
def test_continuous_only_verbs_refuse_a_discrete_latent_in_one_line(tmp_path, args, message, capsys):
    run = train_tiny_run(tmp_path, *VQ_RUN, "train.epochs=1")
    capsys.readouterr()
    assert main([a.format(run=run, tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert main(["train", "-o", str(tmp_path / "r2"), "model.name=vq-f4", "prior.after_training=true"]) == 2
    assert "prior.after_training: the fitted prior (gmm) cannot model a discrete latent" in capsys.readouterr().err


def test_encode_writes_tokens_in_the_smallest_type_equal_to_a_direct_computation(tmp_path, capsys):
    from imgvae.data.datasets import build_dataset
    from imgvae.data.decode import normalize
    from imgvae.io.latents import token_dtype
    from imgvae.io.paths import load_model

    assert [token_dtype(k) for k in (2, 256, 257, 65536, 65537)] == [np.uint8, np.uint8, np.uint16, np.uint16,
                                                                      np.uint32]
    run = train_tiny_run(tmp_path, *VQ_RUN, "train.epochs=1")
    out = tmp_path / "tokens"
    assert main(["encode", str(run), "-o", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint8 and tokens.shape == (16, 8, 8)
    assert manifest["tokens"] == {"shape": [8, 8], "codebook_size": 32, "dtype": "uint8"}
    model, cfg = load_model(run)
    views = build_dataset(cfg.data.train, cfg.data, train=False, seed=0)
    keys = read_keys(out)
    x = normalize(torch.stack([views.load(i) for i in range(len(views))]))
    with torch.no_grad():
        direct = model.encode(x).indices.numpy()
    assert keys == [views.key(i) for i in range(len(views))]
    np.testing.assert_array_equal(tokens, direct)


@pytest.mark.parametrize("cosine", [True, False])
def test_a_vq_model_exports_to_a_diffusers_vq_model_with_the_same_codes_and_reconstructions(tmp_path, capsys, cosine):
    """A cosine codebook too (the presets'): its codes as unit vectors make VQModel's Euclidean lookup
    pick the codes the cosine one picks."""
    from diffusers import VQModel

    from imgvae.data.decode import normalize
    from imgvae.io.paths import load_model

    run = train_tiny_run(tmp_path, *VQ_RUN, f"model.cosine={str(cosine).lower()}", "train.epochs=1",
                         "loss.sigma=pixel")
    assert main(["export", str(run), "-o", str(tmp_path / "export"), "--no-progress"]) == 0
    net = VQModel.from_pretrained(tmp_path / "export", local_files_only=True, low_cpu_mem_usage=False).eval()
    model, _ = load_model(run)
    x = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        ours = model(x, sample=False)
        latents = net.encode(x).latents
        _, _, (_, _, codes) = net.quantize(latents)
        theirs = net.decode(latents).sample
    assert torch.equal(codes.view(ours.posterior.indices.shape), ours.posterior.indices.long())
    assert ours.posterior.indices.unique().numel() > 1  # not one code for everything
    torch.testing.assert_close(theirs, ours.x_hat, rtol=1e-4, atol=1e-5)
    assert "VQModel.from_pretrained" in (tmp_path / "export" / "README.md").read_text()


def test_fsq_refuses_diffusers_naming_the_nearest_preset_that_exports(tmp_path, capsys):
    fsq = train_tiny_run(tmp_path / "fsq", *VQ_RUN, "model.quantizer=fsq", "model.latent_channels=3",
                         "model.fsq_levels=[4,4,4]", "train.epochs=1")
    capsys.readouterr()
    assert main(["export", str(fsq), "-o", str(tmp_path / "fsq-export"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "its quantiser is 'fsq', which has no codebook lookup" in err and err.count("\n") == 1
    assert "the nearest that exports: vq-f8 (model.quantizer=vq, a codebook lookup); or --format safetensors" in err
    assert main(["export", str(fsq), "-o", str(tmp_path / "fsq-export"), "--no-progress"]) == 0  # safetensors
