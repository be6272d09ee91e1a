"""The built-in synthetic task types: a registry (``TASKS``) and one generator per type, each
drawing an (instruction, input, output) from the rng it is given: the word and letter tasks here,
the number and knowledge-table tasks in synthetic_tasks_numbers.py (data/synthetic.py imports
both, in that order, which is the registration order the seeded federations depend on)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from flexlora.data.synthetic_vocab import (
    _VOWELS,
    WORDS,
)
from flexlora.data.types import Example

# ---------------------------------------------------------------------------------------
# Task registry
# ---------------------------------------------------------------------------------------

# A generator draws one example from the rng it is given and nothing else.
Generator = Callable[[random.Random], Example]
TASKS: dict[str, Generator] = {}


def _task(name: str):
    """Register `fn(rng) -> (instruction, input, output)` as the generator of task `name`."""

    def register(fn: Callable[[random.Random], tuple[str, str, str]]):
        def generate(rng: random.Random) -> Example:
            instruction, input_, output = fn(rng)
            return Example(instruction=instruction, input=input_, output=output, category=name)

        generate.__name__ = fn.__name__
        generate.__doc__ = fn.__doc__
        TASKS[name] = generate
        return fn

    return register


def list_tasks() -> list[str]:
    """Names of all built-in task types, in registration order."""
    return list(TASKS)


def _words(rng: random.Random, low: int = 4, high: int = 7) -> list[str]:
    """Distinct vocabulary words (distinct so that answers such as 'the longest' are unique)."""
    return rng.sample(WORDS, rng.randint(low, high))


def _numbers(rng: random.Random, low: int = 4, high: int = 7, top: int = 99) -> list[int]:
    return rng.sample(range(1, top + 1), rng.randint(low, high))


def _join(numbers: Sequence[int], sep: str = ", ") -> str:
    return sep.join(str(n) for n in numbers)


# --- word order and selection --------------------------------------------------------------


@_task("reverse_words")
def _reverse_words(rng):
    words = _words(rng)
    instruction = rng.choice(
        (
            "Reverse the order of the words in the sentence.",
            "Write the words of the input in reverse order.",
            "Rewrite the sequence of words backwards, last word first.",
            "Output the same words, but in the opposite order.",
        )
    )
    return instruction, " ".join(words), " ".join(reversed(words))


@_task("sort_words")
def _sort_words(rng):
    words = _words(rng)
    instruction = rng.choice(
        (
            "Sort the words alphabetically.",
            "Arrange the given words in alphabetical order, separated by spaces.",
            "Put these words in dictionary order.",
            "List the words sorted from A to Z.",
        )
    )
    return instruction, " ".join(words), " ".join(sorted(words))


@_task("first_word")
def _first_word(rng):
    words = _words(rng)
    instruction = rng.choice(
        (
            "What is the first word of the sentence?",
            "Return only the first word of the input.",
            "Write down the word that comes first.",
        )
    )
    return instruction, " ".join(words), words[0]


@_task("last_word")
def _last_word(rng):
    words = _words(rng)
    instruction = rng.choice(
        (
            "What is the last word of the sentence?",
            "Return only the final word of the input.",
            "Write down the word that comes last.",
        )
    )
    return instruction, " ".join(words), words[-1]


@_task("count_words")
def _count_words(rng):
    words = _words(rng, 3, 9)
    instruction = rng.choice(
        (
            "How many words are in the input? Answer with a number.",
            "Count the words in the sentence.",
            "Give the number of words in the following text.",
        )
    )
    return instruction, " ".join(words), str(len(words))


@_task("longest_word")
def _longest_word(rng):
    # Redraw until the longest word is unique, so the answer is unambiguous.
    while True:
        words = _words(rng)
        lengths = sorted((len(w) for w in words), reverse=True)
        if lengths[0] > lengths[1]:
            break
    instruction = rng.choice(
        (
            "Which word in the list is the longest?",
            "Find the longest word.",
            "Return the word that has the most letters.",
        )
    )
    return instruction, " ".join(words), max(words, key=len)


@_task("remove_word")
def _remove_word(rng):
    words = _words(rng)
    target = rng.choice(words)
    instruction = rng.choice(
        (
            'Remove the word "{w}" from the sentence.',
            'Delete every occurrence of "{w}" and write the rest of the words.',
            'Rewrite the input without the word "{w}".',
        )
    ).format(w=target)
    return instruction, " ".join(words), " ".join(w for w in words if w != target)


@_task("replace_word")
def _replace_word(rng):
    words = _words(rng)
    old = rng.choice(words)
    new = rng.choice([w for w in WORDS if w not in words])
    instruction = rng.choice(
        (
            'Replace the word "{old}" with "{new}".',
            'Rewrite the sentence, changing "{old}" to "{new}".',
            'Substitute "{new}" for "{old}" in the input.',
        )
    ).format(old=old, new=new)
    return instruction, " ".join(words), " ".join(new if w == old else w for w in words)


@_task("repeat_word")
def _repeat_word(rng):
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    instruction = rng.choice(
        (
            "Repeat the word {n} times, separated by spaces.",
            "Write the given word {n} times in a row.",
            "Output the input word exactly {n} times.",
        )
    ).format(n=times)
    return instruction, word, " ".join([word] * times)


@_task("acronym")
def _acronym(rng):
    words = _words(rng, 3, 5)
    instruction = rng.choice(
        (
            "Form an acronym from the first letter of each word, in capitals.",
            "Write the uppercase initials of the words, with no spaces.",
            "Make an abbreviation by joining the first letters of the words in upper case.",
        )
    )
    return instruction, " ".join(words), "".join(w[0] for w in words).upper()


@_task("hyphen_join")
def _hyphen_join(rng):
    words = _words(rng, 3, 6)
    instruction = rng.choice(
        (
            "Join the words with hyphens.",
            "Connect all the words using a hyphen between each pair.",
            "Write the words as one string, separated by '-'.",
        )
    )
    return instruction, " ".join(words), "-".join(words)


# --- letter case --------------------------------------------------------------------------


@_task("uppercase")
def _uppercase(rng):
    text = " ".join(_words(rng))
    instruction = rng.choice(
        (
            "Convert the sentence to uppercase.",
            "Rewrite the input in capital letters.",
            "Write the text with every letter in upper case.",
        )
    )
    return instruction, text, text.upper()


@_task("lowercase")
def _lowercase(rng):
    words = _words(rng)
    # Mixed case inputs, so that the answer differs from the input.
    text = " ".join(w.upper() if rng.random() < 0.5 else w.capitalize() for w in words)
    instruction = rng.choice(
        (
            "Convert the sentence to lowercase.",
            "Rewrite the input using only small letters.",
            "Write the text with every letter in lower case.",
        )
    )
    return instruction, text, " ".join(words)


@_task("capitalize_words")
def _capitalize_words(rng):
    words = _words(rng)
    instruction = rng.choice(
        (
            "Capitalize the first letter of each word.",
            "Rewrite the sentence in title case.",
            "Make every word start with a capital letter.",
        )
    )
    return instruction, " ".join(words), " ".join(w.capitalize() for w in words)


# --- letters within words ----------------------------------------------------------------


@_task("remove_vowels")
def _remove_vowels(rng):
    words = _words(rng, 2, 4)
    instruction = rng.choice(
        (
            "Remove all vowels (a, e, i, o, u) from the text.",
            "Delete the vowels from every word.",
            "Rewrite the input without any vowels.",
        )
    )
    stripped = ("".join(ch for ch in w if ch not in _VOWELS) for w in words)
    return instruction, " ".join(words), " ".join(s for s in stripped if s)


@_task("reverse_letters")
def _reverse_letters(rng):
    word = rng.choice(WORDS)
    instruction = rng.choice(
        (
            "Spell the word backwards.",
            "Reverse the letters of the word.",
            "Write the input word from its last letter to its first.",
        )
    )
    return instruction, word, word[::-1]


@_task("spell_word")
def _spell_word(rng):
    word = rng.choice(WORDS)
    instruction = rng.choice(
        (
            "Spell the word, separating its letters with spaces.",
            "Write each letter of the word with a space in between.",
            "Split the word into its letters.",
        )
    )
    return instruction, word, " ".join(word)


@_task("count_letters")
def _count_letters(rng):
    word = rng.choice(WORDS)
    instruction = rng.choice(
        (
            "How many letters does the word have?",
            "Count the letters in the word. Answer with a number.",
            "Give the length of the word in letters.",
        )
    )
    return instruction, word, str(len(word))
