"""evaluate / reconstruct / sample / interpolate / report end to end on a tiny trained run."""

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from imgvae.commands.cli import main
from imgvae.evaluation.report import build_report
from imgvae.metrics.features import FeatureError, InceptionFeatures

from conftest import train_tiny_run, write_jpegs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run whose train call also writes metrics.json and report.html."""
    return train_tiny_run(tmp_path_factory.mktemp("verbs"), "train.final_eval=true", "train.epochs=2")


def test_train_ends_with_metrics_and_report(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["checkpoint"].endswith("epoch_002")
    assert (run / "report.html").is_file() and (run / "steps.jsonl").is_file()


def test_evaluate_cli_writes_metrics_and_prints_table(run, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "-o", str(out), "--iw-samples", "3", "--limit", "4", "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 4 and metrics["likelihood"]["iw_samples"] == 3
    assert set(metrics["reconstruction"]) >= {"mse", "psnr", "ssim", "ms_ssim"}
    assert len(metrics["latent"]["kl_per_dim"]) == 16
    assert {"fd_effnet_recon", "fd_effnet_samples"} <= set(metrics["distribution"])
    printed = capsys.readouterr().out
    for label in ("PSNR", "SSIM", "-ELBO bits/dim", "-IW bound (K=3)", "active units", "fd_effnet_samples"):
        assert label in printed
    # Same seed, same numbers.
    assert main(["evaluate", str(run), "-o", str(tmp_path / "m2.json"), "--iw-samples", "3", "--limit", "4",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "m2.json").read_text()) == metrics
    # Samples scored against the training images instead: 16 samples, the held-out metrics unchanged.
    train_dir = str(run.parent / "train")
    assert main(["evaluate", str(run), "-o", str(tmp_path / "m3.json"), "--iw-samples", "3", "--limit", "4",
                 "--sample-reference", train_dir, "--no-progress"]) == 0
    against_train = json.loads((tmp_path / "m3.json").read_text())
    assert against_train["samples_reference"] == {"sources": [train_dir], "images": 16, "held_out": False}
    assert against_train["reconstruction"] == metrics["reconstruction"]
    assert against_train["distribution"]["fd_effnet_samples"] != metrics["distribution"]["fd_effnet_samples"]
    assert f"16 images from {train_dir}" in capsys.readouterr().out


def test_reconstruct_sample_interpolate(run, tmp_path):
    photos = write_jpegs(tmp_path / "mine", 3, seed=9, sizes=((120, 90),))
    assert main(["reconstruct", str(run), *map(str, photos), "-o", str(tmp_path / "rec"), "--device", "cpu"]) == 0
    pair = Image.open(tmp_path / "rec" / f"{photos[0].stem}_reconstruction.png")
    assert pair.size == (2 * 32 + 3 * 2, 32 + 2 * 2)
    assert Image.open(tmp_path / "rec" / "reconstructions.png").size == (6 * 32 + 7 * 2, 32 + 2 * 2)

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["sample", str(run), "-n", "5", "--temperature", "0.7", "--seed", str(seed),
                     "-o", str(tmp_path / name)]) == 0
    assert len(list((tmp_path / "a" / "samples").glob("sample_*.png"))) == 5
    from torch_fidelity.utils import glob_samples_paths  # the folder reader `fidelity --input1 DIR` uses

    assert len(glob_samples_paths(str(tmp_path / "a" / "samples"), False, "png", verbose=False)) == 5
    read = lambda name: (tmp_path / name / "samples.png").read_bytes()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("c")

    assert main(["interpolate", str(run), str(photos[0]), str(photos[1]), "--steps", "4",
                 "-o", str(tmp_path / "int")]) == 0
    strip = Image.open(tmp_path / "int" / "interpolation.png")
    assert strip.size == (6 * 32 + 7 * 2, 2 * 32 + 3 * 2)  # A, 4 steps, B; linear and spherical rows


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "{run}", "{missing}", "-o", "{tmp}"], "cannot be read"),
    (["reconstruct", "{run}", "{notimage}", "-o", "{tmp}"], "not a readable image"),
    (["sample", "{tmp}", "-o", "{tmp}"], "is not a checkpoint"),
    (["sample", "{run}", "-n", "0", "-o", "{tmp}"], "argument -n: must be >= 1"),
    (["interpolate", "{run}", "{notimage}", "{notimage}", "--steps", "1"], "argument --steps: must be >= 2"),
    (["evaluate", "{run}", "--iw-samples", "0"], "iw_samples must be >= 1"),
    (["evaluate", "{run}", "--data", "{missing}"], "does not exist"),
    (["evaluate", "{run}", "--fid-weights", "{missing}"], "no such file"),
    (["report", "{tmp}"], "not a run folder"),
])
def test_verb_errors_are_one_line_exit_2(run, tmp_path, args, message, capsys):
    (tmp_path / "notimage.jpg").write_text("hello")
    values = {"run": run, "tmp": tmp_path, "missing": tmp_path / "nope.jpg", "notimage": tmp_path / "notimage.jpg"}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgvae") and "error:" in err and message in err and err.count("\n") == 1


def test_report_has_every_section_and_only_existing_files(run):
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    for section in ("summary", "curves", "metrics", "grids", "config"):
        assert f'<section id="{section}">' in page
    for text in ("KL per latent dimension", "PSNR", "learning rate", "reconstruction term", "epoch 2", "model:"):
        assert text in page
    assert page.count("<svg") >= 6  # five curves and the KL chart
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(refs) == 6  # 2 epochs x 3 grids
    assert all((run / ref).is_file() for ref in refs)
    assert "http" not in page  # nothing fetched from the network


def test_report_without_metrics_says_how_to_get_them(run, tmp_path):
    for name in ("config.yaml", "history.jsonl"):
        (tmp_path / name).write_text((run / name).read_text())
    page = build_report(tmp_path)
    assert "run <code>imgvae evaluate RUN_DIR</code>" in page and "No picture grids yet" in page


def test_fid_weights_are_used_and_unsafe_files_refused(run, tmp_path, monkeypatch):
    """Real FID runs from a local weights file (random weights here: the plumbing, not the number)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as patch:  # build the network without its download
        patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "m.json"
    with pytest.warns(UserWarning, match=r"is not that of weights-inception-2015-12-05-6726825d.pth \(6726825d"):
        assert main(["evaluate", str(run), "--fid-weights", str(weights), "--limit", "3", "-o", str(out),
                     "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert {"fid_recon", "fid_samples", "fd_effnet_recon"} <= set(metrics["distribution"])
    fid = metrics["feature_weights"]["fid"]
    assert fid["published"] is False and len(fid["sha256"]) == 64 and fid["file"] == str(weights)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FeatureError, match="not a plain PyTorch state dict"):
        InceptionFeatures(tmp_path / "evil.pth")


def test_version_and_the_export_formats_the_parser_offers(capsys):
    from imgvae import __version__
    from imgvae.commands.parser import EXPORT_FORMATS, EXPORT_PRIORS
    from imgvae.export import FORMATS
    from imgvae.export.folder import PRIORS

    assert EXPORT_FORMATS == FORMATS and EXPORT_PRIORS == PRIORS
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"imgvae {__version__}"


def test_the_command_line_parses_without_importing_torch():
    script = "import sys, imgvae.commands.cli as c; c.parse_args(['train', '-o', 'x']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]


def test_a_missing_checkpoint_or_run_is_refused_before_torch_is_imported(tmp_path):
    script = """
import sys, imgvae.commands.cli as c
for argv in (["sample", sys.argv[1], "-o", sys.argv[2]], ["train", "--resume", sys.argv[1]], ["report", sys.argv[1]]):
    print(c.main(argv), "torch" in sys.modules)
"""
    missing = tmp_path / "no-run"
    result = subprocess.run([sys.executable, "-c", script, str(missing), str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert result.stdout.split("\n") == ["2 False"] * 3 + [""], result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"imgvae: error: checkpoint {str(missing)!r} does not exist",
                                          *[f"imgvae: error: {missing} is not a run folder (no config.yaml)"] * 2]
    assert list(tmp_path.iterdir()) == []
