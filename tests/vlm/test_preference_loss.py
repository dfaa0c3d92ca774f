"""vlm_preference's losses agree with TRL 1.16's on the same log-probabilities: DPOTrainer._compute_loss run with a
stand-in model that returns those log-probs (its loss code cannot be called without a model), and CPOTrainer's
SimPO and ORPOTrainer's ORPO (which vlm_preference calls themselves) against their formula / TRL's whole ORPO loss."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from visiontune.vlm.preference_config import PreferenceLossConfig
from visiontune.vlm.preference_loss import SequenceLogps, loss_settings, preference_loss, sequence_logps

PAIRS, LENGTH = 3, 7


def _batch(seed: int = 0):
    """Per-token answer log-probs of [chosen; rejected] (answers of different lengths), and reference sums."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.bool)
    for row, start in enumerate([3, 4, 2, 5, 3, 4]):
        mask[row, start:] = True
    per_token = -torch.rand(2 * PAIRS, LENGTH - 1, generator=g) * 3 * mask[:, 1:]
    ref = per_token.sum(-1) + torch.randn(2 * PAIRS, generator=g)
    return per_token, mask, ref


def trl_dpo_loss(loss_types: list[str], loss_weights: list[float], beta: float, smoothing: float, batch=None):
    """TRL's DPOTrainer._compute_loss on `batch` = (per-token answer log-probs [2B, T-1], answer mask [2B, T],
    reference sums [2B]) of [chosen; rejected] rows, and the metrics it logged."""
    from trl import DPOTrainer

    per_token, mask, ref = batch if batch is not None else _batch()
    pairs, length = per_token.shape[0] // 2, mask.shape[1]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    identity = lambda x: x  # noqa: E731 - one process: gathering returns its input
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {
        "input_ids": torch.zeros(2 * pairs, length, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False), trainer._metrics["train"]


def _ours(cfg: PreferenceLossConfig):
    per_token, mask, ref = _batch()
    policy = SequenceLogps(per_token.sum(-1), mask[:, 1:].sum(-1), per_token, mask[:, 1:])
    return preference_loss(policy, *ref.chunk(2), **loss_settings(cfg))


@pytest.mark.parametrize(
    ("kind", "beta", "smoothing"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.3, 0.0), ("ipo", 0.2, 0.0), ("robust", 0.1, 0.2)],
)
def test_dpo_losses_and_metrics_equal_trl(kind, beta, smoothing):
    trl_loss, trl_metrics = trl_dpo_loss([kind], [1.0], beta, smoothing)
    loss, metrics = _ours(PreferenceLossConfig(type=kind, beta=beta, label_smoothing=smoothing))
    torch.testing.assert_close(loss, trl_loss)
    for key, values in metrics.items():  # TRL's names, TRL's values
        assert trl_metrics[key] == [pytest.approx(values.mean().item(), abs=1e-6)], key


def test_rpo_term_equals_trl_sft_loss_type_weighted_by_alpha():
    trl_loss, _ = trl_dpo_loss(["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0)
    loss, _ = _ours(PreferenceLossConfig(type="sigmoid", beta=0.1, rpo_alpha=0.7))
    torch.testing.assert_close(loss, trl_loss)
    plain, _ = _ours(PreferenceLossConfig(type="sigmoid", beta=0.1))
    assert not torch.allclose(loss, plain)


def test_simpo_is_trl_cpo_loss_on_length_averaged_logps():
    per_token, mask, _ = _batch()
    tokens = mask[:, 1:].sum(-1)
    cfg = PreferenceLossConfig(type="simpo", beta=2.0, simpo_gamma=0.4, label_smoothing=0.1)
    policy = SequenceLogps(per_token.sum(-1), tokens, per_token, mask[:, 1:])
    loss, metrics = preference_loss(policy, None, None, **loss_settings(cfg))
    chosen, rejected = (per_token.sum(-1) / tokens).chunk(2)
    logits = chosen - rejected - cfg.simpo_gamma / cfg.beta
    expected = -F.logsigmoid(cfg.beta * logits) * 0.9 - F.logsigmoid(-cfg.beta * logits) * 0.1
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], cfg.beta * chosen)


def test_sequence_logps_scores_only_labelled_tokens_from_the_previous_position():
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    got = sequence_logps(logits, labels)
    lp = logits.log_softmax(-1)
    torch.testing.assert_close(got.logps, torch.stack([lp[0, 1, 3] + lp[0, 2, 1], lp[1, 0, 2]]))
    assert got.tokens.tolist() == [2, 1]


def test_orpo_equals_trl_orpo_trainer_loss_and_metrics():
    """TRL's ORPOTrainer.get_batch_loss_metrics (NLL of the chosen answer minus the mean odds-ratio term) with its
    forward stood in by our length-averaged log-probs and our chosen-answer NLL."""
    from trl.experimental.orpo import ORPOTrainer

    per_token, mask, _ = _batch()
    tokens = mask[:, 1:].sum(-1)
    cfg = PreferenceLossConfig(type="orpo", beta=0.25)
    policy = SequenceLogps(per_token.sum(-1), tokens, per_token, mask[:, 1:])
    loss, metrics = preference_loss(policy, None, None, **loss_settings(cfg))
    chosen, rejected = (per_token.sum(-1) / tokens).chunk(2)
    nll = -per_token[:PAIRS][mask[:PAIRS, 1:]].mean()
    logits = torch.zeros(PAIRS, LENGTH, 5)
    trainer = SimpleNamespace(
        beta=cfg.beta,
        aux_loss_enabled=False,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        concatenated_forward=lambda model, batch: (chosen, rejected, logits, logits, nll),
    )
    trainer.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trainer, c, r)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
    torch.testing.assert_close(loss, trl_loss)
    for key in (
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "nll_loss",
        "log_odds_ratio",
    ):
        assert trl_metrics[key] == pytest.approx(metrics[key].float().mean().item(), abs=1e-6), key
    # by hand: the odds of an answer are p / (1 - p) of its length-averaged probability
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    torch.testing.assert_close(loss, nll - cfg.beta * F.logsigmoid(log_odds).mean())


def test_orpo_refuses_the_keys_it_does_not_use():
    from visiontune.core.errors import RecipeError
    from visiontune.recipe import parse_config

    base = {"task": "vlm_preference", "model": "m", "output_dir": "o", "data": {"train": "p.jsonl"}}
    for key, value, match in [
        ("rpo_alpha", 0.5, "loss.rpo_alpha acts only with the losses other than orpo"),
        ("label_smoothing", 0.1, "loss.label_smoothing acts only with loss.type robust or simpo"),
        ("simpo_gamma", 1.0, "loss.simpo_gamma acts only with loss.type: simpo"),
    ]:
        with pytest.raises(RecipeError, match=match):
            parse_config({**base, "loss": {"type": "orpo", key: value}})
    assert parse_config({**base, "loss": {"type": "orpo", "beta": 0.2}}).loss.beta == 0.2
