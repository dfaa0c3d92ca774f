"""Metrics for a VLM's generated answers against references: exact match, ChartQA relaxed accuracy, VQA v2
accuracy, ANLS, BLEU, CIDEr-D and field-level scores for JSON extraction.

Every metric takes `predictions` (one string per sample) and `references` (a list of reference strings per sample;
several are allowed, a bare string counts as one) and returns corpus-level scalars. Ranges: exact_match,
relaxed_accuracy, vqa_accuracy, anls and the JSON scores are in [0, 1]; bleu is sacrebleu's 0-100 score; cider is
CIDEr-D with the customary x10 scale (0-10 in practice). `METRICS` maps the names a recipe lists to the functions
and `compute_metrics` runs a list of them.

Where a benchmark's official script has quirks that change scores, the quirk is kept (and commented) so that
numbers stay comparable with published ones; each deliberate deviation is documented on its function."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import sacrebleu

from visiontune.core.errors import DataError, RecipeError

References = Sequence[Sequence[str] | str]
Metric = Callable[[Sequence[str], References], float | dict[str, float]]


def _check_inputs(predictions: Sequence[str], references: References) -> list[list[str]]:
    """The references as lists of strings, after checking there is one non-empty list per prediction."""
    if len(predictions) != len(references):
        raise DataError(
            f"Got {len(predictions)} predictions but {len(references)} reference lists; pass one list per sample."
        )
    if not predictions:
        raise DataError("No samples to evaluate; pass at least one prediction and its references.")
    checked = []
    for index, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        # A bare string would otherwise be iterated character by character and score silently wrong.
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise DataError(f"Sample {index} has no reference; give every sample at least one.")
        if not isinstance(prediction, str) or not all(isinstance(ref, str) for ref in refs):
            raise DataError(f"Sample {index} has a non-string prediction or reference; convert them to text first.")
        checked.append(refs)
    return checked


def _sample_mean(score: Callable[[str, list[str]], float], predictions: Sequence[str], references: References) -> float:
    """Mean over samples of `score(prediction, references of the sample)`."""
    refs = _check_inputs(predictions, references)
    return sum(score(p, rs) for p, rs in zip(predictions, refs, strict=True)) / len(predictions)


# --------------------------------------------------------------------------------------------------- exact match


def normalize_exact(text: str) -> str:
    """Surrounding whitespace stripped and case-folded (`str.casefold`, a stronger `lower` that also maps e.g. the
    German sharp s to "ss"); inner whitespace and punctuation are kept."""
    return text.strip().casefold()


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Fraction of samples whose normalised prediction (`normalize_exact`) equals any normalised reference."""
    return _sample_mean(lambda p, rs: normalize_exact(p) in {normalize_exact(r) for r in rs}, predictions, references)


# ------------------------------------------------------------------------------------------- ChartQA relaxed acc.

# A plain or thousands-separated decimal, optionally in exponent form. Stricter than `float()`, which would also
# accept "nan", "inf" and "1_000" (nan and inf break the tolerance test) and cannot read "1,234".
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# Relative slack on the tolerance so that answers exactly on the 5% boundary (1.05 against 1.0) are not rejected
# because 1.05 - 1.0 is 0.05000000000000004 in binary floating point.
_BOUNDARY_SLACK = 1e-9


def parse_number(text: str) -> float | None:
    """The number in `text`, or None when it is not exactly one number.

    Thousands separators are removed ("1,234" -> 1234.0) and a trailing "%" divides by 100 ("45%" -> 0.45), as
    `relaxed_correctness` in google-research/pix2struct (the ChartQA implementation behind published numbers)
    does; so "45%" matches "0.45" but not "45"."""
    text = text.strip()
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1].rstrip(), 0.01
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", "")) * scale


def relaxed_match(prediction: str, reference: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed correctness of one answer against one reference (Masry et al., 2022, Sec. 4).

    When both parse as numbers (`parse_number`), the prediction is correct if |prediction - reference| <= tolerance
    x |reference|; a reference of 0 has no relative scale and needs the prediction to be exactly 0 (pix2struct falls
    back to string comparison there, which would reject "0.0" for "0"). Otherwise the answers must be equal after
    `normalize_exact`."""
    predicted, target = parse_number(prediction), parse_number(reference)
    if predicted is None or target is None:
        return normalize_exact(prediction) == normalize_exact(reference)
    if target == 0:
        return predicted == 0
    return abs(predicted - target) <= (tolerance + _BOUNDARY_SLACK) * abs(target)


def relaxed_accuracy(predictions: Sequence[str], references: References, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al., 2022): fraction of samples whose prediction `relaxed_match`es any
    reference; numeric answers may be off by 5% relative, other answers must match exactly."""
    return _sample_mean(lambda p, rs: any(relaxed_match(p, r, tolerance) for r in rs), predictions, references)


# ----------------------------------------------------------------------------------------------------- VQA v2

# Tables copied verbatim from the official evaluation, GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/
# vqaEval.py (Antol et al., 2015; Goyal et al., 2017). The capitalised keys ("Im", "Ive", ...) never match because
# words are lower-cased first, exactly as in the official script; "somebody'd" -> "somebodyd" is its typo, kept.
# fmt: off
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# fmt: on
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a lookahead (the lookbehind was meant), which never
# fires right before a ".", so the pattern removes every period not followed by a digit ("3.5" keeps its period).
_VQA_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) where `re.sub` takes `count`, so at most 32 periods are removed.
_VQA_PERIOD_COUNT = 32
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _vqa_punctuation(text: str) -> str:
    """`processPunctuation`: a mark next to a space, or any mark once the text has a digit-comma-digit, is deleted;
    otherwise it becomes a space ("black-white" -> "black white", "yes, it is" -> "yes it is")."""
    out = text
    delete_all = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        # The official test looks at the original text, not at the text edited by earlier marks.
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """`processDigitArticle`: lower-case, number words to digits, articles dropped, then apostrophe-less
    contractions restored ("dont" -> "don't")."""
    words = [_VQA_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA v2 answer normalisation: newlines and tabs to spaces, strip, punctuation handling
    (`_vqa_punctuation`), then digits, articles and contractions (`_vqa_digits_articles`).

    E.g. "Two dogs." -> "2 dogs", "The black-and-white cat!" -> "black and white cat", "1,000" -> "1000"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one answer (Antol et al., 2015, Sec. 4; the official VQA v2 evaluation).

    With the standard 10 human answers it is averaged over the 10 subsets of 9 humans, as the official script does:
    acc = 1/10 * sum_i min(1, #{j != i : answer_j == prediction} / 3). With any other number of references it is
    min(1, #{j : answer_j == prediction} / 3), so a single reference scores at most 1/3 (use `exact_match` for
    single-answer data). Both sides are compared after `normalize_vqa_answer`.

    Deviation: the official script normalises only the prediction fully and re-applies just the punctuation step to
    the human answers, because the annotation files were normalised when they were built. References here may be
    raw text, so they get the full normalisation too (a no-op on already-normalised answers in practice)."""
    answer = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(reference) == answer for reference in references]
    total = sum(matches)
    if len(matches) != 10:
        return min(1.0, total / 3)
    # Leaving human i out removes its own match from the count.
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / 10


def vqa_accuracy(predictions: Sequence[str], references: References) -> float:
    """Mean `vqa_score` over samples (the VQA v2 "overall" accuracy, as a fraction rather than a percentage)."""
    return _sample_mean(vqa_score, predictions, references)


# ------------------------------------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (unit-cost insertions, deletions, substitutions) by the Wagner-Fischer recurrence.

    Our own: torchmetrics' `edit_distance` (the only one in our stack) prunes the dynamic programme to a beam around
    the diagonal, as TER does, and over-counts when lengths differ a lot (it gives 62 for "abc" vs 60 "x" + "abc",
    not 60); the official ANLS scripts use an exact distance."""
    if len(a) < len(b):
        a, b = b, a  # the row is as long as the shorter string
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _normalize_anls(text: str) -> str:
    """Lower-cased, stripped and with whitespace runs collapsed, as in the ST-VQA / DocVQA evaluation scripts."""
    return " ".join(text.strip().lower().split())


def anls_score(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Normalized Levenshtein similarity of one answer (Biten et al., 2019, Eq. 1): the max over references of
    1 - NL, where NL = levenshtein / max(len) on `_normalize_anls` text, and 0 where NL > threshold.

    NL exactly at the threshold keeps its score: the paper writes NL < tau, but the official ST-VQA and DocVQA scripts
    (which produced the published numbers) zero only a similarity below 1 - tau. Two empty strings have NL = 0."""
    answer = _normalize_anls(prediction)
    best = 0.0
    for reference in references:
        reference = _normalize_anls(reference)
        longest = max(len(answer), len(reference))
        distance = levenshtein(answer, reference) / longest if longest else 0.0
        if distance <= threshold:
            best = max(best, 1.0 - distance)
    return best


def anls(predictions: Sequence[str], references: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity (Biten et al., 2019): mean `anls_score` over samples, tau = 0.5."""
    return _sample_mean(lambda p, rs: anls_score(p, rs, threshold), predictions, references)


# ------------------------------------------------------------------------------------------------------- BLEU


def bleu(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU (Papineni et al., 2002) from `sacrebleu.corpus_bleu` with its defaults (13a tokenisation, case
    sensitive, exponential smoothing), on sacrebleu's 0-100 scale.

    sacrebleu wants reference *streams* (the k-th reference of every sample) of equal length; samples with fewer
    references are padded with None, which sacrebleu skips."""
    refs = _check_inputs(predictions, references)
    width = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score


# ---------------------------------------------------------------------------------------------------- CIDEr-D

_CIDER_ORDER = 4
_CIDER_SIGMA = 6.0
_WORD = re.compile(r"\w+")


def _cider_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped, approximating the PTB tokenizer plus punctuation removal
    that the COCO caption evaluation runs (that one needs Java); identical on plain lower-case words."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str]) -> Counter[tuple[str, ...]]:
    """Counts of all 1- to 4-grams."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, _CIDER_ORDER + 1) for i in range(len(tokens) - n + 1))


def _tfidf(counts: Counter[tuple[str, ...]], doc_freq: Counter, log_images: float) -> list[dict]:
    """Per order, n-gram -> raw count x log(#images / max(1, document frequency)), as in pycocoevalcap (the paper
    divides the count by the sentence's total, which the CIDEr-D clipping does not cancel)."""
    vectors: list[dict] = [{} for _ in range(_CIDER_ORDER)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, doc_freq[gram])))
    return vectors


def _cider_similarity(hyp: list[dict], ref: list[dict], length_gap: int) -> float:
    """Sum over orders of the clipped cosine (min(hyp, ref) * ref over the norms) times the Gaussian length penalty
    exp(-gap^2 / (2 sigma^2)); the caller divides by the number of orders."""
    penalty = math.exp(-(length_gap**2) / (2 * _CIDER_SIGMA**2))
    total = 0.0
    for hyp_n, ref_n in zip(hyp, ref, strict=True):
        dot = sum(min(weight, ref_n.get(gram, 0.0)) * ref_n.get(gram, 0.0) for gram, weight in hyp_n.items())
        norms = math.sqrt(sum(w * w for w in hyp_n.values())) * math.sqrt(sum(w * w for w in ref_n.values()))
        total += (dot / norms if norms else 0.0) * penalty
    return total


def _bigram_count(tokens: list[str]) -> int:
    """The sentence "length" pycocoevalcap's CIDEr-D uses: its `n == 1` test picks the bigram order, so it counts
    bigrams. Only differences of lengths are used, so this equals the word-count gap unless a sentence is empty."""
    return max(len(tokens) - 1, 0)


def cider(predictions: Sequence[str], references: References) -> float:
    """CIDEr-D (Vedantam et al., 2015, Sec. 3 and 5) as computed by pycocoevalcap's `Cider`.

    For each sample: the mean over n = 1..4 of the average over references of the clipped TF-IDF cosine between
    prediction and reference n-gram vectors, times exp(-(length gap)^2 / (2 * 6^2)), times 10; the corpus score is the
    mean over samples. Document frequencies count, for each n-gram, the samples whose references contain it, over
    the evaluated references only, so the score depends on the corpus (a single sample always scores 0).

    Our own: no maintained package in our stack provides CIDEr (pycocoevalcap also needs Java for its tokenizer)."""
    refs = _check_inputs(predictions, references)
    ref_tokens = [[_cider_tokens(r) for r in rs] for rs in refs]
    ref_counts = [[_ngrams(tokens) for tokens in sample] for sample in ref_tokens]
    doc_freq: Counter = Counter(gram for sample in ref_counts for gram in set().union(*sample))
    log_images = math.log(len(refs))
    scores = []
    for prediction, sample_tokens, sample_counts in zip(predictions, ref_tokens, ref_counts, strict=True):
        tokens = _cider_tokens(prediction)
        hyp = _tfidf(_ngrams(tokens), doc_freq, log_images)
        total = sum(
            _cider_similarity(hyp, _tfidf(counts, doc_freq, log_images), _bigram_count(tokens) - _bigram_count(ref))
            for ref, counts in zip(sample_tokens, sample_counts, strict=True)
        )
        scores.append(total / _CIDER_ORDER / len(sample_counts) * 10.0)
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------ JSON fields

# The first fenced block (``` or ```json); an unclosed fence runs to the end of the text.
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def parse_json_object(text: str) -> dict | None:
    """The JSON object in `text`, or None when there is none. The text is either the object itself or contains it in
    a Markdown code fence (```json ... ```, other prose around the fence ignored); arrays and scalars do not count."""
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    try:
        parsed = json.loads(candidate.strip())
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _normalize_value(value: object) -> str:
    """Strings stripped, whitespace-collapsed and case-folded; other values as JSON text (12 -> "12", so the number
    12 and the string "12" match; true -> "true", null -> "null")."""
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    return json.dumps(value)


def flatten_json(value: object, path: str = "") -> Counter[tuple[str, str]]:
    """Multiset of (dotted key path, normalised value) leaves. List indices are dropped, so the items of a list
    share their parent's path and the comparison ignores their order:
    {"menu": [{"nm": "Tea"}, {"nm": "Cake"}]} -> {("menu.nm", "tea"): 1, ("menu.nm", "cake"): 1}.
    Empty objects and lists contribute nothing."""
    leaves: Counter[tuple[str, str]] = Counter()
    if isinstance(value, dict):
        for key, child in value.items():
            leaves += flatten_json(child, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for child in value:
            leaves += flatten_json(child, path)
    else:
        leaves[(path, _normalize_value(value))] += 1
    return leaves


def _reference_fields(references: list[str], index: int) -> list[Counter[tuple[str, str]]]:
    """The flattened fields of each reference of sample `index`; a reference must hold a JSON object."""
    fields = []
    for reference in references:
        parsed = parse_json_object(reference)
        if parsed is None:
            raise DataError(f"Reference of sample {index} is not a JSON object: {reference[:80]!r}; fix the labels.")
        fields.append(flatten_json(parsed))
    return fields


def _matched(predicted: Counter, reference: Counter) -> int:
    """Pairs hit, each at most as often as the reference holds it (multiset intersection)."""
    return sum((predicted & reference).values())


def _best_reference(predicted: Counter, candidates: list[Counter]) -> Counter:
    """The reference giving the highest per-sample F1, 2 * matched / (|prediction| + |reference|); first on ties."""

    def sample_f1(reference: Counter) -> float:
        size = sum(predicted.values()) + sum(reference.values())
        return 2 * _matched(predicted, reference) / size if size else 1.0

    return max(candidates, key=sample_f1)


def json_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Scores for structured extraction (e.g. CORD receipts, Park et al., 2019), references being JSON objects.

    json_valid_rate: fraction of predictions holding a JSON object (`parse_json_object`; fences tolerated).
    json_field_precision / recall / f1: micro-averaged over the corpus on `flatten_json` multisets, as Donut's
    field-level F1 (Kim et al., 2022): a predicted (path, value) pair is a hit at most as often as the reference has
    it. An invalid prediction has no fields, so it costs recall only. With several references per sample, the one
    giving the best per-sample F1 is used."""
    refs = _check_inputs(predictions, references)
    valid = matched = predicted_total = reference_total = 0
    for index, (prediction, sample_refs) in enumerate(zip(predictions, refs, strict=True)):
        parsed = parse_json_object(prediction)
        valid += parsed is not None
        predicted = flatten_json(parsed) if parsed is not None else Counter()
        reference = _best_reference(predicted, _reference_fields(sample_refs, index))
        matched += _matched(predicted, reference)
        predicted_total += sum(predicted.values())
        reference_total += sum(reference.values())
    precision = matched / predicted_total if predicted_total else 0.0
    recall = matched / reference_total if reference_total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "json_valid_rate": valid / len(predictions),
        "json_field_precision": precision,
        "json_field_recall": recall,
        "json_field_f1": f1,
    }


# --------------------------------------------------------------------------------------------------- registry

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "bleu": bleu,
    "cider": cider,
    "json": json_metrics,
}


def compute_metrics(names: Sequence[str], predictions: Sequence[str], references: References) -> dict[str, float]:
    """The named metrics of `METRICS` as one flat dict: {name: value}, except "json", which adds its four
    json_* keys.

    Raises:
        RecipeError: A name is not in `METRICS` (checked before anything is computed).
        DataError: The predictions and references do not pair up (see `_check_inputs`).
    """
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise RecipeError(
            f"Unknown generation metric(s) {', '.join(map(repr, unknown))}; valid names are {', '.join(METRICS)}."
        )
    results: dict[str, float] = {}
    for name in names:
        value = METRICS[name](predictions, references)
        results.update(value if isinstance(value, dict) else {name: value})
    return results
