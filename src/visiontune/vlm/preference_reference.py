"""The reference of preference tuning, without a second model in memory.

LoRA / QLoRA: the reference is the trained model with its adapters switched off (done per step by the trainer).
Full tuning: the reference log-probabilities of every pair are computed once, before training, by the model as it
starts, and cached in one safetensors file keyed on the model's weight files, the pairs' tokens and their images'
content (a re-run, or a resume, reads them back); `visiontune plan` times that pass on a few batches instead of
running it. SimPO has no reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from visiontune.core.identity import file_digest
from visiontune.vlm.tokenize import _image_identity

REFERENCE_FORMAT = "visiontune-reference-1"  # bump when what the cached numbers mean changes


def reference_mode(cfg: Any, model: Any) -> str:
    from peft import PeftModel

    from visiontune.vlm.preference_loss import REFERENCE_FREE

    if cfg.loss.type in REFERENCE_FREE:
        return "none"
    return "adapters_off" if isinstance(model, PeftModel) else "precomputed"


def set_reference(cfg: Any, model: Any, collator: Any, datasets: dict[str, Any]) -> None:
    """Give each dataset its [N, 2] reference log-probs (chosen, rejected), from the cache or computed now."""
    from visiontune.plan.make import planning

    for dataset in datasets.values():
        if len(dataset) == 0:
            continue
        key = reference_key(_model_source(cfg), dataset, cfg.data.max_image_pixels)
        path = _cache_dir() / f"{key}.safetensors"
        cached = _load(path, len(dataset)) if cfg.data.cache else None
        if cached is None and planning():
            dataset.reference, dataset.setup_seconds = timed_reference(model, collator, dataset)
            continue
        dataset.reference = cached if cached is not None else compute_reference(model, collator, dataset)
        if cached is None and cfg.data.cache:
            _save(path, dataset.reference)


@torch.no_grad()
def compute_reference(model: Any, collator: Any, dataset: Any, batch_size: int = 4) -> torch.Tensor:
    """Summed answer log-probs of each pair's two answers under `model` as it is now (eval mode, fp32)."""
    from visiontune.vlm.preference_forward import answer_logps

    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(items).items()}
            labels = batch.pop("labels")
            logps = answer_logps(model, batch, labels).logps.cpu()
            out.append(torch.stack(logps.chunk(2), dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def timed_reference(model: Any, collator: Any, dataset: Any, batches: int = 3, batch_size: int = 4) -> tuple:
    """For `visiontune plan`: the pass over every pair timed on a few batches (the first one untimed, a warm-up) and
    scaled to the dataset, instead of run; the log-probs of the pairs it saw, zeros for the rest (the plan measures
    costs, not losses). Nothing is cached."""
    import math
    import time

    from torch.utils.data import Subset

    n = min(len(dataset), (batches + 1) * batch_size)
    start = time.perf_counter()
    head = [compute_reference(model, collator, Subset(dataset, range(min(n, batch_size))), batch_size)]
    per_batch = time.perf_counter() - start  # what a dataset of one batch has
    if n > batch_size:
        start = time.perf_counter()
        head.append(compute_reference(model, collator, Subset(dataset, range(batch_size, n)), batch_size))
        per_batch = (time.perf_counter() - start) / (math.ceil(n / batch_size) - 1)
    reference = torch.cat([*head, torch.zeros(len(dataset) - n, 2)])
    return reference, per_batch * math.ceil(len(dataset) / batch_size)


def reference_key(model: str, dataset: Any, max_pixels: int) -> str:
    """Changes with the model's weights (files of a folder, else its name), each pair's tokens and labels, and its
    images' content."""
    h = hashlib.sha256(REFERENCE_FORMAT.encode())
    folder = Path(model)
    weights = sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("*.bin")) if folder.is_dir() else []
    h.update(json.dumps([model, max_pixels, [f"{p.name}:{file_digest(p)}" for p in weights]]).encode())
    for t in dataset.tokens:
        pair = dataset.pairs[t.index]
        record = [t.chosen.input_ids, t.chosen.labels, t.rejected.input_ids, t.rejected.labels]
        h.update(json.dumps([record, [_image_identity(s) for s in pair.chosen.images]]).encode())
    return h.hexdigest()[:32]


def _model_source(cfg: Any) -> str:
    """The hub id or folder of `model`, or the assembled model's folder (its language/, vision/ and projector files)."""
    if cfg.init_from:
        from visiontune.vlm.preference_assembled import assembled_folder

        return str(assembled_folder(cfg.init_from))
    return cfg.model


def _cache_dir() -> Path:
    return Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune")) / "reference"


def _load(path: Path, n: int) -> torch.Tensor | None:
    try:
        ref = load_file(str(path))["reference"]
    except Exception:  # missing, unreadable or foreign: compute again (the cache only saves time)
        return None
    return ref if ref.shape == (n, 2) else None


def _save(path: Path, reference: torch.Tensor) -> None:
    """Under a unique name, then renamed into place (readers never see a partial file); a failed write only costs
    the next run the computation."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"reference": reference.contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
