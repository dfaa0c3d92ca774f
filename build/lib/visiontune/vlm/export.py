"""`visiontune export RUN --merge` and `visiontune compare BASE TUNED --data FILE` for VLM runs."""

from __future__ import annotations

import html
import json
from pathlib import Path

from visiontune.core.errors import RunDirError
from visiontune.vlm.generate import checked_conversations, evaluate_conversations, load_trained


def export_merged(run: str, out: Path | None = None) -> Path:
    """Fold the LoRA adapter into the base weights: a plain transformers model + processor folder."""
    from peft import PeftModel

    model, processor = load_trained(run)
    if not isinstance(model, PeftModel):
        raise RunDirError(f"{run} holds a full model, not a LoRA adapter; it is already plain transformers.")
    out = out or Path(run) / "merged"
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} already exists; remove it or pass --out to another folder.")
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def export_assembled_llava(run: str, out: Path | None = None) -> Path:
    """A vlm_assemble run's model as `LlavaForConditionalGeneration` + `LlavaProcessor` (when its parts allow)."""
    from visiontune.vlm.assembled import is_assembled, load_assembled
    from visiontune.vlm.llava_export import export_llava

    folder = Path(run) / "model" if (Path(run) / "model").is_dir() else Path(run)
    if not is_assembled(folder):
        raise RunDirError(f"{run} is not a vlm_assemble run (no model/visiontune.json of an assembled VLM).")
    out = out or Path(run) / "llava"
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} already exists; remove it or pass --out to another folder.")
    model, processor = load_assembled(folder)
    return export_llava(model, processor, out)


def compare(
    base: str,
    tuned: str,
    data: str,
    out: Path,
    metrics: list[str],
    max_new_tokens: int = 64,
    on_bad_sample: str = "error",
) -> dict:
    """Evaluate both models on the same checked data; write compare.json and compare.md (metrics, answers,
    wins/losses, and the records on_bad_sample="skip" left out)."""
    from visiontune.run.folder import prepare_output_folder

    out = prepare_output_folder(out, "compare --out")  # before the slow part: never into someone else's folder
    convs, skipped = checked_conversations(data, on_bad_sample)
    reports = {
        name: evaluate_conversations(source, convs, metrics, max_new_tokens)
        for name, source in (("base", base), ("tuned", tuned))
    }
    rows = [_row(b, t) for b, t in zip(reports["base"]["samples"], reports["tuned"]["samples"], strict=True)]
    result = {"metrics": {k: reports[k]["metrics"] for k in reports}, "samples": rows, "skipped_samples": skipped}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(_markdown(result, base, tuned))
    return result


def _row(b: dict, t: dict) -> dict:
    from visiontune.vlm.generation_metrics import anls_score

    gain = anls_score(t["prediction"], [t["reference"]]) - anls_score(b["prediction"], [b["reference"]])
    return {
        "ref": b["ref"],
        "question": b["question"],
        "reference": b["reference"],
        "base": b["prediction"],
        "tuned": t["prediction"],
        "gain": gain,
    }


def _markdown(result: dict, base: str, tuned: str) -> str:
    names = list(result["metrics"]["base"])
    lines = [
        f"# Compare: `{base}` vs `{tuned}`",
        "",
        "| metric | base | tuned | change |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in names:
        b, t = result["metrics"]["base"][name], result["metrics"]["tuned"][name]
        lines.append(f"| {name} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
    if result["skipped_samples"]:
        lines += ["", f"{len(result['skipped_samples'])} bad record(s) left out (--skip-bad):", ""]
        lines += [f"- {_cell(s['ref'])}: {_cell(s['reason'])}" for s in result["skipped_samples"]]
    ranked = sorted(result["samples"], key=lambda r: r["gain"])
    for title, picked in (("Biggest wins", ranked[::-1][:5]), ("Biggest losses", ranked[:5])):
        lines += [
            "",
            f"## {title}",
            "",
            "| sample | question | reference | base | tuned |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(r['ref'])} | {_cell(r['question'])} | {_cell(r['reference'])} | {_cell(r['base'])} | "
            f"{_cell(r['tuned'])} |"
            for r in picked
        ]
    lines += ["", "## All answers", "", "| sample | reference | base | tuned |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {_cell(r['ref'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['tuned'])} |"
        for r in result["samples"]
    ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", " ")[:200]
