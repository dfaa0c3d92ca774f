"""Recipe loading in one order: YAML file -> dotted `key=value` overrides -> typed config for the recipe's task.

Errors come out as one `RecipeError` sentence that names the file and key and suggests the closest valid keys.
"""

from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from visiontune.core.errors import RecipeError
from visiontune.core.sources import parse_source
from visiontune.registry import TASKS
from visiontune.run.config import INERT_ERROR, RECIPE_CONTEXT

SOURCE_KEYS = ("model", "vision", "language")  # recipe keys holding model sources (core/sources.py)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: installed with the wheel


def find_recipe(recipe: str) -> Path:
    """A recipe path, or the name of a built-in recipe (`visiontune recipes`)."""
    path = Path(recipe).expanduser()
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    matches = sorted(RECIPES_DIR.rglob(f"{recipe}.yaml"))
    return matches[0] if matches else path


def get_task(name: str) -> Any:
    """The task object for a `task:` name (see `visiontune.run.task.Task`)."""
    if name not in TASKS:
        raise RecipeError(f"`{name}` is not a known task; use one of {sorted(TASKS)}.")
    return TASKS[name].create()


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> BaseModel:
    """Read a recipe, apply `a.b=value` overrides and validate it into the task's config class."""
    path = Path(path)
    file_raw = read_yaml(path)
    raw = copy.deepcopy(file_raw)
    for item in overrides or []:
        apply_override(raw, item)
    for key in made_inert_by_overrides(file_raw, raw):  # the later layer wins: drop what it made inert, say so
        _drop(raw, key)
        print(f"Note: {path}'s `{key}` no longer applies with the command line's keys; left out.", file=sys.stderr)
    config = parse_config(raw, source=str(path))
    for key in SOURCE_KEYS:  # a model path that leads nowhere is refused here, so `validate` catches it too
        if isinstance(text := getattr(config, key, None), str):
            parse_source(text, key)
    return config


def made_inert_by_overrides(file_raw: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """Keys the recipe file writes that the command line made inert (`data.val=...` over a file's `data.val_split`):
    refused in the merged recipe but not in the file itself. A contradiction inside one layer (the file alone, or a
    key the command line itself writes) is still refused. Only judged when the file alone is a valid recipe."""
    file_refused = _inert_refusals(file_raw)
    if file_refused is None:
        return []
    merged_refused = _inert_refusals(raw) or []
    return [key for key in merged_refused if key not in file_refused and _lookup(file_raw, key) == _lookup(raw, key)]


def _inert_refusals(raw: dict[str, Any]) -> list[str] | None:
    """The dotted keys refused as inert when `raw` is validated; None if it fails for another reason too."""
    spec = TASKS.get(raw.get("task"))  # type: ignore[arg-type]
    if spec is None:
        return None
    try:
        spec.config_class().model_validate(raw, context=RECIPE_CONTEXT)
    except ValidationError as err:
        errors = err.errors()
        if any(e["type"] != INERT_ERROR for e in errors):
            return None
        return [key for e in errors for key in e["ctx"]["keys"]]
    return []


_MISSING = object()


def _lookup(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _drop(raw: dict[str, Any], key: str) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise RecipeError(f"Recipe {path} is a folder; give a recipe file (.yaml) or a built-in recipe's name.")
    if not path.is_file():
        raise RecipeError(f"Recipe {path} does not exist; `visiontune recipes` lists the built-in ones.")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if isinstance(err, DuplicateKeyError):
            raise RecipeError(f"Recipe {where}: {problem}.") from None
        raise RecipeError(f"Recipe {where} is not valid YAML: {problem}; fix the syntax on that line.") from None
    if raw is None:
        raise RecipeError(f"Recipe {path} is empty; a recipe starts with `task:` (one of {', '.join(TASKS)}).")
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {path} must be a mapping of keys to values, not {type(raw).__name__}.")
    return raw


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a recipe with a second `data:` section would lose
    the first one. Refuse it instead (the error carries the line of the second key)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    None, None, f"`{key}` appears twice (first on line {seen[key]}); keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so `3`, `1e-4`, `true`, `[a, b]` work)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"Override {item!r} must look like key=value (for example train.lr=1e-4).")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"Override {item!r}: {part!r} holds a value, not a section of keys.")
        node = child
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def parse_config(raw: dict[str, Any], source: str = "recipe") -> BaseModel:
    task = raw.get("task")
    if task is None:
        raise RecipeError(f"{source}: `task:` is missing; use one of {sorted(TASKS)}.")
    if task not in TASKS:
        raise RecipeError(f"{source}: `task: {task}` is not a known task; use one of {sorted(TASKS)}.")
    schema = TASKS[task].config_class()
    try:
        config = schema.model_validate(raw, context=RECIPE_CONTEXT)  # the context: refuse keys that would be inert
    except ValidationError as err:
        raise RecipeError(_explain(err, schema, source)) from None
    _check_metric(config, source)
    return config


def _check_metric(config: Any, source: str) -> None:
    """`train.metric` must be something the task's validation reports, else the run fails at its first evaluation."""
    known = config.validation_metrics()
    if config.train.metric not in known:
        raise RecipeError(
            f"{source}: train.metric `{config.train.metric}` is not a validation metric of {config.task} with this "
            f"recipe; use one of {', '.join(known)}."
        )


def _explain(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and (owners := _tasks_with_key(e["loc"])):
            task = schema.model_fields["task"].default
            lines.append(
                f"{source}: `{loc}` is not used by task {task} (it is a key of {', '.join(owners)}); remove it."
            )
        elif e["type"] == "extra_forbidden":
            hint = _closest(e["loc"], schema)
            lines.append(f"{source}: unknown key `{loc}`" + (f"; did you mean {hint}?" if hint else "."))
        elif e["type"] == "missing":
            lines.append(f"{source}: required key `{loc}` is missing.")
        elif e["type"] == INERT_ERROR:  # one sentence per rule, each naming its keys (run/config.py:refuse_inert)
            lines += [f"{source}: {sentence}" for sentence in e["ctx"]["sentences"]]
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A section's or the recipe's own check: its message names the keys; the input is the whole section.
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}.")
        else:
            lines.append(f"{source}: `{loc}` = {e.get('input')!r} is invalid: {e['msg']}.")
    return "\n".join(lines)


def _tasks_with_key(loc: tuple) -> list[str]:
    """The tasks whose schema has this dotted key: a key refused here because this task would ignore it."""
    return [name for name, spec in TASKS.items() if _has_key(spec.config_class(), loc)]


def _has_key(schema: type[BaseModel], loc: tuple) -> bool:
    model: Any = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) and model is not None else None
        if field is None:
            return False
        model = next((a for a in _members(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return True


def _closest(loc: tuple, schema: type[BaseModel]) -> str:
    """Closest valid key names at the same nesting level as an unknown key."""
    model: Any = schema
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        model = next((a for a in _members(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    names = list(model.model_fields)
    prefix = ".".join(str(p) for p in loc[:-1])
    matches = difflib.get_close_matches(str(loc[-1]), names, n=3, cutoff=0.6) or names[:0]
    return " or ".join(f"`{prefix + '.' if prefix else ''}{m}`" for m in matches)


def _members(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    return list(args) if args else [annotation]


def dump_config(config: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
