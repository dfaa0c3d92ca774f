"""WiSE-FT (Wortsman et al., 2022): mix zero-shot and fine-tuned vision weights, θ(α) = (1-α)·θ_zs + α·θ_ft,
and measure the target task and a held-out control task for each α, so fine-tuning need not cost zero-shot
ability. Writes `eval/wise_ft.json`, `plots/wise_ft.png` and the chosen mix as `wise_ft_model/`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from visiontune.clip.config import ClipClassifyConfig
from visiontune.clip.merge import StateDict, interpolate
from visiontune.core.check import clean
from visiontune.core.errors import ModelError
from visiontune.core.readers import read_dataset


def sweep(cfg: ClipClassifyConfig, run_dir: Path) -> list[dict]:
    """Evaluate θ(α) for every `wise_ft.alphas`, save the chosen mix. The saved model is read from disk once: both
    endpoints are kept as CPU state dicts and each α's mix is loaded into that one model."""
    from visiontune.classify.task import load_split
    from visiontune.clip.classify import ClipClassifyTask, load_clip_classifier

    task, wise = ClipClassifyTask(), cfg.wise_ft
    tuned = load_clip_classifier(str(run_dir / "model"))
    fine_tuned = {k: v.detach().to("cpu", copy=True) for k, v in tuned.vision_state().items()}
    zero_shot = _zero_shot_state(cfg, fine_tuned)
    target = load_split(cfg).val
    target_names = tuned.class_names
    control = _control(wise.control, cfg.data.max_image_pixels)
    rows = []
    for alpha in wise.alphas:
        tuned.encoder.model.load_state_dict(interpolate(zero_shot, fine_tuned, alpha), strict=False)
        row = {"alpha": alpha, "target_accuracy": _accuracy(task, tuned, target_names, target)}
        if control is not None:
            row["control_accuracy"] = _accuracy(task, tuned, control.class_names, control)
        row["mean_accuracy"] = sum(v for k, v in row.items() if k.endswith("_accuracy")) / (1 + (control is not None))
        rows.append(row)
    chosen = _choose(rows, wise.choose)
    tuned.encoder.model.load_state_dict(interpolate(zero_shot, fine_tuned, chosen), strict=False)
    tuned.set_head(target_names)
    tuned.save(run_dir / "wise_ft_model")
    (run_dir / "eval" / "wise_ft.json").write_text(json.dumps({"rows": rows, "chosen_alpha": chosen}, indent=2))
    _plot(rows, chosen, run_dir / "plots" / "wise_ft.png")
    _report(run_dir, rows, chosen)
    return rows


def _zero_shot_state(cfg: ClipClassifyConfig, fine_tuned: StateDict) -> StateDict:
    """The vision weights training started from: the base model's, then `init_from`'s. Each is copied into a CPU
    tensor shaped and typed like its fine-tuned counterpart, as loading them into the saved model would do."""
    from visiontune.clip.classify import read_vision_state
    from visiontune.clip.dual_encoder import resolve_dual_encoder

    base = resolve_dual_encoder(cfg.model).model.state_dict()
    if cfg.init_from:
        base.update(read_vision_state(Path(cfg.init_from), base))
    state = {}
    for key, like in fine_tuned.items():
        start = base.get(key)
        if start is None or start.shape != like.shape:
            raise ModelError(
                f"wise_ft: the saved model's {key} does not match {cfg.model}'s; the run folder is from another model."
            )
        state[key] = torch.empty_like(like).copy_(start)
    return state


def _report(run_dir: Path, rows: list[dict], chosen: float) -> None:
    from visiontune.report import write_report
    from visiontune.report.sections import add_section

    keys = [k for k in ("alpha", "target_accuracy", "control_accuracy", "mean_accuracy") if k in rows[0]]
    add_section(
        run_dir,
        "WiSE-FT: zero-shot / fine-tuned weight mixing",
        text=f"Chosen α = {chosen}, saved as `wise_ft_model/`.",
        header=keys,
        rows=[[r[k] for k in keys] for r in rows],
        image="plots/wise_ft.png",
    )
    write_report(run_dir)


def _control(spec: str | None, max_pixels: int):
    if spec is None:
        return None
    return clean(read_dataset(spec), "error", max_pixels, "wise_ft.control")[0]


def _accuracy(task, clf, class_names: list[str], images) -> float:
    clf.set_head(class_names)
    return task.evaluate_loaded(clf, images)["metrics"]["accuracy"]


def _choose(rows: list[dict], rule: float | str) -> float:
    if isinstance(rule, float):
        return rule
    key = "target_accuracy" if rule == "best_target" else "mean_accuracy"
    return max(rows, key=lambda r: (r[key], -abs(r["alpha"] - 0.5)))["alpha"]


def _plot(rows: list[dict], chosen: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [r["alpha"] for r in rows]
    for key, label in (("target_accuracy", "target task"), ("control_accuracy", "control task (zero-shot)")):
        if key in rows[0]:
            ax.plot(alphas, [r[key] for r in rows], marker="o", label=label)
    ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen α = {chosen}")
    ax.set(xlabel="α (0 = zero-shot weights, 1 = fine-tuned)", ylabel="accuracy", title="WiSE-FT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
