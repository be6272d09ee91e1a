"""The built-in synthetic tasks' vocabulary and small lookup tables (a data table: words,
plurals, past tenses, capitals, antonyms) and number words. See data/synthetic.py."""

from __future__ import annotations

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
