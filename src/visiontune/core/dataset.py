"""torch Dataset over `LabeledImages`, the seeded stratified split, and the batch collator."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from transformers import TrainerCallback

from visiontune.core.check import hf_image
from visiontune.core.errors import DataError, SampleError
from visiontune.core.identity import duplicates, groups, identify_sets, refuse_shared
from visiontune.core.images import BadImage, open_image
from visiontune.core.readers import LabeledImages


class EpochSeed:
    """Per-sample randomness that depends only on (seed, epoch, sample index), not on which loader worker draws the
    sample nor on how many it drew before: a resumed run, whose fresh workers skip what was already trained,
    then augments every sample as the uninterrupted run did. The epoch lives in shared memory, because persistent
    workers keep the copy of the dataset made at the first epoch and must still see each new epoch."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    @contextlib.contextmanager
    def fixed(self, index: int) -> Iterator[None]:
        """torch's CPU generator (which torchvision's random transforms draw from) seeded for this sample, and
        restored after: with no workers the transform runs in the training process, whose stream must not move."""
        state = torch.get_rng_state()
        sample_seed = np.random.SeedSequence([self.seed, int(self.epoch), index]).generate_state(1)[0]
        torch.default_generator.manual_seed(int(sample_seed))
        try:
            yield
        finally:
            torch.set_rng_state(state)


class SetEpoch(TrainerCallback):
    """Tells a dataset which epoch starts (from the Trainer's state, so also when resuming mid-epoch). A callback,
    not accelerate's `set_epoch` forwarding, which skips the dataset when the sampler has its own `set_epoch`."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class ImageClassificationDataset(torch.utils.data.Dataset):
    """`seed` (training): random transforms draw per sample from `EpochSeed`; call `set_epoch` (`SetEpoch`)."""

    def __init__(
        self,
        data: LabeledImages,
        transform: Callable,
        max_pixels: int,
        draft_size: int | None = None,
        seed: int | None = None,
    ):
        self.data, self.transform, self.max_pixels, self.draft_size = data, transform, max_pixels, draft_size
        self.rng = EpochSeed(seed) if seed is not None else None

    def set_epoch(self, epoch: int) -> None:
        if self.rng is not None:
            self.rng.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int) -> Image.Image:
        d = self.data
        if d.kind == "array":
            return Image.fromarray(d.items[i]).convert("RGB")
        try:
            source = d.items[i] if d.kind == "file" else hf_image(d, i)
            return open_image(source, self.max_pixels, self.draft_size)
        except BadImage as err:
            hint = "fix or remove it (data.on_bad_sample=skip drops bad samples)"
            raise SampleError(f"{d.ref(i)} {err}; {hint}.") from None

    def __getitem__(self, i: int) -> dict:
        image = self.load(i)
        with self.rng.fixed(i) if self.rng is not None else contextlib.nullcontext():
            pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": self.data.labels[i]}


def stratified_split(data: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """Seeded split keeping class proportions (sklearn); plain shuffle when a class has a single sample. Records of
    the same image (`identify`) go to one side together: the split is drawn over images, each labelled as its
    first record, so data without duplicates splits exactly as before."""
    from sklearn.model_selection import train_test_split

    same = groups(identify(data)[0])
    idx = np.arange(len(same))
    labels = np.asarray([data.labels[g[0]] for g in same])
    present = np.bincount(labels)[np.unique(labels)]
    n_val = int(round(fraction * len(same)))
    if n_val < 1 or n_val >= len(same):
        raise DataError(f"data.val_split={fraction} leaves no train or no val samples from {len(same)}; change it.")
    # sklearn needs at least one sample per class on each side to stratify.
    stratifiable = present.size > 1 and present.min() >= 2 and present.size <= min(n_val, len(same) - n_val)
    stratify = labels if stratifiable else None
    # An integer size, so the split is exactly the n_val checked above (a fraction would be rounded up by sklearn).
    train_idx, val_idx = train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)
    records = [[i for g in side.tolist() for i in same[g]] for side in (train_idx, val_idx)]
    return data.subset(sorted(records[0])), data.subset(sorted(records[1]))


def identify(*sets: LabeledImages) -> list[list[str]]:
    """Each set's per-record image keys (core.identity), computed over all sets at once so that they compare across
    sets, and kept on the sets (`keys`, carried by `subset`) so that a split does not hash twice."""
    return identify_sets(sets, _sources)


def _sources(data: LabeledImages) -> list:
    if data.kind != "hf":
        return list(data.items)
    found = []
    for i in range(len(data)):
        try:
            found.append(hf_image(data, i))
        except BadImage:
            found.append(None)  # the bad-sample check names it
    return found


def refuse_leak(train: LabeledImages, val: LabeledImages) -> None:
    """Refuse validation images that are also training images (`core.identity.refuse_shared`)."""
    train_keys, val_keys = identify(train, val)
    refuse_shared(train_keys, val_keys, train.ref, val.ref)


def refuse_empty_classes(train: LabeledImages) -> None:
    """A class with no training image would stay in the model's head, trained on nothing: refuse it."""
    counts = np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=len(train.class_names))
    empty = [name for name, n in zip(train.class_names, counts.tolist(), strict=True) if n == 0]
    if empty:
        raise DataError(
            f"Class(es) {empty} have no usable training image in {train.origin} (after leaving out unreadable and "
            "bad files); add images of them, or remove them from the data (and from data.class_names)."
        )


def split_duplicates(splits: dict[str, LabeledImages]) -> dict[str, int]:
    """Per split, the records whose image repeats an earlier record's (for data_report.json)."""
    return {role: duplicates(identify(data)[0]) for role, data in splits.items()}


class Collator:
    """Stacks samples; applies batch-level mixup/cutmix during training (labels become soft)."""

    def __init__(self, mixer: Callable | None = None):
        self.mixer = mixer

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        # default_collate stacks straight into shared memory inside DataLoader workers; a plain torch.stack makes
        # one more copy of the batch when it is sent to the main process (~10-20 % of a 224 px batch, measured).
        pixels = default_collate([s["pixel_values"] for s in samples])
        labels = torch.tensor([s["labels"] for s in samples], dtype=torch.long)
        if self.mixer is not None and len(samples) > 1:
            pixels, labels = self.mixer(pixels, labels)
        return {"pixel_values": pixels, "labels": labels}
