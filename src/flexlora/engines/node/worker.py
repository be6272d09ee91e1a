"""The node worker (`flexlora node serve`): loads the base model once and trains the tasks its
node's ClientApps hand it over the local channel (channel.py), one at a time, with the same
`client_app.train_reply` (and so `client.train_client`) as the in-process ClientApp.

- The base model is this worker's: every task must name the same one (model source, dtype,
  quantization, and the seed for a random-weight model), else it is refused with one line.
- One task trains at a time; up to `max_queued` more wait their turn (a lock, so never two on
  one model); beyond that a task is refused as busy.
- Only the worker's own user is served (folder 0700, socket 0600, SO_PEERCRED checked).
- A failed task is an error reply and the worker goes on serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from flexlora.engines.node.channel import (
    ChannelError,
    check_private_folder,
    check_socket_path,
    frame_to_records,
    peer_refusal,
    peer_uid,
    records_to_frame,
    recv_frame,
    send_frame,
)

log = logging.getLogger("flexlora.node")

PRECISIONS = ("float32", "bfloat16", "nf4")  # nf4: 4-bit base weights, bfloat16 compute


def base_fingerprint(source: str, dtype: str, quantization: str | None, seed: int) -> dict:
    """What tells two base models apart: their source (a local path made absolute), dtype and
    quantization, and for a random-weight model (tiny-llama, random-llama-1b) the seed that drew
    its weights."""
    from flexlora.models import RANDOM_1B, TINY

    path = Path(source).expanduser()
    if path.exists():
        source = str(path.resolve())
    return {"model": source, "dtype": dtype, "quantization": quantization, "seed": seed if source in (TINY, RANDOM_1B) else None}


def describe(fp: dict) -> str:
    text = f"{fp['model']} ({fp['quantization'] + '/' if fp['quantization'] else ''}{fp['dtype']}"
    return text + (f", seed {fp['seed']})" if fp["seed"] is not None else ")")


def parse_precision(precision: str) -> tuple[str, str | None]:
    """'float32' | 'bfloat16' | 'nf4' -> (model_dtype, quantization), as the run config says them."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: choose from {', '.join(PRECISIONS)}, got {precision!r}")
    return ("bfloat16", "nf4") if precision == "nf4" else (precision, None)


class NodeWorker:
    def __init__(
        self,
        model: str,
        precision: str = "float32",
        device: str = "auto",
        seed: int = 0,
        gradient_checkpointing: bool = False,
        max_queued: int = 4,
        allowed_uid: int | None = None,
    ):
        if max_queued < 0:
            raise ValueError(f"--max-queued must be >= 0, got {max_queued}")
        self.dtype, self.quantization = parse_precision(precision)
        self.source, self.device_name, self.seed = model, device, seed
        self.gradient_checkpointing = gradient_checkpointing
        self.fingerprint = base_fingerprint(model, self.dtype, self.quantization, seed)
        self.max_queued = max_queued
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.model = self.tokenizer = self.device = None
        self._train_lock = threading.Lock()  # one task on the model at a time
        self._count_lock = threading.Lock()
        self._pending = 0  # tasks training or waiting
        self._stopping = False
        self.served: list[dict] = []  # the last tasks: client, round, wall-clock start/end, outcome
        self.started = time.time()

    # ------------------------------------------------------------ model

    def load(self) -> None:
        from flexlora.experiment import resolve_device
        from flexlora.models import load_model

        started = time.perf_counter()
        self.device = resolve_device(self.device_name)
        self.model, self.tokenizer = load_model(
            self.source,
            self.device,
            seed=self.seed,
            dtype=self.dtype,
            quantization=self.quantization,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        log.info("loaded %s on %s in %.1f s", describe(self.fingerprint), self.device, time.perf_counter() - started)

    def model_for(self, cfg, node_config):
        """(model, tokenizer, target modules) for a task, if it is for this worker's base model."""
        from flexlora.models import default_target_modules

        wanted = base_fingerprint(str(node_config.get("model") or cfg.model), cfg.model_dtype, cfg.quantization, cfg.seed)
        if wanted != self.fingerprint:
            raise ValueError(f"this node worker serves {describe(self.fingerprint)}, the task is for {describe(wanted)}")
        return self.model, self.tokenizer, cfg.lora.target_modules or default_target_modules(self.model)

    # ------------------------------------------------------------ requests

    def status(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "pid": os.getpid(),
            "pending": self._pending,
            "served": self.served[-20:],
            "up_s": time.time() - self.started,
        }

    def handle(self, header: dict, payload: bytes) -> tuple[dict, bytes | list]:
        """One request -> (reply header, payload). Errors are replies, never a crash."""
        op = header.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}, b""
        if op != "train":
            return {"ok": False, "error": f"unknown request {op!r}"}, b""
        with self._count_lock:
            if self._pending > self.max_queued:
                return {
                    "ok": False,
                    "error": f"node worker busy: a task is training and {self._pending - 1} wait (--max-queued {self.max_queued})",
                }, b""
            self._pending += 1
        try:
            with self._train_lock:
                return self._train(header, payload)
        finally:
            with self._count_lock:
                self._pending -= 1

    def _train(self, header: dict, payload: bytes) -> tuple[dict, list]:
        from flexlora.engines.flower.client_app import train_reply

        entry = {"started": time.time()}
        try:
            content = frame_to_records(header, payload)
            node_config = header.get("node_config") or {}
            meta = _task_meta(content)
            entry.update(client=meta.get("client_id"), round=meta.get("round"))
            log.info("round %s: task for client %s received", entry["round"], entry["client"])
            reply = train_reply(content, node_config, lambda cfg: self.model_for(cfg, node_config))
            head, body = records_to_frame(reply, raw="raw" in header)  # answered in the request's kind
            entry.update(finished=time.time(), ok=True)
            m = _update_metrics(reply)
            log.info(
                "round %s: client %s trained in %.2f s (%s steps at max rank %s, loss %.4f -> %.4f), reply %.2f MB",
                entry["round"],
                entry["client"],
                entry["finished"] - entry["started"],
                m.get("steps"),
                m.get("max_rank"),
                m.get("train_loss_first", float("nan")),
                m.get("train_loss_last", float("nan")),
                sum(len(part) for part in body) / 2**20,
            )
            return {"ok": True, **head}, body
        except Exception as e:  # a failed task is this task's error reply; the worker serves on
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            entry.update(finished=time.time(), ok=False, error=reason)
            log.warning("round %s: client %s failed: %s", entry.get("round"), entry.get("client"), reason)
            return {"ok": False, "error": reason}, b""
        finally:
            self.served.append(entry)
            del self.served[:-100]

    def serve_connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                refusal = peer_refusal(peer_uid(conn), self.allowed_uid)
                if refusal:
                    log.warning("refused a connection: %s", refusal)
                    send_frame(conn, {"ok": False, "error": f"refused: {refusal}"})
                    return
                request = recv_frame(conn)
                if request is None:
                    return
                head, body = self.handle(*request)
                send_frame(conn, head, body)
            except ChannelError as e:
                log.warning("bad request: %s", e)
                try:
                    send_frame(conn, {"ok": False, "error": str(e)})
                except OSError:
                    pass
            except OSError as e:  # the ClientApp went away (its process was stopped)
                log.warning("lost the ClientApp's connection: %s", e)

    # ------------------------------------------------------------ the socket

    def serve(self, path: str | Path, ready: threading.Event | None = None) -> None:
        """Listen on `path` until SIGTERM / SIGINT (or the listening socket is closed)."""
        path = Path(path).expanduser().absolute()
        listener = bind_private_socket(path)
        self._listener = listener
        log.info("serving %s on %s (device %s), socket %s", describe(self.fingerprint), os.uname().nodename, self.device, path)
        if ready is not None:
            ready.set()
        inode = os.stat(path).st_ino
        try:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    if self._stopping:
                        return
                    raise
                threading.Thread(target=self.serve_connection, args=(conn,), daemon=True).start()
        finally:
            listener.close()
            try:
                if os.stat(path).st_ino == inode:  # ours, not a successor's
                    os.unlink(path)
            except FileNotFoundError:
                pass
            log.info("stopped serving on %s", path)

    def stop(self) -> None:
        """End serve() from another thread (tests): wake its accept() and close the socket."""
        self._stopping = True
        listener = getattr(self, "_listener", None)
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
            except OSError:
                pass
            listener.close()


def _update_metrics(reply) -> dict:
    import json

    from flexlora.engines.flower.codec import UPDATE

    try:
        return json.loads(reply.config_records[UPDATE][UPDATE]).get("metrics") or {}
    except (KeyError, TypeError, ValueError):
        return {}


def _task_meta(content) -> dict:
    import json

    from flexlora.engines.flower.codec import TASK

    try:
        return json.loads(content.config_records[TASK][TASK])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the request is not a Flower train task (no 'task' record)") from None


def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600, in a folder private to this user (made
    with mode 0700 if missing; refused if it exists and others can enter it). A socket file
    left by a worker that died is replaced; a live one is an error."""
    check_socket_path(path)
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    check_private_folder(folder)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):  # never remove what is not a socket
            raise ChannelError(f"{path} exists and is not a worker's socket; remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            os.unlink(path)  # a dead worker's socket
        except OSError as e:
            raise ChannelError(
                f"{path} exists and cannot be probed ({e.strerror or e}); remove it or choose another path"
            ) from None
        else:
            raise ChannelError(f"a node worker is already serving at {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # the socket is born 0600: no moment at which others may connect
    try:
        listener.bind(os.fspath(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener


def main(args) -> None:
    """`flexlora node serve`: load the model, serve until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    worker = NodeWorker(
        args.model,
        args.precision,
        args.device,
        args.seed,
        args.gradient_checkpointing,
        args.max_queued,
    )
    path = Path(args.socket).expanduser() if args.socket else None
    if path is None:
        from flexlora.engines.node.channel import default_socket_path

        path = default_socket_path()
    check_socket_path(path)  # before minutes of loading
    worker.load()

    def _terminate(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        worker.serve(path)
    except KeyboardInterrupt:
        pass
