"""`task: clip_classify` — fine-tune a CLIP-family vision encoder behind a frozen zero-shot text head.

Runs the classify pipeline (data -> model -> plan -> Trainer -> before/after eval -> save -> report) with a
`CLIPClassifier` in place of the image classifier; "before" is the zero-shot accuracy. Modes: full, LoRA (PEFT)
and L-LoRA (linearised LoRA). Optional WiSE-FT sweep afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visiontune.classify.task import ClassifyTask, SplitData, TuningPlan
from visiontune.clip.config import ClipClassifyConfig, ClipLoraConfig
from visiontune.clip.dual_encoder import hold_scalars_as_vectors, resolve_dual_encoder
from visiontune.clip.vision_lora import apply_vision_lora
from visiontune.clip.zero_shot import CLIPClassifier, read_saved_meta
from visiontune.core.errors import DataError, ModelError
from visiontune.core.sources import model_folder
from visiontune.core.transforms import with_image_size
from visiontune.run.task import Fit


class ClipClassifyTask(ClassifyTask):
    name = "clip_classify"
    reads_own_classes = True  # the head is built from the evaluation data's own class names

    def train(self, cfg: ClipClassifyConfig, overwrite: bool = False, resume: bool = False) -> Path:
        if cfg.skip_training:
            return self.zero_shot_only(cfg, overwrite)
        return super().train(cfg, overwrite=overwrite, resume=resume)

    def save(
        self, cfg: ClipClassifyConfig, fit: Fit, trainer: Any, data: SplitData, run_dir: Path, after: dict
    ) -> dict:
        """The model, then (rank 0 only, after it is written) the exported vision state and the WiSE-FT sweep."""
        extras = super().save(cfg, fit, trainer, data, run_dir, after)
        if cfg.export_state_to:
            _export_vision_state(run_dir / "model", Path(cfg.export_state_to).expanduser())
        if cfg.wise_ft is not None:
            from visiontune.clip.wise_ft import sweep

            sweep(cfg, run_dir)
        return extras

    def build_model(self, cfg: ClipClassifyConfig, class_names: list[str]) -> CLIPClassifier:
        encoder = resolve_dual_encoder(cfg.model)
        encoder.preprocess = with_image_size(encoder.preprocess, cfg.data.image_size)
        clf = CLIPClassifier(encoder, prompt_names(cfg.data.prompt_names, class_names), cfg.data.templates)
        if cfg.init_from:
            load_vision_state(clf, Path(cfg.init_from))
        return clf

    def plan_tuning(self, model: CLIPClassifier, cfg: ClipClassifyConfig) -> TuningPlan:
        model.label_smoothing = cfg.train.label_smoothing
        if cfg.train.deepspeed or cfg.train.fsdp:  # before LoRA wraps the tower, so every wrapper sees the vector
            hold_scalars_as_vectors(model.encoder.model)
        if cfg.train.grad_checkpointing:
            model.enable_grad_checkpointing()
        if cfg.tune.method == "full":
            model.freeze_all_but_vision()
        else:
            apply_vision_lora(model, cfg.tune.lora, linearize=cfg.tune.method == "l_lora")
        return TuningPlan()

    def load_model(self, name: str, class_names: list[str] | None = None) -> CLIPClassifier:
        return load_clip_classifier(name, class_names)

    def predict(self, model: str, inputs: list[str], top_k: int = 5, labels: list[str] | None = None) -> list[dict]:
        """Zero-shot over `labels` (predict --labels), else over the class names the model was saved with."""
        from visiontune.classify.task import predict_images

        return predict_images(self.load_model(model, labels or None), inputs, top_k)

    def zero_shot_only(self, cfg: ClipClassifyConfig, overwrite: bool) -> Path:
        """FusionBench's `skip_training`: evaluate the zero-shot head on the validation data and report."""
        from visiontune.report import write_report
        from visiontune.run.distributed import is_main_process
        from visiontune.run.runner import open_run, save_eval

        run_dir = Path(cfg.output_dir).expanduser()
        data = self.prepare(cfg)
        if not is_main_process():  # one evaluation is enough; the other ranks have nothing to add
            return run_dir
        run = open_run(cfg, run_dir, overwrite, None, self.skipped(data), defer=True)
        clf = self.build_model(cfg, data.val.class_names)
        run.begin()  # --overwrite removes the previous run's files only once the model has loaded
        save_eval(run_dir, "after", self.evaluate_loaded(clf, data.val, run_dir / "eval"))
        write_report(run_dir)
        return run_dir


def prompt_names(configured: list[str] | None, class_names: list[str]) -> list[str]:
    if configured is None:
        return class_names
    if len(configured) != len(class_names):
        raise DataError(
            f"data.prompt_names has {len(configured)} names but the data has {len(class_names)} "
            f"classes {class_names}; give one readable name per class, in label order."
        )
    return configured


def load_clip_classifier(name: str, class_names: list[str] | None = None) -> CLIPClassifier:
    """A saved clip_classify model (or any dual encoder) with a head for `class_names` (default: as saved)."""
    path = Path(name).expanduser()
    folder = model_folder(path) if path.is_dir() else path
    meta = read_saved_meta(folder)
    encoder = resolve_dual_encoder(name)
    names = class_names or meta.get("class_names")
    if not names:
        raise DataError(f"{name} has no saved class names; evaluate it with labelled data (--data).")
    clf = CLIPClassifier(encoder, names, meta.get("templates", "builtin"))
    if "l_lora" in meta:
        lora = meta["l_lora"]
        cfg = ClipLoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=0.0, target_modules=lora["target_modules"])
        apply_vision_lora(clf, cfg, linearize=True)
        from safetensors.torch import load_file

        clf.vision.load_state_dict(load_file(str(folder / "linearized.safetensors")))
    return clf


def load_vision_state(clf: CLIPClassifier, path: Path) -> None:
    """FusionBench's `state_dict_load_path`: vision weights from a .safetensors / .pt state dict."""
    clf.encoder.model.load_state_dict(read_vision_state(path, clf.encoder.model.state_dict()), strict=False)


def read_vision_state(path: Path, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `init_from` state dict at `path`, checked against the keys of the model it is for (`model_state`)."""
    if not path.is_file():
        raise ModelError(f"init_from: {path} does not exist; give a state dict file written by export_state_to.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in state if k not in model_state]
    if missing:
        raise ModelError(f"init_from: {path} has keys the model lacks (first: {missing[0]}); it is from another model.")
    return state


def _export_vision_state(model_dir: Path, target: Path) -> None:
    from safetensors.torch import save_file

    clf = load_clip_classifier(str(model_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.vision_state().items()}, str(target))
