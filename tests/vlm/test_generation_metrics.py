"""Generation metrics against values worked out by hand (in the comments) on small examples: VQA normalisation on
tricky strings and the 10-human averaging, ChartQA's 5% boundaries, ANLS around its threshold, CIDEr-D on a
2-image corpus (by hand and against a straightforward re-implementation), BLEU against sacrebleu itself and JSON
field scores on invalid, fenced, nested and partial outputs."""

import math
from collections import Counter

import pytest
import sacrebleu

from visiontune.core.errors import DataError, RecipeError
from visiontune.vlm.generation_metrics import (
    METRICS,
    anls,
    anls_score,
    bleu,
    cider,
    compute_metrics,
    exact_match,
    flatten_json,
    json_metrics,
    levenshtein,
    normalize_vqa_answer,
    parse_json_object,
    parse_number,
    relaxed_accuracy,
    relaxed_match,
    vqa_accuracy,
    vqa_score,
)

# ------------------------------------------------------------------------------------------------- exact match


def test_exact_match_strips_and_casefolds_only():
    predictions = [" Paris\n", "STRASSE", "new york", "dog.", "cat"]
    references = [["paris"], ["Straße"], ["New  York"], ["dog"], ["lion", "CAT"]]
    # Hits: Paris (strip + case), Straße (casefold maps ß to ss), CAT (second reference); "New  York" keeps its
    # double space and "dog." its period.
    assert exact_match(predictions, references) == pytest.approx(3 / 5)


# ------------------------------------------------------------------------------------------------------ ChartQA


@pytest.mark.parametrize(
    ("text", "value"),
    [("12", 12.0), (" -3.5 ", -3.5), ("1,234.5", 1234.5), ("45%", 0.45), ("45 %", 0.45), (".5", 0.5), ("1e3", 1e3)],
)
def test_parse_number_reads_numbers(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["nan", "inf", "1_000", "1,2", "12 apples", "$5", "", "%"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("105", "100", True),  # exactly +5%
        ("95", "100", True),  # exactly -5%
        ("105.01", "100", False),
        ("94.99", "100", False),
        ("1.05", "1", True),  # on the boundary although 1.05 - 1 > 0.05 in binary floating point
        ("0.95", "1", True),
        ("-104", "-100", True),
        ("1,050", "1000", True),
        ("1,051", "1000", False),
        ("45%", "0.45", True),  # "%" divides by 100, as pix2struct does
        ("45%", "45", False),
        ("47%", "45%", True),  # 0.47 vs 0.45: 4.4% off
        ("0", "0", True),
        ("0.0", "0", True),  # a zero reference needs exactly zero, numerically
        ("0.001", "0", False),
        (" Yes ", "yes", True),  # non-numeric: exact after strip + casefold
        ("yes", "no", False),
        ("1,2", "12", False),  # "1,2" is not a number, so compared as text
        ("12 apples", "12", False),
    ],
)
def test_relaxed_match(prediction, reference, correct):
    assert relaxed_match(prediction, reference) is correct


def test_relaxed_accuracy_takes_any_reference():
    predictions = ["104", "Blue", "50", "7"]
    references = [["100"], ["red", "blue"], ["60", "52"], ["8"]]
    # 104 vs 100: 4% -> hit; blue: second reference; 50 vs 52: 3.8% -> hit; 7 vs 8: 12.5% -> miss.
    assert relaxed_accuracy(predictions, references) == pytest.approx(3 / 4)


# ------------------------------------------------------------------------------------------------------- VQA v2


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit; final period removed
        ("The black-and-white cat!", "black and white cat"),  # "-" and "!" touch no space: replaced by a space
        ("yes, it is", "yes it is"),  # "," is followed by a space: deleted
        ("1,000", "1000"),  # a digit-comma-digit deletes every mark instead of spacing it
        ("1,000 (approx)", "1000 approx"),
        ("red/blue", "red blue"),
        ("red / blue", "red blue"),
        ("a;b", "b"),  # ";" -> space, then the article "a" is dropped
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g. dog", "eg dog"),
        ("10:30", "10:30"),  # ":" is not in the VQA v2 punctuation list
        ("dont", "don't"),  # contraction restored
        ("Don't", "don't"),  # apostrophes are kept
        ("Im", "im"),  # the table's "Im" key never matches: text is lower-cased first
        ("NONE", "0"),
        ("\tTen\n", "10"),
        ("An apple", "apple"),
        ("hello?!", "hello"),
        ("$5", "$5"),
        ("." * 40, "." * 8),  # the official script removes at most 32 periods
    ],
)
def test_vqa_normalisation_follows_the_official_rules(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(
    ("matches", "accuracy"),
    [
        # acc = 1/10 * sum_i min(1, matches among the other 9 / 3); m matching humans:
        (0, 0.0),
        (1, 0.3),  # 1 * min(1, 0/3) + 9 * min(1, 1/3) = 3 -> 0.3
        (2, 0.6),  # 2 * 1/3 + 8 * 2/3 = 6 -> 0.6
        (3, 0.9),  # 3 * 2/3 + 7 * 1 = 9 -> 0.9
        (4, 1.0),  # 4 * 1 + 6 * 1
        (10, 1.0),
    ],
)
def test_vqa_score_averages_over_the_ten_subsets_of_nine(matches, accuracy):
    references = ["Two"] * matches + ["three"] * (10 - matches)
    assert vqa_score("2", references) == pytest.approx(accuracy)


def test_vqa_score_with_fewer_than_ten_references_is_min_of_matches_over_three():
    assert vqa_score("yes", ["yes"]) == pytest.approx(1 / 3)
    assert vqa_score("yes", ["Yes", "yes.", "no"]) == pytest.approx(2 / 3)
    assert vqa_score("yes", ["yes"] * 5) == 1.0
    assert vqa_score("maybe", ["yes", "no"]) == 0.0


def test_vqa_accuracy_is_the_mean_over_questions():
    references = [["yes"] * 10, ["2"] * 3 + ["3"] * 7, ["red"] * 3]
    assert vqa_accuracy(["Yes.", "two", "blue"], references) == pytest.approx((1.0 + 0.9 + 0.0) / 3)


# --------------------------------------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0), ("abc", "x" * 60 + "abc", 60)],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@pytest.mark.parametrize(
    ("prediction", "references", "score"),
    [
        ("hello", ["hello"], 1.0),
        ("helo", ["hello"], 0.8),  # 1 edit / 5 characters
        ("  Hello   WORLD ", ["hello world"], 1.0),  # lower-cased, whitespace collapsed
        ("ab", ["ac"], 0.5),  # NL = 0.5 exactly: kept
        ("abcd", ["abxy"], 0.5),
        ("abc", ["axy"], 0.0),  # NL = 2/3 > 0.5
        ("abcde", ["abxyz"], 0.0),  # NL = 0.6
        ("invoice", ["receipt", "invoices"], 7 / 8),  # best reference: 1 edit / 8
        ("", [""], 1.0),
        ("", ["a"], 0.0),
    ],
)
def test_anls_score(prediction, references, score):
    assert anls_score(prediction, references) == pytest.approx(score)


def test_anls_is_the_mean_over_questions():
    assert anls(["helo", "abc", "x"], [["hello"], ["axy"], ["X"]]) == pytest.approx((0.8 + 0.0 + 1.0) / 3)


# --------------------------------------------------------------------------------------------------------- BLEU

HYPOTHESES = ["the cat sat on the mat", "a dog runs in the park today", "it is raining heavily"]
VARIABLE_REFERENCES = [
    ["the cat is sitting on the mat", "a cat sat on the mat"],
    ["a dog is running in the park"],
    ["it rains a lot", "heavy rain is falling", "it is raining hard"],
]


def test_bleu_equals_sacrebleu_with_padded_streams():
    streams = [
        ["the cat is sitting on the mat", "a dog is running in the park", "it rains a lot"],
        ["a cat sat on the mat", None, "heavy rain is falling"],
        [None, None, "it is raining hard"],
    ]
    assert bleu(HYPOTHESES, VARIABLE_REFERENCES) == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, streams).score)


def test_bleu_padding_equals_repeating_a_reference():
    # A repeated reference changes neither the clipped n-gram counts (a max over references) nor the closest length.
    repeated = [refs + [refs[0]] * (3 - len(refs)) for refs in VARIABLE_REFERENCES]
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [list(stream) for stream in zip(*repeated, strict=True)]).score
    assert bleu(HYPOTHESES, VARIABLE_REFERENCES) == pytest.approx(expected)
    assert 0 < expected < 100


def test_bleu_is_100_on_identical_text():
    assert bleu(["a b c d e"], [["a b c d e"]]) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------------ CIDEr-D


def test_cider_by_hand_on_a_two_image_corpus():
    references = [["a cat"], ["a dog"]]
    # N = 2 images, idf(g) = log(2 / df): "a" is in both images (idf 0), "cat", "dog", "a cat", "a dog" in one
    # (idf log 2). An exact prediction has cosine 1 for unigrams and bigrams and no 3-/4-grams (0), so
    # 10 * mean(1, 1, 0, 0) = 5.
    assert cider(["a cat", "a dog"], references) == pytest.approx(5.0)
    # "cat": unigram cosine 1, no bigram; lengths (bigram counts) 0 vs 1 -> penalty exp(-1 / (2 * 6^2)).
    assert cider(["cat", "a dog"], references) == pytest.approx((2.5 * math.exp(-1 / 72) + 5.0) / 2)
    # "cat cat": tf-idf 2 log 2 vs log 2; clipped dot min(2 log 2, log 2) * log 2 over norms 2 log 2 * log 2 = 0.5;
    # its bigram "cat cat" is not in the reference: 10 * mean(0.5, 0, 0, 0) = 1.25.
    assert cider(["cat cat", "a dog"], references) == pytest.approx((1.25 + 5.0) / 2)


def test_cider_averages_over_references_and_ignores_case_and_punctuation():
    references = [["a cat", "a dog"], ["a cat", "a dog"]]
    # Every n-gram is in both images: all idf weights are 0 and every cosine is 0.
    assert cider(["a cat", "a cat"], references) == 0.0
    references = [["A cat.", "a bird"], ["a dog"]]
    # Image 1: vs "a cat" 10 * mean(1, 1, 0, 0) = 5, vs "a bird" 0 -> 5 / 2 references = 2.5.
    assert cider(["a cat", "a dog"], references) == pytest.approx((2.5 + 5.0) / 2)


def test_cider_of_a_single_image_is_zero():
    assert cider(["a cat"], [["a cat"]]) == 0.0  # log(1 image / df 1) = 0 for every n-gram


def reference_cider(predictions: list[str], references: list[list[str]]) -> float:
    """Straight from Vedantam et al. (2015) Eq. 7-9, with pycocoevalcap's raw counts and x10: loops, no sharing."""

    def grams(words: list[str], n: int) -> Counter:
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    refs = [[r.lower().split() for r in rs] for rs in references]

    def weights(counts: Counter, n: int) -> dict:
        return {
            g: c * math.log(len(refs) / max(1, sum(any(g in grams(r, n) for r in rs) for rs in refs)))
            for g, c in counts.items()
        }

    scores = []
    for prediction, sample in zip(predictions, refs, strict=True):
        words = prediction.lower().split()
        total = 0.0
        for ref in sample:
            penalty = math.exp(-((len(words) - len(ref)) ** 2) / (2 * 6.0**2))
            for n in range(1, 5):
                hyp, target = weights(grams(words, n), n), weights(grams(ref, n), n)
                dot = sum(min(w, target.get(g, 0.0)) * target.get(g, 0.0) for g, w in hyp.items())
                norms = math.sqrt(sum(w * w for w in hyp.values())) * math.sqrt(sum(w * w for w in target.values()))
                total += penalty * (dot / norms if norms else 0.0) / 4
        scores.append(10 * total / len(sample))
    return sum(scores) / len(scores)


def test_cider_matches_a_straightforward_reimplementation():
    predictions = ["a man riding a red bike down the street", "two dogs play with a ball on the grass"]
    references = [
        ["a man rides a bike on the street", "a person riding a red bicycle down a road", "man on a bike"],
        ["two dogs playing with a ball on grass", "dogs chase a red ball in the park"],
    ]
    expected = reference_cider(predictions, references)
    assert cider(predictions, references) == pytest.approx(expected)
    assert 0.5 < expected < 10


# --------------------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  {"a": 1}\n', {"a": 1}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Here you go:\n```JSON\n{"a": 1}\n```\nAnything else?', {"a": 1}),
        ('```\n{"a": 1}\n```', {"a": 1}),
        ('```json\n{"a": 1}', {"a": 1}),  # unclosed fence runs to the end
        ('```json\n{"a": 1,', None),  # truncated
        ("{'a': 1}", None),  # Python dict, not JSON
        ('{"a": 1,}', None),
        ("[1, 2]", None),  # valid JSON but not an object
        ("42", None),
        ("no json here", None),
    ],
)
def test_parse_json_object(text, parsed):
    assert parse_json_object(text) == parsed


def test_flatten_json_drops_list_indices_and_normalises_values():
    receipt = {
        "menu": [{"nm": "Tea", "price": "3"}, {"nm": " Cake ", "price": 3, "sub": {"nm": "Cream"}}],
        "total": {"total_price": "6", "paid": True, "change": None},
        "notes": [],
    }
    assert flatten_json(receipt) == Counter(
        {
            ("menu.nm", "tea"): 1,
            ("menu.nm", "cake"): 1,
            ("menu.price", "3"): 2,  # the string "3" and the number 3
            ("menu.sub.nm", "cream"): 1,
            ("total.total_price", "6"): 1,
            ("total.paid", "true"): 1,
            ("total.change", "null"): 1,
        }
    )


def test_json_metrics_on_fenced_nested_partial_and_invalid_outputs():
    references = [
        ['{"menu": [{"nm": "Tea", "price": "3"}, {"nm": "Cake", "price": "3"}], "total": {"total_price": "6"}}'],
        ['{"store": "Cafe", "date": "2024-01-01"}'],
        ['{"total": "10"}'],
    ]
    predictions = [
        # Fenced, list order swapped, one price wrong: fields nm cake, nm tea, price 3, price 4, total 6 -> 4 of 5
        # hit (price "3" only once, as a multiset).
        '```json\n{"menu": [{"nm": "cake", "price": "3"}, {"nm": "TEA", "price": "4"}],'
        ' "total": {"total_price": 6}}\n```',
        '{"store": "cafe"}',  # partial: 1 of 1 predicted hits, 1 of 2 reference fields found
        "{'total': 10",  # invalid: no fields
    ]
    scores = json_metrics(predictions, references)
    # matched 5, predicted 5 + 1 + 0 = 6, reference 5 + 2 + 1 = 8.
    assert scores["json_valid_rate"] == pytest.approx(2 / 3)
    assert scores["json_field_precision"] == pytest.approx(5 / 6)
    assert scores["json_field_recall"] == pytest.approx(5 / 8)
    assert scores["json_field_f1"] == pytest.approx(2 * 5 / (6 + 8))


def test_json_metrics_uses_the_best_reference_and_handles_no_predicted_fields():
    references = [['{"a": "x", "b": "y", "c": "z"}', '{"a": "x"}']]
    # Against the first: 1 hit, F1 2/4; against the second: 1 hit, F1 2/2 -> the second is used.
    assert json_metrics(['{"a": "x"}'], references)["json_field_recall"] == 1.0
    scores = json_metrics(["not json"], [['{"a": "x"}']])
    assert scores == {
        "json_valid_rate": 0.0,
        "json_field_precision": 0.0,
        "json_field_recall": 0.0,
        "json_field_f1": 0.0,
    }


def test_json_metrics_rejects_a_reference_that_is_not_json():
    with pytest.raises(DataError, match="sample 0"):
        json_metrics(['{"a": 1}'], [["a: 1"]])


# ----------------------------------------------------------------------------------------------------- registry


def test_metrics_registry_names():
    assert set(METRICS) == {"exact_match", "relaxed_accuracy", "vqa_accuracy", "anls", "bleu", "cider", "json"}


def test_compute_metrics_flattens_results_and_accepts_bare_string_references():
    results = compute_metrics(["exact_match", "anls", "json"], ['{"a": 1}', '{"a": 2}'], ['{"a": 1}', '{"a": 3}'])
    assert results == pytest.approx(
        {
            "exact_match": 0.5,
            "anls": (1.0 + 7 / 8) / 2,  # 1 edit in 8 characters
            "json_valid_rate": 1.0,
            "json_field_precision": 0.5,
            "json_field_recall": 0.5,
            "json_field_f1": 0.5,
        }
    )


def test_compute_metrics_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(RecipeError, match="'rouge'.*exact_match, relaxed_accuracy, vqa_accuracy, anls, bleu, cider"):
        compute_metrics(["exact_match", "rouge"], ["a"], [["a"]])


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a", "b"], [["a"]], "2 predictions but 1"),
        ([], [], "No samples"),
        (["a"], [[]], "Sample 0 has no reference"),
        (["a"], [[None]], "non-string"),
    ],
)
def test_inputs_are_checked(predictions, references, message):
    with pytest.raises(DataError, match=message):
        exact_match(predictions, references)
