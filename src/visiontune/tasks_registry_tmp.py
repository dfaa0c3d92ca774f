"""Tasks, chosen by the recipe's explicit `task:` key. Each task is one module implementing `Task`."""

from __future__ import annotations

import importlib

from visiontune.tasks.base import Task

# task name -> "module:Class"; imported lazily so the CLI stays light.
TASKS: dict[str, str] = {
    "classify": "visiontune.tasks.classify:ClassifyTask",
    "clip_classify": "visiontune.tasks.clip_classify:ClipClassifyTask",
    "clip_contrastive": "visiontune.tasks.clip_contrastive:ClipContrastiveTask",
    "clip_continual": "visiontune.tasks.clip_continual:ClipContinualTask",
    "vlm_sft": "visiontune.tasks.vlm_sft:VlmSftTask",
    "vlm_assemble": "visiontune.tasks.vlm_assemble:VlmAssembleTask",
}


def get_task(name: str) -> Task:
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["TASKS", "Task", "get_task"]
