"""`visiontune.json`: the one manifest visiontune writes next to every model it saves.

One schema for every kind of model: `{"format": FORMAT_VERSION, "kind": KIND, ...the kind's own fields}`. Kinds:
`classifier` (library, class_names, preprocess), `dual_encoder` (family, preprocess, task extras), `vlm` (base_model,
tune), `assembled_vlm` (vision, projector, preprocess, ...). Folders written before the format field existed read
as format 0 with the same fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visiontune.core.errors import ModelError

MANIFEST = "visiontune.json"
FORMAT_VERSION = 1


def write_manifest(folder: Path, kind: str, **fields: Any) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps({"format": FORMAT_VERSION, "kind": kind, **fields}, indent=2))
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest ({} when there is none); one sentence for a corrupt or newer one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(
            f"{path} is not valid JSON ({err}); the model folder is damaged: save or export it again."
        ) from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} must hold a JSON object; the model folder is damaged: save or export it again.")
    if manifest.get("format", 0) > FORMAT_VERSION:
        raise ModelError(
            f"{path} has manifest format {manifest['format']}, newer than this visiontune reads "
            f"({FORMAT_VERSION}); upgrade visiontune."
        )
    return manifest


def save_with_manifest(folder: Path, module: Any, kind: str, **fields: Any) -> Path:
    """`module`'s state dict as model.safetensors plus the manifest: the export of a model that plain libraries
    rebuild from the manifest's fields (the README shows how for each kind)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
    write_manifest(folder, kind, **fields)
    return folder
