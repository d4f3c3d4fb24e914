"""A version's zygote: imports the task modules once, then forks a run process on request.

Run as ``python -m ember.daemon._zygote --fd N ...`` by the supervisor, with one end of a
socketpair as fd N. It stays single-threaded and never runs an event loop, so forking it is
safe; each child builds its own loop in :mod:`ember.daemon._worker`.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from ember._task import Task
from ember.daemon._discover import discover
from ember.daemon._protocol import Exited, Fork, Forked, FrameDecoder, Indexed, encode


def _send(channel: socket.socket, message: Indexed | Forked | Exited) -> None:
    channel.sendall(encode(message))


def _child(
    channel: socket.socket,
    selector: selectors.BaseSelector,
    fork: Fork,
    args: argparse.Namespace,
    tasks: dict[str, Task[Any, Any, Any]],
) -> int:
    selector.close()
    channel.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    from ember.daemon._worker import run_worker

    return run_worker(
        socket_path=args.worker_socket,
        worker_id=fork.worker_id,
        token=fork.token,
        tasks=tasks,
        heartbeat_s=args.heartbeat_s,
    )


def main() -> int:
    """Run the zygote until its channel to the daemon closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--code-dir", required=True)
    parser.add_argument("--worker-socket", required=True)
    parser.add_argument("--heartbeat-s", type=float, default=10.0)
    args = parser.parse_args()
    channel = socket.socket(fileno=args.fd)
    try:
        tasks, index = discover(Path(args.code_dir))
    except BaseException:
        _send(channel, Indexed(error=traceback.format_exc()))
        return 1
    _send(channel, Indexed(tasks=index))

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    # A handler (not SIG_DFL) so that SIGCHLD writes to the wakeup fd.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ, "channel")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    decoder = FrameDecoder(Fork)
    children: set[int] = set()
    while True:
        for key, _ in selector.select():
            if key.data == "wake":
                os.read(wake_r, 4096)
                _reap(channel, children)
                continue
            try:
                data = channel.recv(65536)
            except InterruptedError:
                continue
            if not data:
                return 0  # the daemon is gone; run processes notice on their own channels
            for fork in decoder.feed(data):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _child(channel, selector, fork, args, tasks)
                    except BaseException:
                        traceback.print_exc()
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                children.add(pid)
                _send(channel, Forked(worker_id=fork.worker_id, pid=pid))


def _reap(channel: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(channel, Exited(pid=pid, status=os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    sys.exit(main())
