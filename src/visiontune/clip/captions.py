"""Image-caption pairs for contrastive training: readers, the bad-pair check, a split by image, torch datasets.

Formats: CSV/JSONL with columns `image` (or `path`) and `caption`; COCO-captions JSON (`images` [{id, file_name}] +
`annotations` [{image_id, caption}], several captions per image); a `datasets` dataset saved to disk with an image
column and a caption/text column (a list of captions per row is allowed); and `builtin:mnist-5k-captions` (digits
with captions generated from their labels). Image paths are relative to the file, or to `data.image_root`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visiontune.core.check import BadSample, Wording, check_splits
from visiontune.core.dataset import EpochSeed
from visiontune.core.errors import DataError, SampleError
from visiontune.core.identity import duplicates, identify_sets, refuse_shared
from visiontune.core.identity import groups as key_groups
from visiontune.core.images import BadImage, check_image, hf_image_value, open_image
from visiontune.core.readers import load_saved_dataset, pick_column, read_csv_rows, read_jsonl_rows, read_text

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings for builtin:mnist-5k-captions; {word} is the digit's name, {n} its numeral.
MNIST_PHRASINGS = (
    "a handwritten digit {word}",
    "a photo of the number {n}",
    "an image of a {word}",
    "the number {word}, written by hand",
    "a picture of a handwritten {n}",
    "a scan of the digit {word}",
    "a black and white image of the numeral {n}",
    "handwriting that shows a {word}",
)
CAPTIONS_PER_DIGIT = 3


@dataclass
class CaptionPairs:
    """One record per (image, caption) pair; an image with several captions appears once per caption.
    `sources[i]` is a file path, an in-memory uint8 array, or a dataset row index (see `kind`)."""

    sources: list[Any]
    captions: list[str]
    image_ids: list[Hashable]
    refs: list[str]  # where each pair came from ("FILE line N", "FILE annotation N", ...), for messages
    origin: str
    kind: str = "file"  # "file" | "array" | "hf"
    hf_dataset: Any = None
    image_column: str | None = None
    keys: list[str] | None = None  # per pair, equal <=> the same image content (core.identity); see `identify_pairs`

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: Sequence[int]) -> CaptionPairs:
        pick = list(indices)
        return CaptionPairs(
            [self.sources[i] for i in pick],
            [self.captions[i] for i in pick],
            [self.image_ids[i] for i in pick],
            [self.refs[i] for i in pick],
            self.origin,
            self.kind,
            self.hf_dataset,
            self.image_column,
            [self.keys[i] for i in pick] if self.keys is not None else None,
        )

    def images(self) -> list[list[int]]:
        """Pair indices grouped by image, images in order of their first pair."""
        groups: dict[Hashable, list[int]] = {}
        for i, image_id in enumerate(self.image_ids):
            groups.setdefault(image_id, []).append(i)
        return list(groups.values())

    def image_index(self) -> list[int]:
        """For each pair, the position of its image in `images()` (retrieval ground truth)."""
        index = [0] * len(self)
        for position, group in enumerate(self.images()):
            for i in group:
                index[i] = position
        return index


def read_captions(spec: str, image_root: str | None = None, seed: int = 0, split: str = "train") -> CaptionPairs:
    """Dispatch on the form of `spec` (file suffix, saved dataset folder, `builtin:`); see the module docstring."""
    if spec.startswith("builtin:"):
        return _read_builtin(spec.removeprefix("builtin:"), seed)
    path = Path(spec).expanduser()
    root = Path(image_root).expanduser() if image_root else None
    if path.is_file() and path.suffix.lower() in CAPTION_READERS:
        return CAPTION_READERS[path.suffix.lower()](path, root or path.parent)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _read_hf(path, split)
    if path.exists():
        raise DataError(
            f"{path}: unsupported caption data; use a .csv/.jsonl file (image,caption), a COCO captions "
            ".json, or a folder saved with `Dataset.save_to_disk`."
        )
    raise DataError(f"Caption data {spec} does not exist; check data.train / data.val in the recipe.")


def _read_csv(path: Path, root: Path) -> CaptionPairs:
    _, rows, lines = read_csv_rows(path)
    return _from_rows(path, root, rows, lines)


def _read_jsonl(path: Path, root: Path) -> CaptionPairs:
    rows, lines = read_jsonl_rows(path, '{"image": ..., "caption": ...}')
    return _from_rows(path, root, rows, lines)


def _from_rows(path: Path, root: Path, rows: list[dict], lines: list[int]) -> CaptionPairs:
    if not rows:
        raise DataError(f"{path} has no records; add `image,caption` rows.")
    image_key = next((k for k in ("image", "path") if k in rows[0]), None)
    if image_key is None or "caption" not in rows[0]:
        raise DataError(
            f"{path} needs columns `image` (or `path`) and `caption` (found {sorted(rows[0])}); rename the columns."
        )
    pairs = CaptionPairs([], [], [], [], str(path))
    for n, row in zip(lines, rows, strict=True):
        value = row.get(image_key)
        source = (root / str(value)).resolve() if value not in (None, "") else None
        for caption in _caption_list(row.get("caption")):
            _append(pairs, source, caption, str(source) if source else f"{path}:{n}", f"{path} line {n}")
    return pairs


def _read_coco(path: Path, root: Path) -> CaptionPairs:
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file.") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        raise DataError(
            f"{path} is not a COCO captions file; it needs an `images` list of {{id, file_name}} and an "
            "`annotations` list of {image_id, caption}."
        )
    files = {}
    for k, image in enumerate(doc["images"]):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise DataError(f"{path} images[{k}] needs an `id` and a `file_name`; fix that entry.")
        files[image["id"]] = (root / str(image["file_name"])).resolve()
    pairs = CaptionPairs([], [], [], [], str(path))
    for k, ann in enumerate(doc["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in files:
            raise DataError(
                f"{path} annotations[{k}] refers to image_id {image_id!r}, which is not in `images`; "
                "fix the id or add the image."
            )
        _append(pairs, files[image_id], _as_text(ann.get("caption")), image_id, f"{path} annotation {k}")
    return pairs


def _read_hf(path: Path, split: str) -> CaptionPairs:
    import datasets

    ds = load_saved_dataset(path, split)
    image_col = pick_column(ds, ("image", "img"), path, "rename its image column to one of them")
    caption_col = pick_column(ds, ("caption", "captions", "text", "sentences"), path, "rename its caption column")
    if isinstance(ds.features[image_col], datasets.Image) and ds.features[image_col].decode:
        # Keep the bytes: open_image decodes them, so the pixel cap applies and bad bytes become a bad pair.
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    pairs = CaptionPairs([], [], [], [], str(path), "hf", ds, image_col)
    for row, value in enumerate(ds[caption_col]):
        for caption in _caption_list(value):
            _append(pairs, row, caption, row, f"{path} record {row}")
    return pairs


# builtin caption set -> (digit arrays it captions, captions per digit, shuffled order)
CAPTION_SETS = {
    "mnist-5k-captions": ("mnist-5k-captions", CAPTIONS_PER_DIGIT, False),
    "mnist-5k-heldout-captions": ("mnist-5k-heldout", 1, True),
}


def _read_builtin(name: str, seed: int) -> CaptionPairs:
    from visiontune.core.assets import get_asset, load_digit_arrays

    get_asset(name, "dataset")  # an unknown name fails with the list of built-in datasets
    if name not in CAPTION_SETS:
        raise DataError(
            f"builtin:{name} has labels, not captions; use one of {sorted(f'builtin:{n}' for n in CAPTION_SETS)} "
            "or a caption file for data.train, and labelled data for data.zero_shot."
        )
    source, per_digit, shuffled = CAPTION_SETS[name]
    images, labels, _ = load_digit_arrays(source)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels)) if shuffled else np.arange(len(labels))  # mixed classes for eval heads
    pairs = CaptionPairs([], [], [], [], f"builtin:{name}", "array")
    for k in order.tolist():
        label = int(labels[k])
        for p in rng.choice(len(MNIST_PHRASINGS), per_digit, replace=False):
            caption = MNIST_PHRASINGS[p].format(word=DIGIT_WORDS[label], n=label)
            _append(pairs, images[k], caption, k, f"builtin:{name} record {k}")
    return pairs


def _append(pairs: CaptionPairs, source: Any, caption: str, image_id: Hashable, ref: str) -> None:
    pairs.sources.append(source)
    pairs.captions.append(caption)
    pairs.image_ids.append(image_id)
    pairs.refs.append(ref)


def _caption_list(value: Any) -> list[str]:
    """One caption, or a list of them (JSONL and datasets often hold all captions of an image in one row)."""
    if isinstance(value, list | tuple):
        return [_as_text(v) for v in value] or [""]
    return [_as_text(value)]


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


CAPTION_READERS: dict[str, Callable[[Path, Path], CaptionPairs]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
    ".json": _read_coco,
}


def find_bad_pairs(pairs: CaptionPairs, max_pixels: int, workers: int = 4) -> list[BadSample]:
    """Pairs with an empty caption or an unusable image. Each image is checked once, however many captions it has."""
    groups = pairs.images()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # I/O bound: threads overlap file reads
        problems = list(pool.map(lambda group: _image_problem(pairs, group[0], max_pixels), groups))
    bad = []
    for group, problem in zip(groups, problems, strict=True):
        for i in group:
            reason = problem or (None if pairs.captions[i].strip() else "has an empty caption")
            if reason:
                bad.append(BadSample(i, pairs.refs[i], reason))
    return sorted(bad, key=lambda b: b.index)


def clean_pairs(pairs: CaptionPairs, policy: str, max_pixels: int, role: str) -> tuple[CaptionPairs, list[BadSample]]:
    """The usable pairs; with policy `error`, one DataError listing the first bad records (after checking all)."""
    kept, bad = clean_pair_splits({role: pairs}, policy, max_pixels)
    return kept[role], bad


def clean_pair_splits(
    splits: dict[str, CaptionPairs], on_bad_sample: str, max_pixels: int
) -> tuple[dict[str, CaptionPairs], list[BadSample]]:
    """Check every split (e.g. {"train": ..., "val": ...}) before stopping, so one error lists the bad pairs of all
    of them (the first few, a count, and a report file with every one); with `skip`, each split keeps its usable
    pairs. Returns the kept splits and every bad pair."""
    return check_splits(splits, lambda pairs: find_bad_pairs(pairs, max_pixels), on_bad_sample, PAIRS)


PAIRS = Wording("pair", "caption data", "image-caption pairs")


def _image_problem(pairs: CaptionPairs, i: int, max_pixels: int) -> str | None:
    source = pairs.sources[i]
    if source is None:
        return "has no image path"
    try:
        if pairs.kind == "file":
            check_image(source, max_pixels)
        elif pairs.kind == "hf":
            open_image(hf_image(pairs, i), max_pixels)
    except BadImage as err:
        return _image_reason(pairs, i, err)
    return None


def _image_reason(pairs: CaptionPairs, i: int, err: BadImage) -> str:
    return f"image {Path(pairs.sources[i]).name} {err}" if pairs.kind == "file" else f"image {err}"


def split_by_image(pairs: CaptionPairs, fraction: float, seed: int) -> tuple[CaptionPairs, CaptionPairs]:
    """Seeded split of the images (not the pairs), so the captions of one image never straddle train and val; copies
    of one image under other names or ids count as that image (`identify_pairs`)."""
    (keys,) = identify_pairs(pairs)
    groups = image_groups([(pairs.image_ids[i], keys[i]) for i in range(len(pairs))])
    n_val = int(round(fraction * len(groups)))
    if n_val < 1 or n_val >= len(groups):
        raise DataError(
            f"data.val_split={fraction} leaves no train or no val images from the {len(groups)} images "
            f"of {pairs.origin}; change it or give data.val."
        )
    val_groups = set(np.random.default_rng(seed).permutation(len(groups))[:n_val].tolist())
    train = [i for g, group in enumerate(groups) if g not in val_groups for i in group]
    val = [i for g, group in enumerate(groups) if g in val_groups for i in group]
    return pairs.subset(sorted(train)), pairs.subset(sorted(val))


def identify_pairs(*sets: CaptionPairs) -> list[list[str]]:
    """Each set's per-pair image keys, comparable across the sets (core.identity.identify_sets)."""
    return identify_sets(sets, _pair_sources)


def _pair_sources(pairs: CaptionPairs) -> list[Any]:
    if pairs.kind != "hf":
        return list(pairs.sources)
    found = []
    for i in range(len(pairs)):
        try:
            found.append(hf_image(pairs, i))
        except BadImage:
            found.append(None)  # the bad-pair check names it
    return found


def image_groups(ids_and_keys: list[tuple[Hashable, str]]) -> list[list[int]]:
    """Pair indices grouped by image: by image id, and ids whose images have the same content joined into one."""
    by_id = key_groups([image_id for image_id, _ in ids_and_keys])
    first_of_key: dict[str, int] = {}
    joined: list[list[int]] = []
    for group in by_id:
        key = ids_and_keys[group[0]][1]
        if key in first_of_key:
            joined[first_of_key[key]] += group
        else:
            first_of_key[key] = len(joined)
            joined.append(list(group))
    return joined


def refuse_pair_leak(train: CaptionPairs, val: CaptionPairs) -> None:
    """Refuse validation pairs whose image is also a training image: retrieval would be scored on trained images."""
    train_keys, val_keys = identify_pairs(train, val)
    refuse_shared(train_keys, val_keys, lambda i: train.refs[i], lambda i: val.refs[i])


def pair_duplicates(pairs: CaptionPairs) -> int:
    """Pairs that repeat an earlier pair of the set: the same image content with the same caption."""
    (keys,) = identify_pairs(pairs)
    return duplicates(list(zip(keys, pairs.captions, strict=True)))


def load_image(pairs: CaptionPairs, i: int, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Pair i's image; a SampleError (which stays one sentence through a DataLoader worker) naming the record and
    the image when it cannot be decoded."""
    if pairs.kind == "array":
        return Image.fromarray(pairs.sources[i]).convert("RGB")
    try:
        source = pairs.sources[i] if pairs.kind == "file" else hf_image(pairs, i)
        return open_image(source, max_pixels, draft_size)
    except BadImage as err:
        hint = "fix or remove it (data.on_bad_sample=skip drops bad pairs)"
        raise SampleError(f"{pairs.refs[i]} {_image_reason(pairs, i, err)}; {hint}.") from None


def hf_image(pairs: CaptionPairs, i: int) -> Any:
    return hf_image_value(pairs.hf_dataset, int(pairs.sources[i]), pairs.image_column, missing="is missing")


class CaptionedImages(torch.utils.data.Dataset):
    """One item per image: its pixels and one of its captions, a different one each epoch (deterministic given the
    seed and the epoch). Sampling one caption per image keeps each image's only positive on the InfoNCE diagonal;
    iterating over pairs instead could put two captions of one image in a batch as each other's negatives. The
    caption and the random augmentation depend only on (seed, epoch, image), whichever loader worker draws it
    (`EpochSeed`), so a resumed run sees what the uninterrupted one saw."""

    def __init__(
        self, pairs: CaptionPairs, transform: Callable, max_pixels: int, seed: int = 0, draft_size: int | None = None
    ):
        self.pairs, self.transform, self.max_pixels, self.draft_size = pairs, transform, max_pixels, draft_size
        self.groups, self.rng = pairs.images(), EpochSeed(seed)

    def set_epoch(self, epoch: int) -> None:
        self.rng.set_epoch(epoch)  # shared memory: persistent loader workers see it too

    def caption_index(self, i: int) -> int:
        group = self.groups[i]
        if len(group) == 1:
            return group[0]
        return group[int(np.random.default_rng([self.rng.seed, int(self.rng.epoch), i]).integers(len(group)))]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        image = load_image(self.pairs, self.groups[i][0], self.max_pixels, self.draft_size)
        with self.rng.fixed(i):
            pixels = self.transform(image)
        return {"pixel_values": pixels, "caption": self.pairs.captions[self.caption_index(i)]}


class CaptionCollator:
    """Stacks images and tokenises their captions (`DualEncoder.tokenize`: the family's padding and length)."""

    def __init__(self, tokenize: Callable[[list[str]], Any]):
        self.tokenize = tokenize

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        tokens = self.tokenize([s["caption"] for s in samples])
        batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), "input_ids": tokens["input_ids"]}
        if "attention_mask" in tokens:  # SigLIP's tokenizer gives none: it was trained on unmasked max-length padding
            batch["attention_mask"] = tokens["attention_mask"]
        return batch


def stack_pixels(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Collate images only (evaluation embeds the captions separately, all of them)."""
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}
