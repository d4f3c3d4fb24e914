"""A version's zygote: imports the task modules once, then forks a run process on request.

Run as ``python -m ember.daemon.child.zygote --fd N ...`` by the supervisor, with one end of a
socketpair as fd N. It stays single-threaded and never runs an event loop, so forking it is
safe; each child builds its own loop in :mod:`ember.daemon.child.worker`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gc
import os
import selectors
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember._task import Task
from ember.daemon.child import lifeline as _lifeline
from ember.daemon.child import limits as _limits
from ember.daemon.child import tracing
from ember.daemon.child.discover import discover
from ember.daemon.child.lifeline import ProcessIdentity

# Imported before any fork: every run process starts with the runtime already in memory.
from ember.daemon.child.worker import run_worker
from ember.daemon.procs.protocol import Exited, Fork, Forked, FrameDecoder, Indexed, encode


def _send(channel: socket.socket, message: Indexed | Forked | Exited) -> None:
    # After the daemon is gone the zygote only waits for its children: nobody listens.
    with contextlib.suppress(OSError):
        channel.sendall(encode(message))


CLONE_NEWPID = 0x20000000


def _in_own_pid_namespace(run: Callable[[], int]) -> int:
    """Run ``run`` as PID 1 of a new PID namespace; return its exit status.

    CRIU restores a process with its original PID: as PID 1 of its own namespace, a restored
    run process never collides with whatever took its host PID meanwhile. This process
    stays as the namespace's parent so the zygote still learns how the run process ended.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWPID) failed: {os.strerror(errno)}")
    # Held open by this process alone: the child reads EOF from it once this process is gone.
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(alive_w)
            # Killing this parent kills the namespace's init, and with it the namespace.
            _lifeline.die_with_parent()
            os.set_blocking(alive_r, False)
            try:
                parent_gone = os.read(alive_r, 1) == b""
            except BlockingIOError:
                parent_gone = False
            os.close(alive_r)  # a pipe leading out of the tree would stop a checkpoint
            if not parent_gone:
                os.setsid()  # the session must lie inside the dumped tree
                code = run()
        finally:
            os._exit(code)
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)
    os.close(alive_w)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _child(
    channel: socket.socket,
    selector: selectors.BaseSelector,
    fork: Fork,
    args: argparse.Namespace,
    tasks: dict[str, Task[Any, Any, Any]],
    zygote_pid: int,
    daemon: ProcessIdentity | None,
    lock_fd: int,
) -> int:
    selector.close()
    channel.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # A run process (or its namespace's parent) dies with the zygote: once the zygote is
    # gone nobody reports how it ended, and the daemon starts the run's next attempt.
    _lifeline.die_with_parent()
    if os.getppid() != zygote_pid:
        return 1  # the zygote died before the signal was armed
    _limits.enter(fork)  # its machine preset's cgroup (or rlimit), before any task code

    def run() -> int:
        return run_worker(
            socket_path=args.worker_socket,
            worker_id=fork.worker_id,
            token=fork.token,
            tasks=tasks,
            heartbeat_s=args.heartbeat_s,
            cancel_grace_s=args.cancel_grace_s,
            daemon=daemon,
            lock_fd=lock_fd,
        )

    if args.pidns:
        return _in_own_pid_namespace(run)
    os.setsid()  # its own process group, which the daemon kills with it
    _lifeline.become_subreaper()  # (PID 1 of a namespace adopts orphans anyway)
    return run()


def main() -> int:
    """Run the zygote until its channel to the daemon closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int)
    # In a container: connect to the daemon's socket for this zygote (no fd crosses into
    # it), and write output to the version's log file, bind-mounted.
    parser.add_argument("--connect")
    parser.add_argument("--log-file")
    parser.add_argument("--code-dir", required=True)
    parser.add_argument("--worker-socket", required=True)
    parser.add_argument("--heartbeat-s", type=float, default=10.0)
    parser.add_argument("--cancel-grace-s", type=float, default=5.0)
    parser.add_argument("--pidns", action="store_true")
    parser.add_argument("--lock")
    parser.add_argument("--no-tracing", action="store_true")
    parser.add_argument("--instrument", action="append", default=[])
    args = parser.parse_args()
    if args.log_file:
        log_fd = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    if args.connect:
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        channel.connect(args.connect)
    else:
        channel = socket.socket(fileno=args.fd)
    lock_fd = -1
    if args.lock:
        # Shared by this zygote and every process it forks (they inherit it): a daemon that
        # starts later waits until none of them is left (outlive_predecessors).
        lock_fd = os.open(args.lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
    try:
        # Before the task modules: OTel's SDK is imported once here, not in every run process,
        # and a task module's own tracer finds the provider.
        tracing.install(not args.no_tracing)
        tracing.instrument(args.instrument)
        tasks, index = discover(Path(args.code_dir))
    except BaseException:
        _send(channel, Indexed(error=traceback.format_exc()))
        return 1
    _send(channel, Indexed(tasks=index))
    # Everything imported so far lives as long as the run processes: out of the collector's
    # sight, a child's collections no longer touch (and so copy) every inherited page.
    gc.freeze()
    # Orphans of a run process that was killed come here, to be killed in turn (_reap).
    _lifeline.become_subreaper()
    zygote_pid = os.getpid()
    daemon = ProcessIdentity.of(os.getppid())

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
                # The daemon is gone, or stopped this zygote: run processes end on their own
                # (their channel closes, or their last run ends). Exiting before them would
                # kill them by their parent-death signal, mid-run.
                selector.unregister(channel)
                while children:
                    selector.select()
                    os.read(wake_r, 4096)
                    _reap(channel, children)
                return 0
            for fork in decoder.feed(data):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        # Every fd a run process keeps must lead nowhere outside it, or CRIU
                        # cannot dump it: close the zygote's own.
                        os.close(wake_r)
                        os.close(wake_w)
                        code = _child(
                            channel, selector, fork, args, tasks, zygote_pid, daemon, lock_fd
                        )
                    except BaseException:
                        traceback.print_exc()
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                children.add(pid)
                _send(channel, Forked(worker_id=fork.worker_id, pid=pid))


def _reap(channel: socket.socket, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in children:
            children.discard(pid)
            _send(channel, Exited(pid=pid, status=os.waitstatus_to_exitcode(status)))
    # Any other child is what a killed run process forked, adopted by this subreaper: it
    # must not outlive the run (its own exit brings SIGCHLD, and the reaping above).
    for pid in _lifeline.children():
        if pid not in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
