"""Packed rows attended one record at a time (vlm/packed_attention.py): the same logits and gradients as SDPA over
the whole row with transformers' block-diagonal mask, for every family's language model; the per-record path really
runs on packed rows, its record starts found once per forward; padded batches, cached generation and sliding-window
layers are left to transformers' SDPA; no T x T mask is built for a packed row; saved configs stay plain."""

import pytest
import torch

from visiontune.vlm import packed_attention

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "idefics3", "llava"]


def _step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_record_attention_equals_the_masked_row_and_leaves_other_batches_alone(
    family, records, tmp_path, monkeypatch
):
    from tests.vlm.conftest import sdpa_model_and_items
    from visiontune.vlm.collate import VlmCollator
    from visiontune.vlm.packing import PackedCollator, rope_index_of

    model, processor, tokens, items = sdpa_model_and_items(family, records, tmp_path)
    packed = PackedCollator(processor, 512 * 512, rope_index_of(model))(items)
    padded = VlmCollator(processor, 512 * 512)(items)
    prompt = VlmCollator(processor, 512 * 512)(items[:1])
    masked = [_step(model, packed), _step(model, padded)]
    with torch.no_grad():
        greedy = model.generate(**prompt, max_new_tokens=4, do_sample=False)

    assert packed_attention.use_packed_attention(model)
    per_record = []
    starts = packed_attention.record_starts
    monkeypatch.setattr(packed_attention, "record_starts", lambda *a: per_record.append(starts(*a)) or per_record[-1])
    for (logits, grads), batch in zip(masked, (packed, padded), strict=True):
        per_record.clear()
        monkeypatch.setattr(packed_attention, "_last", (None, (), None))  # nothing remembered from another forward
        got_logits, got_grads = _step(model, batch)
        ran = [s for s in per_record if s is not None]
        if batch is packed:  # once per forward (not per layer), records where they start
            assert ran == [[0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]]
        else:
            assert not ran
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    with torch.no_grad():
        assert torch.equal(model.generate(**prompt, max_new_tokens=4, do_sample=False), greedy)
    model.save_pretrained(tmp_path / "saved")
    assert packed_attention.NAME not in (tmp_path / "saved" / "config.json").read_text()


def test_an_assembled_model_and_a_non_sdpa_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from visiontune.testing.fixtures import tiny_clip
    from visiontune.testing.vlm_fixtures import tiny_causal_lm
    from visiontune.vlm.assembled import build_assembled

    lm = tiny_causal_lm("llama", tmp_path / "llama")
    model, _ = build_assembled(str(tiny_clip(tmp_path / "clip")), str(lm), {"kind": "mlp2x_gelu"})
    assert packed_attention.use_packed_attention(model)
    assert model.language.config._attn_implementation == packed_attention.NAME
    from transformers import PreTrainedModel

    towers = [m for m in model.vision.modules() if isinstance(m, PreTrainedModel)]
    assert towers and all(m.config._attn_implementation == "sdpa" for m in towers)
    eager = AutoModelForCausalLM.from_pretrained(lm, attn_implementation="eager")
    assert not packed_attention.use_packed_attention(eager) and eager.config._attn_implementation == "eager"


def test_record_starts_follow_transformers_packed_rows_and_no_mask_is_built_for_them():
    from transformers.masking_utils import causal_mask_function, find_packed_sequence_indices, sdpa_mask

    q = torch.zeros(1, 2, 7, 4)
    for row, starts in (
        ([0, 1, 2, 0, 1, 0, 1], [0, 3, 5]),
        ([3, 4, 5, 0, 1, 7, 8], [0, 3, 5]),
        ([0, 1, 2, 3, 4, 5, 6], None),
    ):
        positions = torch.tensor([row])
        assert packed_attention.record_starts(positions, q, q) == starts
        seq = find_packed_sequence_indices(positions)
        assert (seq is None) == (starts is None)
        if seq is not None:  # the same records as transformers' block-diagonal mask
            assert [0, *((seq[0, 1:] != seq[0, :-1]).nonzero().squeeze(1) + 1).tolist()] == starts
    assert packed_attention.record_starts(torch.tensor([[0, 1, 2, 0, 1, 0, 1]] * 2), q.expand(2, -1, -1, -1), q) is None

    common = {"mask_function": causal_mask_function, "allow_is_causal_skip": False}
    assert packed_attention.packed_causal_mask(1, 7, 7, **common) is None  # one unpadded row: no T x T mask
    padding = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7])
    for args, kwargs in (
        ((2, 7, 7), {"attention_mask": padding}),
        ((1, 7, 7), {"local_size": 3}),
        ((1, 1, 7, 6, 0), {}),
    ):
        want = sdpa_mask(*args, **common, **kwargs)
        assert want is not None and torch.equal(packed_attention.packed_causal_mask(*args, **common, **kwargs), want)


def test_a_sliding_window_layer_keeps_its_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1]])
    i = torch.arange(6)
    window = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 2) & ((i[:, None] < 4) == (i[None, :] < 4))
    module = torch.nn.Module()
    kwargs = {"position_ids": positions, "sliding_window": 2}
    got, _ = packed_attention.packed_sdpa(module, q, k, v, window[None, None], **kwargs)
    want, _ = sdpa_attention_forward(module, q, k, v, window[None, None], **kwargs)
    assert torch.equal(got, want)
    per_record, _ = packed_attention.packed_sdpa(module, q, k, v, None, position_ids=positions)
    assert not torch.allclose(per_record, want)  # the window matters on these records: the test can tell
