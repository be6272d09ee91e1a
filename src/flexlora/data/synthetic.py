"""Built-in synthetic federated instruction data: one task type per client, no downloads.

Modelled on the paper's Natural Instructions setting: every client holds the data of one
task type, several clients may share a type, and a disjoint set of task types is held out
so the global model is scored on tasks it never trained on. Each task has a few
paraphrased instruction templates (so a client cannot just memorise one string), an input,
and a short answer that is checkable by construction.

Everything is generated from a `random.Random` seeded by the caller; the global `random`
state is never touched, so a seed fixes the whole federation.

The default held-out types were chosen by measurement (see DEFAULT_HELDOUT_TASKS):
SmolLM2-135M-Instruct scores low Rouge-L on them zero-shot and improves after a short
LoRA fine-tune on the other types. Note that Rouge-L lowercases and splits on
punctuation, so case tasks (uppercase, capitalize) and separator tasks (hyphen join) look
solved to it by plain copying: they are fine training tasks but poor held-out ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from flexlora.data.types import ClientData, Example, FederatedDataset

# ---------------------------------------------------------------------------------------
# Built-in vocabulary and small lookup tables
# ---------------------------------------------------------------------------------------

# Common, short, lowercase English words: one BPE token or two for most tokenizers, so
# prompts stay short and the tasks test the transformation rather than spelling.
WORDS: tuple[str, ...] = tuple(
    """
    apple river green house table window summer winter yellow bread garden music paper
    orange doctor teacher family mountain forest ocean silver golden market letter pencil
    rabbit tiger horse chicken bottle button candle castle circle cloud coffee cookie
    corner cotton dinner dragon engine farmer finger flower friend guitar hammer honey
    island jacket kitchen ladder lemon light little magic marble meadow mirror monkey
    morning needle number office palace parrot pepper pillow planet pocket potato puzzle
    quiet rain robot rocket saddle salad school shadow sister smile snow spider spoon
    spring square stone storm street sugar sunny ticket tomato tower travel turtle valley
    velvet village violin wagon water weather whisper wind wolf wooden yard zebra bright
    happy simple gentle brave clever calm early fast blue small large warm cold soft
    strong sweet open quick slow round dark fresh red white black purple city road boat
    train plane book chair lamp door bird fish tree leaf moon star sun sky sand wave
    """.split()
)

# Regular and irregular plurals, listed explicitly so the answers never depend on rules.
PLURALS: dict[str, str] = {
    "cat": "cats",
    "dog": "dogs",
    "book": "books",
    "tree": "trees",
    "apple": "apples",
    "house": "houses",
    "table": "tables",
    "window": "windows",
    "garden": "gardens",
    "river": "rivers",
    "flower": "flowers",
    "bird": "birds",
    "planet": "planets",
    "teacher": "teachers",
    "rocket": "rockets",
    "box": "boxes",
    "bus": "buses",
    "glass": "glasses",
    "church": "churches",
    "brush": "brushes",
    "fox": "foxes",
    "dish": "dishes",
    "watch": "watches",
    "city": "cities",
    "baby": "babies",
    "party": "parties",
    "story": "stories",
    "lady": "ladies",
    "family": "families",
    "country": "countries",
    "cherry": "cherries",
    "puppy": "puppies",
    "toy": "toys",
    "key": "keys",
    "day": "days",
    "boy": "boys",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "shelf": "shelves",
    "life": "lives",
    "wife": "wives",
    "half": "halves",
    "loaf": "loaves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "hero": "heroes",
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "goose": "geese",
    "tooth": "teeth",
    "foot": "feet",
    "person": "people",
    "ox": "oxen",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "cactus": "cacti",
}

CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Hungary": "Budapest",
    "Czechia": "Prague",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Turkey": "Ankara",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "South Korea": "Seoul",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh",
    "Pakistan": "Islamabad",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Brazil": "Brasilia",
    "United Kingdom": "London",
    "United States": "Washington",
    "Switzerland": "Bern",
}

# Each pair is usable in both directions.
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("young", "old"),
    ("high", "low"),
    ("long", "short"),
    ("asleep", "awake"),
    ("full", "empty"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("wide", "narrow"),
    ("deep", "shallow"),
    ("true", "false"),
    ("good", "bad"),
    ("brave", "afraid"),
    ("above", "below"),
    ("inside", "outside"),
    ("win", "lose"),
    ("buy", "sell"),
    ("begin", "end"),
    ("push", "pull"),
    ("give", "take"),
    ("arrive", "leave"),
    ("remember", "forget"),
    ("accept", "refuse"),
    ("friend", "enemy"),
    ("day", "night"),
    ("summer", "winter"),
    ("north", "south"),
    ("east", "west"),
    ("up", "down"),
    ("left", "right"),
    ("first", "last"),
    ("always", "never"),
    ("love", "hate"),
    ("laugh", "cry"),
    ("sweet", "sour"),
    ("cheap", "expensive"),
    ("safe", "dangerous"),
    ("easy", "difficult"),
    ("polite", "rude"),
)
_ANTONYM_LOOKUP: tuple[tuple[str, str], ...] = ANTONYMS + tuple((b, a) for a, b in ANTONYMS)

PAST_TENSES: dict[str, str] = {
    "go": "went",
    "eat": "ate",
    "see": "saw",
    "take": "took",
    "give": "gave",
    "come": "came",
    "run": "ran",
    "write": "wrote",
    "sing": "sang",
    "swim": "swam",
    "drink": "drank",
    "begin": "began",
    "speak": "spoke",
    "break": "broke",
    "drive": "drove",
    "fly": "flew",
    "know": "knew",
    "grow": "grew",
    "throw": "threw",
    "draw": "drew",
    "buy": "bought",
    "bring": "brought",
    "think": "thought",
    "teach": "taught",
    "catch": "caught",
    "sleep": "slept",
    "keep": "kept",
    "feel": "felt",
    "leave": "left",
    "make": "made",
    "say": "said",
    "find": "found",
    "sit": "sat",
    "stand": "stood",
    "tell": "told",
    "sell": "sold",
    "win": "won",
    "walk": "walked",
    "play": "played",
    "jump": "jumped",
    "cook": "cooked",
    "open": "opened",
    "clean": "cleaned",
    "watch": "watched",
    "dance": "danced",
    "smile": "smiled",
    "study": "studied",
    "carry": "carried",
    "stop": "stopped",
}

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_VOWELS = set("aeiouAEIOU")


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 99, e.g. 47 -> 'forty-seven'."""
    if n < 20:
        return _UNITS[n]
    tens, unit = divmod(n, 10)
    return _TENS[tens - 2] + ("" if unit == 0 else "-" + _UNITS[unit])


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


# ---------------------------------------------------------------------------------------
# Federation
# ---------------------------------------------------------------------------------------

# Chosen by measurement (SmolLM2-135M-Instruct, Alpaca prompt, greedy decoding, generated
# Rouge-L on 8 test examples each). Zero-shot all four score 3-13: the model answers with a
# sentence about the task. After 50 LoRA steps on the other 25 types they reached
# reverse_words 28, sort_words 52, remove_word 82, plural 38 (exact match 38), mostly by
# answering concisely with the input's words. Copying the input alone scores 19 / 53 / 88 / 0,
# so a method beating that (and exact match) shows transfer beyond format. Each has a
# related training task to learn from: reverse_letters, sort_numbers, replace_word,
# past_tense. Not chosen: last_word, min_number, acronym, count_letters and longest_word did
# not improve in that budget; case and hyphen tasks look solved to Rouge-L by copying.
DEFAULT_HELDOUT_TASKS: tuple[str, ...] = ("reverse_words", "sort_words", "remove_word", "plural")


def _draw_examples(task: str, rng: random.Random, count: int, avoid: set[tuple[str, str]]) -> list[Example]:
    """`count` examples of `task` whose (instruction, input) pairs are not in `avoid`.

    Small-table tasks (capitals, antonyms) may run out of fresh pairs; after a bounded
    number of redraws a repeat is accepted rather than looping forever.
    """
    generate = TASKS[task]
    examples = []
    for _ in range(count):
        for _attempt in range(50):
            ex = generate(rng)
            if (ex.instruction, ex.input) not in avoid:
                break
        avoid.add((ex.instruction, ex.input))
        examples.append(ex)
    return examples


def _make_client(client_id: str, task: str, n_train: int, n_test: int, rng: random.Random) -> ClientData:
    # Test first, then train avoiding the test prompts: no test prompt is seen in training.
    seen: set[tuple[str, str]] = set()
    test = _draw_examples(task, rng, n_test, seen)
    train = _draw_examples(task, rng, n_train, seen)
    return ClientData(client_id=client_id, category=task, train=train, test=test)


def make_federation(
    num_clients: int = 40,
    train_per_client: int = 32,
    test_per_client: int = 8,
    heldout_tasks: int | Sequence[str] = DEFAULT_HELDOUT_TASKS,
    heldout_clients_per_task: int = 1,
    seed: int = 0,
    vary_sizes: bool = True,
) -> FederatedDataset:
    """A federation with one task type per client.

    num_clients: training clients. Training task types are dealt round-robin over a
        seeded shuffle, so every training type gets a client when num_clients allows.
    heldout_tasks: task names, or a number of task types to draw at random (seeded).
        Their clients are appended after the training clients (ids continue the
        numbering) and are evaluation-only: they also carry `train` examples, for
        local-adaptation experiments, which must never be used to train the global model.
    vary_sizes: training clients get train sizes drawn uniformly from
        [train_per_client/2, train_per_client*1.5], so data-size weights p_k matter;
        held-out clients always get exactly train_per_client. Test sizes are fixed.
    """
    rng = random.Random(seed)
    all_tasks = list_tasks()
    if isinstance(heldout_tasks, int):
        if not 0 <= heldout_tasks < len(all_tasks):
            raise ValueError(f"heldout_tasks must be in [0, {len(all_tasks)}), got {heldout_tasks}")
        heldout = sorted(rng.sample(all_tasks, heldout_tasks))
    else:
        heldout = list(heldout_tasks)
        unknown = [t for t in heldout if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task types {unknown}; known: {all_tasks}")
    train_tasks = [t for t in all_tasks if t not in heldout]
    if num_clients > 0 and not train_tasks:
        raise ValueError("every task type is held out; nothing left to train on")
    rng.shuffle(train_tasks)

    def train_size() -> int:
        if not vary_sizes:
            return train_per_client
        return rng.randint(max(1, train_per_client // 2), max(1, round(train_per_client * 1.5)))

    clients = []
    for i in range(num_clients):
        task = train_tasks[i % len(train_tasks)]
        # Each client draws from its own rng, seeded from the master one, so one client's
        # data does not depend on how many examples the clients before it drew.
        client_rng = random.Random(rng.getrandbits(64))
        clients.append(_make_client(f"syn-{i:03d}", task, train_size(), test_per_client, client_rng))

    heldout_clients = []
    for task in heldout:
        for _ in range(heldout_clients_per_task):
            index = num_clients + len(heldout_clients)
            client_rng = random.Random(rng.getrandbits(64))
            heldout_clients.append(_make_client(f"syn-{index:03d}", task, train_per_client, test_per_client, client_rng))
    return FederatedDataset(name=f"synthetic-seed{seed}", clients=clients, heldout=heldout_clients)


__all__ = [
    "DEFAULT_HELDOUT_TASKS",
    "TASKS",
    "WORDS",
    "list_tasks",
    "make_federation",
    "number_to_words",
]
