"""CPU seconds of every process a benchmark started, by role, over any window of wall-clock time
(`flexlora bench deployment`: a round's SuperLink, SuperNodes, SuperExecs, ClientApps, ServerApp,
node workers, Ray, ...). CPU seconds hold better than wall time on a machine shared with other work.

A sampler thread reads, every `interval_s`, the CPU time (user + system) of every descendant of
this process (psutil), and of their children already waited for: a short-lived process (one
`flwr-clientapp` per Message) that exits between two samples is still counted in full, in its
parent's children times, and the parent's role for its children gives it its own role back (a
node's SuperExec reaps ClientApps, the SuperLink's its ServerApp). A role's cumulative seconds are
interpolated linearly at a window's ends; the error is at most one sampling interval's CPU at each
end. A process that is gone without a parent in the tree to reap it (the bench reaps what it
started itself) keeps what it was last seen to have used. This process itself is not counted.
"""

from __future__ import annotations

import bisect
import os
import threading
import time

# (a piece of the command line, role), first match wins.
ROLES = (
    ("flwr-clientapp", "clientapp"),
    ("flwr-serverapp", "serverapp"),
    ("flower-superexec", "superexec"),
    ("flower-supernode", "supernode"),
    ("flower-superlink", "superlink"),
    ("node serve", "worker"),
    ("flwr run", "flwr run (CLI)"),
    ("ray::", "ray workers"),
    ("raylet", "ray"),
    ("gcs_server", "ray"),
    ("ray/", "ray"),
    ("flexlora.cli run", "flexlora run"),
)


def role_of(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for piece, role in ROLES:
        if piece in text:
            return role
    return "other"


def children_role(role: str, parent_role: str | None) -> str:
    """The role of the processes a process of `role` starts and reaps: a SuperExec's are
    ClientApps on a node, the ServerApp beside the SuperLink."""
    if role == "superexec":
        return "clientapp" if parent_role == "supernode" else "serverapp"
    return role


class CpuSampler:
    """Samples the CPU seconds of this process's descendants, by role, in a thread; use as a
    context manager (`with CpuSampler() as cpu: ...; cpu.window(t0, t1)`)."""

    def __init__(self, interval_s: float = 0.5):
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.times: list[float] = []
        self.samples: list[dict[str, float]] = []  # per sample: role -> cumulative CPU seconds
        self._roles: dict[int, tuple[str, str | None]] = {}  # pid -> (role, parent's role)
        self._seen: dict[int, tuple[int | None, dict[str, float]]] = {}  # pid -> (parent pid, last CPU by role)
        self._retired: dict[str, float] = {}  # CPU of processes gone with nobody in the tree to reap them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-cpu-sampler")

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _role(self, proc) -> tuple[str, str | None]:
        known = self._roles.get(proc.pid)
        if known is None:
            try:
                parent = proc.parent()
                parent_role = role_of(parent.cmdline()) if parent is not None else None
                known = (role_of(proc.cmdline()), parent_role)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                known = ("other", None)
            self._roles[proc.pid] = known
        return known

    def sample(self) -> None:
        psutil = self.psutil
        now = time.time()
        try:
            procs = psutil.Process(os.getpid()).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        seen: dict[int, tuple[int | None, dict[str, float]]] = {}
        for proc in procs:
            try:
                cpu = proc.cpu_times()
                parent = proc.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            role, parent_role = self._role(proc)
            mine = {role: cpu.user + cpu.system}
            reaped = cpu.children_user + cpu.children_system
            if reaped:
                child = children_role(role, parent_role)
                mine[child] = mine.get(child, 0.0) + reaped
            seen[proc.pid] = (parent, mine)
        for pid, (parent, last) in self._seen.items():
            if pid not in seen and parent not in seen:  # gone, and no parent in the tree counts it
                for role, value in last.items():
                    self._retired[role] = self._retired.get(role, 0.0) + value
        self._seen = seen
        totals = dict(self._retired)
        for _, mine in seen.values():
            for role, value in mine.items():
                totals[role] = totals.get(role, 0.0) + value
        self.times.append(now)
        self.samples.append(totals)

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per role between two wall-clock times (time.time())."""
        roles = {role for s in self.samples for role in s}
        return {role: max(0.0, self._at(role, end) - self._at(role, start)) for role in sorted(roles)}

    def _at(self, role: str, t: float) -> float:
        if not self.times:
            return 0.0
        i = bisect.bisect_left(self.times, t)
        if i == 0:
            return self.samples[0].get(role, 0.0)
        if i == len(self.times):
            return self.samples[-1].get(role, 0.0)
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.samples[i - 1].get(role, 0.0), self.samples[i].get(role, 0.0)
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
