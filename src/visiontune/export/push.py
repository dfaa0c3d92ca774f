"""`visiontune push RUN REPO_ID`: upload a run's model (or any model folder) to the Hugging Face Hub in one commit,
with a model card whose loading code loads from REPO_ID. huggingface_hub does the work (create_repo, create_commit:
LFS for large files); own code only picks the folder and turns the Hub's failures into one sentence each.
It needs a token (`hf auth login` or HF_TOKEN) and a network; nothing else in visiontune does."""

from __future__ import annotations

from pathlib import Path

from visiontune.core.errors import ModelError, VisiontuneError
from visiontune.core.sources import model_folder
from visiontune.export.card import CARD, model_card, run_of

PUSHED_FOLDERS = ("merged", "model", "adapter")  # what a run folder pushes: the merged export first, if made
SKIPPED = (".visiontune-run", ".cache")  # visiontune's own markers, never model content


def folder_to_push(path: Path) -> Path:
    """The model folder of a run (merged/ if exported, else model/ or adapter/), or `path` itself."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder; push a run folder or an exported model folder.")
    for name in PUSHED_FOLDERS:
        if (path / name).is_dir() and (path / "config.yaml").is_file():
            return path / name
    return model_folder(path)


def files_of(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.rglob("*") if f.is_file() and f.name != CARD and not any(s in f.parts[-1] for s in SKIPPED)
    )


def push(path: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the model repo and commit the folder plus its card; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub itself uses (httpx2 in 2.x)

    folder = folder_to_push(Path(path))
    files = files_of(folder)
    if not files:
        raise ModelError(f"{folder} holds no files to push; train or export the model first.")
    if constants.HF_HUB_OFFLINE:
        raise VisiontuneError(
            "push needs a network connection to the Hub, but this runs offline (HF_HUB_OFFLINE=1, or the Hub could "
            "not be reached); run it where huggingface.co is reachable."
        )
    token = token or get_token()
    if not token:
        raise VisiontuneError("push needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN.")
    card = model_card(folder, run_of(folder) or _run(Path(path)), repo_id=repo_id).encode("utf-8")
    operations = [CommitOperationAdd(str(f.relative_to(folder).as_posix()), str(f)) for f in files]
    operations.append(CommitOperationAdd(CARD, card))  # the card written for the repo, the local one left as it is
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=f"Upload {folder.name} with visiontune")
    except OfflineModeIsEnabled:
        raise VisiontuneError("push needs a network connection to the Hub; unset HF_HUB_OFFLINE.") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        reason = (str(err).strip().splitlines() or ["no answer"])[0][:200]
        raise VisiontuneError(f"The Hub refused the push to {repo_id} (HTTP {status}: {reason}).") from None
    except (OSError, httpx.TransportError) as err:  # no route, DNS, TLS, timeouts
        raise VisiontuneError(f"push to {repo_id} failed: the Hub could not be reached ({err}).") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")


def _run(path: Path) -> Path | None:
    return path if (path / "config.yaml").is_file() else None
