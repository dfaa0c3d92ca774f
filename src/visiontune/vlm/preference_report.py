"""The preference run's own report section: reward and margin curves (training and validation, TRL's metric names)
drawn from metrics.jsonl, and a table of the last values."""

from __future__ import annotations

from pathlib import Path

from visiontune.report._inputs import _read_jsonl, series
from visiontune.report._plots import _pyplot, _save
from visiontune.report.sections import add_section

CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def add_reward_section(run_dir: Path) -> Path | None:
    """plots/rewards.png (rewards and margins on the left, reward accuracy on the right) and its report section;
    nothing when the run logged no reward metric."""
    records = _read_jsonl(run_dir / "metrics.jsonl")
    curves = {
        f"{split} {key.split('/')[1]}": series(records, prefix + key)
        for split, prefix in (("train", ""), ("val", "eval_"))
        for key in CURVES
    }
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    fig, (rewards, accuracy) = _pyplot().subplots(1, 2, figsize=(11, 4))
    for label, (steps, values) in curves.items():
        ax = accuracy if label.endswith("accuracies") else rewards
        ax.plot(steps, values, label=label, marker="o" if label.startswith("val") else None, markersize=4)
    rewards.set(xlabel="step", ylabel="beta * log-ratio", title="Rewards and margin")
    accuracy.set(xlabel="step", ylabel="share of pairs", title="Reward accuracy (chosen > rejected)", ylim=(0, 1.02))
    for ax in (rewards, accuracy):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = _save(fig, run_dir / "plots" / "rewards.png")
    last = [[label, values[-1]] for label, (_, values) in curves.items()]
    add_section(
        run_dir,
        "Preference rewards",
        "Implicit rewards beta * (log p_policy - log p_reference) of the chosen and rejected answers (SimPO: of "
        "the length-averaged log-probs), their margin, and the share of pairs ranked right.",
        ["curve", "last value"],
        last,
        "plots/rewards.png",
    )
    return path
