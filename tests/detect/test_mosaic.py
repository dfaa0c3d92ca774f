"""Mosaic (`data.augment.mosaic`) and per-item seeded augmentation of the detection training set: boxes and instance
masks stay exactly on their objects' pixels in a mosaic; the recipe keys are refused where they act on nothing;
`mosaic_off_epochs` turns mosaic off for the last epochs; item i of epoch e is augmented alike by any dataset
instance, in any order, by any number of loader workers, without moving the training process's RNG."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision import tv_tensors

from visiontune.core.dataset import EpochSeed
from visiontune.core.errors import RecipeError
from visiontune.detect.data import read_boxes
from visiontune.detect.dataset import CloseMosaic, DetectionDataset, MosaicDataset, detection_collate
from visiontune.detect.task import training_set
from visiontune.detect.transforms import detection_transforms
from visiontune.recipe import parse_config
from visiontune.testing.detect_fixtures import write_detection_sets, write_instance_sets

SIZE = 48


class _Painted(torch.utils.data.Dataset):
    """Duck-typed DetectionDataset: item j is a black image (at most SIZE a side, so no resize blurs it) with
    non-overlapping rectangles and their masks. Each object drawn gets a new id o (a mosaic may show an item twice):
    its label, painted (o % 250 + 1) / 256 in channel 0 and 1.0 in channel 1, crowd when o % 3 == 0; `drawn[o]` is
    its whole box."""

    def __init__(self, n: int = 12, seed: int = 0):
        self.n, self.rng, self.drawn = n, EpochSeed(seed), {}

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.rng.set_epoch(epoch)

    def item(self, j: int) -> tuple[tv_tensors.Image, dict]:
        gen = torch.Generator().manual_seed(j)
        h, w = (int(v) for v in torch.randint(20, SIZE + 1, (2,), generator=gen))
        image, boxes, masks = torch.zeros(3, h, w), [], []
        for _ in range(3):
            x0, y0 = (
                int(torch.randint(0, w - 6, (1,), generator=gen)),
                int(torch.randint(0, h - 6, (1,), generator=gen)),
            )
            x1 = min(w, x0 + int(torch.randint(3, 20, (1,), generator=gen)))
            y1 = min(h, y0 + int(torch.randint(3, 20, (1,), generator=gen)))
            if any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes):
                continue
            boxes.append((x0, y0, x1, y1))
            mask = torch.zeros(h, w, dtype=torch.uint8)
            mask[y0:y1, x0:x1] = 1
            masks.append(mask)
        labels = torch.arange(len(boxes), dtype=torch.long) + len(self.drawn)
        for (x0, y0, x1, y1), o in zip(boxes, labels.tolist(), strict=True):
            image[0, y0:y1, x0:x1], image[1, y0:y1, x0:x1] = (o % 250 + 1) / 256, 1.0
            self.drawn[o] = (x0, y0, x1, y1)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
            ),
            "labels": labels,
            "iscrowd": labels % 3 == 0,
            "image_id": j,
            "orig_size": (h, w),
            "masks": tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)),
        }
        return tv_tensors.Image(image), target

    def __getitem__(self, j: int):
        with self.rng.fixed(j):
            return self.item(j)


def _pixels(image: torch.Tensor, o: int) -> torch.Tensor:
    """Where object o's paint shows in a mosaic (the grey canvas is 0.45 in channel 1, objects 1.0)."""
    return (image[1] == 1.0) & ((image[0] * 256).round() == o % 250 + 1)


def _extent(where: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(where, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_mosaic_boxes_and_masks_stay_exactly_on_their_objects():
    data = _Painted()
    mosaic = MosaicDataset(data, SIZE, p=1.0)
    kept = dropped = 0
    for epoch in range(6):
        data.set_epoch(epoch)
        for i in range(len(data)):
            first = len(data.drawn)
            image, target = mosaic[i]
            assert image.shape == (3, SIZE, SIZE) and target["orig_size"] == (SIZE, SIZE) and target["image_id"] == i
            boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
            assert tuple(boxes.canvas_size) == (SIZE, SIZE) and masks.shape == (len(boxes), SIZE, SIZE)
            assert len(labels) == len(target["iscrowd"]) == len(boxes) and len(set(labels.tolist())) == len(labels)
            assert target["iscrowd"].tolist() == (labels % 3 == 0).tolist()  # flags in step with their boxes
            for box, o, mask in zip(boxes.tolist(), labels.tolist(), masks, strict=True):
                seen = _pixels(image, o)
                assert seen.any(), (epoch, i, o)
                assert box == _extent(seen), (epoch, i, o)  # the box is exactly the object's visible pixels
                assert torch.equal(mask.bool(), seen), (epoch, i, o)  # so is its mask
            shown = {o for o in range(first, len(data.drawn)) if _pixels(image, o).any()}
            for o in shown - set(labels.tolist()):  # an object left out shows under MIN_VISIBLE of itself
                x0, y0, x1, y1 = data.drawn[o]
                assert int(_pixels(image, o).sum()) < 0.25 * (x1 - x0) * (y1 - y0)
                dropped += 1
            kept += len(boxes)
    assert kept > 100 and dropped > 0


def test_mosaic_masks_of_a_real_instance_set_stay_on_their_boxes(tmp_path):
    """Through the real pipeline (decode, light augmentation, resize): each mask's extent is its box's, within the
    resize's rounding that the plain augmentation has too (tests/detect/test_masks.py allows the same)."""
    data = read_boxes(str(write_instance_sets(tmp_path)["coco-train"]), masks=True)
    plain = DetectionDataset(data, detection_transforms("light", SIZE, train=True), 10**8, seed=3)
    mosaic = MosaicDataset(plain, SIZE, p=1.0)
    images, targets = detection_collate([mosaic[i] for i in range(len(mosaic))])
    kept = 0
    for image, t in zip(images, targets, strict=True):
        assert image.shape == (3, SIZE, SIZE) and t["masks"].shape[0] == len(t["boxes"]) == len(t["labels"])
        for box, mask in zip(t["boxes"].tolist(), t["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            shown = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert max(abs(a - b) for a, b in zip(shown, box, strict=True)) <= 1.5, (shown, box)
            kept += 1
    assert kept >= len(mosaic)


def _recipe(**augment) -> dict:
    return {
        "task": "detect",
        "model": "builtin:efficientnet-lite0",
        "output_dir": "out",
        "data": {"train": "coco.json", "augment": augment},
    }


@pytest.mark.parametrize(
    ("augment", "named"),
    [
        ({"preset": "none", "mosaic": 0.5}, "data.augment.mosaic acts only with data.augment.preset light or strong"),
        ({"mosaic_off_epochs": 2}, "data.augment.mosaic_off_epochs acts only with data.augment.mosaic above 0"),
    ],
)
def test_mosaic_keys_are_refused_where_they_act_on_nothing(augment, named):
    with pytest.raises(RecipeError) as err:
        parse_config(_recipe(**augment))
    assert named in str(err.value) and len(str(err.value).strip().splitlines()) == 1


def test_recipe_keys_build_the_mosaic_and_its_closing(tmp_path):
    data = read_boxes(str(write_detection_sets(tmp_path)["coco-train"]))
    cfg = parse_config(_recipe(mosaic=0.7, mosaic_off_epochs=2))
    dataset, callbacks = training_set(cfg, data, 64)
    assert isinstance(dataset, MosaicDataset) and dataset.p == 0.7 and dataset.dataset.rng.seed == cfg.seed
    (closing,) = [c for c in callbacks if isinstance(c, CloseMosaic)]
    assert closing.epochs == 2 and closing.dataset is dataset
    dataset, callbacks = training_set(parse_config(_recipe()), data, 64)  # mosaic 0: the plain set, no closing
    assert isinstance(dataset, DetectionDataset) and not any(isinstance(c, CloseMosaic) for c in callbacks)


def test_mosaic_is_off_for_the_last_epochs(monkeypatch):
    mosaic = MosaicDataset(_Painted(), SIZE, p=1.0)
    made = []
    original = MosaicDataset._mosaic
    monkeypatch.setattr(MosaicDataset, "_mosaic", lambda self, i: made.append(i) or original(self, i))
    closing = CloseMosaic(mosaic, epochs=2)
    per_epoch = []
    for epoch in range(5):
        closing.on_epoch_begin(None, SimpleNamespace(epoch=float(epoch), num_train_epochs=5), None)
        made.clear()
        _ = [mosaic[i] for i in range(4)]
        per_epoch.append(len(made))
    assert per_epoch == [4, 4, 4, 0, 0]


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> Path:
    return write_detection_sets(tmp_path_factory.mktemp("boxes"))["coco-train"]


def _training_set(boxes: Path, mosaic: float) -> torch.utils.data.Dataset:
    data = read_boxes(str(boxes))
    plain = DetectionDataset(data, detection_transforms("strong", 40, train=True), 10**8, seed=7)
    return MosaicDataset(plain, 40, mosaic) if mosaic else plain


def _equal(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


@pytest.mark.parametrize("mosaic", [0.0, 0.5])
def test_an_item_is_augmented_alike_by_any_instance_order_and_worker_count(boxes, mosaic):
    first, second = _training_set(boxes, mosaic), _training_set(boxes, mosaic)
    first.set_epoch(1), second.set_epoch(1)
    state = torch.get_rng_state()
    forward = [first[i] for i in range(len(first))]
    assert torch.equal(torch.get_rng_state(), state)  # the training process's stream did not move
    backward = [second[i] for i in reversed(range(len(second)))][::-1]
    assert all(_equal(a, b) for a, b in zip(forward, backward, strict=True))
    loader = torch.utils.data.DataLoader(second, batch_size=3, num_workers=2, collate_fn=detection_collate)
    images = [image for batch_images, _ in loader for image in batch_images]
    assert all(torch.equal(a[0], b) for a, b in zip(forward, images, strict=True))
    second.set_epoch(2)  # another epoch, other augmentations
    assert not all(_equal(a, second[i]) for i, a in enumerate(forward))


def test_maskrcnn_trains_on_mosaic_masks(fixtures_dir, tmp_path, monkeypatch):
    """detector maskrcnn with mosaic: the task's training set gives mosaic items with masks in step with their boxes,
    which Mask R-CNN takes as mask targets (its mask loss has a gradient on the mask head)."""
    from torchvision.models.detection import roi_heads

    from visiontune.detect.task import DetectTask

    sets = write_instance_sets(tmp_path / "instances")
    recipe = {
        "task": "detect",
        "model": f"timm:local-dir:{fixtures_dir / 'timm-cnn'}",
        "detector": "maskrcnn",
        "fpn_channels": 32,
        "output_dir": str(tmp_path / "run"),
        "data": {
            "train": str(sets["coco-train"]),
            "val": str(sets["coco-val"]),
            "image_size": 64,
            "augment": {"preset": "light", "mosaic": 1.0},
            "workers": 0,
        },
    }
    cfg = parse_config(recipe)
    task = DetectTask()
    fit = task.build(cfg, task.prepare(cfg), tmp_path / "run")
    assert isinstance(fit.train_dataset, MosaicDataset)
    batch = fit.collator([fit.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape[-2:] == (64, 64)
    for t in batch["targets"]:
        assert t["masks"].shape == (len(t["boxes"]), 64, 64) and t["masks"].dtype == torch.uint8
    seen = []
    original = roi_heads.maskrcnn_loss
    monkeypatch.setattr(roi_heads, "maskrcnn_loss", lambda *a: seen.append(a[2]) or original(*a))
    out = fit.model.train()(**batch)
    assert [len(m) for m in seen[0]] == [int((~t["iscrowd"]).sum()) for t in batch["targets"]]
    out["loss"].backward()
    head = fit.model.net.roi_heads.mask_predictor.mask_fcn_logits.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
