"""The built-in synthetic federation: determinism, held-out disjointness, answer correctness."""

import random

import pytest

from flexlora.data.synthetic import (
    DEFAULT_HELDOUT_TASKS,
    TASKS,
    list_tasks,
    make_federation,
    number_to_words,
)
from flexlora.data.types import Example, FederatedDataset


def _all_examples(fd: FederatedDataset) -> list[Example]:
    return [e for c in fd.clients + fd.heldout for e in c.train + c.test]


def _examples_of(task: str, n: int = 40, seed: int = 1) -> list[Example]:
    rng = random.Random(seed)
    return [TASKS[task](rng) for _ in range(n)]


def test_at_least_16_task_types_with_generators():
    assert len(list_tasks()) >= 16
    assert list_tasks() == list(TASKS)
    assert set(DEFAULT_HELDOUT_TASKS) <= set(TASKS)


def test_same_seed_same_dataset_different_seed_different():
    a, b = make_federation(seed=3), make_federation(seed=3)
    assert a == b
    c = make_federation(seed=4)
    assert _all_examples(a) != _all_examples(c)


def test_does_not_touch_global_random_state():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    make_federation(num_clients=5, seed=0)
    assert random.random() == expected


def test_heldout_task_types_disjoint_from_training():
    fd = make_federation()
    train_types = {c.category for c in fd.clients}
    heldout_types = {c.category for c in fd.heldout}
    assert heldout_types == set(DEFAULT_HELDOUT_TASKS)
    assert not train_types & heldout_types
    # With 40 clients every training type has at least one client.
    assert train_types == set(list_tasks()) - heldout_types
    ids = [c.client_id for c in fd.clients + fd.heldout]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "syn-000"


def test_heldout_as_a_count_is_seeded_and_disjoint():
    fd = make_federation(num_clients=10, heldout_tasks=5, heldout_clients_per_task=2, seed=7)
    heldout_types = {c.category for c in fd.heldout}
    assert len(heldout_types) == 5 and len(fd.heldout) == 10
    assert not heldout_types & {c.category for c in fd.clients}
    again = make_federation(num_clients=10, heldout_tasks=5, heldout_clients_per_task=2, seed=7)
    assert {c.category for c in again.heldout} == heldout_types


def test_unknown_heldout_task_rejected():
    with pytest.raises(ValueError):
        make_federation(heldout_tasks=["no_such_task"])


def test_sizes_as_requested():
    fd = make_federation(num_clients=12, train_per_client=10, test_per_client=3, seed=1)
    assert len(fd.clients) == 12 and len(fd.heldout) == len(DEFAULT_HELDOUT_TASKS)
    for c in fd.clients:
        assert 5 <= len(c.train) <= 15 and len(c.test) == 3
        assert c.num_examples == len(c.train)
    assert len({len(c.train) for c in fd.clients}) > 1  # sizes vary, so weights p_k matter
    for c in fd.heldout:
        assert len(c.train) == 10 and len(c.test) == 3

    fixed = make_federation(num_clients=6, train_per_client=10, test_per_client=3, vary_sizes=False)
    assert all(len(c.train) == 10 for c in fixed.clients)


def test_every_example_nonempty_and_labelled():
    fd = make_federation()
    for c in fd.clients + fd.heldout:
        for e in c.train + c.test:
            assert e.instruction.strip() and e.input.strip() and e.output.strip()
            assert e.category == c.category


def test_instructions_are_paraphrased():
    for task in list_tasks():
        assert len({e.instruction for e in _examples_of(task, 60)}) >= 2, task


def test_test_prompts_not_in_training_of_same_client():
    fd = make_federation()
    for c in fd.clients:
        train = {(e.instruction, e.input) for e in c.train}
        # Word-based tasks have plenty of fresh prompts; small tables may repeat.
        if c.category in {"reverse_words", "sort_words", "addition", "max_number"}:
            assert not train & {(e.instruction, e.input) for e in c.test}


# --- answers checked independently of the generators ---------------------------------------


def test_reverse_words_answers():
    for e in _examples_of("reverse_words"):
        assert e.output.split() == e.input.split()[::-1]


def test_sort_words_answers():
    for e in _examples_of("sort_words"):
        assert e.output.split() == sorted(e.input.split())


def test_count_words_answers():
    for e in _examples_of("count_words"):
        assert int(e.output) == len(e.input.split())


def test_addition_and_subtraction_answers():
    for e in _examples_of("addition"):
        a, b = map(int, e.input.split(" and "))
        assert int(e.output) == a + b
    for e in _examples_of("subtraction"):
        a, b = map(int, e.input.split(" and "))
        assert int(e.output) == a - b >= 0


def test_number_list_answers():
    for e in _examples_of("max_number"):
        assert int(e.output) == max(int(x) for x in e.input.split(","))
    for e in _examples_of("sort_numbers"):
        assert [int(x) for x in e.output.split(",")] == sorted(int(x) for x in e.input.split(","))
    for e in _examples_of("even_numbers"):
        assert [int(x) for x in e.output.split(",")] == [int(x) for x in e.input.split(",") if int(x) % 2 == 0]


def test_word_edit_answers():
    for e in _examples_of("remove_word"):
        target = e.instruction.split('"')[1]
        assert target in e.input.split()
        assert e.output.split() == [w for w in e.input.split() if w != target]
    for e in _examples_of("remove_vowels"):
        assert not set(e.output) & set("aeiou")
    for e in _examples_of("acronym"):
        assert e.output == "".join(w[0] for w in e.input.split()).upper()


def test_number_to_words():
    assert [number_to_words(n) for n in (0, 7, 13, 20, 47, 99)] == [
        "zero",
        "seven",
        "thirteen",
        "twenty",
        "forty-seven",
        "ninety-nine",
    ]
