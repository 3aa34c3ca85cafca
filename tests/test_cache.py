import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.config import ConfigError, DataConfig, load_config
from imgvae.data.cache import prepare
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import load_view
from imgvae.data.loading import DeviceBatches, loader_workers, make_loader, resident_images
from imgvae.data.sources import SourceError, open_source, read_keys
from imgvae.train.engine import train

from conftest import decode_rgb, preprocess, smooth_image, tiny_config, write_jpegs


def all_views(dataset):
    return torch.stack([dataset.load(i) for i in range(len(dataset))])


def test_loader_workers_by_source_and_device(tmp_path, image_folder, monkeypatch):
    cfg = DataConfig(image_size=32, crop_size=64)
    prepare([str(image_folder)], cfg, tmp_path / "cache", workers=1, progress=False)
    cached = build_dataset([str(tmp_path / "cache")], cfg, train=True, seed=0)
    jpegs = build_dataset([str(image_folder)], cfg, train=True, seed=0)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loader_workers(cached, 4, gpu) == 0  # a cache is a memory copy: always in-process
    assert loader_workers(jpegs, "auto", cpu) == 0 and loader_workers(jpegs, "auto", gpu) == 8
    assert loader_workers(jpegs, 3, cpu) == 3


@pytest.mark.parametrize("exact", [True, False])
def test_cache_round_trip_equals_on_the_fly(tmp_path, image_folder, coco_zips, exact):
    cfg = DataConfig(image_size=32, crop_size=64, exact_decode=exact)
    specs = [str(image_folder), str(coco_zips["val2017"])]
    manifest = prepare(specs, cfg, tmp_path / "cache", workers=2, chunk=5, progress=False)
    assert manifest["count"] == 30 and manifest["preprocessing"]["exact_decode"] is exact
    cached = build_dataset([str(tmp_path / "cache")], cfg, train=True, seed=0)
    direct = build_dataset(specs, cfg, train=True, seed=0)
    assert torch.equal(all_views(cached), all_views(direct))
    assert [cached.key(i) for i in range(30)] == [direct.key(i) for i in range(30)]


def test_interrupted_prepare_resumes_without_redoing_chunks(tmp_path, image_folder):
    cfg = DataConfig(image_size=16, crop_size=64)
    calls = []

    def dies_after_two(c):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(c)

    with pytest.raises(KeyboardInterrupt):
        prepare([str(image_folder)], cfg, tmp_path / "c", workers=1, chunk=5, progress=False, on_chunk=dies_after_two)
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial").is_dir()
    with pytest.raises(SourceError, match="unfinished cache"):
        open_source(str(tmp_path / "c.partial"))

    manifest = prepare([str(image_folder)], cfg, tmp_path / "c", workers=1, chunk=5, progress=False,
                       on_chunk=calls.append)
    assert sorted(calls) == [0, 1, 2, 3, 4] and calls[:2] == [0, 1]  # chunks 0, 1 not redone
    assert manifest["count"] == 24 and not (tmp_path / "c.partial").exists()
    prepare([str(image_folder)], cfg, tmp_path / "straight", workers=1, chunk=5, progress=False)
    assert np.array_equal(np.load(tmp_path / "c" / "images.npy"), np.load(tmp_path / "straight" / "images.npy"))


def test_changed_settings_restart_a_partial_cache(tmp_path, image_folder, capsys):
    def interrupt_at_1(c):
        if c == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([str(image_folder)], DataConfig(image_size=16), tmp_path / "c", workers=1, chunk=5, progress=False,
                on_chunk=interrupt_at_1)
    manifest = prepare([str(image_folder)], DataConfig(image_size=8), tmp_path / "c", workers=1, chunk=5,
                       progress=False)
    assert "starting over" in capsys.readouterr().out
    assert manifest["preprocessing"]["image_size"] == 8
    assert np.load(tmp_path / "c" / "images.npy").shape == (24, 3, 8, 8)


def test_preprocessing_mismatch_is_refused(tmp_path, image_folder):
    prepare([str(image_folder)], DataConfig(image_size=32), tmp_path / "c", workers=1, progress=False)
    for other, message in [
        (DataConfig(image_size=64), "data.image_size: cache 32, run 64"),
        (DataConfig(image_size=32, exact_decode=True), "data.exact_decode: cache False, run True"),
        (DataConfig(image_size=32, crop="random"), "data.crop: cache 'center', run 'random'"),
    ]:
        with pytest.raises(SourceError, match=message):
            build_dataset([str(tmp_path / "c")], other, train=True, seed=0)
    with pytest.raises(SourceError, match="already holds a prepared cache"):
        prepare([str(image_folder)], DataConfig(image_size=32), tmp_path / "c", progress=False)
    with pytest.raises(SourceError, match="use data.crop=center"):
        prepare([str(image_folder)], DataConfig(crop="random"), tmp_path / "r", progress=False)


def test_bad_files_are_listed_in_the_manifest_and_left_out(tmp_path, image_folder):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (image_folder / "empty.png").write_bytes(b"")
    manifest = prepare([str(image_folder)], DataConfig(image_size=16), tmp_path / "c", workers=2, chunk=4,
                       progress=False)
    assert manifest["rows"] == 26 and manifest["count"] == 24
    assert sorted(k.rsplit("/", 1)[1] for k in manifest["skipped"]) == ["broken.jpg", "empty.png"]
    dataset = build_dataset([str(tmp_path / "c")], DataConfig(image_size=16), train=True, seed=0)
    assert len(dataset) == 24 and all("broken" not in dataset.key(i) for i in range(24))


def test_ranks_read_disjoint_slices_of_one_cache(tmp_path, image_folder):
    prepare([str(image_folder)], DataConfig(image_size=16), tmp_path / "c", workers=1, progress=False)
    dataset = build_dataset([str(tmp_path / "c")], DataConfig(image_size=16), train=True, seed=0)
    seen = []
    for rank in (0, 1):
        loader, sampler = make_loader(dataset, 4, True, seed=0, num_workers=0, rank=rank, world_size=2)
        sampler.set_epoch(0)
        seen.append(torch.cat([indices for _, indices, _ in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 12 and not set(seen[0]) & set(seen[1])


def test_cli_prepare_then_train_on_the_cache(tmp_path, image_folder):
    assert main(["prepare", "-o", str(tmp_path / "c"), "--no-progress", "--workers", "2",
                 f"data.train=[{image_folder}]", "data.image_size=32", "data.crop_size=64"]) == 0
    summary = train(tiny_config([tmp_path / "c"], [tmp_path / "c"], "train.epochs=1"), tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and summary["skipped_files"] == 0


def test_fast_decode_is_close_to_exact_on_photo_like_jpegs(tmp_path):
    """DCT-scaled decoding vs full decode on 640x480 JPEGs with texture (>= 35 dB)."""
    rng = np.random.default_rng(0)
    cfg_fast, cfg_exact = DataConfig(), DataConfig(exact_decode=True)
    psnrs = []
    for i in range(12):
        base = np.asarray(smooth_image(rng, 640, 480), dtype=np.float64)
        texture = rng.normal(0, 12, (480, 640, 1))
        from PIL import Image
        img = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
        if i % 4 == 0:
            img = img.convert("L")
        path = tmp_path / f"{i}.jpg"
        img.save(path, quality=90)
        data = path.read_bytes()
        fast = load_view(data, cfg_fast).astype(np.float64)
        exact = load_view(data, cfg_exact)
        assert np.array_equal(exact, preprocess(decode_rgb(data), cfg_exact).numpy())
        mse = np.mean((fast - exact.astype(np.float64)) ** 2)
        psnrs.append(10 * np.log10(255**2 / mse))
    assert np.mean(psnrs) >= 35, psnrs


def test_fast_decode_equals_exact_for_png(tmp_path):
    img = smooth_image(np.random.default_rng(1), 500, 400)
    path = tmp_path / "a.png"
    img.save(path)
    data = path.read_bytes()
    assert np.array_equal(load_view(data, DataConfig()), load_view(data, DataConfig(exact_decode=True)))


def test_manifest_is_json_with_provenance(tmp_path, image_folder):
    prepare([str(image_folder)], DataConfig(image_size=16), tmp_path / "c", workers=1, progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format"] == "imgvae-cache" and manifest["sources"] == [str(image_folder)]
    assert len(read_keys(tmp_path / "c")) == 24


def test_a_resident_cache_trains_bit_identical_to_the_loader(tmp_path, image_folder, capsys):
    assert main(["prepare", "-o", str(tmp_path / "c"), "--no-progress", f"data.train=[{image_folder}]",
                 "data.image_size=32", "data.crop_size=64"]) == 0
    for name, budget in (("loader", "0"), ("resident", "auto")):
        train(tiny_config([tmp_path / "c"], [], "train.epochs=2", "train.ema=0.9", f"data.device_cache_gb={budget}"),
              tmp_path / name, progress=False)
        assert ("training set resident on cpu" in capsys.readouterr().out) == (name == "resident")
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "last" / "model.safetensors")) for n in ("loader", "resident"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resident_rows_follow_the_sampler_across_ranks_and_caches(tmp_path, image_folder):
    for split, seed in (("a", 1), ("b", 2)):
        write_jpegs(tmp_path / split, 10, seed=seed)
        assert main(["prepare", "-o", str(tmp_path / f"c{split}"), "--no-progress", f"data.train=[{tmp_path / split}]",
                     "data.image_size=32", "data.crop_size=64"]) == 0
    cfg = load_config(None, ["data.image_size=32", "data.crop_size=64", "data.views_per_image=2"]).data
    dataset = build_dataset([str(tmp_path / "ca"), str(tmp_path / "cb")], cfg, train=True, seed=0)
    images = resident_images(dataset, torch.device("cpu"), 2**30)
    assert resident_images(dataset, torch.device("cpu"), images.numel() - 1) is None  # over budget
    for rank in (0, 1):
        loader, sampler = make_loader(dataset, 4, True, seed=0, num_workers=0, rank=rank, world_size=2)
        sampler.set_epoch(3, start=4)  # resumed one batch into epoch 3
        batches = DeviceBatches(images, sampler, 4, dataset.views)
        assert len(batches) == len(loader)
        for (x, i, _), (y, j, bad) in zip(loader, batches):
            assert torch.equal(i, j) and torch.equal(x, y) and bad == []


@pytest.mark.filterwarnings("ignore::imgvae.data.datasets.SkippedFile")
def test_views_kept_in_ram_go_to_the_device_and_train_bit_identical(tmp_path, image_folder, capsys):
    """After the first epoch fills the RAM view cache, batches come from it by index (an
    unreadable file left out of its batch, as the loader does): the same batches and weights."""
    (image_folder / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = load_config(None, ["data.image_size=32", "data.crop_size=64"]).data
    dataset = build_dataset([str(image_folder)], cfg, train=True, seed=0)
    assert dataset.keep_in_memory(2**30, shared=False) and dataset.views_in_memory() is None
    loader, sampler = make_loader(dataset, 4, True, seed=0, num_workers=0)
    sampler.set_epoch(0)
    list(loader)  # fills the cache, but for the view that drop_last left out
    assert dataset.views_in_memory() is None
    memory, readable = dataset.views_in_memory(fill=1)
    assert readable.tolist() == [not dataset.key(i).endswith("broken.jpg") for i in range(25)]
    sampler.set_epoch(1, start=4)
    batches = DeviceBatches(memory, sampler, 4, readable=readable)
    assert len(batches) == len(loader)
    for (x, i, _), (y, j, bad) in zip(loader, batches):
        assert torch.equal(i, j) and torch.equal(x, y) and bad == []

    for name, budget in (("loader", "0"), ("resident", "auto")):
        train(tiny_config([image_folder], [], "train.epochs=3", "train.ema=0.9", f"data.device_cache_gb={budget}"),
              tmp_path / name, progress=False)
        assert ("batching them on cpu from now on" in capsys.readouterr().out) == (name == "resident")
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "last" / "model.safetensors")) for n in ("loader", "resident"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (tmp_path / "resident" / "history.jsonl").read_text().splitlines()]
    assert all(0 <= h["data_wait"] < 1 for h in history)


def test_prepare_on_a_device_decodes_jpegs_in_batches_as_pil_does(tmp_path, image_folder):
    """The nvJPEG path, run with torchvision's CPU decoder: JPEG views within rounding of PIL's
    full decode, other files through PIL itself, bad files skipped for the same reasons."""
    rng = np.random.default_rng(3)
    odd = image_folder / "odd"
    odd.mkdir()
    smooth_image(rng, 90, 70).convert("L").save(odd / "grey.jpg", quality=90)
    smooth_image(rng, 70, 90).convert("CMYK").save(odd / "cmyk.jpg", quality=90)
    smooth_image(rng, 50, 40).save(odd / "small.png")
    whole = (image_folder / "nested" / f"{0:012d}.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (odd / "page.jpg").write_text("<html></html>")
    (odd / "empty.jpg").write_bytes(b"")
    cfg = DataConfig(image_size=32, crop_size=64)
    on_device = prepare([str(image_folder)], cfg, tmp_path / "device", chunk=8, progress=False, device="cpu")
    pil = prepare([str(image_folder)], DataConfig(image_size=32, crop_size=64, exact_decode=True), tmp_path / "pil",
                  workers=1, chunk=8, progress=False)
    assert on_device["decoder"] == "torchvision decode_jpeg on cpu" and pil["decoder"] == "PIL"
    assert on_device["skipped"] == pil["skipped"] and len(pil["skipped"]) == 3
    a, b = (np.load(tmp_path / name / "images.npy").astype(int) for name in ("device", "pil"))
    keys = read_keys(tmp_path / "pil")
    valid = np.load(tmp_path / "pil" / "valid.npy")
    for row in valid:
        diff = np.abs(a[row] - b[row])
        if keys[row].endswith(("cmyk.jpg", "small.png")):  # taken by the CPU path
            assert np.array_equal(a[row], load_view(Path(keys[row]).read_bytes(), cfg)), keys[row]
        else:
            assert diff.mean() < 0.5 and diff.max() <= 3, (keys[row], diff.mean(), diff.max())
    with pytest.raises(ConfigError, match="exact_decode"):
        prepare([str(image_folder)], DataConfig(exact_decode=True), tmp_path / "x", progress=False, device="cpu")
