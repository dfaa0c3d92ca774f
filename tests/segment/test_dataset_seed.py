"""A segmentation training set augments item i of epoch e the same way in any dataset copy, worker or order (what a
resumed run needs to see what the uninterrupted run saw), and leaves the training process's random stream alone."""

from __future__ import annotations

import pytest
import torch

from visiontune.segment.data import read_masks
from visiontune.segment.dataset import SegmentationDataset
from visiontune.segment.transforms import segmentation_transforms
from visiontune.testing.segment_fixtures import write_segmentation_sets


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    folder = write_segmentation_sets(tmp_path_factory.mktemp("masks"))["ids"]
    return read_masks(str(folder), "train", None)


def _dataset(masks, seed: int | None = 7) -> SegmentationDataset:
    return SegmentationDataset(masks, segmentation_transforms("strong", 32, train=True), 10**8, seed=seed)


def _items(dataset, order) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: tuple(t.as_subclass(torch.Tensor) for t in dataset[i]) for i in order}


def test_item_and_epoch_decide_the_augmentation(masks):
    n = len(masks)
    first, second = _dataset(masks), _dataset(masks)
    forward = _items(first, range(n))
    torch.manual_seed(123)  # whatever the process's stream holds
    backward = _items(second, reversed(range(n)))
    for i in range(n):
        assert torch.equal(forward[i][0], backward[i][0]) and torch.equal(forward[i][1], backward[i][1])
    second.set_epoch(1)
    later = _items(second, range(n))
    assert any(not torch.equal(forward[i][0], later[i][0]) for i in range(n))


def test_the_training_stream_does_not_move(masks):
    dataset = _dataset(masks)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _items(dataset, range(len(masks)))
    assert torch.equal(torch.rand(3), expected)


def test_a_loader_with_workers_gives_the_same_items(masks):
    dataset = _dataset(masks)
    direct = _items(dataset, range(len(masks)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, shuffle=False)
    for i, (image, mask) in enumerate(loader):
        assert torch.equal(image.as_subclass(torch.Tensor), direct[i][0])
        assert torch.equal(mask.as_subclass(torch.Tensor), direct[i][1])
