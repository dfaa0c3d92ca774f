"""`visiontune merge`: merge CLIP vision encoders fine-tuned from one base (average, task arithmetic, TIES) and
evaluate the base, every fine-tune and the merge on every task's data with zero-shot heads."""

from __future__ import annotations

import json
from pathlib import Path

from visiontune.clip.classify import ClipClassifyTask, load_clip_classifier
from visiontune.clip.dual_encoder import resolve_dual_encoder
from visiontune.clip.merge import MERGE_METHODS
from visiontune.core.check import clean
from visiontune.core.config import PIL_MAX_PIXELS
from visiontune.core.errors import RecipeError
from visiontune.core.readers import read_dataset
from visiontune.run.folder import prepare_output_folder

OPTIONS = {"average": set(), "task_arithmetic": {"scaling"}, "ties": {"scaling", "density"}}


def merge_clip(base: str, fine_tuned: list[str], method: str, out: Path, data: list[str], **options: float) -> dict:
    if method not in MERGE_METHODS:
        raise RecipeError(f"--method {method} is not a merge method; use one of {sorted(MERGE_METHODS)}.")
    unknown = set(options) - OPTIONS[method]
    if unknown:
        raise RecipeError(f"--method {method} takes no {sorted(unknown)}; it takes {sorted(OPTIONS[method])}.")
    if len(fine_tuned) < 2:
        raise RecipeError("merge needs at least two fine-tuned models.")
    out = prepare_output_folder(out, "merge --out")  # before loading anything: a refused folder fails fast
    encoder = resolve_dual_encoder(base)
    base_state = {
        k: v for k, v in encoder.model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))
    }
    tuned_states = [load_clip_classifier(ft, ["_"]).vision_state() for ft in fine_tuned]
    merged = MERGE_METHODS[method](base_state, tuned_states, **options)
    encoder.model.load_state_dict(merged, strict=False)
    encoder.save(out, extra_meta={"merged_from": fine_tuned, "merge_method": method, "merge_options": options})
    table = evaluate_all(base, fine_tuned, out, data)
    (out / "merge.json").write_text(json.dumps({"method": method, "options": options, "results": table}, indent=2))
    return {"method": method, "results": table}


def evaluate_all(base: str, fine_tuned: list[str], merged: Path, data: list[str]) -> list[dict]:
    """Accuracy of base (zero-shot), each fine-tune and the merge on every dataset given."""
    task = ClipClassifyTask()
    models = {
        "base (zero-shot)": base,
        **{f"fine-tune {i + 1}": ft for i, ft in enumerate(fine_tuned)},
        "merged": str(merged),
    }
    rows = []
    for spec in data:
        images = clean(read_dataset(spec), "error", PIL_MAX_PIXELS, "merge eval")[0]
        row = {"data": spec}
        for label, source in models.items():
            clf = load_clip_classifier(source, images.class_names)
            row[label] = task.evaluate_loaded(clf, images)["metrics"]["accuracy"]
        rows.append(row)
    return rows
