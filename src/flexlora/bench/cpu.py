"""CPU seconds of every process a benchmark started, by role, over any window of wall-clock time
(`flexlora bench deployment`: a round's SuperLink, SuperNodes, SuperExecs, ClientApps, ServerApp,
node workers, Ray, ...). CPU seconds hold better than wall time on a machine shared with other work.

A sampler thread reads, every `interval_s`, the CPU time (user + system) of every descendant of
this process (psutil), and of their children already waited for: a short-lived process (one
`flwr-clientapp` per Message) that exits between two samples is still counted in full, in its
parent's children times, and the parent's role for its children gives it its own role back (a
node's SuperExec reaps ClientApps, the SuperLink's its ServerApp). A role's cumulative seconds are
interpolated linearly at a window's ends; the error is at most one sampling interval's CPU at each
end. This process itself (the bench) is not counted.
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-cpu-sampler")

    def __enter__(self) -> CpuSampler:
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
        totals: dict[str, float] = {}
        now = time.time()
        try:
            procs = psutil.Process(os.getpid()).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                cpu = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            role, parent_role = self._role(proc)
            totals[role] = totals.get(role, 0.0) + cpu.user + cpu.system
            reaped = cpu.children_user + cpu.children_system
            if reaped:
                child = children_role(role, parent_role)
                totals[child] = totals.get(child, 0.0) + reaped
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
