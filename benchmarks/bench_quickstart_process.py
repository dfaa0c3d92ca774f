"""The whole quickstart process against a plain PyTorch script doing the same work, each in a fresh process.

visiontune's side is exactly what `make quickstart` runs after setup: `visiontune train mnist-efficientnet-lite0
output_dir=<tmp>` (import, data checks, the evaluation before training, 3 epochs with a validation after each, the
"after" evaluation, the model export, card, report and plots). The plain side is this file run with `--plain`: the
same split, dataset class, transforms, model and pretrained weights (as bench_overhead.py's baseline), AdamW with
decay / no-decay groups, warmup + cosine, label smoothing, an accuracy pass over the 1,000 held-out digits before
training and after every epoch, and the weights saved as safetensors. The sides alternate (plain, visiontune, ...)
so background load hits both alike; each process's wall time and CPU time (from the OS, children included) are
reported with their ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quickstart_process.py --rounds 2
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve()
VISIONTUNE = Path(sys.executable).with_name("visiontune")


def plain(out: Path) -> None:
    """The plain script: what the quickstart computes, without the framework."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from bench_overhead import param_groups
    from safetensors.torch import save_file

    from visiontune.classify.task import ClassifyTask, load_split
    from visiontune.core.dataset import Collator, ImageClassificationDataset
    from visiontune.core.transforms import eval_transform, train_transform
    from visiontune.recipe import find_recipe, load_recipe

    cfg = load_recipe(find_recipe("mnist-efficientnet-lite0"), [f"output_dir={out}"])
    torch.manual_seed(cfg.seed)
    data = load_split(cfg)
    model = ClassifyTask().build_model(cfg, data.train.class_names)
    pre, train, aug = model.preprocess, cfg.train, cfg.data.augment
    augment = train_transform(pre, preset=aug.preset, hflip=aug.hflip, policy=aug.policy)
    train_set = ImageClassificationDataset(data.train, augment, cfg.data.max_image_pixels, draft_size=pre.image_size)
    val_set = ImageClassificationDataset(data.val, eval_transform(pre), cfg.data.max_image_pixels)
    loader = torch.utils.data.DataLoader(train_set, train.batch_size, shuffle=True, collate_fn=Collator())
    val_loader = torch.utils.data.DataLoader(val_set, train.batch_size, collate_fn=Collator())
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr)
    total = int(train.epochs) * len(loader)
    warm = math.ceil(train.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
    )

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for batch in val_loader:
                right += int((model.backbone(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
        model.train()
        return right / len(val_set)

    print(f"before {accuracy():.4f}", flush=True)
    for epoch in range(int(train.epochs)):
        for batch in loader:
            logits = model.backbone(batch["pixel_values"])
            loss = F.cross_entropy(logits, batch["labels"], label_smoothing=train.label_smoothing)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        print(f"epoch {epoch + 1} {accuracy():.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))


def timed(command: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one child process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(rounds: int) -> None:
    sides: dict[str, list[tuple[float, float]]] = {"plain": [], "visiontune": []}
    for r in range(1, rounds + 1):
        with tempfile.TemporaryDirectory(prefix="vt-qs-") as tmp:
            out = Path(tmp)
            sides["plain"].append(timed([sys.executable, str(HERE), "--plain", str(out / "plain")]))
            command = [str(VISIONTUNE), "train", "mnist-efficientnet-lite0", f"output_dir={out / 'vt'}"]
            sides["visiontune"].append(timed(command))
        (pw, pc), (vw, vc) = sides["plain"][-1], sides["visiontune"][-1]
        print(
            f"round {r}: plain {pw:.1f} s wall {pc:.1f} s CPU | visiontune {vw:.1f} s wall {vc:.1f} s CPU | "
            f"ratio wall {vw / pw:.3f} CPU {vc / pc:.3f}",
            flush=True,
        )
    wall = statistics.median(v[0] / p[0] for p, v in zip(sides["plain"], sides["visiontune"], strict=True))
    cpu = statistics.median(v[1] / p[1] for p, v in zip(sides["plain"], sides["visiontune"], strict=True))
    print(f"median of per-round ratios: wall {wall:.3f}, CPU {cpu:.3f} (target <= 1.05)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="plain/visiontune pairs, alternated")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # run the plain side into this folder
    args = parser.parse_args()
    if args.plain:
        args.plain.mkdir(parents=True)
        sys.path.insert(0, str(HERE.parent))
        plain(args.plain)
    else:
        main(args.rounds)
