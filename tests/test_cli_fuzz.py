"""What users type, fuzzed: hypothesis draws a verb (sample, evaluate, reconstruct, interpolate,
fit-prior, train-prior, encode, export, compare, prepare), hostile values for its options (0,
negatives, NaN, infinities, huge numbers, words, empty strings, missing paths) and for KEY=VALUE
overrides of the keys the verb takes; each case either works or is refused in one line with exit
code 2, no traceback, and nothing written where it was told to write."""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgvae.commands.cli import main

from conftest import train_tiny_run, write_jpegs

ROOT = Path(tempfile.mkdtemp(prefix="imgvae-cli-fuzz-"))
NUMBERS = ["0", "-1", "1", "2", "nan", "inf", "-inf", "1e9", "1000000000", "99999999999999999999", "abc", "", "0.5"]
VALUES = [".nan", ".inf", "-.inf", "0", "-1", "1e12", "x", "[]", "[[[[1]]]]", "null", "true", '"café ü"', "{a: 1}"]
KEYS = {  # the keys each kind of verb takes (a trained model's: data, eval, prior)
    "use": ["data.crop_size", "data.image_size", "data.eval_limit", "data.num_workers", "eval.iw_samples",
            "eval.batch_size", "eval.limit", "eval.seed", "eval.generation_images", "prior.images",
            "prior.components"],
    "prior": ["prior.epochs", "prior.batch_size", "prior.width", "prior.depth", "prior.steps", "prior.lr",
              "prior.time_limit", "prior.view_epochs", "prior.ema", "train.time_limit", "data.image_size"],
    "data": ["data.image_size", "data.crop_size", "data.max_file_mb", "data.max_megapixels", "data.crop_scale"],
}


@pytest.fixture(scope="module")
def model():
    run = train_tiny_run(ROOT / "model", "model.name=kl-f4", "model.base_channels=4", "train.epochs=1",
                         "data.image_size=16", n_train=12, n_eval=4)
    write_jpegs(ROOT / "photos", 4, seed=3)
    return run


def verbs(run: Path, photos: Path, out: Path) -> dict:
    """Each verb's argv, with {} where a hostile option value goes, and the keys it takes."""
    small = ["--no-progress"]
    return {
        "sample": (["sample", str(run), "-o", str(out), *small], ["-n", "--steps", "--temperature", "--seed"], "use"),
        "evaluate": (["evaluate", str(run), "-o", str(out / "m.json"), "--limit", "4", *small],
                     ["--iw-samples", "--batch-size", "--limit", "--seed"], "use"),
        "reconstruct": (["reconstruct", str(run), str(next(photos.iterdir())), "-o", str(out)], ["--seed"], "use"),
        "interpolate": (["interpolate", str(run), *map(str, sorted(photos.iterdir())[:2]), "-o", str(out)],
                        ["--steps", "--seed"], "use"),
        "fit-prior": (["fit-prior", str(run), "--data", str(photos), *small], ["--limit", "--components",
                                                                               "--batch-size"], "use"),
        "train-prior": (["train-prior", str(run), "-o", str(out), "prior.epochs=1", "prior.width=8",
                         "prior.batch_size=8", *small], [], "prior"),
        "encode": (["encode", str(run), "-o", str(out), "--data", str(photos), *small], ["--batch-size"], "use"),
        "export": (["export", str(run), "-o", str(out), "--data", str(photos), *small], ["--images"], "use"),
        "compare": (["compare", str(run), f"again={run}", "--data", str(photos), "-o", str(out), *small],
                    ["--pictures", "--image-size", "--iw-samples"], "use"),
        "prepare": (["prepare", "-o", str(out), f"data.train=[{photos}]", "data.crop=center", "--workers", "1",
                     *small], ["--workers"], "data"),
    }


def fuzz_one(model: Path, data) -> None:
    out = Path(tempfile.mkdtemp(prefix="case-", dir=ROOT)) / "out"
    argv, options, keys = verbs(model, ROOT / "photos", out)[data.draw(st.sampled_from(sorted(verbs(model, ROOT,
                                                                                                    out))))]
    argv = list(argv)
    for option in data.draw(st.lists(st.sampled_from(options), max_size=2, unique=True)) if options else []:
        argv += [option, data.draw(st.sampled_from(NUMBERS))]
    for key in data.draw(st.lists(st.sampled_from(KEYS[keys]), max_size=2, unique=True)):
        argv.append(f"{key}={data.draw(st.sampled_from(VALUES))}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    said = err.getvalue()
    assert code in (0, 2), (argv, code, said)
    assert "Traceback" not in said, (argv, said)
    if code == 2:
        errors = [line for line in said.splitlines() if "error" in line]
        assert len(errors) == 1 and said.rstrip("\n").splitlines()[-1] == errors[0], (argv, said)
        assert not out.exists(), (argv, sorted(out.rglob("*")))
    elif argv[0] == "evaluate":
        assert json.loads((out / "m.json").read_text())["images"] == 4


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_what_users_type_works_or_is_refused_in_one_line(model, data):
    fuzz_one(model, data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_what_users_type_works_or_is_refused_in_one_line_at_length(model, data):
    fuzz_one(model, data)
