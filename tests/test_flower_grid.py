"""The streaming runtime of the ServerApp over Flower's Grid (FlowerRuntime): at most
flower.max_in_flight tasks pushed and unanswered, a missing reply a timeout, a task Flower does
not take a failure, a pushed Message left untouched. Nodes answer without training (EchoGrid),
so that many clients cost nothing; tests/test_flower.py has the grid they build on."""

from __future__ import annotations

from importlib import import_module

import pytest
import torch
from test_flower import InProcessGrid, _factors

from flexlora import protocol
from flexlora.client import ClientTask
from flexlora.config import load_config
from flexlora.engines import flower


class CountingTasks:
    """An iterator over tasks that records, each time one is taken, how many were pushed and
    not answered yet (the runtime may take a task only when it can push it at once)."""

    def __init__(self, tasks, grid):
        self.tasks, self.grid = iter(tasks), grid
        self.taken = 0
        self.unanswered_when_taken: list[int] = []

    def __iter__(self):
        return self

    def __next__(self):
        task = next(self.tasks)
        self.taken += 1
        self.unanswered_when_taken.append(len(self.grid.pushed))
        return task


class EchoGrid(InProcessGrid):
    """Nodes that answer a task without training: an update with the task's own factors (or
    fresh ones at its ranks), so that many clients cost nothing. `silent`: nodes that never
    answer; `after_pulls`: a pushed message is answered only from that many pulls on."""

    def __init__(self, nodes, silent=(), after_pulls=0, **kwargs):
        super().__init__({n: {} for n in nodes}, **kwargs)
        self.silent, self.after_pulls = set(silent), after_pulls
        self.pulls_seen: dict[str, int] = {}
        self.extra_replies = []  # replies Flower hands back that match no pushed id

    def _answer(self, m):
        from flwr.app import Message

        task, _ = flower.decode_task(m.content)
        factors = task.factors or {k: (torch.ones(r, 12), torch.zeros(7, r)) for k, r in task.module_ranks.items()}
        update = protocol.ClientUpdate(task.client_id, 3, 16.0, factors, {"train_loss_last": 1.0})
        return Message(flower.encode_update(update, "float32", packed=flower.is_packed(m.content, flower.TASK)), reply_to=m)

    def pull_messages(self, message_ids):
        ready = []
        for mid in message_ids:
            self.pulls_seen[mid] = self.pulls_seen.get(mid, 0) + 1
            m = self.pushed.get(mid)
            if m is not None and m.metadata.dst_node_id not in self.silent and self.pulls_seen[mid] > self.after_pulls:
                ready.append(mid)
        if self.newest_first:
            ready.reverse()
        replies = [self._answer(self.pushed.pop(mid)) for mid in ready[: self.per_pull]]
        extra, self.extra_replies = self.extra_replies, []
        return extra + replies


def _echo_setup(tiny_overrides, n, timeout_s=3600.0, **grid_kwargs):
    from types import SimpleNamespace

    cfg = load_config(overrides=tiny_overrides)
    ids = [f"c{i}" for i in range(n)]
    strategy = flower.FederatedStrategy(SimpleNamespace(cfg=cfg), {cid: 100 + i for i, cid in enumerate(ids)}, timeout_s)
    grid = EchoGrid([100 + i for i in range(n)], **grid_kwargs)
    tasks = [ClientTask(cid, 2, "T1", {"layer.0.q_proj": 2}, _factors((2,)), i) for i, cid in enumerate(ids)]
    return strategy, grid, tasks


@pytest.mark.parametrize("max_in_flight, per_pull", [(1, None), (3, 1), (3, None), (20, 2)])
def test_at_most_max_in_flight_tasks_are_pushed_and_unanswered(max_in_flight, per_pull, tiny_overrides, run_identity):
    strategy, grid, tasks = _echo_setup(tiny_overrides, 10, per_pull=per_pull, newest_first=True, after_pulls=1)
    counting = CountingTasks(tasks, grid)
    results = flower.FlowerRuntime(strategy, grid, max_in_flight=max_in_flight).train(counting)
    first = next(results)
    # Taken lazily: the first result comes after max_in_flight tasks, and one more for each
    # reply of that pull (their freed slots are refilled, in one push, before it is yielded).
    first_pull = min(per_pull or max_in_flight, max_in_flight)
    assert counting.taken == min(10, max_in_flight + first_pull)
    rest = []
    for result in results:
        answered = len(grid.sent) - len(grid.pushed)
        assert counting.taken - answered <= max_in_flight  # pushed and not answered when a result comes
        rest.append(result)
    assert sorted(r.client_id for r in [first, *rest]) == sorted(t.client_id for t in tasks)
    assert all(isinstance(r, protocol.ClientUpdate) for r in [first, *rest])
    assert counting.taken == 10 and len(grid.sent) == 10
    assert max(counting.unanswered_when_taken) <= max_in_flight - 1  # each taken task is pushed at once
    assert grid.most_unanswered == min(10, max_in_flight)
    for r in rest:
        assert r.metrics["bytes_down"] >= r.metrics["payload_bytes_down"] == 4 * (2 * 12 + 7 * 2)
        assert r.metrics["bytes_up"] >= r.metrics["payload_bytes_up"] == 4 * (2 * 12 + 7 * 2)


class CallCountingGrid(EchoGrid):
    """Records the Messages of every push_messages call."""

    def __init__(self, nodes, **kwargs):
        super().__init__(nodes, **kwargs)
        self.calls: list[list[str]] = []  # per call: the clients' nodes

    def push_messages(self, messages):
        messages = list(messages)
        self.calls.append([m.metadata.dst_node_id for m in messages])
        return super().push_messages(messages)


@pytest.mark.parametrize("previous", [False, True])
def test_a_rounds_tasks_go_in_one_push_messages_call(previous, tiny_overrides, run_identity):
    """Every task of a round that fits in max_in_flight goes to Flower in one push_messages call
    (the previous transport, the deployment bench's baseline, pushed one call per task)."""
    strategy, _, tasks = _echo_setup(tiny_overrides, 5)
    strategy.packed = not previous
    grid = CallCountingGrid([100 + i for i in range(5)], after_pulls=1)
    runtime = flower.FlowerRuntime(strategy, grid, max_in_flight=8)
    results = list(runtime.train(tasks))
    assert sorted(r.client_id for r in results) == [f"c{i}" for i in range(5)]
    assert all(isinstance(r, protocol.ClientUpdate) for r in results)
    expected = [[100 + i] for i in range(5)] if previous else [[100, 101, 102, 103, 104]]
    assert grid.calls == expected and runtime.push_calls == len(expected)
    assert runtime.poll_s == 0.0  # the grid's own pull_interval (the in-memory grid's, here 0)
    server_module = import_module("flexlora.engines.flower.server_app")  # the package exports the ServerApp under that name
    assert server_module.POLL_S <= 0.2 and server_module.PREVIOUS_POLL_S == 1.0  # a deployment grid's polls
    # Each task went in its layout, and each reply came back in it: one packed Array per field, or one per tensor.
    for m in grid.sent:
        assert flower.is_packed(m.content, flower.TASK) is (not previous)
    assert {r.metrics["objects_down"] for r in results} == ({8} if previous else {6})


def test_a_missing_reply_is_a_timeout_failure_and_the_round_ends_at_its_deadline(tiny_overrides, run_identity, caplog):
    import time

    # Node 101 never answers; with one slot the round's time runs out waiting for it, and the
    # tasks it had no time to send are failures too (taken, and so built, one at a time).
    strategy, grid, tasks = _echo_setup(tiny_overrides, 4, timeout_s=0.6, silent={101})
    started = time.monotonic()
    results = list(flower.FlowerRuntime(strategy, grid, max_in_flight=1, poll_s=0.01).train(CountingTasks(tasks, grid)))
    assert time.monotonic() - started < 5
    assert [r.client_id for r in results] == ["c0", "c1", "c2", "c3"]
    assert isinstance(results[0], protocol.ClientUpdate)
    assert results[1].reason == "no reply within 0.6 s"
    assert all("not sent: the round's flower.round_timeout_s was up" in r.reason for r in results[2:])
    assert len(grid.sent) == 2

    # With slots for all, only the silent node's task fails; a reply to a message id the round
    # never sent is ignored, and one from another node than the task's is that task's failure.
    strategy, grid, tasks = _echo_setup(tiny_overrides, 4, timeout_s=0.5, silent={102})
    runtime = flower.FlowerRuntime(strategy, grid, max_in_flight=4, poll_s=0.01)
    stray = grid._answer(strategy.task_message(tasks[0]))
    stray.metadata.__dict__["_reply_to_message_id"] = "not-ours"
    grid.extra_replies.append(stray)
    original = grid._answer

    def answer_from_elsewhere(m):
        reply = original(m)
        if m.metadata.dst_node_id == 103:
            reply.metadata.__dict__["_src_node_id"] = 100
        return reply

    grid._answer = answer_from_elsewhere
    with caplog.at_level("WARNING"):
        results = {r.client_id: r for r in runtime.train(tasks)}
    assert sorted(results) == ["c0", "c1", "c2", "c3"]
    assert isinstance(results["c0"], protocol.ClientUpdate) and isinstance(results["c1"], protocol.ClientUpdate)
    assert results["c2"].reason == "no reply within 0.5 s"
    assert results["c3"].reason == "bad reply: from node 100, the task went to node 103"
    assert "ignored a Flower reply to unknown message 'not-ours'" in caplog.text


def test_a_task_flower_does_not_take_is_a_failure(tiny_overrides, run_identity):
    strategy, grid, tasks = _echo_setup(tiny_overrides, 3)
    push = grid.push_messages
    grid.push_messages = lambda messages: [None if m.metadata.dst_node_id == 101 else push([m])[0] for m in messages]
    results = {r.client_id: r for r in flower.FlowerRuntime(strategy, grid, max_in_flight=2).train(tasks)}
    assert isinstance(results["c0"], protocol.ClientUpdate) and isinstance(results["c2"], protocol.ClientUpdate)
    assert results["c1"].reason == "Flower did not take the task (push_messages returned no message id)"


def _dict_shapes(obj) -> dict[int, frozenset]:
    """The key set of every dict and object __dict__ reachable from `obj`: what a pickle running
    in another thread iterates (Flower's simulation pickles a pushed Message for its Ray actor)."""
    shapes, stack = {}, [obj]
    while stack:
        o = stack.pop()
        if id(o) in shapes or isinstance(o, (str, bytes, int, float, bool, type(None))):
            continue
        if isinstance(o, dict):
            shapes[id(o)] = frozenset(o)
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            shapes[id(o)] = frozenset(vars(o))
            stack.extend(vars(o).values())
    return shapes


class HandsOffGrid(EchoGrid):
    """Records each pushed Message's dict shapes as Flower takes it, and checks them when it is
    answered: a Message pushed is Flower's, and the sender must not add to it (not even a cached
    object id), or a concurrent pickle fails with "dictionary changed size during iteration"."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.shapes_at_push: dict[str, dict[int, frozenset]] = {}  # message id -> its shapes

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for mid in ids:
            self.shapes_at_push[mid] = _dict_shapes(self.pushed[mid])
        return ids

    def _answer(self, m):
        assert _dict_shapes(m) == self.shapes_at_push[m.metadata.message_id], "the Message changed after it was pushed"
        return super()._answer(m)


def test_a_pushed_message_is_not_touched_by_the_sender(tiny_overrides, run_identity):
    strategy, _, tasks = _echo_setup(tiny_overrides, 3)
    grid = HandsOffGrid([100, 101, 102])
    results = list(flower.FlowerRuntime(strategy, grid, max_in_flight=3).train(tasks))
    assert sorted(r.client_id for r in results) == ["c0", "c1", "c2"]
    assert all(r.metrics["bytes_down"] > r.metrics["payload_bytes_down"] > 0 for r in results)
