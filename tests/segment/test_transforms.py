"""Mask-aware augmentation: under every preset and many seeds, each class stays on its own pixels (the mask moves
with the image), resizing never invents a class id (nearest for masks), crops pad masks with the ignore index, and
every item ends square at image_size so batches stack."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from visiontune.segment.dataset import segmentation_collate
from visiontune.segment.transforms import PRESETS, segmentation_transforms

SIZE = 48
IGNORE = 255
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}  # class 0 is the grey background; ignore is white


@pytest.fixture(autouse=True)
def one_thread():
    """As in a DataLoader worker: on tiny images torch's intra-op threads cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample(gen: torch.Generator) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A grey image of random size with a rectangle of each class (pure red / green / blue) and an ignore (white)
    one, possibly overlapping (painted in order, the mask with the pixels)."""
    h, w = (int(v) for v in torch.randint(40, 100, (2,), generator=gen))
    image = torch.full((3, h, w), 128, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.int64)
    for label in (1, 2, 3, IGNORE):
        bw, bh = (int(torch.randint(12, max(13, s // 2), (1,), generator=gen)) for s in (w, h))
        x0, y0 = (
            int(torch.randint(0, w - bw + 1, (1,), generator=gen)),
            int(torch.randint(0, h - bh + 1, (1,), generator=gen)),
        )
        colour = COLOURS.get(label, (255, 255, 255))
        image[:, y0 : y0 + bh, x0 : x0 + bw] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
        mask[y0 : y0 + bh, x0 : x0 + bw] = label
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _colour_class(image: torch.Tensor) -> torch.Tensor:
    """The class each pixel's colour says (colour jitter keeps the dominant channel): 1-3 for a clearly dominant
    red / green / blue, 0 for grey, -1 for anything else (a blend at an edge)."""
    top2 = image.topk(2, dim=0).values
    out = torch.full(image.shape[1:], -1, dtype=torch.int64)
    out[(top2[0] - top2[1]) > 0.15] = image.argmax(dim=0)[(top2[0] - top2[1]) > 0.15] + 1
    out[(image.max(dim=0).values - image.min(dim=0).values) < 0.03] = 0
    return out


def _interior(mask: torch.Tensor, r: int = 2) -> torch.Tensor:
    """Pixels whose (2r + 1)^2 neighbourhood holds one mask value: away from edges that resampling blends."""
    padded = torch.nn.functional.pad(mask[None, None].float(), (r, r, r, r), value=-1)[0, 0]
    h, w = mask.shape
    same = torch.ones_like(mask, dtype=torch.bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            same &= padded[dy : dy + h, dx : dx + w] == mask
    return same


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("preset", PRESETS)
def test_masks_stay_on_their_pixels(preset, train):
    transform = segmentation_transforms(preset, SIZE, train=train, ignore_index=IGNORE)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, mask = _sample(gen)
        out, got = transform(image, mask)
        assert isinstance(out, tv_tensors.Image) and isinstance(got, tv_tensors.Mask)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32 and got.shape == (SIZE, SIZE)
        assert 0 <= float(out.min()) and float(out.max()) <= 1 and got.dtype == torch.int64
        assert set(got.unique().tolist()) <= {0, 1, 2, 3, IGNORE}  # nearest: no id between two others
        got = got.as_subclass(torch.Tensor)
        inside = _interior(got) & (got != IGNORE)
        colours = _colour_class(out.as_subclass(torch.Tensor))
        assert torch.equal(colours[inside], got[inside]), (preset, train, seed)
        checked += int(inside.sum())
    assert checked > 40 * SIZE * SIZE * 0.3  # most pixels were compared, not just a few


def test_crop_padding_is_ignore_in_the_mask():
    """Strong's scale jitter at 0.5 leaves the image smaller than the crop: exactly the padded (black) pixels are
    ignore in the mask. Colour jitter is taken out so black stays black."""
    transform = segmentation_transforms("strong", SIZE, train=True, ignore_index=IGNORE)
    transform.transforms = [t for t in transform.transforms if not isinstance(t, v2.ColorJitter)]
    transform.transforms[1].scale_range = (0.5, 0.5)
    gen = torch.Generator().manual_seed(4)
    for seed in range(10):
        torch.manual_seed(seed)
        image, mask = _sample(gen)
        mask[mask == IGNORE] = 0  # no ignore pixels of its own
        out, got = transform(image, mask)
        black = (out == 0).all(dim=0)
        assert black.any() and torch.equal(black, got.as_subclass(torch.Tensor) == IGNORE)


def test_eval_is_deterministic_and_pipelines_pickle():
    image, mask = _sample(torch.Generator().manual_seed(1))
    transform = segmentation_transforms("strong", SIZE, train=False)
    first, again = transform(image, mask), transform(image, mask)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for preset in PRESETS:  # DataLoader workers receive the pipeline pickled
        pickle.loads(pickle.dumps(segmentation_transforms(preset, SIZE, train=True)))
    with pytest.raises(ValueError, match="unknown augment preset"):
        segmentation_transforms("heavy", SIZE, train=True)


def test_no_flip_when_hflip_is_zero():
    image, mask = _sample(torch.Generator().manual_seed(2))
    transform = segmentation_transforms("none", SIZE, train=True, hflip=0.0)
    reference = transform(image, mask)[1]
    light = segmentation_transforms("light", SIZE, train=True, hflip=0.0)
    light.transforms[1].scale = (1.0, 1.0)  # a whole-image crop: only a flip could move the mask now
    light.transforms[1].ratio = (mask.shape[1] / mask.shape[0],) * 2
    for seed in range(10):
        torch.manual_seed(seed)
        assert torch.equal(light(image, mask)[1], reference)


def test_collate_stacks_and_refuses_mixed_sizes():
    gen = torch.Generator().manual_seed(3)
    transform = segmentation_transforms("light", SIZE, train=True)
    batch = segmentation_collate([transform(*_sample(gen)) for _ in range(3)])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["labels"].shape == (3, SIZE, SIZE)
    assert type(batch["labels"]) is torch.Tensor and batch["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="mixes image sizes"):
        segmentation_collate([_sample(gen), _sample(gen)])
