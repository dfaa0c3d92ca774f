"""`visiontune pairs`: preference pairs from a trained VLM's own mistakes.

The model answers each labelled question several times (sampling with a temperature, or the best beams); every
distinct answer that does not match the reference (`normalize_exact`, as the exact_match metric compares) becomes a
pair: chosen = the reference answer, rejected = the model's answer. The pairs are written as TRL's conversational
prompt / chosen / rejected / images JSONL, which `task: vlm_preference` reads; images that were in memory (saved
datasets, builtin: data) are written as PNG files next to the JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visiontune.vlm.conversations import IMAGE_TOKEN, Conversation, load_images, to_messages
from visiontune.vlm.generate import prompt_inputs


def mine_pairs(
    model: str,
    data: str,
    out: Path,
    samples: int = 4,
    temperature: float = 1.0,
    beams: bool = False,
    max_new_tokens: int = 64,
    max_pixels: int = 512 * 512,
    on_bad_sample: str = "error",
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write `out` (JSONL pairs) and return counts: questions asked, questions with a mistake, pairs written.
    `limit`: ask a seeded sample of that many questions (in their order; files may be sorted by label)."""
    from visiontune.vlm.generate import checked_conversations, load_trained
    from visiontune.vlm.generation_metrics import normalize_exact

    convs, skipped = checked_conversations(data, on_bad_sample)
    if limit and limit < len(convs):
        keep = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed))[:limit]
        convs = [convs[i] for i in sorted(keep.tolist())]
    vlm, processor = load_trained(model)
    torch.manual_seed(seed)
    images_dir = out.with_name(f"{out.stem}_images")
    written = wrong_questions = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for index, conv in enumerate(convs):
            prompt, reference = _prompt(conv)
            answers = sample_answers(vlm, processor, prompt, samples, temperature, beams, max_new_tokens, max_pixels)
            seen = {normalize_exact(reference)}
            mistakes = []
            for a in answers:
                if a.strip() and normalize_exact(a) not in seen:
                    seen.add(normalize_exact(a))
                    mistakes.append(a)
            wrong_questions += bool(mistakes)
            paths = _image_paths(prompt, images_dir, out.parent, index) if mistakes else []
            for rejected in mistakes:
                f.write(json.dumps(_record(prompt, reference, rejected, paths)) + "\n")
                written += 1
    return {"questions": len(convs), "with_mistakes": wrong_questions, "pairs": written, "skipped": skipped}


def _prompt(conv: Conversation) -> tuple[Conversation, str]:
    """The conversation up to its last answer (with the images it mentions), and that answer (the reference)."""
    last = max(i for i, t in enumerate(conv.turns) if t.role == "assistant")
    turns = conv.turns[:last]
    n_images = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    return Conversation(turns, conv.images[:n_images], conv.ref), conv.turns[last].text


@torch.inference_mode()
def sample_answers(
    model: Any,
    processor: Any,
    prompt: Conversation,
    samples: int,
    temperature: float,
    beams: bool,
    max_new_tokens: int,
    max_pixels: int,
) -> list[str]:
    """`samples` answers: sampled at `temperature`, or the `samples` best beams."""
    inputs = prompt_inputs(processor, prompt, max_pixels)
    search = {"num_beams": samples, "do_sample": False} if beams else {"do_sample": True, "temperature": temperature}
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=samples, **search)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _image_paths(prompt: Conversation, images_dir: Path, root: Path, index: int) -> list[str]:
    """Each image as a path the JSONL can name: files as they are (absolute), in-memory images saved as PNG."""
    paths = []
    for k, source in enumerate(prompt.images):
        if isinstance(source, Path):
            paths.append(str(source))
            continue
        images_dir.mkdir(parents=True, exist_ok=True)
        target = images_dir / f"{index}-{k}.png"
        load_images(Conversation([], [source], prompt.ref))[0].save(target)
        paths.append(target.relative_to(root).as_posix())
    return paths


def _record(prompt: Conversation, chosen: str, rejected: str, images: list[str]) -> dict[str, Any]:
    return {
        "prompt": to_messages(prompt),
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "images": images,
    }
