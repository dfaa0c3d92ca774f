"""Built-in MNIST digit Q/A conversations and held-out captions (vlm_assemble's offline recipe data)."""

from __future__ import annotations

import numpy as np

from visiontune.clip.captions import read_captions
from visiontune.vlm.builtin_conversations import QUESTIONS
from visiontune.vlm.conversations import read_conversations


def test_digit_questions_have_the_right_answers_and_cover_every_class():
    from visiontune.core.assets import load_digit_arrays

    images, labels, _ = load_digit_arrays("mnist-5k-heldout")
    convs = read_conversations("builtin:mnist-5k-heldout-qa")
    assert len(convs) == len(labels) == 1000
    first = [int(c.ref.rsplit(" ", 1)[1]) for c in convs[:100]]
    assert len({int(labels[k]) for k in first}) == 10  # shuffled: any head of the list mixes the classes
    for conv in convs[:200]:
        k = int(conv.ref.rsplit(" ", 1)[1])
        question = conv.turns[0].text.removeprefix("<image>\n")
        assert conv.turns[1].text == QUESTIONS[question](int(labels[k]))
        assert np.array_equal(np.asarray(conv.images[0].convert("L")), images[k])
    assert {c.turns[0].text for c in convs} == {f"<image>\n{q}" for q in QUESTIONS}


def test_held_out_captions_are_one_per_digit_and_mixed():
    pairs = read_captions("builtin:mnist-5k-heldout-captions")
    assert len(pairs) == 1000 and len(set(pairs.image_ids)) == 1000
    words = {caption.split()[-1] for caption in pairs.captions[:100]}
    assert len(words) > 5  # not all one class at the start
