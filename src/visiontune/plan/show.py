"""The plan on the console (one table) and in plan.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLAN_OUT = "plan --out"


def check_plan_out(out: Path, inputs: list[object]) -> Path:
    """plan.json goes anywhere but into a run folder (a run's files are the run's) or over a file plan did not
    write; refused before anything is loaded."""
    from visiontune.core.errors import RunDirError
    from visiontune.run.folder import check_output_file, marker_kind

    out = check_output_file(out, PLAN_OUT, inputs)
    parent = out.resolve().parent
    if marker_kind(parent) is not None:
        raise RunDirError(
            f"{PLAN_OUT}: {parent} is a visiontune output folder, whose files are its run's; write the plan "
            "elsewhere (--out PATH)."
        )
    return out


def write_plan(plan: dict[str, Any], out: Path) -> None:
    from visiontune.run.folder import mark_output_file

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=2))
    mark_output_file(out, PLAN_OUT)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) pairs of the table, in the order a reader asks: data, model, memory, time."""
    samples = ", ".join(f"{k} {v}" for k, v in plan["samples"].items())
    batch = plan["batch"]
    memory = plan["memory"]
    time = plan["time"]
    out = [
        ("task", f"{plan['task']} on {plan['device']}"),
        ("samples", samples),
    ]
    if plan["skipped"]:
        first = plan["skipped"][0]
        out.append(("skipped", f"{len(plan['skipped'])}, first: {first['ref']} {first['reason']}"))
    tokens = plan.get("tokens")
    if tokens:
        per = tokens["tokens_per_record"]
        hist = per["histogram"]
        bins = " ".join(f"{lo}+:{n}" for lo, n in zip(hist["edges"], hist["counts"], strict=False))
        out.append(("tokens/record", f"min {per['min']}, mean {per['mean']}, max {per['max']} ({bins})"))
        if "tokens_per_pair" in tokens:  # vlm_preference: the records are both answers of each pair
            pair = tokens["tokens_per_pair"]
            out.append(
                ("tokens/pair", f"min {pair['min']}, mean {pair['mean']}, max {pair['max']} (chosen + rejected)")
            )
        if tokens["image_tokens_per_record"]:
            images = tokens["image_tokens_per_record"]
            out.append(
                ("image tokens", f"mean {images['mean']}, max {images['max']} at {tokens['max_image_pixels']} px")
            )
        out.append(("truncated", f"{len(tokens['truncated'])} record(s) at max_length {tokens['max_length']}"))
        pad = tokens["padding"]
        drawn = "packed (data.packing)" if tokens.get("packing") else "as training draws"
        out.append(("padding", f"{pad['as_training_draws']:.1%} {drawn}, {pad['shuffled']:.1%} shuffled and padded"))
    params = plan["parameters"]
    out += [
        ("parameters", f"{params['trainable']:,} trainable, {params['frozen']:,} frozen ({plan['method']})"),
        (
            "batch",
            f"{batch['per_device']} x {batch['grad_accum']} accumulation x {batch['world_size']} process(es) = "
            f"{batch['global']}{' (batch_size: auto)' if batch.get('auto') else ''}, {plan['precision']}",
        ),
        (
            "memory (estimate)",
            f"{size(memory['peak'])} = weights {size(memory['weights'])} + gradients {size(memory['gradients'])} "
            f"+ optimiser {size(memory['optimizer'])} + batch {size(memory['batch'])} + activations "
            f"{size(memory['activations'])} + working {size(memory['working'])}",
        ),
        ("memory (measured)", f"{size(memory['measured_peak'])} peak over one step"),
        ("step", f"{time['seconds_per_batch'] * 1000:.1f} ms per batch (median of {time['steps_timed']})"),
        ("expected time", f"{duration(time['expected_wall_s'])} for {time['optimizer_steps']} optimiser steps"),
    ]
    if "expected_validation_s" in time:
        out.append(("  of which validation", f"{duration(time['expected_validation_s'])} ({time['validations']}x)"))
    if "expected_setup_s" in time:
        out.append(("  of which setup", f"{duration(time['expected_setup_s'])} (a pass over the data before training)"))
    return out


def print_plan(plan: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="visiontune plan (nothing trained, nothing saved)", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in rows(plan):
        table.add_row(name, value)
    console = Console(highlight=False, width=140)
    console.print(table)
    console.print(f"Plan written to {out}", markup=False, soft_wrap=True)
