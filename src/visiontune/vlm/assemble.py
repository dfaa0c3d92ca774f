"""`task: vlm_assemble` — build a VLM LLaVA-style from a vision encoder + projector + causal LM and train it.

Stage `align`: vision and language frozen, only the projector learns, on image-caption pairs (each becomes a
"<image> + prompt → caption" conversation). Stage `instruct`: projector + language model (full or LoRA) learn, and
the vision encoder too with `tune.vision: full`, on conversations in every format vlm_sft reads, starting from an
`align` run's model.

Reads top to bottom like vlm_sft, whose data path (tokenise once with assistant-only labels, image-safe truncation,
cache), collator, generation eval and report it reuses: model → stage's trainable parts → data → Trainer →
eval before → train → eval after → save (`model/` in visiontune's format, `adapter/` for LoRA, `llava/` when the
parts fit the LLaVA format).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.core.errors import DataError, RecipeError
from visiontune.run.runner import save_eval
from visiontune.run.task import Fit
from visiontune.vlm.assemble_config import VlmAssembleConfig
from visiontune.vlm.assembled import (
    AssembledProcessor,
    AssembledVlm,
    assembled_in,
    build_assembled,
    load_assembled,
)
from visiontune.vlm.conversations import IMAGE_TOKEN, Conversation, Turn, read_conversations
from visiontune.vlm.generate import generation_report
from visiontune.vlm.model import enable_grad_checkpointing
from visiontune.vlm.scheduled_sampling import mix_inputs, teacher_forcing_ratio
from visiontune.vlm.sft import VlmPrepared, VlmSftTask, VlmTrainer, evaluate_vlm, prepare_data, vlm_fit


class VlmAssembleTask(VlmSftTask):
    """vlm_sft's data, validation, evaluate and predict; its own model, trainable parts and exports."""

    name = "vlm_assemble"

    def prepare(self, cfg: VlmAssembleConfig) -> VlmPrepared:
        model, processor = load_model(cfg)
        data = prepare_data(cfg, processor, read=lambda spec: read_stage_data(spec, cfg), model_key=_model_key(cfg))
        return VlmPrepared(model, processor, data)

    def build(self, cfg: VlmAssembleConfig, prepared: VlmPrepared, run_dir: Path) -> Fit:
        model = set_trainable(prepared.model, cfg)
        if cfg.train.grad_checkpointing:
            enable_grad_checkpointing(model.language, offload=cfg.train.grad_checkpointing_offload)
        fit = vlm_fit(cfg, model, prepared.processor, prepared.data, trainer_class=AssembleTrainer)
        fit.make_optimizer = optimizer_for(cfg)
        fit.trainer_attrs["scheduled_sampling"] = cfg.scheduled_sampling
        return fit

    def evaluate_run(self, cfg: VlmAssembleConfig, fit: Fit, trainer: Any, prepared: VlmPrepared, name: str) -> dict:
        if name == "before" and cfg.stage == "instruct" and prepared.data.val:
            # The LM answering without images: the floor the images must beat.
            alone = [_without_images(c) for c in prepared.data.val[: cfg.eval.max_samples or None]]
            report = generation_report(
                fit.model,
                prepared.processor,
                alone,
                cfg.eval.metrics,
                cfg.eval.max_new_tokens,
                cfg.data.max_image_pixels,
            )
            save_eval(Path(cfg.output_dir).expanduser(), "text_only", report)
        return evaluate_vlm(trainer, name)

    def save(
        self, cfg: VlmAssembleConfig, fit: Fit, trainer: Any, prepared: VlmPrepared, run_dir: Path, after: dict
    ) -> dict:
        return save_outputs(trainer.model, prepared.processor, cfg, run_dir, after)


# ----------------------------------------------------------------------------------------------------- model


def load_model(cfg: VlmAssembleConfig) -> tuple[AssembledVlm, AssembledProcessor]:
    """align: a new model from `vision` + `language`; instruct: the align run's model (or a new one)."""
    if cfg.stage == "instruct" and cfg.init_from:
        model, processor = load_assembled(_stage_one_folder(cfg.init_from))
        if cfg.chat_template:
            processor.chat_template = cfg.chat_template
        return model, processor
    assert cfg.vision and cfg.language  # the schema guarantees it
    return build_assembled(
        cfg.vision,
        cfg.language,
        cfg.projector.model_dump(),
        cfg.vision_layer,
        cfg.drop_cls,
        cfg.image_size,
        cfg.chat_template,
        cfg.seed,
    )


def _stage_one_folder(init_from: str) -> Path:
    if folder := assembled_in(init_from):
        return folder
    raise RecipeError(
        f"init_from: {init_from} is not the output of a vlm_assemble align run (no model/visiontune.json of an "
        "assembled VLM); run the align stage first and point init_from at its run folder."
    )


def set_trainable(model: AssembledVlm, cfg: VlmAssembleConfig) -> AssembledVlm:
    """Gradients only where the stage says: align → projector; instruct → projector (unless turned off) + LM, and
    the vision encoder with tune.vision: full."""
    model.vision.requires_grad_(cfg.stage == "instruct" and cfg.tune.vision == "full")
    model.projector.requires_grad_(cfg.stage == "align" or cfg.tune.train_projector)
    language = "frozen" if cfg.stage == "align" else cfg.tune.language
    model.language.requires_grad_(language == "full")
    if language == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=cfg.tune.lora_r,
            lora_alpha=cfg.tune.lora_alpha,
            lora_dropout=cfg.tune.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model.language = get_peft_model(model.language, config)
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError("nothing trains: set tune.train_projector=true or tune.language to full or lora.")
    return model


def optimizer_for(cfg: VlmAssembleConfig) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """The runner's optimiser, with the vision encoder's parameters at tune.vision_lr_scale × train.lr."""
    from visiontune.run.optim import build_optimizer

    t = cfg.train

    def make(model: nn.Module) -> torch.optim.Optimizer:
        scales = {n: cfg.tune.vision_lr_scale for n, _ in model.named_parameters() if n.startswith("vision.")}
        return build_optimizer(
            model, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer, momentum=t.momentum, layer_scales=scales
        )

    return make


def trainable_counts(model: AssembledVlm) -> dict[str, int]:
    return {
        part: sum(p.numel() for p in getattr(model, part).parameters() if p.requires_grad)
        for part in ("vision", "projector", "language")
    }


def _model_key(cfg: VlmAssembleConfig) -> str:
    return f"assembled:{cfg.init_from or ''}:{cfg.vision}:{cfg.language}:{cfg.projector.model_dump_json()}"


# ------------------------------------------------------------------------------------------------------ data


def read_stage_data(spec: str, cfg: VlmAssembleConfig) -> list[Conversation]:
    """Conversations for the stage; align's caption pairs become "<image>\\n{prompt}" → caption turns."""
    d = cfg.data
    if cfg.stage == "align" and is_caption_data(spec):
        from visiontune.clip.captions import read_captions

        convs = captions_to_conversations(read_captions(spec, d.image_root, cfg.seed), d.prompt)
    else:
        convs = read_conversations(spec, image_root=d.image_root, dataset_name=d.dataset_name)
    if d.limit and spec == d.train and d.limit < len(convs):  # a seeded sample, not the head (files may be sorted)
        keep = sorted(torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.seed))[: d.limit].tolist())
        convs = [convs[i] for i in keep]
    return convs


def is_caption_data(spec: str) -> bool:
    """Caption pairs (CSV/JSONL image,caption; COCO-captions JSON; builtin:mnist-5k-captions) rather than
    conversations (LLaVA-Pretrain JSON and the other vlm_sft formats)."""
    from visiontune.vlm.builtin_conversations import QA_DATASETS

    if spec.startswith("builtin:"):
        return spec.removeprefix("builtin:") not in QA_DATASETS
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return True
    if suffix == ".jsonl" and path.is_file():
        with path.open() as f:
            first = next((line for line in f if line.strip()), "{}")
        try:
            record = json.loads(first)
        except ValueError:  # not JSON: the conversation reader names the line and the fix
            return False
        return isinstance(record, dict) and ("caption" in record or "captions" in record)
    if suffix == ".json" and path.is_file():
        text = path.read_text()  # COCO captions: one object with "annotations"; conversations are a list
        return text.lstrip().startswith("{") and '"annotations"' in text
    return False


def captions_to_conversations(pairs: Any, prompt: str) -> list[Conversation]:
    from PIL import Image

    from visiontune.clip.captions import hf_image

    convs = []
    for i, caption in enumerate(pairs.captions):
        source = pairs.sources[i]
        if pairs.kind == "array":
            source = Image.fromarray(source).convert("RGB")
        elif pairs.kind == "hf":
            source = hf_image(pairs, i)
        else:
            source = Path(source)
        if not caption.strip():
            raise DataError(f"{pairs.refs[i]} has an empty caption; write one or remove the pair.")
        turns = [Turn("user", f"{IMAGE_TOKEN}\n{prompt}"), Turn("assistant", caption.strip())]
        convs.append(Conversation(turns, [source], pairs.refs[i]))
    return convs


def _without_images(conv: Conversation) -> Conversation:
    """The same questions with the images taken out: what the language model answers on its own."""
    turns = [Turn(t.role, t.text.replace(IMAGE_TOKEN, "").strip()) for t in conv.turns]
    return Conversation(turns, [], conv.ref)


# --------------------------------------------------------------------------------------------------- trainer


class AssembleTrainer(VlmTrainer):
    """vlm_sft's trainer plus: scheduled sampling, the MoE balance loss in the logs, and checkpoints that hold only
    the trained parameters (stage 1 trains a few MB of projector next to a frozen LM of hundreds of MB; resume
    reloads them over the frozen weights, which come from the pretrained sources)."""

    scheduled_sampling = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.scheduled_sampling is not None and model.training:
            inputs = dict(inputs)
            s = self.scheduled_sampling
            ratio = teacher_forcing_ratio(
                self.state.global_step, max(1, self.state.max_steps), s.schedule, s.start, s.end, s.k
            )
            self._teacher_forcing = ratio
            with torch.no_grad():
                predicted = model(**inputs).logits.argmax(dim=-1)  # [B, T], the second forward's inputs
            inputs["input_ids"] = mix_inputs(inputs["input_ids"], predicted, inputs["labels"], ratio)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if "loss" in logs and model.balance_loss is not None:
            logs["moe_balance_loss"] = round(model.balance_loss, 4)
        if "loss" in logs and getattr(self, "_teacher_forcing", None) is not None:
            logs["teacher_forcing_ratio"] = round(self._teacher_forcing, 4)
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        if not self.args.should_save:  # FSDP calls it on every rank, after gathering the weights on the main one
            return
        output_dir = output_dir or self.args.output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trained, seen = {}, set()
        for name, param in model.named_parameters():
            if self.is_fsdp_enabled and param.requires_grad:  # the parameters are shards; accelerate gathered these
                trained[name] = state_dict[name].contiguous()
            elif param.requires_grad and param.data_ptr() not in seen:  # tied weights: save one copy
                seen.add(param.data_ptr())
                trained[name] = param.detach().contiguous()
        save_file(trained, str(Path(output_dir) / "model.safetensors"), metadata={"format": "pt"})

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Frozen weights are missing from our checkpoints by design; only unexpected keys are a problem."""
        if load_result.unexpected_keys:
            raise RecipeError(
                f"the checkpoint holds parameters this model lacks: {load_result.unexpected_keys[:5]}; "
                "resume with the recipe that wrote it."
            )


# ------------------------------------------------------------------------------------------------------ save


def save_outputs(
    model: AssembledVlm, processor: AssembledProcessor, cfg: VlmAssembleConfig, run_dir: Path, after: dict
) -> dict:
    """`model/` (visiontune's format, a LoRA LM merged), `adapter/` (PEFT, for the LM), `llava/` when it fits."""
    from visiontune.vlm.llava_export import export_llava, llava_blocker

    counts = trainable_counts(model)
    if hasattr(model.language, "save_pretrained") and hasattr(model.language, "peft_config"):
        model.language.save_pretrained(run_dir / "adapter")  # PEFT's own format, for the LM
    model.meta["stage"] = cfg.stage
    model.save_pretrained(run_dir / "model", processor)  # merges a LoRA LM into its weights first
    blocker = llava_blocker(model)
    if blocker is None:
        export_llava(model, processor, run_dir / "llava")
    extras = {
        "stage": cfg.stage,
        "trainable_parameters": counts,
        "per_question": per_question(after),
        "llava_export": blocker or "llava/",
    }
    _report_sections(run_dir, cfg, counts, extras["per_question"], blocker)
    return extras


def _report_sections(
    run_dir: Path, cfg: VlmAssembleConfig, counts: dict[str, int], per_q: dict, blocker: str | None
) -> None:
    from visiontune.report.sections import add_section

    text = f"Stage {cfg.stage}; " + (
        "exported as LLaVA in llava/."
        if blocker is None
        else f"no LLaVA export: {blocker}; model/ loads with visiontune eval."
    )
    add_section(
        run_dir,
        "Assembled model",
        text,
        ["part", "trainable parameters"],
        [[part, f"{n:,}"] for part, n in counts.items()],
    )
    if per_q:
        before = per_question(_read_eval(run_dir, "before"))
        alone = per_question(_read_eval(run_dir, "text_only"))
        rows = [[q, v["n"], _fmt(alone.get(q)), _fmt(before.get(q)), _fmt(v)] for q, v in per_q.items()]
        add_section(
            run_dir,
            "Exact match per question",
            "Text only = the language model alone, images removed.",
            ["question", "n", "text only", "before", "after"],
            rows,
        )


def _read_eval(run_dir: Path, name: str) -> dict:
    path = run_dir / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(entry: dict | None) -> str:
    return "" if entry is None else f"{entry['exact_match']:.3f}"


def per_question(report: dict) -> dict[str, dict[str, float]]:
    """Exact match per distinct question (e.g. the three built-in digit questions), when there are few of them."""
    from visiontune.vlm.generation_metrics import exact_match

    groups: dict[str, list[dict]] = {}
    for sample in report.get("samples", []):
        groups.setdefault(sample["question"].replace(IMAGE_TOKEN, "").strip(), []).append(sample)
    if not groups or len(groups) > 20:
        return {}
    return {
        q: {"n": len(s), "exact_match": exact_match([x["prediction"] for x in s], [[x["reference"]] for x in s])}
        for q, s in groups.items()
    }
