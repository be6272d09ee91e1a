"""The local channel between a Flower ClientApp and its node's worker, torch-free.

What the ClientApp imports on the worker path is this module, numpy, safetensors and Flower:
neither torch nor transformers (tests/test_node_worker.py checks it in a fresh process).

Transport: a Unix-domain stream socket. The worker creates it with mode 0600 inside a folder
that must be private to its user (mode 0700, owned by it), and both ends check the other's
user with SO_PEERCRED: a process of another user can neither open the socket nor, if the
permissions were loosened by mistake, be served.

Framing: every frame is a fixed prefix (magic b"FLXN", version, header length, payload length),
a UTF-8 JSON header, and a payload of raw array bytes or safetensors bytes (never pickle). One
connection carries one request and its reply.

A Flower RecordDict crosses as a frame: its ConfigRecords (JSON values) in the header, its
Arrays either forwarded as they are (`raw`: each Array's own bytes, which are Flower's
serialised .npy data, with its dtype, shape and stype in the header: no conversion at all, what
a packed message takes, see flower/packed.py) or converted to safetensors tensors named
`<record>/<key>` (the previous layout's hand-off, kept for the deployment bench's baseline).
Either way the worker sees the very records the ClientApp received and returns the very records
the in-process ClientApp would send, key order kept.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

MAGIC, VERSION = b"FLXN", 2
_PREFIX = struct.Struct(">4sBIQ")  # magic, version, header bytes, payload bytes
MAX_HEADER_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = 1 << 40
MAX_SOCKET_PATH = 100  # bytes; Linux allows 107, macOS 103
CONNECT_TIMEOUT_S = 10.0
WORKER_SOCKET_KEY = "worker-socket"  # the node-config key that hands tasks to a worker


class ChannelError(RuntimeError):
    """A one-line failure of the channel (no worker, a malformed frame, a refused peer)."""


class WorkerUnavailable(ChannelError):
    """Nobody is listening at the socket, or this user may not open it."""


class WorkerGone(ChannelError):
    """The worker closed the channel before its reply was complete (stopped or killed)."""


class WorkerRefused(ChannelError):
    """The worker answered with an error (wrong base model, busy, a failed training)."""


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/flexlora/node.sock (a per-user tmpfs under systemd), else ~/.flexlora/node.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "flexlora" / "node.sock" if runtime else Path.home() / ".flexlora" / "node.sock"


# ---------------------------------------------------------------- frames


def send_frame(sock: socket.socket, header: dict, payload: bytes | bytearray | memoryview | list = b"") -> None:
    """One frame; `payload` is bytes or a list of byte parts sent one after the other (no join)."""
    parts = payload if isinstance(payload, list) else [payload]
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ChannelError(f"frame header of {len(head)} bytes is over the {MAX_HEADER_BYTES} limit")
    sock.sendall(_PREFIX.pack(MAGIC, VERSION, len(head), sum(len(p) for p in parts)) + head)
    for part in parts:
        if len(part):
            sock.sendall(part)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes] | None:
    """(header, payload), or None when the peer closed the connection before a frame began; a
    frame cut short raises WorkerGone, a malformed one ChannelError."""
    prefix = _recv_exact(sock, _PREFIX.size, allow_eof=True)
    if prefix is None:
        return None
    magic, version, head_len, payload_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ChannelError(f"not a flexlora node frame (starts with {magic!r})")
    if version != VERSION:
        raise ChannelError(f"node frame version {version}, this side speaks {VERSION}")
    if head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise ChannelError(f"node frame too large (header {head_len} bytes, payload {payload_len} bytes)")
    try:
        header = json.loads(_recv_exact(sock, head_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChannelError(f"node frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ChannelError("node frame header is not a JSON object")
    return header, _recv_exact(sock, payload_len)


def _recv_exact(sock: socket.socket, n: int, allow_eof: bool = False):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if allow_eof and got == 0:
                return None
            raise WorkerGone(f"the channel closed {got} bytes into a {n}-byte read")
        got += k
    return bytes(buf)


# ---------------------------------------------------------------- Flower records <-> frames


def records_to_frame(content: RecordDict, raw: bool = False) -> tuple[dict, list]:
    """A RecordDict of ConfigRecords and ArrayRecords as (header, payload parts): every Array's
    own bytes as they are (`raw`), or all Arrays as one safetensors buffer."""
    if content.metric_records:
        raise ChannelError(f"MetricRecords do not cross the node channel ({sorted(content.metric_records)})")
    configs = {}
    for name, record in content.config_records.items():
        values = dict(record)
        bad = [
            k for k, v in values.items() if isinstance(v, bytes) or (isinstance(v, list) and any(isinstance(x, bytes) for x in v))
        ]
        if bad:
            raise ChannelError(f"ConfigRecord {name!r}: bytes values ({bad[0]!r}) do not cross the node channel")
        configs[name] = values
    order: dict[str, list[str]] = {}
    for name, record in content.array_records.items():
        if "/" in name:
            raise ChannelError(f"ArrayRecord name {name!r} contains '/'")
        order[name] = list(record.keys())
    if raw:
        described = [
            [name, key, a.dtype, list(a.shape), a.stype, len(a.data)]
            for name, keys in order.items()
            for key in keys
            for a in (content.array_records[name][key],)
        ]
        parts = [content.array_records[name][key].data for name, key, *_ in described]
        return {"configs": configs, "raw": described}, parts
    tensors = {
        f"{name}/{key}": np.ascontiguousarray(content.array_records[name][key].numpy())
        for name, keys in order.items()
        for key in keys
    }
    return {"configs": configs, "arrays": order}, [save_safetensors(tensors)] if tensors else []


def frame_to_records(header: dict, payload: bytes) -> RecordDict:
    """The inverse of records_to_frame (a malformed frame: one-line ChannelError)."""
    content = RecordDict()
    for name, values in (header.get("configs") or {}).items():
        content[name] = ConfigRecord(values)
    if "raw" in header:
        return _raw_records(header["raw"], payload, content)
    try:
        tensors = dict(load_safetensors(payload)) if payload else {}
    except Exception as e:  # safetensors raises its own error type for a corrupt buffer
        raise ChannelError(f"node frame payload is not safetensors: {e}") from None
    for name, keys in (header.get("arrays") or {}).items():
        record = ArrayRecord()
        for key in keys:
            try:
                record[key] = Array(tensors.pop(f"{name}/{key}"))
            except KeyError:
                raise ChannelError(f"node frame lacks the tensor {name}/{key}") from None
        content[name] = record
    if tensors:
        raise ChannelError(f"node frame has a tensor no record names: {next(iter(tensors))!r}")
    return content


def _raw_records(described, payload: bytes, content: RecordDict) -> RecordDict:
    """Arrays forwarded as they are: [record, key, dtype, shape, stype, nbytes] each, their bytes
    back to back in the payload (the whole payload itself when it is one Array: no copy)."""
    if not isinstance(described, list):
        raise ChannelError("node frame: 'raw' is not a list")
    start = 0
    for entry in described:
        try:
            name, key, dtype, shape, stype, nbytes = entry
            shape = tuple(int(d) for d in shape)
            if not (isinstance(name, str) and isinstance(key, str) and isinstance(dtype, str) and isinstance(stype, str)):
                raise TypeError
            nbytes = int(nbytes)
        except (TypeError, ValueError):
            raise ChannelError(
                f"node frame: a raw array entry is not [record, key, dtype, shape, stype, nbytes]: {str(entry)[:80]}"
            ) from None
        if nbytes < 0 or start + nbytes > len(payload):
            raise ChannelError(f"node frame: array {name}/{key} ({nbytes} bytes) runs past the payload ({len(payload)} bytes)")
        data = payload if (start == 0 and nbytes == len(payload)) else payload[start : start + nbytes]
        if name not in content.array_records:
            content[name] = ArrayRecord()
        content.array_records[name][key] = Array(dtype=dtype, shape=shape, stype=stype, data=bytes(data))
        start += nbytes
    if start != len(payload):
        raise ChannelError(f"node frame: {len(payload) - start} payload bytes no array describes")
    return content


# ---------------------------------------------------------------- who may use the socket


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end (SO_PEERCRED), None where the OS has no
    such option (then only the folder's and socket's permissions protect the channel)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid


def peer_refusal(peer: int | None, allowed: int) -> str | None:
    """Why a peer is refused (one line), or None when it may use the channel: only the same
    user; an unknown peer user (no SO_PEERCRED) is left to the file permissions."""
    if peer is None or peer == allowed:
        return None
    return f"peer uid {peer} is not the node worker's user (uid {allowed})"


def check_private_folder(folder: Path) -> None:
    """The socket's folder must be a real folder owned by this user and closed to everyone else."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise ChannelError(f"socket folder {folder} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ChannelError(f"socket folder {folder} is not a folder (a symlink or file?)")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or mode & 0o077:
        raise ChannelError(
            f"socket folder {folder} must be private to the worker's user (owner uid {os.geteuid()}, mode 0700); "
            f"it has owner uid {st.st_uid}, mode {mode:04o}"
        )


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ChannelError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes (a Unix socket limit); choose a shorter one"
        )


# ---------------------------------------------------------------- the ClientApp's side


def connect(path: str | Path, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    path = Path(path)
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise WorkerUnavailable(f"no node worker listening at {path} (start one: flexlora node serve --socket {path})") from None
    except PermissionError:
        sock.close()
        raise WorkerUnavailable(f"permission denied on the node worker's socket {path} (it belongs to another user)") from None
    except OSError as e:
        sock.close()
        raise WorkerUnavailable(f"cannot reach the node worker at {path}: {e.strerror or e}") from None
    peer = peer_uid(sock)
    if peer_refusal(peer, os.geteuid()):  # the ClientApp hands its task only to a worker of its own user
        sock.close()
        raise WorkerUnavailable(f"the process serving {path} runs as uid {peer}, not as this user (uid {os.geteuid()})")
    sock.settimeout(None)  # training takes as long as it takes; Flower's round timeout bounds it
    return sock


def call(path: str | Path, header: dict, payload: bytes | list = b"") -> tuple[dict, bytes]:
    """One request to the worker and its reply (header, payload); the worker's error reply
    raises WorkerRefused with its one line."""
    with connect(path) as sock:
        try:
            send_frame(sock, header, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker refused and closed early: its reason may be waiting to be read
        try:
            reply = recv_frame(sock)
        except ConnectionResetError:
            reply = None
    if reply is None:
        raise WorkerGone(f"the node worker at {path} closed the channel before replying (stopped or killed mid-task?)")
    head, body = reply
    if not head.get("ok"):
        raise WorkerRefused(str(head.get("error") or "the node worker refused the request"))
    return head, body


def train_on_worker(path: str | Path, content: RecordDict, node_config, raw: bool = True) -> RecordDict:
    """A train Message's content, trained by the node's worker: the reply's content. `raw`: its
    Arrays are forwarded as they are, and the worker answers in kind (packed messages); else
    converted to safetensors (the previous layout, the deployment bench's baseline)."""
    header, payload = records_to_frame(content, raw)
    config = {k: v for k, v in dict(node_config).items() if k != WORKER_SOCKET_KEY}
    head, body = call(path, {"op": "train", "node_config": config, **header}, payload)
    return frame_to_records(head, body)


def worker_status(path: str | Path) -> dict:
    """What the worker serves (model fingerprint, device), whether it is training, tasks done."""
    head, _ = call(path, {"op": "status"})
    return head["status"]
