"""The token prior of discrete latents (MaskGIT over the code grid): its objective learns a known
distribution of grids, it trains through the engine (kill-and-resume to the same weights), samples
deterministically and decodes its codes, is scored like every prior, and is refused on a
continuous latent (as the continuous priors are on a discrete one). And the codebook under two
gloo processes: equal on both ranks after every step, no hang."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.config import ConfigError, TokenConfig, model_config
from imgvae.io.paths import load_model
from imgvae.models.generate import decode_codes
from imgvae.models.registry import build_model
from imgvae.priors.learned import train_prior
from imgvae.priors.standard import sample
from imgvae.priors.tokens import TokenPrior, masked_share, token_loss
from test_engine import CrashAfter
from test_quantized import SMALL, VQ_RUN

from conftest import train_tiny_run, write_jpegs

SMALL_PRIOR = ["prior.width=16", "prior.depth=1", "prior.epochs=2", "prior.batch_size=16", "prior.steps=4",
               "prior.precision=fp32", "prior.ckpt_every_steps=1"]


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("tokens"), *VQ_RUN, "train.epochs=1")


@pytest.mark.parametrize("quantizer, extra", [("vq", {}), ("vq", {"codebook_dim": 2}), ("fsq", {}), ("lfq", {})])
def test_codes_of_indices_are_the_latent_encode_gives(quantizer, extra):
    """Also with codes looked up in a lower dimension (codebook_dim), projected back to the latent's."""
    torch.manual_seed(0)
    keys = {"base_channels": 8, "latent_channels": 4, "quantizer": quantizer} | SMALL[quantizer] | extra
    model = build_model(model_config("vq-f4", **keys), 32, "scalar").eval()
    with torch.no_grad():
        posterior = model.encode(torch.rand(3, 3, 32, 32) * 2 - 1)
        torch.testing.assert_close(model.codes(posterior.indices), posterior.mean)


def test_the_masked_token_objective_learns_a_known_distribution_of_grids():
    """Two 2 x 3 patterns over 5 codes, 3 : 1: samples are those patterns, near that proportion
    (MaskGIT fixes the most confident codes first, which favours the likelier pattern a little)."""
    torch.manual_seed(0)
    patterns = torch.tensor([[[0, 1, 2], [3, 4, 0]], [[4, 4, 3], [2, 1, 1]]])
    data = patterns[(torch.rand(2048) < 0.25).long()]
    prior = TokenPrior(TokenConfig(width=32, depth=2), (2, 3), 5)
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(600):
        batch = data[torch.randint(0, len(data), (64,), generator=generator)]
        loss = token_loss(prior, batch, torch.rand(64, generator=generator), torch.rand(64, 6, generator=generator))
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes = prior.eval().sample(400, 6, torch.Generator().manual_seed(2), "cpu")
    first, second = ((codes == p).flatten(1).all(1) for p in patterns)
    assert (first | second).double().mean() > 0.95  # whole patterns, not a mix of their codes
    assert 0.1 < second.double().mean() < 0.35


def test_the_mask_follows_the_cosine_schedule():
    prior = TokenPrior(TokenConfig(width=16, depth=1), (4, 4), 8)
    r = torch.tensor([0.0, 0.5, 1.0])
    masked = prior.mask(torch.zeros(3, 4, 4, dtype=torch.long), r, torch.rand(3, 16))
    assert masked.sum(1).tolist() == [16, int(torch.ceil(masked_share(torch.tensor(0.5)) * 16)), 1]


def test_token_prior_training_resumes_to_the_weights_of_a_straight_run(vq_run, tmp_path):
    train_prior(vq_run, tmp_path / "straight", overrides=SMALL_PRIOR, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_prior(vq_run, tmp_path / "resumed", overrides=SMALL_PRIOR, progress=False,
                    callbacks=[CrashAfter("step_00000003")])
    summary = train_prior(vq_run, tmp_path / "resumed", resume=True, progress=False)
    assert summary["kind"] == "tokens" and summary["steps"] == 4  # 32 views (16 photos, mirrored), 2 an epoch
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / name)) for r in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_token_samples_are_deterministic_decoded_codes_and_scored(vq_run, tmp_path, capsys):
    assert main(["train-prior", str(vq_run), "--no-progress", *SMALL_PRIOR]) == 0
    assert (vq_run / "prior-tokens" / "checkpoints" / "last").exists()
    assert (vq_run / "grids" / "token_prior_samples.png").is_file()
    outs = []
    for i, extra in enumerate([[], [], ["--steps", "2"]]):
        assert main(["sample", str(vq_run), "-n", "5", "-o", str(tmp_path / str(i)), *extra]) == 0
        outs.append((tmp_path / str(i) / "samples.png").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert "5 samples from the token prior" in capsys.readouterr().out
    assert main(["evaluate", str(vq_run), "--no-progress", "-o", str(tmp_path / "m.json"),
                 "eval.generation_images=8"]) == 0
    gen = json.loads((tmp_path / "m.json").read_text())["generation"]
    assert set(gen["priors"]) == {"standard", "tokens"}
    assert 0 <= gen["priors"]["tokens"]["memorised"] <= 1


def test_a_discrete_models_own_prior_is_uniform_codes(vq_run):
    model, _ = load_model(vq_run)
    codes = torch.randint(model.codebook_size, (4, *model.token_shape), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample(model, 4, seed=3), decode_codes(model, codes))


def test_each_prior_is_refused_on_the_other_kind_of_latent(vq_run, tmp_path, capsys):
    kl = train_tiny_run(tmp_path / "kl", "model.name=kl-f8", "model.base_channels=8", "train.epochs=1")
    capsys.readouterr()
    cases = [
        (["train-prior", str(kl), "prior.kind=tokens", "-o", str(tmp_path / "p")],
         "train-prior: the token prior (tokens) cannot model a continuous latent; for this model use gmm or flow"),
        (["train-prior", str(vq_run), "prior.kind=flow", "-o", str(tmp_path / "p")],
         "train-prior: the flow prior (flow) cannot model a discrete latent (a grid of codes); for this model use "
         "tokens"),
        (["sample", str(kl), "--prior", "tokens", "-o", str(tmp_path / "s")],
         "--prior tokens: the token prior (tokens) cannot model a continuous latent"),
        (["sample", str(vq_run), "--prior", "flow", "-o", str(tmp_path / "s")],
         "--prior flow: the flow prior (flow) cannot model a discrete latent"),
        (["train", "-o", str(tmp_path / "t"), "model.name=kl-f8", "prior.after_training=true", "prior.kind=tokens"],
         "prior.after_training: the token prior (tokens) cannot model a continuous latent"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match=r"prior.backbone: 'unet' is not one of \['auto', 'transformer'\]"):
        train_prior(vq_run, tmp_path / "u", overrides=[*SMALL_PRIOR, "prior.backbone=unet"], progress=False)


CODEBOOKS = """
import sys, torch
from imgvae.config import load_config
from imgvae.io.checkpoint import unwrap
from imgvae.runtime import process_rank
from imgvae.train.engine import train
from imgvae.train.task import Callback

class Codebooks(Callback):
    def __init__(self):
        self.books = []
    def on_step_end(self, state):
        self.books.append(unwrap(state.model).quantizer._codebook.embed.detach().clone())

out, photos = sys.argv[1], sys.argv[2]
keep = Codebooks()
cfg = load_config(None, sys.argv[3:] + [f"data.train=[{photos}]", "data.eval=[]"])
train(cfg, out, progress=False, callbacks=[keep])
torch.save(torch.stack(keep.books), f"{out}/codebooks_{process_rank()}.pt")
"""


def test_an_ema_codebook_stays_equal_on_two_gloo_processes(tmp_path):
    write_jpegs(tmp_path / "photos", 16, seed=1)
    script = tmp_path / "codebooks.py"
    script.write_text(CODEBOOKS)
    keys = [*VQ_RUN, "model.dead_code_threshold=4", "data.image_size=32", "data.crop_size=64", "train.epochs=2",
            "train.batch_size=4", "train.precision=fp32", "train.channels_last=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "run"), str(tmp_path / "photos"), *keys]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert result.returncode == 0, result.stderr[-3000:]
    books = [torch.load(tmp_path / "run" / f"codebooks_{rank}.pt") for rank in (0, 1)]
    assert books[0].shape[0] == 4  # 16 photos in global batches of 8, 2 epochs
    assert not torch.equal(books[0][0], books[0][-1])  # the codebook moved
    torch.testing.assert_close(books[0], books[1], rtol=0, atol=1e-6)
