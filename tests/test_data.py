import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from imgvae.config import DataConfig
from imgvae.data.datasets import BadFiles, build_dataset, collate
from imgvae.data.decode import normalize, to_model_input
from imgvae.data.loading import make_loader
from imgvae.data.sources import SourceError, open_source, open_sources

from conftest import decode_rgb, preprocess, smooth_image, write_jpegs


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_exact_values_on_hand_made_grey_image():
    # 6 wide x 4 high grey image; crop 4 takes columns 1..4 (torchvision's centring), no resize.
    pixels = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    img = decode_rgb(encode(Image.fromarray(pixels, mode="L"), "PNG"))
    x = normalize(preprocess(img, DataConfig(image_size=4, crop_size=4))[None])[0]
    expected = (torch.tensor(pixels[:, 1:5], dtype=torch.float32) / 255 - 0.5) / 0.5
    assert x.shape == (3, 4, 4)
    for c in range(3):  # grey replicated into R, G and B
        assert torch.equal(x[c], expected)
    assert x.min() >= -1 and x.max() <= 1


def test_matches_seed_torchvision_pipeline_exactly():
    """Centre-crop 375 -> resize 64 -> ToTensor -> Normalize(.5, .5), the seed's order."""
    img = smooth_image(np.random.default_rng(0), 500, 420)
    noisy = np.asarray(img).astype(int) + np.random.default_rng(1).integers(-30, 30, (420, 500, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    seed = T.Compose([T.CenterCrop(375), T.Resize(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ours = normalize(preprocess(img, DataConfig())[None])[0]
    assert torch.equal(ours, seed(img))


def test_small_image_is_cropped_not_zero_padded():
    img = Image.new("RGB", (300, 200), (255, 255, 255))  # smaller than 375 on both sides
    x = normalize(preprocess(img, DataConfig())[None])[0]
    assert x.shape == (3, 64, 64)
    assert torch.all(x == 1.0)  # white everywhere: no black padding


def palette_image(colour) -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, *colour])
    return img


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (8, 8), 100),
        lambda: palette_image((100, 100, 100)),
        lambda: Image.new("RGBA", (8, 8), (100, 100, 100, 7)),
        lambda: Image.new("LA", (8, 8), (100, 50)),
    ],
    ids=["grey", "palette", "rgba", "grey-alpha"],
)
def test_odd_modes_become_rgb(make):
    img = decode_rgb(encode(make(), "PNG"))
    assert img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [100, 100, 100]


def test_cmyk_jpeg_becomes_rgb():
    img = decode_rgb(encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"))
    assert img.mode == "RGB" and np.asarray(img).min() > 240  # no ink = white


def test_16bit_grey_is_scaled_not_clipped():
    pixels = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257: mid grey in 16 bits
    raw = encode(Image.fromarray(pixels), "PNG")
    assert Image.open(io.BytesIO(raw)).mode.startswith("I")
    assert np.asarray(decode_rgb(raw))[0, 0].tolist() == [128, 128, 128]


def test_hflip_on_batches_mirrors_about_half():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    x = to_model_input(images, torch.device("cpu"), torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5)
    plain = normalize(images)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x, plain)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(x, plain)])
    assert torch.all(flipped | kept)
    assert 16 < flipped.sum() < 48
    assert torch.equal(to_model_input(images, torch.device("cpu")), plain)  # eval: never flipped


def test_folder_source_is_recursive_and_filters_extensions(tmp_path):
    write_jpegs(tmp_path / "a" / "b", 3)
    Image.new("RGB", (10, 10)).save(tmp_path / "a" / "x.PNG")
    Image.new("RGB", (10, 10)).save(tmp_path / "a" / "y.webp")
    Image.new("RGB", (10, 10)).save(tmp_path / "a" / "z.bmp")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path / "a"))
    assert len(source) == 6
    assert all(not k.endswith(".txt") for k in map(source.key, range(len(source))))


def test_coco_zips_combine_and_read_in_workers(coco_zips):
    cfg = DataConfig(image_size=32)
    dataset = build_dataset([str(coco_zips["train2017"]), str(coco_zips["test2017"])], cfg, train=True, seed=0)
    assert len(dataset) == 24
    assert dataset.key(0).endswith("train2017.zip:train2017/000000000000.jpg")
    assert dataset.key(23).endswith("test2017.zip:test2017/000000000007.jpg")
    loader, sampler = make_loader(dataset, batch_size=5, train=False, seed=0, num_workers=2)
    batches = list(loader)
    got = torch.cat([b[0] for b in batches])
    assert got.shape == (24, 3, 32, 32) and got.dtype == torch.uint8
    # Workers read the same bytes as the main process.
    order = torch.cat([b[1] for b in batches])
    for row, index in zip(got, order.tolist()):
        assert torch.equal(row, dataset.load(index))


def test_zip_bytes_equal_folder_bytes(tmp_path):
    paths = write_jpegs(tmp_path / "val2017", 3)
    with zipfile.ZipFile(tmp_path / "val2017.zip", "w") as zf:
        for p in paths:
            zf.write(p, f"val2017/{p.name}")
    folder, zipped = open_source(str(tmp_path / "val2017")), open_source(str(tmp_path / "val2017.zip"))
    assert [folder.read_bytes(i, 2**20) for i in range(3)] == [zipped.read_bytes(i, 2**20) for i in range(3)]


def test_bad_files_are_skipped_once_each_with_count(tmp_path):
    write_jpegs(tmp_path / "d", 4)
    (tmp_path / "d" / "empty.jpg").write_bytes(b"")
    good = (tmp_path / "d" / "000000000000.jpg").read_bytes()
    (tmp_path / "d" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "d" / "text.png").write_text("hello, not a png")
    dataset = build_dataset([str(tmp_path / "d")], DataConfig(image_size=16, views_per_image=2), train=True, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    images, indices, bad = collate(items)
    assert images.shape[0] == 8 and len(bad) == 6  # 3 bad files x 2 views
    log = BadFiles()
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        log.add(dataset, bad)
    assert len(log) == 3 and len(record) == 3  # one warning per file, not per view
    assert {k.rsplit("/", 1)[1] for k in log.reasons} == {"empty.jpg", "truncated.jpg", "text.png"}


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_sources([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no image files"):
        open_sources([str(tmp_path / "empty")])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"\xff\xd8 nothing")
    with pytest.raises(SourceError, match="none of its 1 files is a readable image"):
        build_dataset([str(tmp_path / "broken")], DataConfig(), train=True, seed=0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SourceError, match="neither a folder nor a zip"):
        open_sources([str(tmp_path / "file.txt")])
    with pytest.raises(SourceError, match="embedded:train or embedded:eval"):
        open_sources(["embedded:other"])


def test_embedded_photos_are_real_and_held_out():
    once = DataConfig(crop="center", views_per_image=1, eval_views_per_image=1)
    train = build_dataset(["embedded:train"], once, train=True, seed=0)
    held_out = build_dataset(["embedded:eval"], once, train=False, seed=0)
    assert len(train) == 6 and len(held_out) == 2
    assert not {train.key(i) for i in range(6)} & {held_out.key(i) for i in range(2)}
    x = train.load(0)
    assert x.shape == (3, 64, 64) and x.float().std() > 20  # a real photo, not a flat image


def test_random_crops_repeat_per_seed_epoch_and_vary_across_epochs():
    cfg = DataConfig(crop="random", views_per_image=4)
    a = build_dataset(["embedded:train"], cfg, train=True, seed=0)
    b = build_dataset(["embedded:train"], cfg, train=True, seed=0)
    assert torch.equal(a.load(5), b.load(5))
    assert not torch.equal(a.load(4), a.load(5))  # two views of one photo differ
    first = a.load(5)
    a.set_epoch(1)
    assert not torch.equal(first, a.load(5))
    ev = build_dataset(["embedded:eval"], DataConfig(crop="random", eval_views_per_image=3), train=False, seed=0)
    ev.set_epoch(7)  # held-out views do not move with the epoch
    assert torch.equal(ev.load(1), build_dataset(["embedded:eval"], ev.cfg, train=False, seed=0).load(1))


def test_views_kept_in_memory_are_filled_by_workers_and_skip_decoding_later(tmp_path, monkeypatch):
    write_jpegs(tmp_path / "photos", 12, seed=3)
    cfg = DataConfig(image_size=32, crop_size=64)
    uncached = build_dataset([str(tmp_path / "photos")], cfg, train=True, seed=0)
    expected = [uncached.load(i) for i in range(12)]
    dataset = build_dataset([str(tmp_path / "photos")], cfg, train=True, seed=0)
    assert dataset.keep_in_memory(12 * 3 * 32 * 32, shared=True)
    loader, sampler = make_loader(dataset, batch_size=4, train=True, seed=0, num_workers=2)
    first = list(loader)  # the workers decode, into memory the training process sees
    assert dataset.filled.all()
    monkeypatch.setattr(type(dataset.source.sources[0]), "read_bytes", lambda *a: pytest.fail("decoded again"))
    sampler.set_epoch(1)
    for images, indices, _ in [*first, *loader]:
        for image, index in zip(images, indices.tolist()):
            assert torch.equal(image, expected[index])


def test_views_that_change_or_do_not_fit_are_not_kept(tmp_path):
    write_jpegs(tmp_path / "photos", 4, seed=3)
    cfg = DataConfig(image_size=32, crop_size=64)
    folder = [str(tmp_path / "photos")]
    assert not build_dataset(folder, cfg, train=True, seed=0).keep_in_memory(4 * 3 * 32 * 32 - 1, shared=False)
    random_crops = DataConfig(image_size=32, crop="random")
    assert not build_dataset(folder, random_crops, train=True, seed=0).keep_in_memory(2**30, shared=False)
    # Held-out random crops are the same every epoch: kept.
    assert build_dataset(folder, random_crops, train=False, seed=0).keep_in_memory(2**30, shared=False)


def test_auto_views_are_random_crops_of_the_embedded_photos_and_one_centre_crop_elsewhere(tmp_path):
    write_jpegs(tmp_path / "photos", 5)
    embedded = build_dataset(["embedded:train"], DataConfig(), train=True, seed=0)
    held_out = build_dataset(["embedded:eval"], DataConfig(), train=False, seed=0)
    folder = build_dataset([str(tmp_path / "photos")], DataConfig(), train=True, seed=0)
    assert (embedded.cfg.crop, len(embedded), len(held_out)) == ("random", 6 * 128, 2 * 13)
    assert (folder.cfg.crop, folder.cfg.views_per_image, len(folder)) == ("center", 1, 5)
    explicit = build_dataset(["embedded:train"], DataConfig(crop="center", views_per_image=2), train=True, seed=0)
    assert (explicit.cfg.crop, len(explicit)) == ("center", 12)  # only "auto" is decided per source


@pytest.mark.parametrize("budget", [2**30, 1000])  # every photo kept; none (decoded per view, as before)
def test_random_crops_from_photos_kept_decoded_are_the_same_views(tmp_path, budget):
    write_jpegs(tmp_path / "jpegs", 2, seed=4, sizes=((640, 480),))  # reduced-scale decodes at several scales
    cfg = DataConfig(image_size=32, crop="random", views_per_image=6)
    sources = ["embedded:train", str(tmp_path / "jpegs")]  # PNG and JPEG photos
    plain = build_dataset(sources, cfg, train=True, seed=3)
    kept = build_dataset(sources, cfg, train=True, seed=3)
    assert kept.keep_decoded(budget) and kept.decoded is not None
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        kept.set_epoch(epoch)
        for i in range(len(plain)):
            assert torch.equal(plain.load(i), kept.load(i)), (epoch, i)
    assert (kept.decoded.used > 0) == (budget > 1000) and kept.decoded.used <= budget
    assert not build_dataset(sources, DataConfig(image_size=32), train=True, seed=3).keep_decoded(2**30)  # centre


@pytest.mark.parametrize("size, crop_size, side", [(64, "auto", 375), (256, "auto", 375), (512, "auto", 512),
                                                   (512, 300, 300), (64, 1000, 600)])
def test_the_default_centre_crop_is_never_upscaled(size, crop_size, side):
    """"auto": the seed's 375 px, or the image size when larger (a diffusers folder at its
    native 512 px); a set crop_size is kept; every crop is clipped to the shorter side."""
    from imgvae.data.decode import crop_box

    cfg = DataConfig(image_size=size, crop_size=crop_size, crop="center")
    assert crop_box(800, 600, cfg, None) == ((800 - side) // 2, (600 - side) // 2, side)
    x = preprocess(Image.new("RGB", (800, 600)), cfg)
    assert x.shape == (3, size, size)
