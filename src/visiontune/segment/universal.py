"""transformers universal segmentation models (Mask2Former, MaskFormer) trained and run in semantic mode.

They predict N mask queries, each a binary mask plus a class distribution (one extra "no object" class), instead of
per-pixel logits. Training gives the model its own Hungarian-matched loss with one binary mask per class present in
an image (what their image processors build from a semantic map: ignored pixels lie in no mask); inference turns the
queries into per-class scores with the image processor's own `post_process_semantic_segmentation`, so our masks are
the ones plain transformers gives. OneFormer (it also needs tokenised task text) and the panoptic-only DETR /
EoMT heads are refused by name.
"""

from __future__ import annotations

import torch

from visiontune.core.errors import ModelError

UNIVERSAL = ("mask2former", "maskformer")  # AutoModelForUniversalSegmentation types trained here in semantic mode
_PROCESSORS = {"mask2former": "Mask2FormerImageProcessor", "maskformer": "MaskFormerImageProcessor"}


def model_type(name: str) -> str | None:
    """The checkpoint's `model_type`, or None when its config cannot be read (the semantic loader then says why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError):
        return None


def check_universal(kind: str | None) -> bool:
    """True for a type trained here through AutoModelForUniversalSegmentation; other universal-only types are
    refused in one sentence."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES as SEMANTIC,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES as UNIVERSAL_TYPES,
    )

    if kind in UNIVERSAL:
        return True
    if kind in UNIVERSAL_TYPES and kind not in SEMANTIC:
        raise ModelError(
            f"model: a {kind} checkpoint is a universal segmentation model that task: segment does not train "
            f"(semantic mode covers {', '.join(UNIVERSAL)}); use one of those or a semantic-segmentation checkpoint."
        )
    return False


def default_processor(kind: str):
    """The family's image processor with its defaults, for a checkpoint saved without one."""
    import transformers

    return getattr(transformers, _PROCESSORS[kind])()


def mask_targets(labels: torch.Tensor, ignore_index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image of `labels` [B, H, W]: (binary masks [K, H, W] float, class ids [K]) for the K classes present,
    built as the Mask2Former / MaskFormer image processors build them from a semantic map."""
    from transformers.models.mask2former.image_processing_mask2former import (
        convert_segmentation_map_to_binary_masks_fast as binary_masks,
    )

    pairs = [binary_masks(label.long(), ignore_index=ignore_index) for label in labels]
    return [m.to(labels.device) for m, _ in pairs], [c.to(labels.device) for _, c in pairs]


def semantic_scores(processor, outputs) -> torch.Tensor:
    """Per-class scores [B, C, h, w] from the query outputs: the image processor's semantic post-processing (class
    probabilities without "no object" times mask probabilities, summed over queries), before it resizes them."""
    found = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    return torch.stack([item.segmentation_scores for item in found])


def scores_as_logits(scores: torch.Tensor) -> torch.Tensor:
    """Scores are non-negative and not normalised; their log makes cross-entropy the negative log of each pixel's
    share of the true class (the validation loss)."""
    return scores.float().clamp_min(1e-6).log()
