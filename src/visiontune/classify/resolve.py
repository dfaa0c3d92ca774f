"""One resolver for every model source: `builtin:NAME`, `timm:NAME`, a local folder (visiontune, timm or
transformers format), or a transformers hub id. Heads are resized to the dataset's classes here."""

from __future__ import annotations

import json
from pathlib import Path

from visiontune.classify.model import ImageClassifier, read_meta
from visiontune.core.errors import ModelError
from visiontune.core.sources import parse_source
from visiontune.core.transforms import Preprocess


def resolve_classifier(name: str, class_names: list[str] | None = None, pretrained: bool = True) -> ImageClassifier:
    """Build a classifier for `class_names` (None: keep the saved model's classes, for eval/predict)."""
    source = parse_source(name, "model")
    if source.kind == "builtin":
        return _builtin(source.name, class_names)
    if source.kind == "timm":
        return _timm(source.name, class_names, pretrained)
    if source.path is not None:  # a folder
        return _local(source.path, class_names)
    return _hf(source.name, class_names)


def _builtin(asset: str, class_names: list[str] | None) -> ImageClassifier:
    import timm

    from visiontune.core.assets import efficientnet_lite0_state_dict

    if asset != "efficientnet-lite0":
        raise ModelError(f"model: builtin:{asset} is not an image classifier; use builtin:efficientnet-lite0.")
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    backbone.load_state_dict(efficientnet_lite0_state_dict())
    names = class_names or _imagenet_names(1000)
    if class_names is not None:
        backbone.reset_classifier(len(class_names))
    return ImageClassifier(backbone, "timm", names, _timm_preprocess(backbone))


def _timm(model_id: str, class_names: list[str] | None, pretrained: bool) -> ImageClassifier:
    import timm

    kwargs = {"num_classes": len(class_names)} if class_names else {}
    try:
        backbone = timm.create_model(model_id, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            hint = "`timm.list_models('*name*')` lists them"
            raise ModelError(f"model: timm:{model_id} is not a timm model; {hint}.") from None
        raise
    except OSError as err:
        raise ModelError(
            f"model: timm:{model_id} weights cannot be loaded offline ({err}); use a local folder "
            "(timm:local-dir:/path), set pretrained=false, or download the weights first."
        ) from None
    names = class_names or backbone.pretrained_cfg.get("label_names") or _imagenet_names(backbone.num_classes)
    return ImageClassifier(backbone, "timm", list(names), _timm_preprocess(backbone))


def _local(path: Path, class_names: list[str] | None) -> ImageClassifier:
    meta = read_meta(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model: {path} has no config.json; it is not a saved model folder.")
    config = json.loads(config_file.read_text())
    if (meta or {}).get("library", (meta or {}).get("kind")) == "timm" or "architecture" in config:
        model = _timm(f"local-dir:{path}", class_names, pretrained=True)
        if class_names is None:
            model.class_names = config.get("label_names") or model.class_names
    else:
        model = _hf(str(path), class_names)
    if meta and class_names is None:
        model.class_names = meta["class_names"]
        model.preprocess = Preprocess(
            **{**meta["preprocess"], "mean": tuple(meta["preprocess"]["mean"]), "std": tuple(meta["preprocess"]["std"])}
        )
    return model


def _hf(name: str, class_names: list[str] | None) -> ImageClassifier:
    from transformers import AutoModelForImageClassification

    instead = "a local folder, timm:NAME or builtin:NAME (`visiontune assets`)"
    backbone = pretrained_with_head(AutoModelForImageClassification, name, class_names, "image classifier", instead)
    id2label = backbone.config.id2label
    names = class_names or [id2label[i] for i in sorted(id2label)]
    return ImageClassifier(backbone, "hf", names, _hf_preprocess(name, backbone))


def new_head(class_names: list[str] | None) -> dict:
    """`from_pretrained` arguments giving a transformers model a freshly initialised head for `class_names`, named in
    `id2label`; none (keep the checkpoint's head) without class names."""
    if not class_names:
        return {}
    return {
        "id2label": dict(enumerate(class_names)),
        "label2id": {n: i for i, n in enumerate(class_names)},
        "ignore_mismatched_sizes": True,  # a new class count re-initialises the head
    }


def pretrained_with_head(auto_class, name: str, class_names: list[str] | None, what: str, instead: str):
    """`auto_class.from_pretrained(name)` with a new head for `class_names` (`new_head`); a checkpoint that cannot
    be loaded offline as `what` is refused in one sentence offering `instead`."""
    try:
        return auto_class.from_pretrained(name, **new_head(class_names))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model: {name} cannot be resolved offline as a transformers {what} ({str(err).splitlines()[0]}); "
            f"give {instead}."
        ) from None


def _timm_preprocess(backbone) -> Preprocess:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    return Preprocess(cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))


def _hf_preprocess(name: str, backbone) -> Preprocess:
    from transformers import AutoImageProcessor

    mean, std, resample = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None
    size = getattr(backbone.config, "image_size", 224)
    try:
        proc = AutoImageProcessor.from_pretrained(name)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        size = square_edge(getattr(proc, "crop_size", None) or {}) or square_edge(proc.size) or size
        resample = getattr(proc, "resample", None)
    except Exception:  # no processor saved: fall back to config + ImageNet statistics
        pass
    return Preprocess(int(size), mean, std, "bicubic" if resample == 3 else "bilinear")  # 3: PIL BICUBIC


def square_edge(size) -> int | None:
    """The square input edge from an image processor's `size` (an int, a dict or a transformers SizeDict)."""
    if isinstance(size, int):
        return size
    for key in ("shortest_edge", "height"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def _imagenet_names(n: int) -> list[str]:
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        if n == 1000:
            return [info.index_to_description(i) for i in range(n)]
    except Exception:  # label metadata is optional
        pass
    return [str(i) for i in range(n)]
