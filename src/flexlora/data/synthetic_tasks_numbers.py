"""The built-in synthetic number and knowledge-table tasks (registered after the word and letter
tasks of synthetic_tasks.py, by importing this module; see data/synthetic.py)."""

from __future__ import annotations

from flexlora.data.synthetic_tasks import _join, _numbers, _task
from flexlora.data.synthetic_vocab import _ANTONYM_LOOKUP, CAPITALS, PAST_TENSES, PLURALS, number_to_words

# --- numbers ------------------------------------------------------------------------------


@_task("addition")
def _addition(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    instruction = rng.choice(
        (
            "Add the two numbers.",
            "What is the sum of these numbers?",
            "Compute the total of the two numbers.",
        )
    )
    return instruction, f"{a} and {b}", str(a + b)


@_task("subtraction")
def _subtraction(rng):
    a, b = sorted(rng.sample(range(1, 100), 2), reverse=True)
    instruction = rng.choice(
        (
            "Subtract the second number from the first.",
            "What is the first number minus the second?",
            "Compute the difference: first number minus second number.",
        )
    )
    return instruction, f"{a} and {b}", str(a - b)


@_task("max_number")
def _max_number(rng):
    numbers = _numbers(rng)
    instruction = rng.choice(
        (
            "Which number in the list is the largest?",
            "Return the maximum of the numbers.",
            "Pick the biggest number.",
        )
    )
    return instruction, _join(numbers), str(max(numbers))


@_task("min_number")
def _min_number(rng):
    numbers = _numbers(rng)
    instruction = rng.choice(
        (
            "Which number in the list is the smallest?",
            "Return the minimum of the numbers.",
            "Pick the lowest number.",
        )
    )
    return instruction, _join(numbers), str(min(numbers))


@_task("sort_numbers")
def _sort_numbers(rng):
    numbers = _numbers(rng)
    instruction = rng.choice(
        (
            "Sort the numbers in ascending order.",
            "Arrange the numbers from smallest to largest, separated by commas.",
            "List the numbers in increasing order.",
        )
    )
    return instruction, _join(numbers), _join(sorted(numbers))


@_task("even_numbers")
def _even_numbers(rng):
    numbers = _numbers(rng, 5, 8)
    if all(n % 2 for n in numbers):  # keep at least one even number in the answer
        numbers[rng.randrange(len(numbers))] += 1
    instruction = rng.choice(
        (
            "Keep only the even numbers from the list.",
            "List the even numbers in the input, in their original order.",
            "Remove the odd numbers and write the rest.",
        )
    )
    return instruction, _join(numbers), _join(n for n in numbers if n % 2 == 0)


@_task("number_to_words")
def _number_to_words(rng):
    n = rng.randint(0, 99)
    instruction = rng.choice(
        (
            "Write the number in English words.",
            "Spell out the number.",
            "How is this number written in words?",
        )
    )
    return instruction, str(n), number_to_words(n)


# --- small knowledge tables ---------------------------------------------------------------


@_task("plural")
def _plural(rng):
    noun = rng.choice(list(PLURALS))
    instruction = rng.choice(
        (
            "Give the plural form of the noun.",
            "What is the plural of this word?",
            "Write the word in its plural form.",
        )
    )
    return instruction, noun, PLURALS[noun]


@_task("past_tense")
def _past_tense(rng):
    verb = rng.choice(list(PAST_TENSES))
    instruction = rng.choice(
        (
            "Give the simple past tense of the verb.",
            "What is the past tense of this verb?",
            "Write the verb in the past tense.",
        )
    )
    return instruction, verb, PAST_TENSES[verb]


@_task("capital_city")
def _capital_city(rng):
    country = rng.choice(list(CAPITALS))
    instruction = rng.choice(
        (
            "What is the capital city of the country?",
            "Name the capital of the given country.",
            "Answer with the capital of this country.",
        )
    )
    return instruction, country, CAPITALS[country]


@_task("antonym")
def _antonym(rng):
    word, opposite = rng.choice(_ANTONYM_LOOKUP)
    instruction = rng.choice(
        (
            "Give the opposite of the word.",
            "What is an antonym of this word?",
            "Write a word that means the opposite.",
        )
    )
    return instruction, word, opposite
