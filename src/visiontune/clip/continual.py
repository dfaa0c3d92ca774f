"""`task: clip_continual` — fine-tune one CLIP vision encoder on a sequence of classification tasks.

One runner stage per task of the sequence (`visiontune.run.stages`): each gets its own zero-shot head, a fresh
optimiser and schedule (a new Trainer) and its checkpoints in `stages/I-NAME/`. After each task every task seen so
far is evaluated: the accuracy matrix A[i][j] (after task i, on task j) gives the average accuracy, forgetting and
backward transfer (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from visiontune.classify.task import SplitData, TuningPlan, classification_fit, load_split, split_findings
from visiontune.clip.classify import ClipClassifyTask, prompt_names
from visiontune.clip.config import ClipClassifyConfig, ClipContinualConfig, ClipDataConfig, ContinualTask
from visiontune.clip.dual_encoder import resolve_dual_encoder
from visiontune.clip.zero_shot import CLIPClassifier
from visiontune.core.errors import DataError, RecipeError
from visiontune.core.identity import fingerprint
from visiontune.core.transforms import with_image_size
from visiontune.run.distributed import is_main_process
from visiontune.run.stages import StagedTask, stage_dir
from visiontune.run.task import Fit, Skipped


@dataclass
class Sequence:
    """The checked data of every task, in training order, with the recipe each one trains under."""

    tasks: list[ContinualTask]
    configs: list[ClipClassifyConfig]
    splits: list[SplitData]
    names: list[list[str]]  # each task's class names as the zero-shot head reads them


class ClipContinualTask(StagedTask, ClipClassifyTask):
    """A stage per task; clip_classify's model, tuning and evaluation (and its `evaluate`/`predict` for exports)."""

    name = "clip_continual"

    def prepare(self, cfg: ClipContinualConfig) -> Sequence:
        tasks = _ordered(cfg)
        run_dir = Path(cfg.output_dir).expanduser()
        configs = [_task_config(cfg, t, stage_dir(run_dir, i, t.name)) for i, t in enumerate(tasks)]
        splits = [_load(t, c) for t, c in zip(tasks, configs, strict=True)]  # all data checked up front
        names = [prompt_names(t.prompt_names, s.train.class_names) for t, s in zip(tasks, splits, strict=True)]
        return Sequence(tasks, configs, splits, names)

    def skipped(self, data: Sequence) -> list[Skipped]:
        return [Skipped(b.ref, b.reason) for s in data.splits for b in s.skipped]

    def findings(self, data: Sequence) -> dict:
        """Each task's findings; the run's fingerprint (checked on resume) covers every task's records."""
        found = {task.name: split_findings(split) for task, split in zip(data.tasks, data.splits, strict=True)}
        records = {
            f"{task.name}.{role}": (split.keys or [], split.labels)
            for task, s in zip(data.tasks, data.splits, strict=True)
            for role, split in (("train", s.train), ("val", s.val))
        }
        return {
            "tasks": {name: {k: v for k, v in f.items() if k != "data"} for name, f in found.items()},
            "data": fingerprint(records, None),
        }

    def sizes(self, data: Sequence) -> dict[str, int]:
        return {
            "train_samples": sum(len(s.train) for s in data.splits),
            "val_samples": sum(len(s.val) for s in data.splits),
        }

    def stage_names(self, cfg: ClipContinualConfig) -> list[str]:
        return [t.name for t in _ordered(cfg)]

    def start(self, cfg: ClipContinualConfig, data: Sequence) -> CLIPClassifier:
        encoder = resolve_dual_encoder(cfg.model)
        if cfg.data.image_size:
            encoder.preprocess = with_image_size(encoder.preprocess, cfg.data.image_size)
        clf = CLIPClassifier(encoder, data.names[0], cfg.data.templates)
        self.plan_tuning(clf, cfg)  # clip_classify's: label smoothing, checkpointing, full / LoRA / L-LoRA
        return clf

    def build_stage(
        self, cfg: ClipContinualConfig, data: Sequence, clf: CLIPClassifier, index: int, folder: Path
    ) -> tuple[ClipClassifyConfig, Fit]:
        clf.set_head(data.names[index])
        task_cfg = data.configs[index]
        return task_cfg, classification_fit(clf, task_cfg, data.splits[index], TuningPlan())

    def end_stage(
        self, cfg: ClipContinualConfig, data: Sequence, clf: CLIPClassifier, index: int, folder: Path
    ) -> dict:
        if is_main_process():
            _save_trainable(clf, folder / TRAINABLE)
        return {"accuracy": [self._accuracy(clf, data, j) if j <= index else None for j in range(len(data.tasks))]}

    def restore_stage(
        self, cfg: ClipContinualConfig, data: Sequence, clf: CLIPClassifier, index: int, folder: Path
    ) -> None:
        _load_trainable(clf, folder / TRAINABLE)

    def evaluate_state(
        self, cfg: ClipContinualConfig, data: Sequence, clf: CLIPClassifier, name: str, stages: list[dict]
    ) -> dict:
        """Before: zero-shot accuracy on every task. After: the last stage's row of the matrix (already measured)
        and the sequence's forgetting and backward transfer."""
        tasks = [t.name for t in data.tasks]
        if name == "before":
            zero_shot = [self._accuracy(clf, data, j) for j in range(len(tasks))]
            per_task = dict(zip(tasks, zero_shot, strict=True))
            return {"metrics": {"accuracy": sum(zero_shot) / len(zero_shot)}, "per_task": per_task}
        matrix = [stage["accuracy"] for stage in stages]
        found = continual_metrics(matrix)
        metrics = {"accuracy": found.pop("average_accuracy"), **found}
        return {"metrics": metrics, "per_task": dict(zip(tasks, matrix[-1], strict=True)), "matrix": matrix}

    def save_state(
        self, cfg: ClipContinualConfig, data: Sequence, clf: CLIPClassifier, run_dir: Path, after: dict, stages: list
    ) -> dict:
        clf.set_head(data.names[-1])
        clf.save(run_dir / "model")
        before = json.loads((run_dir / "eval" / "before.json").read_text())
        result = {
            "tasks": [t.name for t in data.tasks],
            "zero_shot": list(before["per_task"].values()),
            "matrix": after["matrix"],
            **continual_metrics(after["matrix"]),
        }
        _write_outputs(run_dir, result)
        return {}

    def _accuracy(self, clf: CLIPClassifier, data: Sequence, index: int) -> float:
        clf.set_head(data.names[index])
        return self.evaluate_loaded(clf, data.splits[index].val)["metrics"]["accuracy"]


TRAINABLE = "trainable.safetensors"  # a finished stage's trained parameters, reloaded on resume


def continual_metrics(matrix: list[list[float | None]]) -> dict[str, float]:
    """Average final accuracy, forgetting (best earlier accuracy minus final, averaged over all but the last
    task) and backward transfer (final minus just-learnt accuracy, same tasks)."""
    final, n = matrix[-1], len(matrix)
    average = sum(final) / n
    if n < 2:
        return {"average_accuracy": average, "forgetting": 0.0, "backward_transfer": 0.0}
    forgetting = sum(max(matrix[i][j] for i in range(j, n - 1)) - final[j] for j in range(n - 1)) / (n - 1)
    bwt = sum(final[j] - matrix[j][j] for j in range(n - 1)) / (n - 1)
    return {"average_accuracy": average, "forgetting": forgetting, "backward_transfer": bwt}


def _ordered(cfg: ClipContinualConfig) -> list[ContinualTask]:
    tasks = list(cfg.tasks)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(tasks)
    return tasks


def _task_config(cfg: ClipContinualConfig, task: ContinualTask, out: Path) -> ClipClassifyConfig:
    shared = cfg.data.model_dump()
    data = ClipDataConfig(
        train=task.train, val=task.val, class_names=task.class_names, prompt_names=task.prompt_names, **shared
    )
    return ClipClassifyConfig(
        model=cfg.model, output_dir=str(out), seed=cfg.seed, data=data, tune=cfg.tune, train=cfg.train, track=cfg.track
    )


def _load(task: ContinualTask, cfg: ClipClassifyConfig) -> SplitData:
    try:
        return load_split(cfg)
    except DataError as err:
        raise DataError(f"Continual task `{task.name}`: {err}") from None


def _load_trainable(clf: CLIPClassifier, path: Path) -> None:
    from safetensors.torch import load_file

    missing = [k for k in load_file(str(path)) if k not in dict(clf.vision.named_parameters())]
    if missing:
        raise RecipeError(f"{path} holds parameters this model lacks ({missing[0]}); resume with the same recipe.")
    clf.vision.load_state_dict(load_file(str(path)), strict=False)


def _save_trainable(clf: CLIPClassifier, path: Path) -> None:
    """Per-task checkpoint of what trains (vision weights, or LoRA / L-LoRA parameters), without unwrapping."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in clf.vision.named_parameters() if v.requires_grad}
    save_file(state, str(path))


def _write_outputs(run_dir: Path, result: dict) -> None:
    from visiontune.report.sections import add_section

    path = run_dir / "eval" / "continual.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    plot_matrix(result, run_dir / "plots" / "continual_matrix.png")
    tasks = result["tasks"]
    rows = [["zero-shot", *result["zero_shot"]]] + [
        [f"after {t}", *row] for t, row in zip(tasks, result["matrix"], strict=True)
    ]
    text = (
        f"Average accuracy {result['average_accuracy']:.4f}, forgetting {result['forgetting']:.4f}, "
        f"backward transfer {result['backward_transfer']:.4f}."
    )
    add_section(
        run_dir,
        "Continual accuracy matrix",
        text=text,
        header=["", *tasks],
        rows=rows,
        image="plots/continual_matrix.png",
    )


def plot_matrix(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = result["tasks"]
    grid = np.array([[np.nan if v is None else v for v in row] for row in result["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 1.0 * len(tasks) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    ax.set(xlabel="evaluated on", title="Accuracy after each task")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
