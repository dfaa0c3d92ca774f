"""Feature-pyramid backbones from `builtin:` / `timm:` sources: a timm `features_only` body with its pretrained
weights, for the families that put their own neck and head on top (detect, segment). One loader, so every family
refuses a bad backbone in the same sentence and rebuilds an export from the same (architecture, args) pair."""

from __future__ import annotations

from typing import Any

from torch import nn

from visiontune.core.errors import ModelError
from visiontune.core.sources import ModelSource

BUILTIN_BACKBONES = {"efficientnet-lite0": "tf_efficientnet_lite0"}  # builtin asset -> timm architecture


def feature_body(source: ModelSource) -> tuple[str, dict[str, Any], nn.Module]:
    """(timm architecture, its constructor args, the features_only model with its pretrained weights)."""
    import timm

    if source.kind == "builtin":
        from visiontune.core.assets import efficientnet_lite0_state_dict

        if source.name not in BUILTIN_BACKBONES:
            raise ModelError(f"model: builtin:{source.name} is not an image backbone; use builtin:efficientnet-lite0.")
        arch = BUILTIN_BACKBONES[source.name]
        body = timm.create_model(arch, features_only=True, pretrained=False)
        wanted = body.state_dict()
        body.load_state_dict({k: v for k, v in efficientnet_lite0_state_dict().items() if k in wanted})
        return arch, {}, body
    try:
        body = timm.create_model(source.name, features_only=True, pretrained=True)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelError(
                f"model: {source.text} is not a timm model; `timm.list_models('*name*')` lists them."
            ) from None
        raise
    except OSError as err:
        raise ModelError(
            f"model: {source.text} weights cannot be loaded offline ({err}); use a local folder (timm:local-dir:PATH) "
            "or download the weights first."
        ) from None
    except (AttributeError, AssertionError, NotImplementedError) as err:
        raise ModelError(f"model: {source.text} has no feature pyramid in timm (features_only: {err}).") from None
    args = getattr(body, "pretrained_model_args", None) or {}
    args = {k: v for k, v in args.items() if k not in ("num_classes", "global_pool")}
    return body.pretrained_cfg.get("architecture", source.name), args, body


def rebuilt_body(arch: str, args: dict[str, Any]) -> nn.Module:
    """The features_only body of an export, without weights (the export's state dict holds them)."""
    import timm

    return timm.create_model(arch, features_only=True, pretrained=False, **args)


def enable_checkpointing(module: nn.Module) -> bool:
    """Gradient checkpointing of a timm model (`set_grad_checkpointing`) or a transformers one; False if it has
    none."""
    if hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(True)
        return True
    if getattr(module, "supports_gradient_checkpointing", False):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False


def body_normalization(body: nn.Module) -> tuple[list[float], list[float]]:
    """(mean, std) the backbone was pretrained with (ImageNet's when timm does not say)."""
    cfg = body.pretrained_cfg
    return list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))
