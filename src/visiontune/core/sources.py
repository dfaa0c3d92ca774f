"""One parser for the model-source strings a recipe holds under `model:`, `vision:` and `language:`.

Every family resolver used to strip `builtin:` / `timm:` itself, expand `~` (or not), tell a folder from a hub id
and word its own error for a path that leads nowhere. `parse_source` does that once, with one error sentence that
names the recipe key; each family's resolver dispatches on `ModelSource.kind` and keeps its own loading (which
builtin fits it, which transformers class, what format a folder holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from visiontune.core.assets import ASSETS
from visiontune.core.errors import ModelError

SourceKind = Literal["builtin", "timm", "folder", "hub"]
MODEL_FILES = ("config.json", "visiontune.json")  # a folder holding neither is no model any resolver loads
LOCAL_DIR = "local-dir:"  # timm's own prefix for a model folder
PATH_STARTS = (".", "/", "~")  # a hub id never starts so: text starting so is meant as a path


@dataclass(frozen=True)
class ModelSource:
    """A parsed source.

    `name`: the asset name (builtin), the timm model name (`local-dir:/abs/path` for a folder), the folder's path
    (folder) or the hub id (hub): what the family's loader takes. `path`: the model folder for a folder or a timm
    `local-dir:`, else None. `text`: what the recipe said, for messages.
    """

    kind: SourceKind
    name: str
    text: str
    path: Path | None = None


def parse_source(text: str, key: str) -> ModelSource:
    """Parse a recipe's model source; `key` is the recipe key it came from ("model", "vision", "language")."""
    if text.startswith("builtin:"):
        return ModelSource("builtin", builtin_model(text.removeprefix("builtin:"), key), text)
    if text.startswith("timm:"):
        return _timm(text, key)
    path = Path(text).expanduser()
    if path.is_dir():
        folder = model_folder(path)
        _check_folder(folder, text, key)
        return ModelSource("folder", str(folder), text, folder)
    if path.exists() or text.startswith(PATH_STARTS):
        _refuse(text, key, f"{path} is a file" if path.exists() else f"there is no folder {path.absolute()}")
    return ModelSource("hub", text, text)


def model_folder(path: Path) -> Path:
    """The folder itself, or, for a visiontune run folder (no model files at its top), its `model/` subfolder."""
    inner = path / "model"
    if inner.is_dir() and not any((path / f).is_file() for f in MODEL_FILES):
        return inner
    return path


def builtin_model(name: str, key: str) -> str:
    """`name` when it is a built-in model asset; otherwise one sentence listing the built-in models."""
    asset = ASSETS.get(name)
    if asset is None or asset.kind != "model":
        models = [a.name for a in ASSETS.values() if a.kind == "model"]
        raise ModelError(
            f"{key}: builtin:{name} is not a built-in model; the built-in models are {models} (`visiontune assets`)."
        )
    return name


def pretrained_config(location: str, key: str, text: str, instead: str) -> Any:
    """transformers' config of a hub id or folder; one that cannot be read offline is refused in one sentence that
    names the recipe `key`, what it said (`text`) and what the family can load `instead`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:  # hub ids without a cache raise OSError; a malformed config ValueError
        raise ModelError(
            f"{key}: {text} cannot be resolved offline ({str(err).splitlines()[0]}); give {instead}."
        ) from None


def _timm(text: str, key: str) -> ModelSource:
    name = text.removeprefix("timm:")
    if not name.startswith(LOCAL_DIR):
        return ModelSource("timm", name, text)
    path = Path(name.removeprefix(LOCAL_DIR)).expanduser()
    if not path.is_dir():
        _refuse(text, key, f"there is no folder {path.absolute()}")
    _check_folder(path, text, key)
    return ModelSource("timm", f"{LOCAL_DIR}{path}", text, path)


def _check_folder(folder: Path, text: str, key: str) -> None:
    if not any((folder / f).is_file() for f in MODEL_FILES):
        _refuse(text, key, f"{folder} holds no {' or '.join(MODEL_FILES)}, so it is not a model folder")


def _refuse(text: str, key: str, reason: str) -> NoReturn:
    raise ModelError(
        f"{key}: {text} cannot be resolved: {reason}; give a model folder (a saved model or a visiontune run "
        "folder), a hub id, timm:NAME or builtin:NAME (`visiontune assets`)."
    )
