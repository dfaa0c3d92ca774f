"""The end of a `vlm_sft` run: seconds of the "after" evaluation when it reuses the last validation (same weights,
same data: the held-out loss is not computed again) against the same evaluation with the reuse turned off.

One trainer is built as `visiontune train` builds it (recipe -> `VlmSftTask.prepare` / `.build` -> the runner's
`make_trainer`) on the tiny Qwen2-VL fixture (random weights) and generated colour conversations; it trains one
epoch with its per-epoch validation, then `evaluate_vlm(trainer, "after")` is timed alternately with and without
the reuse (`--rounds` each, order flipped every round); figures are medians. Generation runs on `eval.max_samples`
records either way, so the saving is the held-out loss pass over the validation set.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval_reuse.py --records 96 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from visiontune.recipe import get_task, load_recipe  # noqa: E402
from visiontune.run import trainer as trainer_module  # noqa: E402
from visiontune.run.runner import make_trainer  # noqa: E402
from visiontune.testing.vlm_fixtures import tiny_vlm  # noqa: E402
from visiontune.vlm.sft import evaluate_vlm  # noqa: E402


def write_data(root: Path, records: int) -> Path:
    rows = []
    for i in range(records):
        colour = ("red", "green", "blue")[i % 3]
        Image.new("RGB", (128, 96), ((i * 37) % 255, 90, 160)).save(root / f"{i}.png")
        answer = " ".join([colour] * (1 + i % 5))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>What colour is this image?"},
                    {"role": "assistant", "content": answer},
                ],
                "images": [f"{i}.png"],
            }
        )
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-eval-reuse-"))
    recipe = {
        "task": "vlm_sft",
        "model": str(tiny_vlm("qwen2_vl", root / "qwen2_vl")),
        "output_dir": str(root / "run"),
        "data": {"train": str(write_data(root, args.records)), "val_split": 0.5, "cache": False},
        "eval": {"max_new_tokens": 4, "max_samples": 4, "samples_during_training": 4},
        "train": {"epochs": 1, "batch_size": 4, "logging_steps": 100},
        "track": {"tensorboard": False},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_recipe(root / "recipe.yaml", [])
    task = get_task(cfg.task)
    prepared = task.prepare(cfg)
    fit = task.build(cfg, prepared, root / "run")
    trainer = make_trainer(cfg, fit, root / "run")
    trainer.train()  # ends with its per-epoch validation of the final weights
    real_key = trainer_module.evaluation_key
    times: dict[str, list[float]] = {"reused": [], "recomputed": []}
    for r in range(args.rounds):
        for mode in ("reused", "recomputed") if r % 2 == 0 else ("recomputed", "reused"):
            trainer_module.evaluation_key = lambda *a: None  # no key: never reused
            if mode == "reused":  # what the run's last validation left: an evaluation of these weights
                trainer_module.evaluation_key = real_key
                trainer.evaluate(metric_key_prefix="eval")
            start = time.perf_counter()
            evaluate_vlm(trainer, "after")
            times[mode].append(time.perf_counter() - start)
    trainer_module.evaluation_key = real_key
    reused, recomputed = statistics.median(times["reused"]), statistics.median(times["recomputed"])
    val = len(fit.eval_dataset)
    print(f"validation records {val}, generation on {cfg.eval.max_samples}, rounds {args.rounds}")
    print(f"after evaluation: reused {reused:.3f} s, recomputed {recomputed:.3f} s, ratio {reused / recomputed:.3f}")
    print("per round reused:", [round(t, 3) for t in times["reused"]])
    print("per round recomputed:", [round(t, 3) for t in times["recomputed"]])


if __name__ == "__main__":
    main()
