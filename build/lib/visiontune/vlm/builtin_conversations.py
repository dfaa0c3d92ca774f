"""Built-in conversation datasets made from real MNIST-5k digits, for instruction-tuning an assembled VLM offline.

`builtin:mnist-5k-qa` asks questions about the 4,000 digits of builtin:mnist-5k-captions and
`builtin:mnist-5k-heldout-qa` about the other 1,000 (builtin:mnist-5k-heldout), so evaluation uses digits never
trained on. Each digit gets one question, drawn with a fixed seed from `QUESTIONS`; answers are short words that
exact match scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from visiontune.vlm.conversations import IMAGE_TOKEN, Conversation, Turn

__all__ = ["QA_DATASETS", "QUESTIONS", "read_builtin_conversations"]

# question -> answer from the digit's label
QUESTIONS: dict[str, Callable[[int], str]] = {
    "What digit is shown?": str,
    "Is this digit even or odd?": lambda d: "even" if d % 2 == 0 else "odd",
    "What is this digit plus one?": lambda d: str(d + 1),
}
QA_DATASETS = {"mnist-5k-qa": "mnist-5k-captions", "mnist-5k-heldout-qa": "mnist-5k-heldout"}


def read_builtin_conversations(name: str, seed: int = 0) -> list[Conversation]:
    from visiontune.core.assets import get_asset, load_digit_arrays
    from visiontune.core.errors import DataError

    get_asset(name, "dataset")
    if name not in QA_DATASETS:
        raise DataError(f"builtin:{name} holds no conversations; the built-in ones are {sorted(QA_DATASETS)}.")
    images, labels, _ = load_digit_arrays(QA_DATASETS[name])
    questions = list(QUESTIONS)
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(questions), size=len(labels))
    order = rng.permutation(len(labels))  # classes mixed, so the first N records (eval.max_samples) cover all ten
    convs = []
    for k in order.tolist():
        image, label, pick = images[k], int(labels[k]), int(picks[k])
        question = questions[pick]
        turns = [Turn("user", f"{IMAGE_TOKEN}\n{question}"), Turn("assistant", QUESTIONS[question](label))]
        convs.append(Conversation(turns, [Image.fromarray(image).convert("RGB")], f"builtin:{name} record {k}"))
    return convs
