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

from visiontune.classify.task import SplitData, build_trainer, load_split
from visiontune.clip.classify import ClipClassifyTask, prompt_names
from visiontune.clip.config import ClipClassifyConfig, ClipContinualConfig, ClipDataConfig, ContinualTask
from visiontune.clip.dual_encoder import resolve_dual_encoder
from visiontune.clip.vision_lora import apply_vision_lora
from visiontune.clip.zero_shot import CLIPClassifier
from visiontune.core.errors import DataError
from visiontune.recipe import dump_config
from visiontune.run.folder import prepare_run_dir


class ClipContinualTask(ClipClassifyTask):
    def train(self, cfg: ClipContinualConfig, overwrite: bool = False, resume: bool = False) -> Path:
        start = time.perf_counter()
        run_dir = Path(cfg.output_dir)
        prepare_run_dir(run_dir, overwrite, resume=False)
        dump_config(cfg, run_dir / "config.yaml")
        order = _ordered(cfg)
        task_cfgs = [_task_config(cfg, task, run_dir / "tasks" / f"{i}-{task.name}") for i, task in enumerate(order)]
        splits = [_load(task, c) for task, c in zip(order, task_cfgs, strict=True)]  # all data checked up front
        names = [prompt_names(t.prompt_names, s.train.class_names) for t, s in zip(order, splits, strict=True)]
        clf = self._model(cfg, names[0])
        zero_shot = [self._accuracy(clf, n, s) for n, s in zip(names, splits, strict=True)]
        matrix: list[list[float | None]] = []
        for i, (task_cfg, split) in enumerate(zip(task_cfgs, splits, strict=True)):
            clf.set_head(names[i])
            Path(task_cfg.output_dir).mkdir(parents=True, exist_ok=True)
            trainer = build_trainer(clf, task_cfg, split, _plan(), Path(task_cfg.output_dir))
            trainer.train()
            _save_trainable(clf, Path(task_cfg.output_dir) / "trainable.safetensors")
            matrix.append([self._accuracy(clf, names[j], splits[j]) if j <= i else None for j in range(len(order))])
        clf.set_head(names[-1])
        clf.save(run_dir / "model")
        result = {
            "tasks": [t.name for t in order],
            "zero_shot": zero_shot,
            "matrix": matrix,
            **continual_metrics(matrix),
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        _write_outputs(run_dir, result)
        return run_dir

    def _model(self, cfg: ClipContinualConfig, first_names: list[str]) -> CLIPClassifier:
        encoder = resolve_dual_encoder(cfg.model)
        if cfg.data.image_size:
            from visiontune.classify.task import _with_size

            encoder.preprocess = _with_size(encoder.preprocess, cfg.data.image_size)
        clf = CLIPClassifier(encoder, first_names, cfg.data.templates)
        if cfg.tune.method == "full":
            clf.freeze_all_but_vision()
        else:
            apply_vision_lora(clf, cfg.tune.lora, linearize=cfg.tune.method == "l_lora")
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


def _plan():
    from visiontune.classify.task import TuningPlan

    return TuningPlan()


def _save_trainable(clf: CLIPClassifier, path: Path) -> None:
    """Per-task checkpoint of what trains (vision weights, or LoRA / L-LoRA parameters), without unwrapping."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in clf.vision.named_parameters() if v.requires_grad}
    save_file(state, str(path))


def _write_outputs(run_dir: Path, result: dict) -> None:
    from visiontune.report import write_report
    from visiontune.report.sections import add_section

    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "continual.json").write_text(json.dumps(result, indent=2))
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
