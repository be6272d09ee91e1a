"""Who may attach to a node worker (flexlora.engines.node): its socket is 0600 in a private
folder, an open folder or a live socket is refused, and a process of another user is refused
by the file permissions and, past them, by the peer-uid check on every connection. The worker
and its helpers are tests/test_node_worker.py's."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from test_node_worker import ThreadWorker, short_dir, worker  # noqa: F401  (a fixture)

from flexlora.engines.node import channel
from flexlora.engines.node.channel import ChannelError, WorkerRefused
from flexlora.engines.node.worker import bind_private_socket


def test_the_socket_is_0600_in_a_private_folder_and_an_open_folder_or_live_socket_is_refused(worker):
    assert stat.S_IMODE(os.stat(worker.path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(worker.path).st_mode)
    assert stat.S_IMODE(os.stat(worker.folder).st_mode) == 0o700
    with pytest.raises(ChannelError, match=r"already serving"):
        bind_private_socket(worker.path)
    open_folder = short_dir()
    try:
        open_folder.chmod(0o755)
        with pytest.raises(ChannelError, match=r"must be private to the worker's user .* mode 0755"):
            bind_private_socket(open_folder / "w.sock")
        open_folder.chmod(0o700)
        (open_folder / "w.sock").write_text("not a socket")
        with pytest.raises(ChannelError, match="exists and is not a worker's socket"):
            bind_private_socket(open_folder / "w.sock")
    finally:
        for p in open_folder.iterdir():
            p.unlink()
        open_folder.rmdir()
    with pytest.raises(ChannelError, match="longer than 100 bytes"):
        bind_private_socket(Path("/tmp") / ("x" * 120) / "w.sock")


def test_the_peer_uid_check_refuses_another_user():
    assert channel.peer_refusal(1000, 1000) is None
    assert channel.peer_refusal(None, 1000) is None  # no SO_PEERCRED: the file permissions decide
    assert channel.peer_refusal(1001, 1000) == "peer uid 1001 is not the node worker's user (uid 1000)"
    # A worker that serves another uid than ours refuses this process (the check runs on every
    # connection, before anything is read).
    other = ThreadWorker(load=False, allowed_uid=os.geteuid() + 1)
    try:
        with pytest.raises(
            WorkerRefused, match=rf"^refused: peer uid {os.geteuid()} is not the node worker's user \(uid {os.geteuid() + 1}\)$"
        ):
            channel.worker_status(other.path)
    finally:
        other.close()


def _attach_as(uid: int, path: Path, raw: bool = False) -> str:
    """Fork, drop to `uid`, ask the worker's status; the child's outcome as one line."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain sockets only, then exit without running any test machinery
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                if raw:  # past the ClientApp's own check of the worker's user: what the worker says
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.connect(str(path))
                        try:
                            channel.send_frame(s, {"op": "status"})
                        except BrokenPipeError:  # refused and closed before reading: the reason waits
                            pass
                        outcome = "reply: " + json.dumps(channel.recv_frame(s)[0])
                else:
                    outcome = "attached: " + json.dumps(channel.worker_status(path))
            except Exception as e:  # noqa: BLE001  (reported to the parent)
                outcome = f"{type(e).__name__}: {e}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_another_user_cannot_attach(worker):
    nobody = 65534
    assert _attach_as(nobody, worker.path) == (
        f"WorkerUnavailable: permission denied on the node worker's socket {worker.path} (it belongs to another user)"
    )
    # Even with the folder and socket opened up by mistake, the peer check refuses it.
    worker.folder.chmod(0o755)
    worker.path.chmod(0o666)
    try:
        assert _attach_as(nobody, worker.path, raw=True) == (
            f'reply: {{"ok": false, "error": "refused: peer uid {nobody} is not the node worker\'s user (uid 0)"}}'
        )
        # and the ClientApp side, for its part, hands nothing to a worker of another user
        assert _attach_as(nobody, worker.path) == (
            f"WorkerUnavailable: the process serving {worker.path} runs as uid 0, not as this user (uid {nobody})"
        )
    finally:
        worker.path.chmod(0o600)
        worker.folder.chmod(0o700)
    assert channel.worker_status(worker.path)["pending"] == 0  # its own user still attaches
