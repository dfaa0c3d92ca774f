"""User-facing errors. Each carries one sentence naming the file, record or key and the fix; the CLI prints it
without a traceback."""


class VisiontuneError(Exception):
    """Base class for errors shown to the user as a single message."""


class RecipeError(VisiontuneError):
    """The recipe or an override is wrong."""


class DataError(VisiontuneError):
    """A dataset, file or record is unusable."""


class ModelError(VisiontuneError):
    """A model name cannot be resolved or does not fit the task."""


class RunDirError(VisiontuneError):
    """The run folder is in a state that would lose work."""


class DistributedError(VisiontuneError):
    """The process group does not match what the launcher promised."""
