"""User-facing errors. Each carries one sentence naming the file, record or key and the fix; the CLI prints it
without a traceback."""


class VisiontuneError(Exception):
    """Base class for errors shown to the user as a single message."""


class RecipeError(VisiontuneError):
    """The recipe or an override is wrong."""


class DataError(VisiontuneError):
    """A dataset, file or record is unusable."""


class SampleError(DataError):
    """A sample that fails while training (one sentence naming the file or record). A DataLoader worker re-raises
    it in the main process as `SampleError("Caught SampleError in DataLoader worker process 0. Original Traceback
    ...")`: keep only the original sentence, the traceback's last line, so the user still reads one line. Every
    dataset and collator that decodes images in a worker raises it (labelled images, caption pairs, VLM records)."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.rstrip().rpartition(f"{type(self).__name__}: ")[2]
        super().__init__(message)


class ModelError(VisiontuneError):
    """A model name cannot be resolved or does not fit the task."""


class RunDirError(VisiontuneError):
    """The run folder is in a state that would lose work."""


class DistributedError(VisiontuneError):
    """The process group does not match what the launcher promised."""


def describe_unexpected(err: BaseException) -> str:
    """One sentence for an error that is not a VisiontuneError: what failed, and a fix where the kind tells one."""
    import json

    detail = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, json.JSONDecodeError):
        return f"a JSON file it read is damaged ({err.msg} at line {err.lineno}, column {err.colno}); rewrite it"
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"the package `{err.name}` is not installed; install it (pip install {err.name}) and try again"
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or detail}; check the path and its permissions"
    if isinstance(err, MemoryError) or "out of memory" in detail.lower():
        return f"out of memory ({detail or type(err).__name__}); lower train.batch_size or use a smaller model"
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__
