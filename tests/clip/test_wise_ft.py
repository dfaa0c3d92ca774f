"""The WiSE-FT sweep on a tiny CLIP: the saved model is read once, the endpoints are the zero-shot (or `init_from`)
and fine-tuned weights exactly, and every row matches mixing freshly loaded models, as the sweep used to."""

import json
from pathlib import Path

import pytest
import torch

from visiontune.clip import classify, dual_encoder, wise_ft
from visiontune.clip.merge import interpolate
from visiontune.clip.zero_shot import CLIPClassifier

NAMES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}"]
ALPHAS = [0.0, 0.5, 1.0]


def _shifted(state: dict, seed: int) -> dict:
    """Vision weights moved away from the base by a seeded random step (a stand-in for training)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}


def _config(fixtures_dir: Path, run_dir: Path, init_from: Path | None):
    from visiontune.recipe import parse_config

    raw = {
        "task": "clip_classify",
        "model": str(fixtures_dir / "clip"),
        "output_dir": str(run_dir),
        "data": {"train": str(fixtures_dir / "images"), "val_split": 0.25, "workers": 0, "prompt_names": NAMES},
        "wise_ft": {"alphas": ALPHAS, "choose": 0.5},
    }
    if init_from is not None:
        raw["init_from"] = str(init_from)
    return parse_config(raw)


@pytest.fixture(params=[False, True], ids=["base", "init_from"])
def run(request, fixtures_dir, tmp_path):
    """A run folder holding a 'fine-tuned' model, and the vision weights its training started from."""
    base = dual_encoder.resolve_dual_encoder(str(fixtures_dir / "clip"))
    clf = CLIPClassifier(base, NAMES, TEMPLATES)
    start, init_from = clf.vision_state(), None
    if request.param:  # training started from an exported state, not from the hub weights
        from safetensors.torch import save_file

        start = _shifted(start, 1)
        init_from = tmp_path / "start.safetensors"
        save_file({k: v.contiguous() for k, v in start.items()}, str(init_from))
    start = {k: v.clone() for k, v in start.items()}
    clf.encoder.model.load_state_dict(_shifted(start, 2), strict=False)
    run_dir = tmp_path / "run"
    clf.save(run_dir / "model")
    (run_dir / "eval").mkdir()
    return _config(fixtures_dir, run_dir, init_from), run_dir, start


def test_the_sweep_reads_the_saved_model_once_and_hits_both_endpoints(run, monkeypatch):
    cfg, run_dir, start = run
    loads: list[str] = []

    def counting(load):
        def wrapped(name, *args, **kwargs):
            loads.append(str(name))
            return load(name, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(classify, "load_clip_classifier", counting(classify.load_clip_classifier))
    monkeypatch.setattr(classify, "resolve_dual_encoder", counting(classify.resolve_dual_encoder))
    monkeypatch.setattr(dual_encoder, "resolve_dual_encoder", counting(dual_encoder.resolve_dual_encoder))
    seen: list[dict] = []
    real_accuracy = wise_ft._accuracy

    def recording(task, clf, class_names, images):
        seen.append({k: v.clone() for k, v in clf.vision_state().items()})
        return real_accuracy(task, clf, class_names, images)

    monkeypatch.setattr(wise_ft, "_accuracy", recording)
    monkeypatch.setattr(wise_ft, "_report", lambda *args: None)
    rows = wise_ft.sweep(cfg, run_dir)

    model_dir = str(run_dir / "model")
    # load_clip_classifier once (which resolves the saved folder once) and the base model once; none per alpha
    assert loads == [model_dir, model_dir, cfg.model], loads
    fine_tuned = CLIPClassifier(dual_encoder.resolve_dual_encoder(model_dir), NAMES, TEMPLATES).vision_state()
    assert len(seen) == len(ALPHAS)
    for key in fine_tuned:
        assert torch.equal(seen[0][key], start[key]), key  # alpha 0: exactly the weights training started from
        assert torch.equal(seen[2][key], fine_tuned[key]), key  # alpha 1: exactly the saved fine-tuned weights
    mixed = interpolate(start, fine_tuned, 0.5)
    assert all(torch.equal(seen[1][k], mixed[k]) for k in fine_tuned)
    assert [r["alpha"] for r in rows] == ALPHAS
    assert json.loads((run_dir / "eval" / "wise_ft.json").read_text())["chosen_alpha"] == 0.5
    saved = CLIPClassifier(dual_encoder.resolve_dual_encoder(str(run_dir / "wise_ft_model")), NAMES, TEMPLATES)
    assert all(torch.equal(saved.vision_state()[k], mixed[k]) for k in fine_tuned)


@pytest.mark.random_model
def test_rows_match_mixing_freshly_loaded_models(run, monkeypatch):
    """What the sweep computed when it reloaded both models from disk for every alpha. The whole evaluation is
    compared, loss included: a tiny random CLIP's accuracy alone would match a wrongly mixed model as well."""
    from visiontune.classify.task import load_split

    cfg, run_dir, _ = run
    monkeypatch.setattr(wise_ft, "_report", lambda *args: None)
    scored, real = [], classify.ClipClassifyTask.evaluate_loaded
    monkeypatch.setattr(
        classify.ClipClassifyTask,
        "evaluate_loaded",
        lambda *args, **kwargs: scored.append(real(*args, **kwargs)) or scored[-1],
    )
    rows = wise_ft.sweep(cfg, run_dir)
    swept = [report["metrics"] for report in scored]

    task, target = classify.ClipClassifyTask(), load_split(cfg).val
    for row, metrics in zip(rows, swept, strict=True):
        tuned = classify.load_clip_classifier(str(run_dir / "model"))
        zero_shot = classify.load_clip_classifier(str(run_dir / "model"))
        zero_shot.encoder.model.load_state_dict(dual_encoder.resolve_dual_encoder(cfg.model).model.state_dict())
        if cfg.init_from:
            classify.load_vision_state(zero_shot, Path(cfg.init_from))
        fine_tuned = classify.load_clip_classifier(str(run_dir / "model")).vision_state()
        tuned.encoder.model.load_state_dict(
            interpolate(zero_shot.vision_state(), fine_tuned, row["alpha"]), strict=False
        )
        tuned.set_head(tuned.class_names)
        assert row["target_accuracy"] == metrics["accuracy"]
        assert task.evaluate_loaded(tuned, target)["metrics"] == pytest.approx(metrics, rel=1e-6)
