"""Recall@K against a brute-force reference with pessimistic tie ranking, on data full of ties and with several
captions per image; hand examples where a tie at the K boundary decides the outcome."""

import pytest
import torch

from visiontune.clip.retrieval import recall_at_k, retrieval_metrics
from visiontune.core.errors import DataError, RecipeError

KS = (1, 2, 3, 5, 10, 100)


def reference_recall(similarity: torch.Tensor, targets: list[set[int]], k: int, pessimistic: bool = True) -> float:
    """Loop over queries; a correct candidate's rank counts strictly greater scores and equal incorrect ones."""
    hits = 0
    for query, row in enumerate(similarity.tolist()):
        ranks = []
        for candidate in targets[query]:
            score = row[candidate]
            above = sum(1 for other in row if other > score)
            tied_incorrect = sum(1 for j, other in enumerate(row) if other == score and j not in targets[query])
            ranks.append(above + (tied_incorrect if pessimistic else 0))
        hits += min(ranks) < min(k, len(row))
    return hits / len(targets)


def sparse_embeddings(count: int, generator: torch.Generator) -> torch.Tensor:
    """4 entries of +-1 in 8 dims, scaled by a power of two: unit vectors have entries +-0.5, so every cosine is a
    multiple of 0.25, computed exactly in any summation order (many exact ties)."""
    embeds = torch.zeros(count, 8)
    for row in embeds:
        positions = torch.randperm(8, generator=generator)[:4]
        row[positions] = torch.randint(0, 2, (4,), generator=generator).float() * 2 - 1
    return embeds * 2.0 ** torch.randint(-3, 4, (count, 1), generator=generator)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_reference_on_quantised_scores(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, candidates = 40, 30
    similarity = torch.randint(0, 6, (queries, candidates), generator=generator).float() / 5  # six levels: ties
    targets = [set(torch.randperm(candidates, generator=generator)[: 1 + q % 3].tolist()) for q in range(queries)]
    result = recall_at_k(similarity, targets, KS)
    expected = {f"R@{k}": reference_recall(similarity, targets, k) for k in KS}
    assert result == pytest.approx(expected, abs=1e-9)
    optimistic = {f"R@{k}": reference_recall(similarity, targets, k, pessimistic=False) for k in KS}
    assert optimistic != expected  # the data really contain ties that decide hits


def test_single_index_ground_truth_forms_agree():
    generator = torch.Generator().manual_seed(3)
    similarity = torch.randint(0, 4, (25, 10), generator=generator).float()
    labels = torch.randint(0, 10, (25,), generator=generator)
    as_sets = recall_at_k(similarity, [{int(label)} for label in labels], KS)
    assert recall_at_k(similarity, labels, KS) == as_sets
    assert recall_at_k(similarity, labels.tolist(), KS) == as_sets
    assert as_sets == pytest.approx({f"R@{k}": reference_recall(similarity, [{int(x)} for x in labels], k) for k in KS})


def test_tie_with_incorrect_candidate_at_boundary_is_a_miss():
    # The correct candidate 1 is tied with incorrect candidate 2: pessimistic rank 2 (0.9 above, 2 tied).
    # An index-order sort would put it second and count a hit at R@2.
    similarity = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    assert recall_at_k(similarity, [{1}], ks=(1, 2, 3)) == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}
    # Same scores with the correct candidate after the incorrect one: same result, order does not matter.
    assert recall_at_k(similarity, [{2}], ks=(1, 2, 3)) == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}


def test_ties_between_correct_candidates_do_not_hurt():
    similarity = torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.5, 0.5]])
    # Query 0: both tied candidates correct -> rank 0. Query 1: candidates 0 and 2 correct, tied with incorrect 1.
    assert recall_at_k(similarity, [{0, 1}, {0, 2}], ks=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}


def test_k_larger_than_candidates_is_clamped():
    similarity = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.3, 0.3]])
    result = recall_at_k(similarity, torch.tensor([0, 1]), ks=(1, 5, 10))
    assert result == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}


def test_bad_ground_truth_and_k_are_reported():
    similarity = torch.zeros(2, 3)
    with pytest.raises(DataError, match="2 rows"):
        recall_at_k(similarity, [{0}])
    with pytest.raises(DataError, match="Query 1 has no correct candidate"):
        recall_at_k(similarity, [{0}, set()])
    with pytest.raises(DataError, match="Query 0 lists candidate 3"):
        recall_at_k(similarity, [3, 0])
    with pytest.raises(RecipeError, match="got 0"):
        recall_at_k(similarity, [0, 0], ks=(0, 1))


def test_retrieval_metrics_hand_example():
    # Image 0 has captions 0 and 1, image 1 has caption 2. Caption 1 is (wrongly) closer to image 1, and
    # caption 2 is equally close to both images, which counts as a miss at R@1.
    images = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    texts = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    result = retrieval_metrics(images, texts, [0, 0, 1], ks=(1, 5))
    # i2t: image 0 finds caption 0 first (hit); image 1's caption 2 (0.71) is below caption 1 (1.0): rank 1.
    # t2i: caption 0 -> image 0 hit; caption 1 -> image 1 first: rank 1; caption 2 -> tie 0.71/0.71: rank 1.
    expected = {"i2t_R@1": 0.5, "i2t_R@5": 1.0, "t2i_R@1": 1 / 3, "t2i_R@5": 1.0}
    expected["mean_recall"] = sum(expected.values()) / 4
    assert result == pytest.approx(expected)
    assert list(result) == ["i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mean_recall"]


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_reference_with_several_captions(seed):
    generator = torch.Generator().manual_seed(seed)
    num_images = 12
    text_to_image = [image for image in range(num_images) for _ in range(1 + image % 3)]
    images = sparse_embeddings(num_images, generator)
    texts = sparse_embeddings(len(text_to_image), generator)
    for caption, image in enumerate(text_to_image[::2]):  # every other caption is its image, rescaled
        texts[2 * caption] = images[image] * 4
    result = retrieval_metrics(images, texts, torch.tensor(text_to_image), ks=KS)

    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731 - exact here: norms are powers of two
    similarity = unit(images) @ unit(texts).T
    captions = [{j for j, i in enumerate(text_to_image) if i == image} for image in range(num_images)]
    expected = {f"i2t_R@{k}": reference_recall(similarity, captions, k) for k in KS}
    expected |= {f"t2i_R@{k}": reference_recall(similarity.T, [{i} for i in text_to_image], k) for k in KS}
    expected["mean_recall"] = sum(expected.values()) / (2 * len(KS))
    assert result == pytest.approx(expected, abs=1e-9)
    optimistic = [reference_recall(similarity, captions, k, pessimistic=False) for k in KS]
    optimistic += [reference_recall(similarity.T, [{i} for i in text_to_image], k, pessimistic=False) for k in KS]
    assert optimistic != list(expected.values())[:-1]  # ties decide some hits in this data


def test_retrieval_metrics_rejects_bad_mapping():
    images, texts = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(DataError, match="3 caption embeddings"):
        retrieval_metrics(images, texts, [0, 1])
    with pytest.raises(DataError, match="Caption 2 points to image 5"):
        retrieval_metrics(images, texts, [0, 1, 5])
    with pytest.raises(DataError, match="Image 1 has no caption"):
        retrieval_metrics(images, texts, [0, 0, 0])
