"""Rouge-L tokenizes every script: rouge-score's default tokenizer keeps only [a-z0-9], so a
perfect answer in Chinese, Russian, Hindi, Arabic... scored 0. English scores must not move."""

import pytest
from rouge_score import rouge_scorer

from flexlora.evaluation import rouge_l

NON_LATIN = {
    "chinese": "今天天气很好",
    "russian": "Привет, как дела?",
    "hindi": "मेरा नाम राम है",
    "arabic": "مرحبا بالعالم",
    "japanese": "これはペンです",
    "thai": "สวัสดีครับ",
    "korean": "안녕하세요 세계",
    "greek": "Καλημέρα κόσμε",
}


@pytest.mark.parametrize("lang", sorted(NON_LATIN))
def test_identical_non_latin_answers_score_one(lang):
    text = NON_LATIN[lang]
    assert rouge_l(text, text) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("今天天气", "今天天气很好"),  # Chinese: characters are tokens
        ("Привет, друг", "Привет, как дела?"),
        ("मेरा नाम श्याम है", "मेरा नाम राम है"),  # Hindi: words stay whole (vowel signs are marks)
        ("مرحبا يا صديقي", "مرحبا بالعالم"),
        ("これはりんごです", "これはペンです"),
        ("สวัสดีค่ะ", "สวัสดีครับ"),
    ],
)
def test_partial_non_latin_overlap_scores_between_zero_and_one(prediction, reference):
    assert 0.0 < rouge_l(prediction, reference) < 1.0


def test_unrelated_non_latin_answers_score_zero():
    assert rouge_l("今天", "Привет") == 0.0
    assert rouge_l("मेरा", "नाम") == 0.0


def test_case_is_ignored_in_every_script():
    assert rouge_l("ПРИВЕТ МИР", "привет мир") == pytest.approx(1.0)
    assert rouge_l("ΚΑΛΗΜΈΡΑ", "καλημέρα") == pytest.approx(1.0)


ENGLISH = [
    ("The cat sat on the mat.", "the cat sat on a mat"),
    ("Answer: 42", "42"),
    ("It's 3.14, isn't it?", "its 3 14 isnt it"),
    ("HELLO world!!!", "Hello, World."),
    ("e-mail me at foo_bar@example.com", "email foo bar example com"),
    ("(A) yes", "A"),
    ("no", "yes"),
    ("", "something"),
    ("   ", ""),
    ("x1y2 z3", "X1Y2, z3!"),
    ("positive\n\nnegative", "Positive"),
    ("1,000,000 dollars", "1000000 dollars"),
    ("Tab\tseparated\tvalues", "tab separated values"),
    ("[\"list\", 'of', `quotes`]", "list of quotes"),
]


@pytest.mark.parametrize("prediction, reference", ENGLISH)
def test_english_scores_equal_rouge_scores_default_tokenizer(prediction, reference):
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert rouge_l(prediction, reference) == default.score(reference, prediction)["rougeL"].fmeasure


def test_random_ascii_tokenizes_like_rouge_scores_default():
    import random

    from rouge_score.tokenizers import DefaultTokenizer

    from flexlora.rouge import UnicodeTokenizer

    rng = random.Random(0)
    chars = "abcXYZ019 _-.,;:!?'\"()\n\t/@#$%^&*+=<>[]{}|\\~`"
    ours, default = UnicodeTokenizer(), DefaultTokenizer()
    for _ in range(500):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
        assert ours.tokenize(text) == default.tokenize(text), repr(text)
