"""`imgvae compare`: two tiny trained runs and a tiny random diffusers folder, end to end."""

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

import imgvae.evaluation.evaluate as evaluate_module
from imgvae.commands.cli import main
from imgvae.evaluation.compare_page import compare_rows

from conftest import train_tiny_run, write_jpegs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    seed = train_tiny_run(root / "seed", "train.epochs=1")
    kl = train_tiny_run(root / "kl", "train.epochs=1", "model.name=autoencoder-kl", "model.block_out_channels=[8,16]",
                        "model.norm_num_groups=4", "loss.sigma=scalar", "train.optimizer=adam")
    torch.manual_seed(0)
    DiffusersAutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, sample_size=32,
                           down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "sd-tiny")
    write_jpegs(root / "photos", 10, seed=7)
    return root, seed, kl


def test_three_models_on_the_same_pixels_one_page(models, tmp_path, monkeypatch, capsys):
    root, seed, kl = models
    fed = []
    real_normalize = evaluate_module.normalize
    monkeypatch.setattr(evaluate_module, "normalize",
                        lambda images: fed.append(images.clone()) or real_normalize(images))
    out = tmp_path / "cmp"
    assert main(["compare", f"seed={seed}", f"kl={kl}", f"sd={root / 'sd-tiny'}", "--data", str(root / "photos"),
                 "-o", str(out), "--iw-samples", "2", "--pictures", "4", "--no-progress"]) == 0
    data = json.loads((out / "compare.json").read_text())
    names = [m["name"] for m in data["models"]]
    assert names == ["seed", "kl", "sd"] and data["images"] == 10 and data["image_size"] == 32
    # Identical pixels: every model was fed the same uint8 batches, in the same order.
    per_model = len(fed) // 3
    assert len(fed) == 3 * per_model and all(torch.equal(a, b) for a, b in zip(fed[:per_model], fed[per_model:]))
    assert all(torch.equal(a, b) for a, b in zip(fed[:per_model], fed[2 * per_model:]))
    keys = data["models"][0]["per_image"]["keys"]
    for m in data["models"]:
        assert m["per_image"]["keys"] == keys and len(m["per_image"]["psnr"]) == len(m["per_image"]["ssim"]) == 10
        assert m["metrics"]["reconstruction"]["psnr"]["mean"] == pytest.approx(
            sum(m["per_image"]["psnr"]) / 10, rel=1e-6)
    sd = data["models"][2]
    assert sd["kind"] == "diffusers" and not sd["has_likelihood"] and data["models"][0]["latent_numbers"] == 16
    page = (out / "compare.html").read_text()
    for section in ("models", "metrics", "rate-distortion", "reconstructions", "worst", "samples"):
        assert f'<section id="{section}">' in page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all((out / ref).is_file() for ref in refs) and "http" not in page
    # The best value of each row is the one marked.
    psnr = [m["metrics"]["reconstruction"]["psnr"]["mean"] for m in data["models"]]
    row = re.search(r"<tr><th>PSNR dB</th>(.*?)</tr>", page).group(1)
    cells = re.findall(r'<td class="(best)?">', row)
    assert [c == "best" for c in cells] == [v == max(psnr) for v in psnr]
    rows = {label: (values, best) for label, values, best in compare_rows(data["models"])}
    assert rows["-ELBO bits/dim"][0][2] is None and rows["parameters"][1] == set()
    fastest = max(range(3), key=lambda i: data["models"][i]["img_per_s"])
    assert rows["encode + decode img/s (this machine)"][1] == {fastest}
    assert "imgvae: wrote" in capsys.readouterr().out


def test_any_resolution_and_the_page_says_so(models, tmp_path):
    root, _, kl = models
    out = tmp_path / "cmp64"
    assert main(["compare", f"kl={kl}", f"sd={root / 'sd-tiny'}", "--data", str(root / "photos"), "--image-size", "64",
                 "-o", str(out), "--iw-samples", "1", "--no-progress"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["image_size"] == 64 and [m["native_size"] for m in data["models"]] == [32, 32]
    assert "Evaluated at 64 px although made for another size: kl, sd." in (out / "compare.html").read_text()


def test_a_model_that_cannot_take_the_size_is_refused_before_any_work(models, tmp_path, capsys):
    root, seed, kl = models
    out = tmp_path / "cmp"
    assert main(["compare", f"kl={kl}", f"seed={seed}", "--data", "/no/such/photos", "--image-size", "64",
                 "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"imgvae: error: seed ({seed}): data.image_size: this model takes 32 px images\n"
    assert not out.exists()
    assert main(["compare", str(seed), "--data", str(root / "photos"), "-o", str(out)]) == 2
    assert "imgvae compare needs at least two models" in capsys.readouterr().err


def test_several_views_per_image_are_told_apart(models, tmp_path):
    root, seed, kl = models
    out = tmp_path / "views"
    assert main(["compare", f"seed={seed}", f"kl={kl}", "--data", str(root / "photos"), "data.crop=random",
                 "data.eval_views_per_image=3", "-o", str(out), "--iw-samples", "1", "--pictures", "4",
                 "--no-progress"]) == 0
    data = json.loads((out / "compare.json").read_text())
    keys = data["models"][0]["per_image"]["keys"]
    assert data["images"] == 30 and len(set(keys)) == 30 and keys[1].endswith("(view 2/3)")
    # Each chosen view is pictured as itself: distinct crops, not one view of a file repeated.
    chosen = data["pictures"]["chosen"]
    assert len(set(chosen)) == 4 and all(key in keys for key in chosen)
