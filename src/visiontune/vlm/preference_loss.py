"""The preference losses of TRL 1.16, on sequence log-probabilities, and the reward metrics under TRL's names.

Why not TRL's code for DPO: `DPOTrainer._compute_loss` takes the model and a batch in its own layout (it runs the
forward itself, with a fused LM head), so its formulas cannot be called on log-probabilities. They are written out
here, the same formulas term for term (sigmoid, hinge, IPO with its per-token normalisation, robust; the RPO/`sft`
term as a token mean over the chosen answers), and tests/vlm/test_preference_loss.py runs TRL's `_compute_loss` on
the same log-probabilities to show they agree. SimPO calls TRL's `CPOTrainer.cpo_loss` and ORPO TRL's
`ORPOTrainer.odds_ratio_loss` themselves (functions of log-probabilities).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from visiontune.vlm.tokenize import IGNORE

REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class SequenceLogps:
    """Per sequence of a [chosen; rejected] batch: summed answer log-probs, answer token counts, and the per-token
    log-probs of the answers (zero elsewhere), for the SFT term."""

    logps: torch.Tensor  # [2B]
    tokens: torch.Tensor  # [2B]
    per_token: torch.Tensor  # [2B, T-1]
    mask: torch.Tensor  # [2B, T-1] bool

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logps.chunk(2)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
    """Log-probabilities of the labelled (answer) tokens, each predicted from the position before it."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = labels.masked_fill(~mask, 0).unsqueeze(-1)
    per_token = (torch.gather(logits.log_softmax(-1), -1, picked).squeeze(-1)) * mask
    return SequenceLogps(per_token.sum(-1), mask.sum(-1), per_token, mask)


def loss_settings(loss: Any) -> dict[str, Any]:
    """The recipe's `loss` section as `preference_loss`'s keywords: only the keys the chosen loss uses."""
    settings = {"kind": loss.type, "beta": loss.beta, "rpo_alpha": loss.rpo_alpha}
    if loss.type in ("robust", "simpo"):
        settings["label_smoothing"] = loss.label_smoothing
    if loss.type == "simpo":
        settings["simpo_gamma"] = loss.simpo_gamma
    return settings


def preference_loss(
    policy: SequenceLogps,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    kind: str,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (TRL's `loss_type` `kind`, its `beta`, ...) and the per-pair metrics TRL logs (detached)."""
    chosen, rejected = policy.halves()
    chosen_n, rejected_n = (t.clamp(min=1).to(chosen.dtype) for t in policy.tokens.chunk(2))
    extra: dict[str, torch.Tensor] = {}
    if kind == "orpo":  # TRL's ORPO scores length-averaged log-probs; its rewards and logps/* are those averages
        chosen, rejected = chosen / chosen_n, rejected / rejected_n
        per_pair, chosen_rewards, rejected_rewards, extra = _orpo(beta, chosen, rejected, policy)
    elif kind in REFERENCE_FREE:
        averages = (chosen / chosen_n, rejected / rejected_n)
        per_pair, chosen_rewards, rejected_rewards = _simpo(beta, label_smoothing, simpo_gamma, *averages)
    else:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        per_pair = dpo_losses(kind, beta, label_smoothing, chosen_ratio, rejected_ratio, chosen_n, rejected_n)
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    loss = per_pair.mean()
    if rpo_alpha:
        chosen_tokens, chosen_mask = policy.per_token.chunk(2)[0], policy.mask.chunk(2)[0]
        loss = loss + rpo_alpha * -chosen_tokens[chosen_mask].mean()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
        **extra,
    }
    return loss, metrics


def dpo_losses(
    kind: str,
    beta: float,
    label_smoothing: float,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """Per-pair loss from the policy/reference log-ratios: TRL 1.16 DPOTrainer's formulas (reverse KL)."""
    delta = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":  # per-token averages, as TRL (confirmed with the IPO authors)
        return (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    if kind == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss {kind!r}")


def _orpo(
    beta: float, chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, policy: SequenceLogps
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO: the NLL of the chosen answer minus `beta` x log sigmoid(log odds ratio), per pair. The odds-ratio term,
    the rewards and TRL's extra metrics are TRL's `ORPOTrainer.odds_ratio_loss` itself. The NLL is the token mean over
    the chosen answers (the paper's L_SFT, and our RPO term): TRL's decoder-only path also scores the prompt, which
    here holds the image tokens and is never a training target."""
    with warnings.catch_warnings():  # TRL flags ORPO as experimental; tests pin what we use of it
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer

    settings = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=chosen_avg.device))
    odds, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        settings, chosen_avg, rejected_avg
    )
    chosen_tokens, chosen_mask = policy.per_token.chunk(2)[0], policy.mask.chunk(2)[0]
    nll = -chosen_tokens[chosen_mask].mean()
    # per pair: mean(nll - odds) == nll - mean(odds), TRL's `policy_nll_loss - losses.mean()`
    per_pair = nll - odds
    extra = {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return per_pair, chosen_rewards, rejected_rewards, extra


def _simpo(
    beta: float, label_smoothing: float, gamma: float, chosen_avg: torch.Tensor, rejected_avg: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """TRL's own SimPO (`CPOTrainer.cpo_loss` with loss_type simpo) on length-averaged log-probs."""
    with warnings.catch_warnings():  # TRL flags CPO as experimental; tests pin what we use of it
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer

    settings = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=label_smoothing,
        accelerator=SimpleNamespace(device=chosen_avg.device),
    )
    return CPOTrainer.cpo_loss(settings, chosen_avg, rejected_avg)
