"""Box-aware augmentation: under every preset and many seeds, boxes stay inside the image with positive area, labels
and crowd flags stay in step with their boxes, and each box still covers the pixels of its object."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision import tv_tensors

from visiontune.detect.dataset import DetectionDataset, MosaicDataset
from visiontune.detect.transforms import PRESETS, detection_transforms

SIZE = 48


def _sample(gen: torch.Generator, n_boxes: int) -> tuple[tv_tensors.Image, dict]:
    """A black image with n white, non-overlapping rectangles; label k marks box k (its crowd flag: k % 3 == 0)."""
    h, w = (int(v) for v in torch.randint(40, 90, (2,), generator=gen))
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    boxes = []
    for _ in range(n_boxes):
        x0, y0 = int(torch.randint(0, w - 8, (1,), generator=gen)), int(torch.randint(0, h - 8, (1,), generator=gen))
        x1 = min(w, x0 + int(torch.randint(4, 30, (1,), generator=gen)))
        y1 = min(h, y0 + int(torch.randint(4, 30, (1,), generator=gen)))
        if any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes):
            continue
        image[:, y0:y1, x0:x1] = 255
        boxes.append((x0, y0, x1, y1))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.arange(len(boxes)),
        "iscrowd": torch.arange(len(boxes)) % 3 == 0,
        "image_id": 5,
        "orig_size": (h, w),
    }
    return tv_tensors.Image(image), target


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("preset", PRESETS)
def test_boxes_stay_valid_and_on_their_objects(preset, train):
    transform = detection_transforms(preset, SIZE, train=train)
    gen = torch.Generator().manual_seed(0)
    kept = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = _sample(gen, n_boxes=seed % 5)
        out, got = transform(image, target)
        h, w = out.shape[-2:]
        assert out.dtype == torch.float32 and max(h, w) == SIZE
        if not train or preset == "none":
            assert len(got["boxes"]) == len(target["boxes"])  # no augmentation drops nothing
        boxes = got["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and tuple(boxes.canvas_size) == (h, w)
        assert len(boxes) == len(got["labels"]) == len(got["iscrowd"])
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
        assert bool((boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all())
        assert bool(((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all())
        assert got["iscrowd"].tolist() == (got["labels"] % 3 == 0).tolist()  # each flag still with its box
        assert got["image_id"] == 5 and got["orig_size"] == target["orig_size"]
        for x0, y0, x1, y1 in boxes.tolist():  # the box centre is on its white rectangle (jitter keeps it bright)
            cx, cy = min(int((x0 + x1) / 2), w - 1), min(int((y0 + y1) / 2), h - 1)
            assert float(out[:, cy, cx].mean()) > 0.3, (preset, seed)
        kept += len(boxes)
    assert kept > 0


class _Generated(torch.utils.data.Dataset):
    rng = None  # MosaicDataset draws from torch's generator as the test seeds it

    def __init__(self, transform):
        self.transform = transform

    def item(self, i: int):
        return self[i]

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return self.transform(*_sample(torch.Generator().manual_seed(i), n_boxes=i % 4 + 1))


def test_mosaic_keeps_boxes_on_their_objects():
    mosaic = MosaicDataset(_Generated(detection_transforms("none", SIZE, train=True)), SIZE, p=1.0)
    kept = 0
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = mosaic[seed % 10]
        boxes = target["boxes"]
        assert image.shape == (3, SIZE, SIZE) and tuple(boxes.canvas_size) == (SIZE, SIZE)
        assert len(boxes) == len(target["labels"]) == len(target["iscrowd"]) and target["image_id"] == seed % 10
        assert bool((boxes >= 0).all() and (boxes <= SIZE).all())
        assert bool(((boxes[:, 2:] - boxes[:, :2]) >= 1).all())
        assert target["iscrowd"].tolist() == (target["labels"] % 3 == 0).tolist()
        for x0, y0, x1, y1 in boxes.tolist():  # inside its border (blurred by the resize) a box is all white
            assert bool((image[:, int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1] > 0.8).all()), seed
        kept += len(boxes)
    assert kept > 30


def test_flip_mirrors_boxes():
    transform = detection_transforms("light", 80, train=True, hflip=1.0)
    image, target = _sample(torch.Generator().manual_seed(1), 3)
    _, plain = detection_transforms("none", 80, train=True)(image, target)
    _, flipped = transform(image, target)
    w = plain["boxes"].canvas_size[1]
    mirrored = torch.stack([w - plain["boxes"][:, 2], plain["boxes"][:, 1], w - plain["boxes"][:, 0]], dim=1)
    assert torch.allclose(flipped["boxes"][:, :3], mirrored, atol=1e-4)


def test_pipeline_pickles_for_workers_and_runs_in_the_dataset(tmp_path):
    from visiontune.detect.data import read_boxes
    from visiontune.testing.detect_fixtures import write_detection_sets

    for preset in PRESETS:
        pickle.loads(pickle.dumps(detection_transforms(preset, 32, train=True)))
    data = read_boxes(str(write_detection_sets(tmp_path)["voc"]))
    ds = DetectionDataset(data, detection_transforms("strong", 32, train=True, hflip=0.5), 10**8)
    for i in range(len(ds)):
        image, target = ds[i]
        assert max(image.shape[-2:]) == 32 and len(target["boxes"]) == len(target["labels"])


def test_unknown_preset_refused():
    with pytest.raises(ValueError, match="none"):
        detection_transforms("wild", 32, train=True)
