"""Rouge-L for answers in any script.

rouge-score's default tokenizer lowercases and keeps only runs of [a-z0-9]: a perfect answer in
Chinese, Russian, Hindi or Arabic has no tokens and scores 0. `UnicodeTokenizer` keeps the
same rule for ASCII text (so English scores are identical to rouge-score's default, and to
the FlexLoRA paper's released code) and extends it to every script:

- a word is a run of Unicode letters, digits and combining marks (so Devanagari, Bengali,
  Arabic, Thai... words keep their vowel signs); everything else (spaces, punctuation,
  symbols, underscore) separates words;
- in scripts written without spaces between words (Han, Hiragana, Katakana, Thai, Lao,
  Khmer, Myanmar), every character (with its combining marks) is its own token, as usual for
  character-level Rouge on Chinese/Japanese; Hangul is written with spaces and keeps words;
- text is NFC-normalised and lowercased (str.lower, every cased script).
"""

from __future__ import annotations

import unicodedata

import regex
from rouge_score import rouge_scorer

# Scripts without spaces between words; U+30FC (the Katakana-Hiragana prolonged sound mark) is
# in the Common script but belongs with the kana.
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc"
_TOKEN = regex.compile(rf"[{_UNSPACED}]\p{{M}}*|[[\p{{L}}\p{{N}}\p{{M}}]--[{_UNSPACED}]]+", regex.V1)


class UnicodeTokenizer:
    """rouge-score tokenizer (an object with `tokenize(text) -> list[str]`) for every script."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(unicodedata.normalize("NFC", text).lower())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 of a prediction against a reference, with `UnicodeTokenizer`."""
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure
