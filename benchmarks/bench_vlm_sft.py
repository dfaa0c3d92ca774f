"""`vlm_sft` training throughput, padding and peak memory: visiontune's trainer vs TRL's `SFTTrainer`.

Both sides train the same model on the same conversations with the same batch size and LoRA adapters:

* model: a random-weight Qwen2-VL built here like `vlm_fixtures.tiny_qwen2_vl` (same trained Qwen2Tokenizer, chat
  template and `Qwen2VLProcessor`, images 56^2..112^2 px -> 4..16 image tokens) but wider and deeper: text hidden
  128, MLP 512, 4 layers, 4 heads (2 KV heads); vision width 64, 2 layers, merger to 128. Saved to a temp folder and
  loaded from there by both sides.
* data: 64 ShareGPT-style conversations written by `make_data` (seed 0): one image each (random size 40..120 px per
  side) at the start of the first user turn, 1-3 question/answer turns, questions of 3-12 words and answers of 1-30
  words drawn from the fixture corpus, so record lengths (and padding) vary.
* visiontune: what `visiontune train` runs — `parse_config({task: vlm_sft, ...})` -> `load_vlm` -> `prepare_data`
  (tokenised with assistant-only labels, cached) -> `VlmSftTask().build` (`apply_tuning`: LoRA r 16 / alpha 32 /
  dropout 0.05 on every Linear of the language model, the projector `visual.merger` trained fully, the task
  defaults; then `vlm_fit`) -> the runner's `make_trainer` (`group_by_length`, the task default) — with
  `data.val_split` 0, batch 4, `train.max_steps` = warm-up + timed steps, `train.eval_steps` huge (one save after the
  last step, outside the timing), every other setting default.
* TRL: `SFTTrainer(model=<the same checkpoint, plain>, args=SFTConfig(use_cpu=True, bf16=False,
  per_device_train_batch_size=4, max_steps=N, report_to="none"), train_dataset=Dataset({messages, images}),
  processing_class=<the same processor>, peft_config=LoraConfig(<the same target modules, r, alpha, dropout and
  modules_to_save>))`, everything else at TRL's defaults: it tokenises in its collator every batch
  (`DataCollatorForVisionLanguageModeling`), trains on every token (prompt, system and image tokens included),
  random batches, and `gradient_checkpointing=True`. The dataset is TRL's documented VLM layout: `messages` with
  string contents (TRL puts the `{"type": "image"}` blocks before the first user text) and an `images` column of PIL
  images, made from the same conversations; the preprocessing step asserts that TRL's collator produces exactly the
  token ids visiontune's tokeniser does for every record.
* TRL no-GC: the same with `gradient_checkpointing=False`, to separate that default from the rest.
* visiontune draws its LoRA dropout masks on CPU from numpy's PCG64 (`run/cpu_dropout.py`; same p, same scaling);
  the side `visiontune_packed_torch_dropout` is the packed run with PEFT's own `nn.Dropout`, to separate the two.

Tokens/s = non-padding tokens (sum of `attention_mask`) of the batches trained between the end of warm-up step
`--warmup` and the end of the last step, divided by the wall time between them (tok/CPU-s: by process CPU time);
the batches are counted where `training_step` receives them. Padding = padded positions / all positions of those
batches; trained tokens/step = positions with label != -100 per step. Ratios are visiontune / TRL of the medians
over rounds; for the packed side also of the means, and per round (both sides measured back to back), with the
mean and median of those. The defaults time 48 steps (three epochs of the 64 records) after a 16-step (one epoch)
warm-up, so every side trains on the same records equally often inside the timed window, and one measurement is
long enough (~10 CPU-s) that the scheduler's noise on a shared machine averages out.

`--width W` builds the same fixture with text width W (MLP 4W, heads of 32): at the default 128 (1.36 M parameters)
a step is dominated by per-op overhead (LoRA dropout's RNG, Python, small matmuls), which padding does not scale;
a wider model shows the comparison where the matmuls dominate, as they do at real sizes. Both are reported.

Preprocessing (one forked process, cache in a fresh `VISIONTUNE_CACHE`): `prepare_data` with the cache cold
(read + check + tokenise 64 records + write the cache) and warm (read + check + load), and one epoch of collation
(all 64 records in batches of 4) by visiontune's `VlmCollator` (pads token ids, runs the image processor) and by
TRL's collator (chat template + tokenise + image processor, every epoch).

Memory is process peak RSS (`getrusage` ru_maxrss, KiB) at the end of the last timed step; "delta" subtracts the
RSS once the model is loaded (before data, adapters and trainer). Every measurement runs in a fresh process forked
from a `forkserver` that has imported torch / transformers / peft / trl / visiontune once. Measurements are
interleaved (the order of the sides rotates every round) so background load hits all sides alike.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vlm_sft.py --rounds 5 --threads 1 \
        --sides visiontune_packed trl_nogc visiontune [--width 512]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# packed: the same with data.packing: true (attention per record, vlm/packed_attention.py); packed_masked: packed,
# but SDPA over the whole row with transformers' block-diagonal mask (what packing did before per-record attention);
# packed_torch_dropout: packed, with PEFT's own nn.Dropout in the LoRA layers (not run/cpu_dropout.py's CpuDropout)
SIDES = (
    "visiontune",
    "trl",
    "trl_nogc",
    "visiontune_packed",
    "visiontune_packed_masked",
    "visiontune_packed_torch_dropout",
)
MiB = 1024  # ru_maxrss is in KiB on Linux
BATCH = 4
IGNORE = -100
PRELOAD = [
    "torch",
    "transformers",
    "transformers.trainer",
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "peft",
    "datasets",
    "trl",
    "visiontune.vlm.sft",
    "visiontune.run.runner",
    "visiontune.testing.vlm_fixtures",
]
hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------------ model and data


def build_qwen2_vl(out: Path, width: int = 128) -> Path:
    """`vlm_fixtures.tiny_qwen2_vl`, wider and deeper: text `width` (128) x 4 layers (MLP 4 x width, heads of 32,
    half as many KV heads), vision 64 x 2 layers merged to `width`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from visiontune.testing.vlm_fixtures import _ids, _qwen_ids, _qwen_parts, _save, _text_config

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    tok, processor = _qwen_parts([])
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}  # head_dim 32 -> 16 frequencies
    text = _text_config(
        tok,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        rope_parameters=rope,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=4,
        num_attention_heads=width // 32,
        num_key_value_heads=width // 64,
    )
    vision = {
        "depth": 2,
        "embed_dim": 64,
        "hidden_size": width,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok)))
    _save(model, processor, out, _ids(tok, "<|im_end|>", "<|endoftext|>"))
    return out


def make_data(root: Path, n: int = 64, seed: int = 0) -> Path:
    """n conversations (ShareGPT `messages` + `images`), one image each, 1-3 turns, answers of 1-30 words."""
    from visiontune.testing.vlm_fixtures import corpus

    rng = random.Random(seed)
    words = [w for line in corpus() for w in line.split() if re.fullmatch(r"[A-Za-z,.']+", w)]
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = rng.randint(40, 120), rng.randint(40, 120)
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).rectangle((w // 4, h // 4, w // 2, h // 2), fill=tuple(rng.randrange(256) for _ in "rgb"))
        image.save(root / "img" / f"{i}.png")
        messages = []
        for turn in range(rng.randint(1, 3)):
            question = " ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "?"
            messages.append({"role": "user", "content": ("<image>" if turn == 0 else "") + question})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))})
        records.append({"messages": messages, "images": [f"img/{i}.png"]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def recipe(root: Path, run_dir: Path, total_steps: int, packing: bool = False):
    from visiontune.recipe import parse_config

    return parse_config(
        {
            "task": "vlm_sft",
            "model": str(root / "qwen2_vl"),
            "output_dir": str(run_dir),
            "data": {"train": str(root / "data.json"), "val_split": 0, "workers": 0, "packing": packing},
            "train": {"max_steps": max(total_steps, 1), "batch_size": BATCH, "eval_steps": 1_000_000},
        }
    )


def trl_dataset(cfg):
    """TRL's VLM layout from the same conversations: string contents, the image placeholder removed (TRL inserts
    the image blocks before the first user text, where the data has its one image), PIL images."""
    from datasets import Dataset

    from visiontune.vlm.conversations import load_images, read_conversations

    convs = read_conversations(cfg.data.train)
    messages = [[{"role": t.role, "content": t.text.replace("<image>", "")} for t in c.turns] for c in convs]
    return Dataset.from_dict({"messages": messages, "images": [load_images(c) for c in convs]})


def trl_lora_config(model, tune):
    """The LoraConfig `visiontune.vlm.model.apply_tuning` builds for these settings (same targets and modules)."""
    from peft import LoraConfig

    from visiontune.vlm.model import FAMILY_PARTS, _language_linear_leaves

    parts = FAMILY_PARTS["qwen2_vl"]
    targets = _language_linear_leaves(model, parts)
    prefixes = "|".join(re.escape(p.rstrip(".")) for p in parts.language if p != "lm_head.")
    pattern = rf"^(?:{prefixes})\..*\.(?:{'|'.join(map(re.escape, targets))})$"
    return LoraConfig(
        r=tune.lora_r,
        lora_alpha=tune.lora_alpha,
        lora_dropout=tune.lora_dropout,
        target_modules=pattern,
        modules_to_save=["visual.merger"],
    )


# ------------------------------------------------------------------------------------------------ measuring


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Counter:
    """Wraps `trainer.training_step`: counts real, padded and trained positions of every batch trained on."""

    def __init__(self, trainer) -> None:
        self.real = self.total = self.trained = 0
        self.inner = trainer.training_step
        trainer.training_step = self

    def __call__(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        if mask is None:  # a packed row (data.packing): every position is a real token
            mask = torch.ones_like(inputs["input_ids"])
        self.real += int(mask.sum())
        self.total += mask.numel()
        self.trained += int((inputs["labels"] != IGNORE).sum())
        return self.inner(model, inputs, *args, **kwargs)


class StepClock(TrainerCallback):
    """(wall, CPU, real, all, trained positions so far) at the end of every step; peak RSS as of the last one."""

    def __init__(self, counter: Counter) -> None:
        self.counter, self.stamps, self.peak = counter, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        c = self.counter
        self.stamps.append((time.perf_counter(), time.process_time(), c.real, c.total, c.trained))
        self.peak = peak_rss_kib()  # the closing save runs after this, outside the figure


def rates(stamps: list[tuple], warmup: int) -> dict:
    if warmup < 1 or len(stamps) <= warmup:
        raise ValueError(f"need warmup >= 1 and more than {warmup} steps, got {len(stamps)}")
    (w0, c0, r0, t0, l0), (w1, c1, r1, t1, l1) = stamps[warmup - 1], stamps[-1]
    steps = len(stamps) - warmup
    return {
        "tps": (r1 - r0) / (w1 - w0),
        "cpu_tps": (r1 - r0) / (c1 - c0),
        "padding": 1 - (r1 - r0) / (t1 - t0),
        "real_per_step": (r1 - r0) / steps,
        "trained_per_step": (l1 - l0) / steps,
        "cpu_s": c1 - c0,
    }


def quiet(verbose: bool, threads: int | None) -> None:
    if not verbose:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    if threads:
        torch.set_num_threads(threads)


def measure(side: str, root: str, total_steps: int, warmup: int, threads: int | None, verbose: bool) -> dict:
    """One training measurement in a fresh forked child."""
    quiet(verbose, threads)
    root_dir = Path(root)
    os.environ["VISIONTUNE_CACHE"] = str(root_dir / "cache")
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{side}-", dir=root_dir))
    cfg = recipe(root_dir, run_dir, total_steps, packing=side.startswith("visiontune_packed"))
    if side == "visiontune_packed_masked":
        import visiontune.vlm.packed_attention as packed_attention

        packed_attention.use_packed_attention = lambda model: False
    if side == "visiontune_packed_torch_dropout":
        import visiontune.run.cpu_dropout as cpu_dropout

        cpu_dropout.cheapen_lora_dropout = lambda model: 0
    if side.startswith("visiontune"):
        from visiontune.run.runner import make_trainer
        from visiontune.vlm.model import load_vlm
        from visiontune.vlm.sft import VlmPrepared, VlmSftTask, prepare_data

        model, processor = load_vlm(cfg)
        ready = current_rss_kib()
        prepared = VlmPrepared(model, processor, prepare_data(cfg, processor))  # what VlmSftTask.prepare returns
        trainer = make_trainer(cfg, VlmSftTask().build(cfg, prepared, run_dir), run_dir)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForImageTextToText.from_pretrained(cfg.model)
        processor = AutoProcessor.from_pretrained(cfg.model)
        ready = current_rss_kib()
        args = SFTConfig(
            output_dir=str(run_dir),
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=BATCH,
            max_steps=total_steps,
            report_to="none",
            disable_tqdm=True,
            seed=cfg.seed,
            **({"gradient_checkpointing": False} if side == "trl_nogc" else {}),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=trl_dataset(cfg),
            processing_class=processor,
            peft_config=trl_lora_config(model, cfg.tune),
        )
    counter = Counter(trainer)
    clock = StepClock(counter)
    trainer.add_callback(clock)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    out = rates(clock.stamps, warmup)
    out.update(
        delta_mib=(clock.peak - ready) / MiB,
        peak_mib=clock.peak / MiB,
        trainable=trainable,
        threads=torch.get_num_threads(),
        gc=bool(trainer.args.gradient_checkpointing),
    )
    return out


def preprocessing(root: str, threads: int | None, verbose: bool, repeats: int) -> dict:
    """prepare_data cold / warm, one epoch of collation per side, and a check that both sides see the same ids."""
    quiet(verbose, threads)
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.model import load_processor
    from visiontune.vlm.sft import TokenizedDataset, prepare_data

    root_dir = Path(root)
    run_dir = Path(tempfile.mkdtemp(prefix="run-prep-", dir=root_dir))
    cfg = recipe(root_dir, run_dir, 1)
    processor = load_processor(cfg)
    cold, warm = [], []
    for k in range(repeats):
        os.environ["VISIONTUNE_CACHE"] = str(root_dir / f"cache-prep-{k}")
        for times in (cold, warm):
            start = time.perf_counter()
            data = prepare_data(cfg, processor)
            times.append(time.perf_counter() - start)
    dataset = TokenizedDataset(data.train_tokens, data.train)
    ours = VlmCollator(processor, cfg.data.max_image_pixels)
    theirs = DataCollatorForVisionLanguageModeling(processor=processor, max_length=1024)  # SFTConfig's default
    rows = trl_dataset(cfg)
    lengths, trained_ours, trained_trl, ours_s, trl_s = [], 0, 0, [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(dataset), BATCH):
            ours([dataset[j] for j in range(i, min(i + BATCH, len(dataset)))])
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(rows), BATCH):
            theirs([rows[j] for j in range(i, min(i + BATCH, len(rows)))])
        trl_s.append(time.perf_counter() - start)
    for j in range(len(dataset)):  # same records, same ids: the comparison is on the same data
        batch = theirs([rows[j]])
        mine = dataset[j]
        if batch["input_ids"][0].tolist() != mine["input_ids"]:
            raise AssertionError(f"record {j}: TRL's collator and visiontune's tokeniser disagree on the token ids")
        lengths.append(len(mine["input_ids"]))
        trained_ours += sum(label != IGNORE for label in mine["labels"])
        trained_trl += int((batch["labels"] != IGNORE).sum())
    return {
        "cold_s": min(cold),
        "warm_s": min(warm),
        "collate_ours_s": min(ours_s),
        "collate_trl_s": min(trl_s),
        "records": len(dataset),
        "len_min": min(lengths),
        "len_max": max(lengths),
        "len_mean": statistics.mean(lengths),
        "trained_ours": trained_ours,
        "trained_trl": trained_trl,
    }


# ------------------------------------------------------------------------------------------------ driver


def run(ctx, fn, *args):
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:  # a fresh process
        return pool.submit(fn, *args).result()


def main(
    steps: int, warmup: int, rounds: int, sides: list[str], threads: int | None, verbose: bool, width: int = 128
) -> None:
    if width % 64:
        raise SystemExit(f"--width must be a multiple of 64 (heads of 32, half as many KV heads), got {width}")
    total = warmup + steps
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="vt-bench-vlm-") as tmp:
        root = Path(tmp)
        build_qwen2_vl(root / "qwen2_vl", width)
        make_data(root)
        from transformers import AutoModelForImageTextToText

        n_params = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(root / "qwen2_vl").parameters())
        print(
            f"torch {torch.__version__}; Qwen2-VL fixture (text width {width}) with {n_params:,} parameters; "
            "64 conversations; "
            f"{rounds} rounds x {steps} timed steps (+{warmup} warm-up), batch {BATCH}",
            flush=True,
        )
        prep = run(ctx, preprocessing, tmp, threads, verbose, 2)
        print(f"preprocessing: {prep}", flush=True)
        results: dict[str, list[dict]] = {}
        for r in range(rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                start = time.perf_counter()
                res = run(ctx, measure, side, tmp, total, warmup, threads, verbose)
                res["wall_s"] = time.perf_counter() - start
                results.setdefault(side, []).append(res)
                print(
                    f"round {r + 1} {side:10s}: {res['tps']:7.1f} tok/s  {res['cpu_tps']:7.1f} tok/CPU-s  "
                    f"({res['cpu_s']:.1f} CPU-s timed)  "
                    f"padding {res['padding']:.3f}  trained/step {res['trained_per_step']:.0f}  "
                    f"real/step {res['real_per_step']:.0f}  peak {res['peak_mib']:.0f} MiB "
                    f"(delta {res['delta_mib']:.0f})  {res['trainable']:,} trainable  gc={res['gc']}  "
                    f"{res['wall_s']:.0f} s",
                    flush=True,
                )
    report(results, sides, prep)


def ratio_line(side: str, base: str, results: dict[str, list[dict]]) -> str:
    """side / base in tokens per CPU-second: ratio of the means, of the medians, and of each round (the two ran
    back to back in that round, so the per-round ratios cancel the load that round had)."""
    a, b = [r["cpu_tps"] for r in results[side]], [r["cpu_tps"] for r in results[base]]
    rounds = [x / y for x, y in zip(a, b, strict=True)]
    wall = statistics.median(r["tps"] for r in results[side]) / statistics.median(r["tps"] for r in results[base])
    return (
        f"{side} / {base} tok/CPU-s: mean {statistics.mean(a) / statistics.mean(b):.3f}, "
        f"median {statistics.median(a) / statistics.median(b):.3f}; per round {' '.join(f'{r:.2f}' for r in rounds)} "
        f"(mean {statistics.mean(rounds):.3f}, median {statistics.median(rounds):.3f}); tok/s median {wall:.3f}"
    )


def report(results: dict[str, list[dict]], sides: list[str], prep: dict) -> None:
    med = {
        s: {
            k: statistics.median(r[k] for r in v)
            for k in ("tps", "cpu_tps", "padding", "real_per_step", "trained_per_step")
        }
        for s, v in results.items()
    }
    mem = {s: (max(r["delta_mib"] for r in v), max(r["peak_mib"] for r in v)) for s, v in results.items()}
    ours = med.get("visiontune")
    print()
    print(
        "| side | tok/s | tok/CPU-s | vt/side tok/s | vt/side tok/CPU-s | padding | real tok/step | "
        "trained tok/step | peak RSS delta (MiB) | peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sides:
        m = med[s]
        ratio = f"{ours['tps'] / m['tps']:.3f} | {ours['cpu_tps'] / m['cpu_tps']:.3f}" if ours else "- | -"
        print(
            f"| {s} | {m['tps']:.0f} | {m['cpu_tps']:.0f} | {ratio} | {m['padding']:.3f} | "
            f"{m['real_per_step']:.0f} | {m['trained_per_step']:.0f} | {mem[s][0]:.0f} | {mem[s][1]:.0f} |"
        )
    print()
    for s in sides:  # the spread a single measurement has on this machine
        cpu = [r["cpu_tps"] for r in results[s]]
        spread = statistics.stdev(cpu) / statistics.mean(cpu) if len(cpu) > 1 else 0.0
        print(
            f"{s}: tok/CPU-s mean {statistics.mean(cpu):.0f}, median {statistics.median(cpu):.0f}, "
            f"rounds {' '.join(f'{c:.0f}' for c in cpu)} (spread {spread:.1%})"
        )
    if "visiontune_packed" in med:
        for base in ("visiontune", "visiontune_packed_masked", "visiontune_packed_torch_dropout", "trl_nogc", "trl"):
            if base in med:
                print(ratio_line("visiontune_packed", base, results))
    print()
    print(
        f"records: {prep['records']}, {prep['len_min']}-{prep['len_max']} tokens (mean {prep['len_mean']:.0f}); "
        f"trained tokens over the dataset: visiontune {prep['trained_ours']}, TRL {prep['trained_trl']}"
    )
    print(
        f"visiontune prepare_data: cold cache {prep['cold_s']:.2f} s, warm cache {prep['warm_s']:.3f} s "
        f"(x{prep['cold_s'] / prep['warm_s']:.0f})"
    )
    print(
        f"collation of one epoch (64 records, batch {BATCH}): visiontune {prep['collate_ours_s']:.3f} s, "
        f"TRL {prep['collate_trl_s']:.3f} s (TRL / vt {prep['collate_trl_s'] / prep['collate_ours_s']:.2f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=48, help="timed optimiser steps per measurement (16 = one epoch of the 64 records)"
    )
    parser.add_argument("--warmup", type=int, default=16, help="untimed steps at the start of each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per side, interleaved")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per measurement")
    parser.add_argument("--verbose", action="store_true", help="show the measurement processes' own output")
    parser.add_argument(
        "--width",
        type=int,
        default=128,
        help="text hidden size of the fixture (MLP 4x, heads of 32); 128 is the reported figure's 1.36 M-parameter "
        "model, a wider one shows the same comparison where matmuls, not per-op overhead, dominate",
    )
    args = parser.parse_args()
    main(args.steps, args.warmup, args.rounds, args.sides, args.threads, args.verbose, args.width)
