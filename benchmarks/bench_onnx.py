"""ONNX inference latency: onnxruntime running `visiontune export --onnx`'s file vs PyTorch running the same
classifier, on this CPU.

The model is the real built-in classifier (`builtin:efficientnet-lite0`, ImageNet EfficientNet-Lite0, 1,000 classes)
saved as a run's model/ is, then exported with `visiontune.export.onnx.export_onnx` (the code behind `export --onnx`).
Both sides get the same preprocessed batches (eval transform of scikit-learn's real photos); PyTorch
runs under `torch.inference_mode()` in eval mode, onnxruntime with its default CPU provider and graph optimisations.
Both are given the same number of intra-op threads. The two are timed alternately in one process after untimed warm-up
calls; the script prints median ms per batch for each, the ratio onnxruntime / PyTorch, and the parity (largest
logit difference, top-1 agreement on the photos).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx.py --batches 1 8 --calls 30 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from visiontune.classify.resolve import resolve_classifier  # noqa: E402
from visiontune.core.transforms import eval_transform, with_image_size  # noqa: E402
from visiontune.export.onnx import export_onnx  # noqa: E402


def photos() -> list:
    """scikit-learn's two real photos (a temple, a flower), whole and in quarters: ten pictures."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        image = Image.fromarray(array).convert("RGB")
        w, h = image.size
        out += [image] + [image.crop((x, y, x + w // 2, y + h // 2)) for x in (0, w // 2) for y in (0, h // 2)]
    return out


def timed(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clf = resolve_classifier("builtin:efficientnet-lite0")
    clf.preprocess = with_image_size(clf.preprocess, args.size)
    clf.eval()
    with tempfile.TemporaryDirectory(prefix="vt-bench-onnx-") as tmp:
        clf.save(Path(tmp) / "model")
        start = time.perf_counter()
        info = export_onnx(str(Path(tmp) / "model"), Path(tmp) / "onnx")
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(Path(tmp) / "onnx" / info["files"]["model"]), options)
    print(f"export: {export_s:.1f} s, opset {info['opset']}, torch {torch.__version__}, onnxruntime {ort.__version__}")

    transform = eval_transform(clf.preprocess)
    images = torch.stack([transform(p) for p in photos()])
    with torch.inference_mode():
        torch_logits = clf(images)["logits"].numpy()
    (onnx_logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
    agree = (torch_logits.argmax(-1) == onnx_logits.argmax(-1)).mean()
    diff = np.abs(torch_logits - onnx_logits).max()
    print(f"parity on {len(images)} photos: max |logit diff| {diff:.2e}, top-1 agreement {agree:.0%}")

    print(f"\n| batch | PyTorch ms | onnxruntime ms | ratio ort/torch | ({args.threads} thread(s), {args.size} px)")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        x = images[torch.arange(batch) % len(images)].contiguous()
        feed = {"pixel_values": x.numpy()}

        def run_torch(x=x) -> None:
            with torch.inference_mode():
                clf(x)

        def run_ort(feed=feed) -> None:
            session.run(["logits"], feed)

        ours, theirs, ratios = [], [], []
        for _ in range(args.rounds):  # alternate, so load from other jobs hits both sides alike
            t = statistics.median(timed(run_torch, args.calls, args.warmup))
            o = statistics.median(timed(run_ort, args.calls, args.warmup))
            theirs.append(t)
            ours.append(o)
            ratios.append(o / t)
        t, o = statistics.median(theirs), statistics.median(ours)
        rounds = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"| {batch} | {t:.1f} | {o:.1f} | {o / t:.2f} (rounds {rounds}) |")


if __name__ == "__main__":
    main()
