"""Generation you can steer: labels read in place from every kind of source (with their misses
counted), through prepare and encode; conditional flow and token priors trained with label
dropout, sampled with classifier-free guidance, deterministic and resumable; refusals in one line;
the score of what was drawn against a classifier's own ceiling."""

import csv
import json
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.config import FlowConfig, TokenConfig
from imgvae.data.labels import LabelWarning, read_labels, view_files
from imgvae.data.sources import SourceError, open_sources
from imgvae.evaluation.steering import label_classifier
from imgvae.priors.flow import FlowPrior, draw_times, flow_loss
from imgvae.priors.learned import train_prior
from imgvae.priors.tokens import TokenPrior
from test_engine import CrashAfter

from conftest import train_tiny_run, write_jpegs


def test_folders_give_the_first_folder_of_each_file_in_folders_and_zips(tmp_path):
    write_jpegs(tmp_path / "photos" / "cat", 2, seed=1)
    write_jpegs(tmp_path / "photos" / "dog" / "deep", 1, seed=2)
    write_jpegs(tmp_path / "photos", 1, seed=3)  # at the top: no folder, no label
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        for i, path in enumerate(write_jpegs(tmp_path / "src", 2, seed=4)):
            zf.write(path, f"{'bird' if i else 'cat'}/{path.name}")
    labels = read_labels("folders", open_sources([str(tmp_path / "photos"), str(tmp_path / "more.zip")]))
    assert labels.vocabulary == ["bird", "cat", "dog"]
    assert [[labels.vocabulary[k] for k in row] for row in labels.rows] == [[], ["cat"], ["cat"], ["dog"], ["bird"],
                                                                            ["cat"]]  # a zip's members sorted
    assert labels.unlabelled == 1 and labels.record()["counts"] == [1, 3, 1]
    with pytest.raises(SourceError, match="data.labels=folders: no image of .* has a label"):
        read_labels("folders", open_sources([str(tmp_path / "photos" / "cat")]))  # no folder below it
    embedded = read_labels("folders", open_sources(["embedded:train"]))
    assert len(embedded.vocabulary) == 6 and "astronaut" in embedded.vocabulary and embedded.unlabelled == 0


def write_coco(path, files, objects):
    """A COCO instances json: images `files`, annotations {file: [category ids]}; category 9 is undefined."""
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    images = [{"id": i, "file_name": f} for i, f in enumerate(files)]
    ann = [{"image_id": files.index(f), "category_id": c} for f, cs in objects.items() for c in cs]
    path.write_text(json.dumps({"categories": cats, "images": images, "annotations": ann}))
    return path


def test_coco_annotations_give_multi_hot_sets_from_a_json_or_the_zip(tmp_path):
    paths = write_jpegs(tmp_path / "train2017", 4, seed=1)
    files = [p.name for p in paths] + ["000000999999.jpg"]  # an annotated image not among the sources
    doc = write_coco(tmp_path / "instances_train2017.json", files, {files[0]: [1, 2, 2], files[1]: [2],
                                                                   files[2]: [9]})
    with zipfile.ZipFile(tmp_path / "annotations.zip", "w") as zf:
        zf.write(doc, "annotations/instances_train2017.json")
        zf.writestr("annotations/captions_train2017.json", "{}")
    for spec in (f"coco:{doc}", f"coco:{tmp_path / 'annotations.zip'}"):
        labels = read_labels(spec, open_sources([str(tmp_path / "train2017")]))
        assert labels.vocabulary == ["dog", "person"]
        assert [[labels.vocabulary[k] for k in row] for row in labels.rows] == [["dog", "person"], ["dog"], [], []]
        assert labels.unlabelled == 2 and labels.unknown == ["9"] and labels.missing == []


def test_csv_and_jsonl_files_name_files_and_their_misses_are_counted(tmp_path):
    paths = write_jpegs(tmp_path / "photos" / "a", 3, seed=1)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        rows = [["file", "label"], [f"a/{paths[0].name}", "cat;indoor"], [paths[1].name, "dog"],
                [paths[1].name, "outdoor"], ["gone.jpg", "cat"]]
        csv.writer(f).writerows(rows)
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": paths[0].name, "labels": ["cat", "indoor"]}, {"file": f"a/{paths[1].name}", "label": "dog"},
        {"file": "b/gone.jpg", "labels": []}]))
    for name, second in (("labels.csv", ["dog", "outdoor"]), ("labels.jsonl", ["dog"])):
        with pytest.warns(LabelWarning) as said:
            labels = read_labels(str(tmp_path / name), open_sources([str(tmp_path / "photos")]))
            labels.warn()
        rows = [[labels.vocabulary[k] for k in row] for row in labels.rows]
        assert rows == [["cat", "indoor"], second, []] and labels.unlabelled == 1
        assert labels.missing == (["gone.jpg"] if name.endswith("csv") else ["b/gone.jpg"])
        assert len(said) == 2 and "1 of 3 images have no label" in str(said[0].message)


def test_prepare_records_labels_and_encode_carries_them(tmp_path, capsys):
    write_jpegs(tmp_path / "photos" / "cat", 3, seed=1)
    write_jpegs(tmp_path / "photos" / "dog", 3, seed=2)
    assert main(["prepare", "-o", str(tmp_path / "cache"), f"data.train=[{tmp_path / 'photos'}]",
                 "data.image_size=16", "data.crop=center", "data.crop_size=64", "data.labels=folders", "--workers", "1",
                 "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["labels"]["vocabulary"] == ["cat", "dog"] and manifest["labels"]["counts"] == [3, 3]
    assert np.load(tmp_path / "cache" / "labels.npy").tolist() == [[1, 0]] * 3 + [[0, 1]] * 3
    source = open_sources([str(tmp_path / "cache")])
    assert read_labels("folders", source).rows == [[0]] * 3 + [[1]] * 3  # the cache's own record


class TwoModes:
    """2-D data, label 0 around (-2, 0), label 1 around (2, 1)."""

    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])

    def __init__(self, n=4096):
        g = torch.Generator().manual_seed(0)
        self.which = torch.randint(0, 2, (n,), generator=g)
        self.data = self.centres[self.which] + 0.3 * torch.randn(n, 2, generator=g)
        self.labels = torch.nn.functional.one_hot(self.which, 2).float()


def test_a_conditional_flow_draws_each_label_in_its_mode_and_guidance_zero_is_the_unconditional_branch():
    torch.manual_seed(0)
    data = TwoModes()
    prior = FlowPrior(FlowConfig(width=64, depth=3), (2,), vocabulary=2)
    prior.std.copy_(data.data.std(0))
    prior.mean.copy_(data.data.mean(0))
    opt = torch.optim.Adam(prior.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(800):
        at = torch.randint(0, len(data.data), (256,), generator=g)
        keep = torch.rand(256, generator=g) >= 0.2  # label dropout
        loss = flow_loss(prior, data.data[at], torch.randn(256, 2, generator=g), draw_times(256, "uniform", g, "cpu"),
                         data.labels[at] * keep[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2))
    for label in (0, 1):
        told = torch.nn.functional.one_hot(torch.full((1000,), label), 2).float()
        drawn = prior.sample(noise, 16, labels=told, guidance=1.0)
        near = torch.cdist(drawn, TwoModes.centres).argmin(1)
        assert (near == label).double().mean() > 0.95, label
        guided = prior.sample(noise, 16, labels=told, guidance=3.0)
        assert (torch.cdist(guided, TwoModes.centres).argmin(1) == label).double().mean() >= (near == label).double(
            ).mean() - 0.01
    unconditional = prior.sample(noise, 16, labels=told, guidance=0.0)
    assert torch.equal(unconditional, prior.sample(noise, 16))  # guidance 0: told nothing
    left = (torch.cdist(unconditional, TwoModes.centres).argmin(1) == 0).double().mean()
    assert 0.35 < left < 0.65  # the unconditional branch learned both modes: dropout trained it


def test_a_conditional_token_prior_takes_a_condition_token_and_guidance():
    prior = TokenPrior(TokenConfig(width=16, depth=1), (2, 2), codebook_size=5, vocabulary=3).eval()
    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = prior.sample(2, 3, g(), "cpu", labels=labels, guidance=2.0)
    assert torch.equal(a, prior.sample(2, 3, g(), "cpu", labels=labels, guidance=2.0))  # deterministic
    assert torch.equal(prior.sample(2, 3, g(), "cpu", labels=labels, guidance=0.0), prior.sample(2, 3, g(), "cpu"))
    assert prior(torch.zeros(2, 2, 2, dtype=torch.long), labels).shape == (2, 4, 5)


KL = ["model.name=kl-f8", "model.base_channels=8", "train.optimizer=adam", "train.epochs=1"]
PRIOR = ["prior.width=16", "prior.depth=1", "prior.epochs=2", "prior.batch_size=8", "prior.steps=4",
         "prior.precision=fp32", "prior.ckpt_every_steps=1", "data.labels=folders"]


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditional")
    for name, seed in (("red", 1), ("blue", 2)):
        write_jpegs(root / "photos" / name, 8, seed=seed)
    return train_tiny_run(root, *KL), root / "photos"


def test_conditional_prior_training_resumes_to_a_straight_runs_weights_and_samples_by_label(labelled_run, tmp_path,
                                                                                            capsys):
    labelled_run, photos = labelled_run
    train_prior(labelled_run, tmp_path / "straight", [str(photos)], overrides=PRIOR, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_prior(labelled_run, tmp_path / "resumed", [str(photos)], overrides=PRIOR, progress=False,
                    callbacks=[CrashAfter("step_00000003")])
    train_prior(labelled_run, tmp_path / "resumed", [str(photos)], resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / name)) for r in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "straight" / "latents" / "labels.npy").is_file()
    out = [tmp_path / f"s{i}" for i in range(3)]
    for folder, extra in zip(out, (["--label", "red", "--label", "blue"], ["--label", "red", "--label", "blue"],
                                   ["--labels", "red,blue", "--guidance", "2"])):
        assert main(["sample", str(labelled_run), "--prior-run", str(tmp_path / "straight"), "-n", "4", "-o",
                     str(folder), *extra]) == 0
    assert (out[0] / "samples.png").read_bytes() == (out[1] / "samples.png").read_bytes() != (
        out[2] / "samples.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--label", "green"], "--label 'green' is not a label of"),
    (["--guidance", "nan"], "argument --guidance: must be >= 0 and <= 100, got nan"),
    (["--prior", "standard", "--label", "red"], "--label: the N(0, I) (standard) is not conditional"),
])
def test_refusals_of_labels_and_guidance_are_one_line(labelled_run, tmp_path, args, message, capsys):
    labelled_run, photos = labelled_run
    if not (labelled_run / "prior-flow").exists():
        train_prior(labelled_run, sources=[str(photos)], overrides=PRIOR, progress=False)
    capsys.readouterr()
    assert main(["sample", str(labelled_run), "-n", "2", "-o", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_an_unconditional_prior_refuses_a_label(tmp_path, capsys):
    run = train_tiny_run(tmp_path, *KL)
    train_prior(run, overrides=[p for p in PRIOR if not p.startswith("data.labels")], progress=False)
    assert main(["sample", str(run), "--label", "red", "-o", str(tmp_path / "s")]) == 2
    assert "is an unconditional prior (trained without data.labels); it takes no labels" in capsys.readouterr().err


def test_the_label_classifier_scores_real_views_at_its_ceiling_and_noise_at_chance():
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 3, (300,), generator=g)
    features = torch.nn.functional.one_hot(which, 3).float() * 4 + torch.randn(300, 3, generator=g)
    sets = [(("a", "b", "c")[k],) for k in which.tolist()]
    classifier = label_classifier(features, sets, ["a", "b", "c"])
    assert classifier.metric == "accuracy" and classifier.ceiling > 0.95
    assert classifier.score(features, sets) > 0.95
    assert classifier.score(torch.randn(300, 3, generator=g), sets) < 0.6
    multi = [s + (("d",) if k == 0 else ()) for s, k in zip(sets, which.tolist())]
    assert label_classifier(features, multi, ["a", "b", "c", "d"]).metric == "mAP"
    assert label_classifier(features, [("a",)] * 300, ["a", "b"]) is None  # one label shown: nothing to tell apart


def test_view_files_map_epoch_views_to_their_files(tmp_path):
    from imgvae.config import load_config
    from imgvae.data.datasets import EpochViews, build_dataset

    write_jpegs(tmp_path / "p", 3, seed=1)
    cfg = load_config(None, [f"data.train=[{tmp_path / 'p'}]", "data.views_per_image=2", "data.crop=random"]).data
    views = EpochViews(build_dataset(cfg.train, cfg, train=True, seed=0), epochs=2, mirror=True)
    assert view_files(views).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2] * 2
