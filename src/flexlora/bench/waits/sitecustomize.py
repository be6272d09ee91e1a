"""Records Flower's idle waits (see __init__.py), and shortens them where FLEXLORA_WAITS_SHORT_S
is set; imported by Python at start-up when this folder is on PYTHONPATH and FLEXLORA_WAITS_DIR is
set. Stdlib only; does nothing otherwise."""

import os

if os.environ.get("FLEXLORA_WAITS_DIR"):
    import json
    import sys
    import threading
    import time

    _DIR = os.environ["FLEXLORA_WAITS_DIR"]
    _SLEEP, _WAIT = time.sleep, threading.Event.wait
    _CALLERS = {"start_client_internal": "supernode idle", "pull_with_retries": "object-pull backoff"}

    def _record(kind, started, seconds):
        try:
            with open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"kind": kind, "start": started, "seconds": seconds, "pid": os.getpid()}) + "\n")
        except OSError:
            pass

    # The bench's counterfactual (engine short-waits+workers): each of the two waits lasts at most
    # this long, so that what they cost a round is measured. time.sleep(s) and Event.wait(timeout).
    _SHORT = float(os.environ.get("FLEXLORA_WAITS_SHORT_S") or 0) or None

    def _shortened(args, kwargs, at):  # `at`: the seconds' position, sleep(seconds) or wait(self, timeout)
        if kwargs.get("timeout") is not None:
            return args, {**kwargs, "timeout": min(kwargs["timeout"], _SHORT)}
        if len(args) > at and args[at] is not None:
            return (*args[:at], min(args[at], _SHORT), *args[at + 1 :]), kwargs
        return args, kwargs  # a wait without a timeout stays one

    def _traced(real, at):
        def wrapper(*args, **kwargs):
            kind = _CALLERS.get(sys._getframe(1).f_code.co_name)
            if kind is None:
                return real(*args, **kwargs)
            if _SHORT is not None:
                args, kwargs = _shortened(args, kwargs, at)
            started = time.time()
            try:
                return real(*args, **kwargs)
            finally:
                _record(kind, started, time.time() - started)

        return wrapper

    time.sleep = _traced(_SLEEP, 0)
    threading.Event.wait = _traced(_WAIT, 1)
