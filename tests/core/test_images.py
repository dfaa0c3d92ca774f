"""Image decoding (every PIL mode -> 8-bit RGB, EXIF rotation, bad files) and the image -> tensor pipeline
(dataset, transforms, mixup, collator). All images are generated here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.core.dataset import Collator, ImageClassificationDataset
from visiontune.core.errors import DataError
from visiontune.core.images import BadImage, check_image, open_image, to_rgb
from visiontune.core.readers import LabeledImages
from visiontune.core.transforms import Preprocess, batch_mixer, eval_transform, train_transform

CAP = 10_000_000


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr.astype(int)


def _noise_png(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    return _save(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), path)


def _noise_jpeg(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(1)
    return _save(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), path, quality=90)


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------- modes -> RGB


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    gray = np.array([[0, 50], [128, 255]], dtype=np.uint8)
    path = _save(Image.fromarray(gray, mode="L"), tmp_path / "g.png")
    out = _pixels(open_image(path, CAP))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    path = _save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png")
    out = _pixels(open_image(path, CAP))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent red -> the white background, not red/black
    assert out[0, 1].tolist() == [0, 0, 255]  # opaque blue stays blue
    assert np.all(np.abs(out[0, 2] - 127) <= 1)  # half-transparent black over white -> mid grey


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (768 - 9))
    for x in range(3):
        img.putpixel((x, 0), x)
    return img


def test_palette_without_transparency_uses_palette_colours(tmp_path):
    path = _save(_palette_image(), tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    out = _pixels(open_image(path, CAP))
    assert out[0].tolist() == [[10, 20, 30], [200, 100, 50], [0, 255, 0]]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency_is_composited_on_white(tmp_path, fmt):
    path = _save(_palette_image(), tmp_path / f"p.{fmt}", transparency=1)
    with Image.open(path) as src:
        assert src.mode == "P" and src.info.get("transparency") == 1
    out = _pixels(open_image(path, CAP))
    assert out[0].tolist() == [[10, 20, 30], [255, 255, 255], [0, 255, 0]]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)  # pure red
    with Image.open(path) as src:
        assert src.mode == "CMYK"
    for draft in (None, 8):
        out = _pixels(open_image(path, CAP, draft_size=draft))
        assert np.all(np.abs(out - [255, 0, 0]) <= 8), out[0, 0]


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 65535], [32768, 257 * 100]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as src:
        assert src.mode == "I;16"
    out = _pixels(open_image(path, CAP))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]  # clipping would give 255 for everything above 255
    assert abs(out[1, 0, 0] - 127) <= 1
    assert abs(out[1, 1, 0] - 100) <= 1


def test_flat_16bit_image_keeps_its_level(tmp_path):
    path = _save(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), tmp_path / "white16.png")
    assert _pixels(open_image(path, CAP)).min() == 255  # white must not turn black


def test_float_image_is_rescaled():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert img.mode == "F"
    out = _pixels(to_rgb(img))
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 255 and abs(out[0, 1, 0] - 127) <= 1


def test_1bit_image_becomes_black_and_white(tmp_path):
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    path = _save(img, tmp_path / "b.png")
    with Image.open(path) as src:
        assert src.mode == "1"
    assert _pixels(open_image(path, CAP))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("mode", ["RGBX", "YCbCr", "RGBa", "LAB", "HSV"])
def test_other_colour_modes_become_8bit_rgb(mode):
    img = Image.new("RGB", (3, 2), (200, 10, 10)).convert(mode)
    out = _pixels(to_rgb(img))
    assert out.shape == (2, 3, 3)
    assert np.all(np.abs(out - [200, 10, 10]) <= 6)


@pytest.mark.parametrize("mode", ["LA", "La"])
def test_grey_with_alpha_is_composited_on_white(mode):
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (0, 255))
    out = _pixels(to_rgb(img.convert(mode)))
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_alpha_is_composited_on_white():
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 255, 255))
    assert _pixels(to_rgb(img.convert("PA")))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = open_image(path, CAP)
    assert out.size == (20, 40)  # width and height swapped
    arr = _pixels(out)
    assert np.all(np.abs(arr[4, 15] - [255, 0, 0]) <= 20)  # marker now top-right
    assert np.all(arr[4, 4] <= 20) and np.all(arr[35, 15] <= 20)  # not left where it was, not bottom-right


def test_open_image_accepts_bytes_and_pil_images():
    buf = io.BytesIO()
    Image.new("L", (5, 3), 77).save(buf, format="PNG")
    from_bytes = _pixels(open_image(buf.getvalue(), CAP))
    from_pil = _pixels(open_image(Image.new("L", (5, 3), 77), CAP))
    assert from_bytes.shape == (3, 5, 3) and np.all(from_bytes == 77) and np.all(from_pil == 77)


def test_draft_size_decodes_big_jpegs_smaller(tmp_path):
    path = _save(Image.new("RGB", (256, 256), (0, 128, 255)), tmp_path / "big.jpg", quality=95)
    assert open_image(path, CAP).size == (256, 256)
    small = open_image(path, CAP, draft_size=64)
    assert 64 <= small.size[0] < 256 and small.size[0] == small.size[1]
    assert np.all(np.abs(_pixels(small)[10, 10] - [0, 128, 255]) <= 6)


# ---------------------------------------------------------------- bad files


def _reason(fn, *args) -> str:
    with pytest.raises(BadImage) as info:
        fn(*args)
    reason = str(info.value)
    assert reason
    return reason


@pytest.mark.parametrize("fn", [open_image, check_image])
def test_corrupt_file(tmp_path, fn):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "cannot identify image file" in _reason(fn, path, CAP)


@pytest.mark.parametrize("fn", [open_image, check_image])
def test_truncated_png(tmp_path, fn):
    path = _cut_in_half(_noise_png(tmp_path / "t.png"))
    assert "truncated" in _reason(fn, path, CAP).lower()


@pytest.mark.parametrize("fn", [open_image, check_image])
def test_truncated_jpeg(tmp_path, fn):
    path = _cut_in_half(_noise_jpeg(tmp_path / "t.jpg"))
    assert "truncated" in _reason(fn, path, CAP).lower()


@pytest.mark.parametrize("fn", [open_image, check_image])
def test_missing_file(tmp_path, fn):
    assert _reason(fn, tmp_path / "nope.png", CAP) == "file not found"


@pytest.mark.parametrize("fn", [open_image, check_image])
def test_zero_byte_file(tmp_path, fn):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "cannot identify image file" in _reason(fn, path, CAP)


def test_zero_size_image():
    assert _reason(open_image, Image.new("RGB", (0, 4)), CAP) == "has zero width or height"


@pytest.mark.parametrize("fn", [open_image, check_image])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, fn):
    # Truncated as well: if the cap were checked after decoding, the reason would be the truncation.
    path = _cut_in_half(_noise_png(tmp_path / "bomb.png", size=64))
    reason = _reason(fn, path, 1000)
    assert "64x64 = 4,096 pixels" in reason and "data.max_image_pixels cap of 1,000" in reason
    assert _pixels(open_image(_noise_png(tmp_path / "ok.png", size=31), 1000)).shape == (31, 31, 3)  # 961 <= cap


def test_good_files_pass_check_image(tmp_path):
    check_image(_noise_png(tmp_path / "a.png"), CAP)
    check_image(_noise_jpeg(tmp_path / "a.jpg"), CAP)


# ---------------------------------------------------------------- dataset, transforms, mixup, collator

PRE = Preprocess(32, (0.5,) * 3, (0.5,) * 3)


def test_eval_transform_normalises_to_minus_one_one():
    tf = eval_transform(PRE)
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    img.paste((0, 0, 0), (0, 0, 50, 20))
    x = tf(img)
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 0, 16], torch.tensor([-1.0, -1.0, -1.0]))  # black top half
    assert torch.allclose(x[:, -1, 16], torch.tensor([1.0, -1.0, -1.0]))  # red bottom half
    assert torch.allclose(tf(Image.new("RGB", (40, 50), (255, 255, 255))), torch.ones(3, 32, 32))


@pytest.mark.parametrize("preset", ["none", "light", "strong"])
def test_train_transform_shapes_and_range(preset):
    torch.manual_seed(0)
    tf = train_transform(PRE, preset=preset)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = tf(Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)))
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5
        assert x.min() < -0.2 and x.max() > 0.2  # really normalised, not left in [0, 1]


def _file_dataset(tmp_path) -> LabeledImages:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    paths = [_save(Image.new("RGB", (40, 36), c), tmp_path / f"{i}.png") for i, c in enumerate(colours)]
    return LabeledImages(paths, [0, 1, 2, 3], ["r", "g", "b", "w"], str(tmp_path))


def test_dataset_items_and_collator(tmp_path):
    ds = ImageClassificationDataset(_file_dataset(tmp_path), eval_transform(PRE), CAP)
    assert len(ds) == 4
    item = ds[1]
    assert item["labels"] == 1
    assert torch.allclose(item["pixel_values"][:, 5, 5], torch.tensor([-1.0, 1.0, -1.0]))
    batch = Collator()([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["pixel_values"][2], ds[2]["pixel_values"])


def test_dataset_over_arrays_gives_rgb_tensors():
    arrays = np.stack([np.full((8, 8), 0, np.uint8), np.full((8, 8), 255, np.uint8)])
    ds = ImageClassificationDataset(LabeledImages(arrays, [0, 1], ["a", "b"], "mem", "array"), eval_transform(PRE), CAP)
    assert torch.allclose(ds[0]["pixel_values"], -torch.ones(3, 32, 32))
    assert torch.allclose(ds[1]["pixel_values"], torch.ones(3, 32, 32))


def test_dataset_bad_file_raises_data_error_naming_it(tmp_path):
    data = _file_dataset(tmp_path)
    _cut_in_half(Path(data.items[2]))
    ds = ImageClassificationDataset(data, eval_transform(PRE), CAP)
    with pytest.raises(DataError) as info:
        ds[2]
    assert str(data.items[2]) in str(info.value) and "data.on_bad_sample=skip" in str(info.value)


def test_mixup_gives_soft_labels_that_sum_to_one(tmp_path):
    torch.manual_seed(0)
    mixer = batch_mixer(4, preset="none", mixup=0.4)
    assert mixer is not None
    ds = ImageClassificationDataset(_file_dataset(tmp_path), eval_transform(PRE), CAP)
    samples = [ds[i] for i in range(4)]
    batch = Collator(mixer)(samples)
    labels, pixels = batch["labels"], batch["pixel_values"]
    assert labels.shape == (4, 4) and labels.dtype.is_floating_point
    torch.testing.assert_close(labels.sum(1), torch.ones(4))
    assert labels.min() >= 0
    lam = labels[0, 0].item()
    assert 0 < lam < 1  # genuinely mixed
    for i in range(4):  # MixUp blends each sample with its neighbour in the batch; labels follow the pixels
        assert labels[i, i].item() == pytest.approx(lam)
        assert labels[i, (i - 1) % 4].item() == pytest.approx(1 - lam)
        expected = lam * samples[i]["pixel_values"] + (1 - lam) * samples[(i - 1) % 4]["pixel_values"]
        torch.testing.assert_close(pixels[i], expected)


def test_batch_mixer_presets():
    assert batch_mixer(3, preset="light") is None
    assert batch_mixer(3, preset="strong", mixup=0.0, cutmix=0.0) is None
    torch.manual_seed(1)
    mixer = batch_mixer(3, preset="strong")  # mixup or cutmix, chosen per batch
    for _ in range(4):
        _, labels = mixer(torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
        assert labels.shape == (6, 3)
        torch.testing.assert_close(labels.sum(1), torch.ones(6))


# ---------------------------------------------------------------- the check decodes what training decodes


@pytest.mark.parametrize("suffix", [".gif", ".bmp", ".tif", ".ppm", ".webp"])
def test_truncated_files_of_every_format_fail_the_check(tmp_path, suffix):
    # verify() passes all of these; only a full decode, as training does, finds the missing pixels.
    path = _cut_in_half(_noise_png(tmp_path / f"t{suffix}"))
    reason = _reason(check_image, path, CAP)
    assert reason.startswith("is corrupt or not an image (")
    assert reason == _reason(open_image, path, CAP).replace("cannot be decoded", "is corrupt or not an image")


def test_truncated_files_are_skipped_up_front_not_mid_training(tmp_path):
    from visiontune.core.check import clean

    colours = {".gif": (255, 0, 0), ".bmp": (0, 255, 0), ".tif": (0, 0, 255), ".ppm": (9, 9, 9)}
    paths = [_cut_in_half(_noise_png(tmp_path / f"bad{s}")) for s in colours]
    paths += [_save(Image.new("RGB", (40, 36), c), tmp_path / f"good{s}") for s, c in colours.items()]
    data = LabeledImages(paths, [0] * 8, ["x"], str(tmp_path))
    kept, bad = clean(data, "skip", CAP, "train")
    assert sorted(b.ref for b in bad) == sorted(str(p) for p in paths[:4])
    ds = ImageClassificationDataset(kept, eval_transform(PRE), CAP)
    assert [ds[i]["labels"] for i in range(len(ds))] == [0] * 4  # every kept file decodes


def test_jpeg_with_bytes_after_its_end_marker_passes(tmp_path):
    path = _noise_jpeg(tmp_path / "trailer.jpg")
    path.write_bytes(path.read_bytes() + b"\x00" * 500)  # phones append data after the image (motion photos)
    check_image(path, CAP)
    assert open_image(path, CAP).size == (64, 64)


def test_bad_sample_under_dataloader_workers_is_one_short_sentence(tmp_path):
    from visiontune.core.dataset import SampleError

    data = _file_dataset(tmp_path)
    _cut_in_half(Path(data.items[2]))
    ds = ImageClassificationDataset(data, eval_transform(PRE), CAP)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=Collator())
    with pytest.raises(SampleError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{data.items[2]} cannot be decoded (image file is truncated")
    assert message.endswith("; fix or remove it (data.on_bad_sample=skip drops bad samples).")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert isinstance(info.value, DataError) and info.value.__cause__ is None
