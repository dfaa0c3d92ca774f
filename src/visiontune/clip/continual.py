"""`task: clip_continual` — fine-tune one CLIP vision encoder on a sequence of classification tasks.

Each task gets its own zero-shot head, a fresh optimizer and schedule (a new Trainer), and a checkpoint. After
each task every task seen so far is evaluated: the accuracy matrix A[i][j] (after task i, on task j) gives the
average accuracy, forgetting and backward transfer (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from visiontune.classify.task import SplitData, TuningPlan, classification_fit, load_split
from visiontune.clip.classify import ClipClassifyTask, prompt_names
from visiontune.clip.config import ClipClassifyConfig, ClipContinualConfig, ClipDataConfig, ContinualTask
from visiontune.clip.dual_encoder import resolve_dual_encoder
from visiontune.clip.zero_shot import CLIPClassifier
from visiontune.core.errors import DataError, RecipeError
from visiontune.core.transforms import with_image_size
from visiontune.run.distributed import is_main_process
from visiontune.run.folder import last_checkpoint
from visiontune.run.runner import make_trainer, open_run, train_with_progress
from visiontune.run.task import Skipped


class ClipContinualTask(ClipClassifyTask):
    """One Trainer per task of the sequence (fresh optimiser and schedule), built by the runner's `make_trainer`.
    Progress is recorded after each task (eval/continual.json), so `--resume` continues mid-sequence: finished
    tasks reload their trained parameters, the interrupted one resumes from its last checkpoint."""

    name = "clip_continual"

    def train(self, cfg: ClipContinualConfig, overwrite: bool = False, resume: bool = False) -> Path:
        start = time.perf_counter()
        run_dir = Path(cfg.output_dir).expanduser()
        order = _ordered(cfg)
        task_cfgs = [_task_config(cfg, task, run_dir / "tasks" / f"{i}-{task.name}") for i, task in enumerate(order)]
        splits = [_load(task, c) for task, c in zip(order, task_cfgs, strict=True)]  # all data checked up front
        progress = _resume_progress(run_dir, resume, cfg.train.resume)
        skipped = [Skipped(b.ref, b.reason) for s in splits for b in s.skipped]
        open_run(cfg, run_dir, overwrite, None, skipped, resuming=progress is not None)
        if progress and is_main_process():
            print(f"Resuming {run_dir} after task {len(progress['matrix'])} of {len(order)}.")
        names = [prompt_names(t.prompt_names, s.train.class_names) for t, s in zip(order, splits, strict=True)]
        clf = self._model(cfg, names[0])
        result = progress or {"tasks": [t.name for t in order], "zero_shot": [], "matrix": []}
        if not result["zero_shot"]:
            result["zero_shot"] = [self._accuracy(clf, n, s) for n, s in zip(names, splits, strict=True)]
        for i, (task_cfg, split) in enumerate(zip(task_cfgs, splits, strict=True)):
            stage_dir = Path(task_cfg.output_dir)
            clf.set_head(names[i])
            if i < len(result["matrix"]):  # finished before the interruption
                _load_trainable(clf, stage_dir / "trainable.safetensors")
                continue
            self._train_one(clf, task_cfg, split, stage_dir, resuming=progress is not None)
            result["matrix"].append(
                [self._accuracy(clf, names[j], splits[j]) if j <= i else None for j in range(len(order))]
            )
            if is_main_process():
                _write_json(_progress_file(run_dir), result)
        clf.set_head(names[-1])
        if is_main_process():
            clf.save(run_dir / "model")
            result |= {**continual_metrics(result["matrix"]), "wall_time_s": round(time.perf_counter() - start, 1)}
            _write_outputs(run_dir, result)
        return run_dir

    def _train_one(
        self, clf: CLIPClassifier, cfg: ClipClassifyConfig, split: SplitData, stage_dir: Path, resuming: bool
    ) -> None:
        if is_main_process():
            stage_dir.mkdir(parents=True, exist_ok=True)
        trainer = make_trainer(cfg, classification_fit(clf, cfg, split, TuningPlan()), stage_dir)
        checkpoint = last_checkpoint(stage_dir) if resuming else None
        train_with_progress(trainer, checkpoint)
        trainer.record_rank(stage_dir)
        if is_main_process():
            _save_trainable(clf, stage_dir / "trainable.safetensors")

    def _model(self, cfg: ClipContinualConfig, first_names: list[str]) -> CLIPClassifier:
        encoder = resolve_dual_encoder(cfg.model)
        if cfg.data.image_size:
            encoder.preprocess = with_image_size(encoder.preprocess, cfg.data.image_size)
        clf = CLIPClassifier(encoder, first_names, cfg.data.templates)
        self.plan_tuning(clf, cfg)  # clip_classify's: label smoothing, checkpointing, full / LoRA / L-LoRA
        return clf

    def _accuracy(self, clf: CLIPClassifier, names: list[str], split: SplitData) -> float:
        clf.set_head(names)
        return self.evaluate_loaded(clf, split.val)["metrics"]["accuracy"]


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


def _progress_file(run_dir: Path) -> Path:
    return run_dir / "eval" / "continual.json"


def _resume_progress(run_dir: Path, flag: bool, recipe_key: bool) -> dict | None:
    """The recorded progress to continue from; `--resume` with nothing to continue is refused."""
    from visiontune.core.errors import RunDirError

    path = _progress_file(run_dir)
    progress = json.loads(path.read_text()) if (flag or recipe_key) and path.is_file() else None
    if progress is None and (flag or recipe_key) and any((run_dir / "tasks").glob("*/checkpoints/checkpoint-*")):
        progress = {"tasks": [], "zero_shot": [], "matrix": []}  # stopped inside the first task
    if flag and progress is None:
        raise RunDirError(f"--resume: {run_dir} has no finished task or checkpoint yet; start it without --resume.")
    return progress


def _load_trainable(clf: CLIPClassifier, path: Path) -> None:
    from safetensors.torch import load_file

    missing = [k for k in load_file(str(path)) if k not in dict(clf.vision.named_parameters())]
    if missing:
        raise RecipeError(f"{path} holds parameters this model lacks ({missing[0]}); resume with the same recipe.")
    clf.vision.load_state_dict(load_file(str(path)), strict=False)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def _save_trainable(clf: CLIPClassifier, path: Path) -> None:
    """Per-task checkpoint of what trains (vision weights, or LoRA / L-LoRA parameters), without unwrapping."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in clf.vision.named_parameters() if v.requires_grad}
    save_file(state, str(path))


def _write_outputs(run_dir: Path, result: dict) -> None:
    from visiontune.report import write_report
    from visiontune.report.sections import add_section

    _write_json(_progress_file(run_dir), result)
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": result["wall_time_s"]}, indent=2))
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
    write_report(run_dir)


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
