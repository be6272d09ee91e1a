"""Named points where a test can stop the process, to kill it there (SIGKILL) and resume.

Production runs never set the variable, and then ``fault_point`` is a dictionary lookup.
With ``FLEXLORA_FAULT_PAUSE="point:round[:nth]"`` the process, on the nth time it reaches
``point`` in ``round`` (default: the first), writes "point:round" to the file named by
``FLEXLORA_FAULT_MARKER`` and sleeps, so the test knows exactly where it is before it kills
it by PID. Pausing (rather than killing itself) keeps the kill external, like a real crash;
the sleep is capped so that a forgotten process still ends.

Points: ``train_step`` (before each local optimizer step), ``checkpoint_write`` (state file
written, checkpoint not yet committed), ``checkpoint`` (checkpoint committed), ``evaluation``
(before the global model is evaluated).

Failed writes: with ``FLEXLORA_FAULT_WRITE="point:round[:ERRNO]"`` (ERRNO a name such as
ENOSPC, the default, EACCES or EIO), ``fault_write`` raises that OSError at the point, as the
disk or the filesystem would: ``checkpoint_tensors`` (the tensor file partly written),
``checkpoint_index`` (the index partly written), ``metrics_line`` (part of the round's line
appended to metrics.jsonl).
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from pathlib import Path

PAUSE_ENV = "FLEXLORA_FAULT_PAUSE"
WRITE_ENV = "FLEXLORA_FAULT_WRITE"
MARKER_ENV = "FLEXLORA_FAULT_MARKER"
MAX_PAUSE_S = 300.0
_reached: Counter = Counter()


def fault_point(point: str, round_: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, rnd, *nth = spec.split(":")
    if name != point or int(rnd) != round_:
        return
    _reached[point, round_] += 1
    if _reached[point, round_] != (int(nth[0]) if nth else 1):
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{point}:{round_}\n")
    deadline = time.monotonic() + MAX_PAUSE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(99)  # nobody killed us: end without running any more of the round


def fault_write(point: str, round_: int) -> None:
    """Raise the OSError FLEXLORA_FAULT_WRITE names when it names this point and round."""
    spec = os.environ.get(WRITE_ENV)
    if not spec:
        return
    name, rnd, *code = spec.split(":")
    if name != point or int(rnd) != round_:
        return
    number = getattr(errno, code[0]) if code else errno.ENOSPC
    raise OSError(number, os.strerror(number))
