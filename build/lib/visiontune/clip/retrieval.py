"""Image<->text retrieval metrics (Recall@K) for CLIP-style models.

Ties are ranked pessimistically so that a model scoring many candidates identically (e.g. a collapsed or quantised
embedding space) is not rewarded by whatever order a sort happens to return: a correct candidate's rank is the
number of candidates with a strictly greater score plus the number of incorrect candidates with an equal score.
Other correct candidates tied with it never push it down."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from numbers import Integral

import torch
import torch.nn.functional as F

from visiontune.core.errors import DataError, RecipeError

GroundTruth = torch.Tensor | Sequence[int] | Sequence[Collection[int]]

_CHUNK = 1024  # queries per block, so the [chunk, N] comparison masks stay small for 25k-caption test sets


def recall_at_k(
    similarity: torch.Tensor, ground_truth: GroundTruth, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Fraction of queries with at least one correct candidate among their top K.

    A query's rank is that of its best correct candidate, counted pessimistically: candidates with a strictly
    greater score, plus incorrect candidates with an equal score. So with scores [0.9, 0.5, 0.5] and only the
    second candidate correct, its rank is 2 (0-based) and it is a hit for R@3 but not R@2, whatever the order.
    K larger than the number of candidates is clamped to it (the key keeps the requested K).

    Args:
        similarity: Scores [Q, N], query x candidate; higher is more similar.
        ground_truth: The correct candidates of each query: a [Q] integer tensor or list with one index per
            query, or a list of Q collections of indices (e.g. the several captions of an image).
        ks: The K values to report.

    Returns:
        {"R@K": recall in [0, 1]} for each K in `ks`.

    Raises:
        DataError: The ground truth does not have one non-empty, in-range entry per query.
        RecipeError: A K is below 1.
    """
    _check_ks(ks)
    if similarity.ndim != 2:
        raise DataError(
            f"The similarity matrix must be 2-D [queries, candidates], got shape {tuple(similarity.shape)}."
        )
    num_queries, num_candidates = similarity.shape
    correct = _correct_mask(ground_truth, num_queries, num_candidates).to(similarity.device)
    ranks = _pessimistic_ranks(similarity, correct)
    # Counting hits and dividing in Python gives the exact fraction, not a float32 mean.
    return {f"R@{k}": (ranks < min(k, num_candidates)).sum().item() / num_queries for k in ks}


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K from cosine similarity of the embeddings.

    Embeddings are L2-normalised here (in float32), so raw projection outputs can be passed. An image query is a
    hit when any of its captions is in the top K; ties are ranked pessimistically as in `recall_at_k`.

    Args:
        image_embeds: Image embeddings [I, D].
        text_embeds: Caption embeddings [T, D].
        text_to_image: For each caption, the index of its image (list or [T] tensor); an image may have several
            captions.
        ks: The K values to report.

    Returns:
        {"i2t_R@K": ..., "t2i_R@K": ..., "mean_recall": mean of all of them}, recalls in [0, 1].

    Raises:
        DataError: `text_to_image` does not give every caption an existing image and every image a caption.
        RecipeError: A K is below 1.
    """
    if isinstance(text_to_image, torch.Tensor):
        text_to_image = text_to_image.tolist()
    captions = _captions_per_image(text_to_image, len(image_embeds), len(text_embeds))
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    similarity = images @ texts.T  # [I, T]
    image_of_text = torch.as_tensor(list(text_to_image), dtype=torch.long)
    metrics = {f"i2t_{name}": value for name, value in recall_at_k(similarity, captions, ks).items()}
    metrics |= {f"t2i_{name}": value for name, value in recall_at_k(similarity.T, image_of_text, ks).items()}
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def _pessimistic_ranks(similarity: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """0-based rank [Q] of each query's best correct candidate, ties with incorrect candidates counted against it.

    Only the highest-scoring correct candidate matters: any lower-scoring one has at least as many candidates
    strictly above it.
    """
    if not similarity.is_floating_point():
        similarity = similarity.float()  # masked_fill with -inf needs a floating dtype
    ranks = []
    for start in range(0, len(similarity), _CHUNK):
        scores, is_correct = similarity[start : start + _CHUNK], correct[start : start + _CHUNK]
        best = scores.masked_fill(~is_correct, float("-inf")).amax(dim=1, keepdim=True)
        above = (scores > best).sum(dim=1)
        tied_incorrect = ((scores == best) & ~is_correct).sum(dim=1)
        ranks.append(above + tied_incorrect)
    return torch.cat(ranks)


def _correct_mask(ground_truth: GroundTruth, num_queries: int, num_candidates: int) -> torch.Tensor:
    """Boolean [Q, N] mask of correct candidates, validating every query's entry."""
    if isinstance(ground_truth, torch.Tensor):
        ground_truth = ground_truth.tolist()
    if len(ground_truth) != num_queries:
        raise DataError(
            f"The ground truth has {len(ground_truth)} entries but the similarity matrix has {num_queries} rows; "
            "pass one entry per query."
        )
    rows, cols = [], []
    for query, entry in enumerate(ground_truth):
        targets = [entry] if isinstance(entry, Integral) else list(entry)
        if not targets:
            raise DataError(f"Query {query} has no correct candidate; give it at least one or leave the query out.")
        bad = next((t for t in targets if not 0 <= t < num_candidates), None)
        if bad is not None:
            raise DataError(
                f"Query {query} lists candidate {bad}, outside 0..{num_candidates - 1}; fix its ground-truth index."
            )
        rows += [query] * len(targets)
        cols += targets
    mask = torch.zeros(num_queries, num_candidates, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def _captions_per_image(text_to_image: Sequence[int], num_images: int, num_texts: int) -> list[set[int]]:
    if len(text_to_image) != num_texts:
        raise DataError(
            f"text_to_image has {len(text_to_image)} entries but there are {num_texts} caption embeddings; "
            "give the image index of every caption."
        )
    captions: list[set[int]] = [set() for _ in range(num_images)]
    for caption, image in enumerate(text_to_image):
        if not 0 <= image < num_images:
            raise DataError(
                f"Caption {caption} points to image {image}, but there are {num_images} images; fix text_to_image."
            )
        captions[image].add(caption)
    missing = next((image for image, found in enumerate(captions) if not found), None)
    if missing is not None:
        raise DataError(f"Image {missing} has no caption in text_to_image; drop the image or add its captions.")
    return captions


def _check_ks(ks: Sequence[int]) -> None:
    bad = next((k for k in ks if k < 1), None)
    if bad is not None:
        raise RecipeError(f"Recall@K needs every K to be at least 1, got {bad}; pass positive K values.")
