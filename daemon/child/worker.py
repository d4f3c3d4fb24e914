"""The run process: connects to the daemon and executes runs one at a time.

It is forked from a zygote that already imported the task modules. Tasks run on a plain
asyncio loop (uvloop's io_uring fd cannot be checkpointed); ``def`` tasks run in a thread.
Whatever a task prints is also recorded as log lines of its run, as Trigger.dev records
``console.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import io
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import msgspec

from ember._errors import AbortTaskRunError, EmberError, NonDeterminismError
from ember._hooks import WaitInfo, WaitKind, global_hooks
from ember._machines import OOM_KILLED
from ember._runtime import Context, current_runtime, reset_runtime, set_runtime
from ember._task import Task, json_default
from ember._types import RunError
from ember.daemon.child import lifeline as _lifeline
from ember.daemon.child.attempt import Attempt, attempt_locals
from ember.daemon.child.lifeline import ProcessIdentity
from ember.daemon.procs.protocol import (
    MAX_FRAME_BYTES,
    MAX_LOG_LINE_BYTES,
    Cancel,
    Done,
    Evict,
    Execute,
    FrameDecoder,
    Heartbeat,
    Hello,
    Log,
    Message,
    Resume,
    Shutdown,
    Suspend,
    ToWorker,
    Wait,
    encode,
)

_json = msgspec.json.Encoder(enc_hook=json_default)
_context_decoder = msgspec.json.Decoder(Context)
# Frames queued by task threads (``def`` tasks that log or print) before a thread waits for
# the loop to hand them to the channel: a flood of lines cannot grow memory without bound.
_THREAD_QUEUE_BYTES = 4 * 1024 * 1024
# How a parked process waits for SIGUSR1 (see await_wake).
WAKE_CHECK_S = 1.0
WAKE_TIMEOUT_S = 600.0
WAKE_GRACE_CHECKS = 3
# The share of the cancel grace that on_cancel hooks and the run's cleanup may use.
_CANCEL_SHARE = 0.8
# Room kept for the marker of a cut log line.
_MARKER_BYTES = 64
# Room left in a frame for everything but a Done's output.
_FRAME_MARGIN_BYTES = 1024 * 1024


class _Channel(asyncio.Protocol):
    """The connection to the daemon: frames are handled as they arrive, in order.

    A protocol rather than a stream reader: a no-op run costs a few loop iterations less
    without a reader task to create and wait for after every frame.
    """

    def __init__(
        self,
        handle: Callable[[ToWorker], None],
        lost: Callable[[], None],
        flow: Callable[[bool], None],
    ) -> None:
        self._handle = handle
        self._lost = lost
        self._flow = flow
        self._decoder = FrameDecoder(ToWorker)
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self._handle(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._flow(False)
        self._lost()

    def pause_writing(self) -> None:
        self._flow(True)

    def resume_writing(self) -> None:
        self._flow(False)

    def write(self, frames: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames)


class _Link:
    """The current channel to the daemon (a new one after a checkpoint's restore).

    Only the loop's thread may touch a transport: frames sent from a ``def`` task's thread
    are queued and handed over by the loop, in order, and the thread waits while the queue
    is full or the channel's buffer is over its high-water mark.
    """

    def __init__(self) -> None:
        self.channel: _Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.get_ident()
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._paused = False
        self._changed = threading.Condition()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand frames to this loop, running on the calling thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def set_paused(self, paused: bool) -> None:
        """The channel's flow control (called on the loop's thread)."""
        with self._changed:
            self._paused = paused
            self._changed.notify_all()

    def send(self, message: Message) -> None:
        frame = encode(message)
        if threading.get_ident() == self._loop_thread:
            self._flush()  # frames queued by a thread go first, as they were sent first
            if self.channel is not None:
                self.channel.write(frame)
            else:
                # Closed for a checkpoint: a run checkpointed mid-execution may end before
                # the channel is back, and its Done must reach the daemon. Sent on reconnect.
                with self._changed:
                    self._queue.append(frame)
                    self._queued_bytes += len(frame)
            return
        with self._changed:
            # (Re-checked every second: a channel closed meanwhile frees the thread.)
            while (self._paused or self._queued_bytes >= _THREAD_QUEUE_BYTES) and (
                self.channel is not None
            ):
                self._changed.wait(1.0)
            first = not self._queue
            self._queue.append(frame)
            self._queued_bytes += len(frame)
        if first and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is ending
                self._loop.call_soon_threadsafe(self._flush)

    def flush(self) -> None:
        """Hand over the frames queued while the channel was closed (after a reconnect)."""
        self._flush()

    def _flush(self) -> None:
        if self.channel is None:
            return  # kept until the channel is back (see send)
        with self._changed:
            frames, self._queue = self._queue, []
            self._queued_bytes = 0
            self._changed.notify_all()
        if frames:
            self.channel.write(b"".join(frames))


class _JournalEntry(msgspec.Struct, frozen=True):
    seq: int
    kind: str
    task_ids: list[str]
    result: msgspec.Raw


_journal_decoder = msgspec.json.Decoder(list[_JournalEntry])
# Each pending wait of the process: its future and the frame that asked (asked again after a
# restore, see RunProcess._suspend).
_Waiters = dict[tuple[str, int], tuple[asyncio.Future[bytes], Wait]]
# Trigger.dev's names of the wait kinds, as the wait hooks see them.
_WAIT_KINDS: dict[str, WaitKind] = {
    "DATETIME": "duration",
    "RUN": "run",
    "BATCH": "batch",
    "TOKEN": "token",
}


class _RunRuntime:
    """What ``logger``, ``ctx`` and ``wait`` reach inside one execution of a run."""

    def __init__(
        self,
        context: Context,
        channel: _Link,
        generation: int,
        journal: list[_JournalEntry],
        waiters: _Waiters,
        resumed_seq: int = 0,
    ) -> None:
        self._context = context
        self._channel = channel
        self._generation = generation
        self._journal = {entry.seq: entry for entry in journal}
        self._waiters = waiters
        self._seq = 0
        self._resumed_seq = resumed_seq
        self.attempt: Attempt | None = None

    @property
    def context(self) -> Context:
        return self._context

    @property
    def generation(self) -> int:
        return self._generation

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def journaled(self, seq: int, kind: str, task_ids: list[str]) -> bytes | None:
        entry = self._journal.get(seq)
        if entry is None:
            return None
        if entry.kind != kind or entry.task_ids != task_ids:
            raise NonDeterminismError(
                f"wait {seq} of run {self._context.run_id} was {entry.kind} {entry.task_ids} "
                f"when the run first executed, and is {kind} {task_ids} on replay: code before "
                "a wait must take the same path every time (move clocks, randomness and "
                "external reads into child tasks)"
            )
        return bytes(entry.result)

    async def replayed(self, seq: int, kind: str) -> None:
        if seq == self._resumed_seq and self.attempt is not None:
            # The wait this execution resumes from: its on_wait fired in the process that
            # waited, which has exited; its on_resume fires here, once.
            self._resumed_seq = 0
            await self.attempt.wait_over(WaitInfo(_WAIT_KINDS.get(kind, "duration"), seq))

    async def wait(
        self,
        seq: int,
        kind: str,
        *,
        resume_at: float | None = None,
        targets: list[str] | None = None,
        task_ids: list[str] | None = None,
    ) -> bytes:
        info = WaitInfo(_WAIT_KINDS.get(kind, "duration"), seq, resume_at, tuple(targets or ()))
        if self.attempt is not None:
            await self.attempt.wait_started(info)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        key = (self._context.run_id, seq)
        asked = Wait(
            run_id=self._context.run_id,
            attempt=self._context.attempt,
            seq=seq,
            kind=kind,
            resume_at=resume_at,
            targets=targets or [],
            task_ids=task_ids or [],
        )
        self._waiters[key] = (future, asked)
        self._channel.send(asked)
        try:
            result = await future
        finally:
            self._waiters.pop(key, None)
        if self.attempt is not None:
            await self.attempt.wait_over(info)
        return result

    def log(self, level: str, message: str, attrs: dict[str, Any]) -> None:
        try:
            encoded = _json.encode(attrs) if attrs else b""
        except (TypeError, msgspec.EncodeError):
            encoded = _json.encode({k: repr(v) for k, v in attrs.items()})
        # A frame over the channel's limit would end the channel: cut what is too large.
        message = cut(message, MAX_LOG_LINE_BYTES)
        if len(encoded) > MAX_LOG_LINE_BYTES:
            encoded = _json.encode({"truncated": f"… [truncated {len(encoded)} bytes]"})
        self._channel.send(
            Log(
                run_id=self._context.run_id,
                attempt=self._context.attempt,
                ts=time.time(),
                level=level,
                message=message,
                attrs=encoded,
            )
        )


def cut(text: str, limit_bytes: int, dropped_bytes: int = 0) -> str:
    """``text`` if its UTF-8 form fits ``limit_bytes``, else its head and a marker.

    The result always fits, marker included, so cutting it again changes nothing.
    ``dropped_bytes`` counts what was cut off before (a stream's overlong line).
    """
    if not dropped_bytes and len(text) <= limit_bytes // 4:
        return text  # fits whatever its characters
    data = text.encode(errors="replace")
    if not dropped_bytes and len(data) <= limit_bytes:
        return text
    head = data[: limit_bytes - _MARKER_BYTES].decode(errors="ignore")
    return f"{head}… [truncated {len(data) - len(head.encode()) + dropped_bytes} bytes]"


class _RunStream(io.TextIOBase):
    """stdout/stderr that also records each complete line as a log line of the current run."""

    def __init__(self, underlying: TextIO, level: str) -> None:
        self._underlying = underlying
        self._level = level
        self._partial = ""
        # Bytes of the line under way cut off already (kept to MAX_LOG_LINE_BYTES characters).
        self._dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._underlying.write(text)
        runtime = current_runtime()
        if runtime is not None:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            if lines and self._dropped:
                lines[0] = cut(lines[0], MAX_LOG_LINE_BYTES, self._dropped)
                self._dropped = 0
            if len(self._partial) > MAX_LOG_LINE_BYTES:
                # No newline in sight: keep no more than a log line can hold.
                self._dropped += len(self._partial[MAX_LOG_LINE_BYTES:].encode(errors="replace"))
                self._partial = self._partial[:MAX_LOG_LINE_BYTES]
            for line in lines:
                runtime.log(self._level, line, {})
        return len(text)

    def flush(self) -> None:
        self._underlying.flush()


def _error_of(exc: BaseException) -> RunError:
    message = str(exc)
    if isinstance(exc, MemoryError) and not message:
        message = "out of memory: an allocation failed under the machine preset's memory limit"
    return RunError(
        name=type(exc).__name__,
        message=cut(message, MAX_LOG_LINE_BYTES),
        stack=cut("".join(traceback.format_exception(exc)), MAX_LOG_LINE_BYTES),
        # Out of memory under a memory rlimit (or any limit Python hits first): the same
        # outcome as the kernel's OOM kill in a cgroup, so the same retry on a larger machine.
        code=OOM_KILLED if isinstance(exc, MemoryError) else "TASK_RUN_ERROR",
    )


def host_ppid() -> int:
    """The PID of this process's parent as the host sees it (0 if it cannot be read)."""
    try:
        with open("/proc/self/stat") as stat:
            return int(stat.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


async def await_wake(
    woke: asyncio.Future[None],
    daemon: ProcessIdentity | None,
    *,
    timeout_s: float = WAKE_TIMEOUT_S,
    check_s: float = WAKE_CHECK_S,
    grace_checks: int = WAKE_GRACE_CHECKS,
) -> bool:
    """Wait for ``woke`` (SIGUSR1); False when it will not come: the daemon is gone, or late.

    A parked process waits for its dump, or, once restored, for the signal that follows the
    restore. The time is counted in checks, each on a fresh timer: the monotonic clock jumps
    over the time a process spent as an image, so a restored process sees its pending timer
    fire at once. The signal follows a restore within milliseconds, so giving up takes
    ``grace_checks`` checks in a row that find the daemon gone (or the wait too long).

    Args:
        woke: resolved by the SIGUSR1 handler.
        daemon: the daemon this process belongs to (None: unknown, only the timeout holds).
        timeout_s: the longest wait for a dump or for the signal after a restore.
        check_s: how often to look.
        grace_checks: consecutive failed checks before giving up.
    """
    checks = failed = 0
    while True:
        try:
            await asyncio.wait_for(asyncio.shield(woke), check_s)
            return True
        except TimeoutError:
            pass
        checks += 1
        gone = daemon is not None and not daemon.alive()
        failed = failed + 1 if gone or checks * check_s > timeout_s else 0
        if failed >= grace_checks:
            return False


def host_pid() -> int:
    """This process's PID as the daemon sees it, also as PID 1 of its own PID namespace."""
    try:
        # /proc is the host's (no mount namespace): /proc/self names the host PID.
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


class RunProcess:
    """One run process's loop: hello, then execute what the daemon sends."""

    def __init__(
        self,
        tasks: dict[str, Task[Any, Any, Any]],
        heartbeat_s: float,
        daemon: ProcessIdentity | None = None,
        lock_fd: int = -1,
        cancel_grace_s: float = 5.0,
    ) -> None:
        self._tasks = tasks
        # Of the daemon's grace between SIGTERM and SIGKILL, what on_cancel and the run's own
        # cleanup may use: the rest is the margin for the process to report and leave.
        self._cancel_budget_s = cancel_grace_s * _CANCEL_SHARE
        self._heartbeat_s = heartbeat_s
        self._daemon = daemon
        self._lock_fd = lock_fd
        self._current: asyncio.Task[None] | None = None
        self._attempt: Attempt | None = None
        self._run_context: contextvars.Context | None = None  # the attempt's, for on_cancel
        self._canceling: asyncio.Task[None] | None = None
        self._waiters: _Waiters = {}
        self._link = _Link()
        self._suspending: asyncio.Task[None] | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._ended: asyncio.Future[None] | None = None
        self._socket = ("", 0, "")  # (path, worker id, token): what reconnecting needs
        self._memory = _Memory()

    async def serve(self, socket_path: str, worker_id: int, token: str) -> None:
        loop = asyncio.get_running_loop()
        self._link.bind(loop)
        self._ended = loop.create_future()
        # The daemon cancels with SIGTERM; on_cancel hooks run, then the attempt stops.
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        await self._connect(socket_path, worker_id, token, restored=False)
        try:
            await self._ended
        finally:
            if self._current is not None:
                self._current.cancel()
            if self._link.channel is not None and self._link.channel.transport is not None:
                self._link.channel.transport.close()
            _lifeline.kill_descendants()

    async def _connect(self, socket_path: str, worker_id: int, token: str, restored: bool) -> None:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(
            lambda: _Channel(self._on_message, self._on_lost, self._link.set_paused), socket_path
        )
        self._link.channel = channel
        channel.write(
            encode(Hello(worker_id=worker_id, token=token, pid=host_pid(), restored=restored))
        )
        self._socket = (socket_path, worker_id, token)
        self._link.flush()  # (after the Hello: the daemon knows the process first)

    def _on_sigterm(self) -> None:
        attempt, current = self._attempt, self._current
        if (
            attempt is None
            or current is None
            or current.done()
            or self._canceling is not None
            or self._run_context is None
        ):
            self._end()
            return

        async def cancel_hooks() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._cancel_budget_s
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        attempt.canceled(current, self._cancel_budget_s), self._cancel_budget_s
                    )
                # Then the run function is canceled and its own cleanup (finally) runs.
                current.cancel()
                await asyncio.wait({current}, timeout=max(0.0, deadline - loop.time()))
            finally:
                self._end()

        # In the run's context: the hooks' logs and locals are the run's.
        self._canceling = asyncio.get_running_loop().create_task(
            cancel_hooks(), context=self._run_context
        )

    def _end(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def _on_lost(self) -> None:
        if self._suspending is None and self._ended is not None and not self._ended.done():
            # The daemon is gone (or let this process go): nothing done now would be recorded,
            # and the run's next attempt may start any moment. A ``def`` task's thread cannot
            # be stopped, so the process leaves at once, with whatever its task started.
            abandon()

    def _on_message(self, message: ToWorker) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(message, Execute):
            self._current = loop.create_task(self._execute(message))
        elif isinstance(message, Resume):
            self._resume(message)
        elif isinstance(message, Suspend):
            self._suspending = loop.create_task(self._suspend())
            self._suspending.add_done_callback(self._suspended)
        elif isinstance(message, Cancel | Evict) and self._current is not None:
            self._current.cancel()
            if isinstance(message, Evict):
                # The run resumes later by replay in a fresh process.
                self._end_after(self._current)
        elif isinstance(message, Shutdown):
            self._end_after(self._current)

    def _suspended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # Without its channel back this process can do nothing more: it leaves.
            traceback.print_exception(error)
            self._end()

    def _end_after(self, current: asyncio.Task[None] | None) -> None:
        if current is None or current.done():
            self._end()
        else:
            current.add_done_callback(lambda _: self._end())

    def _resume(self, message: Resume) -> None:
        pending = self._waiters.get((message.run_id, message.seq))
        if pending is None or pending[0].done():
            return  # (a wait asked again after a restore may be answered twice)
        future = pending[0]
        if message.error is not None:
            error = NonDeterminismError if message.nondeterministic else EmberError
            future.set_exception(error(message.error))
        else:
            future.set_result(message.result)

    async def _suspend(self) -> None:
        """Get ready for a checkpoint: close every channel, park until SIGUSR1, reconnect.

        The daemon dumps this process once the channel closes; after a restore (or if the
        dump failed) it sends SIGUSR1. Both cases take the same path from here.
        """
        from ember._client import default_client

        sys.stdout.flush()
        sys.stderr.flush()
        # Connections to the API would be sockets leading out of the dumped tree.
        await default_client().aclose()
        self._memory.close()
        if self._lock_fd >= 0:
            # CRIU dumps no file lock; the zygote's processes hold it meanwhile.
            os.close(self._lock_fd)
            self._lock_fd = -1
        loop = asyncio.get_running_loop()
        woke: asyncio.Future[None] = loop.create_future()

        def on_sigusr1() -> None:
            if not woke.done():
                woke.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, on_sigusr1)
        parent = host_ppid()
        channel = self._link.channel
        assert channel is not None
        assert channel.transport is not None
        self._link.channel = None
        channel.transport.close()
        await channel.closed
        if not await await_wake(woke, self._daemon):
            abandon()  # never dumped, or restored for a daemon that died before waking it
        loop.remove_signal_handler(signal.SIGUSR1)
        if host_ppid() != parent:
            # Restored: the daemon that restored this process is its parent now.
            self._daemon = ProcessIdentity.of(host_ppid()) or self._daemon
        await self._connect(*self._socket, restored=True)
        self._suspending = None
        # Ask again for what this process waits for: its wait may have completed while no
        # daemon held the result in memory (killed before this restore), and then only the
        # journal knows it. The daemon answers from the journal, or holds the wait as it is.
        for future, asked in list(self._waiters.values()):
            if not future.done():
                self._link.send(asked)

    async def _execute(self, message: Execute) -> None:
        context = _context_decoder.decode(message.context)
        journal = _journal_decoder.decode(message.journal)
        runtime = _RunRuntime(
            context, self._link, message.generation, journal, self._waiters, message.resumed_seq
        )
        token = set_runtime(runtime)
        before = resource.getrusage(resource.RUSAGE_SELF)
        rss_before = self._memory.rss()
        self._beat = asyncio.get_running_loop().call_later(
            self._heartbeat_s, self._heartbeat, message.run_id
        )
        done: Done
        try:
            done = await self._call(message, context, runtime)
        finally:
            self._attempt = self._run_context = None
            self._beat.cancel()
            reset_runtime(token)
            # What the task forked ends with its attempt (a subreaper holds even the orphans).
            _lifeline.kill_descendants()
        if done.output is not None and len(done.output) > MAX_FRAME_BYTES - _FRAME_MARGIN_BYTES:
            done = Done(
                run_id=message.run_id,
                attempt=message.attempt,
                ok=False,
                retry=False,
                error=RunError(
                    name="OutputTooLarge",
                    message=f"the output is {len(done.output)} bytes, more than the worker "
                    f"channel carries ({MAX_FRAME_BYTES - _FRAME_MARGIN_BYTES}): return a "
                    "reference to stored data instead",
                    code="TASK_OUTPUT_TOO_LARGE",
                ),
            )
        after = resource.getrusage(resource.RUSAGE_SELF)
        # The process's high-water mark is this attempt's peak only if the attempt raised it;
        # otherwise the larger of the sizes it started and ended with.
        if after.ru_maxrss > before.ru_maxrss:
            peak_rss = after.ru_maxrss * 1024  # KiB on Linux
        else:
            peak_rss = max(rss_before, self._memory.rss())
        self._link.send(
            msgspec.structs.replace(
                done, cpu_s=_cpu_s(after) - _cpu_s(before), peak_rss_bytes=peak_rss
            )
        )

    async def _call(self, message: Execute, context: Context, runtime: _RunRuntime) -> Done:
        """Run the attempt with its task's lifecycle; the Done that reports it."""
        failed = functools.partial(Done, run_id=message.run_id, attempt=message.attempt, ok=False)
        task = self._tasks.get(message.task_id)
        if task is None:
            error = AbortTaskRunError(
                f"task {message.task_id!r} is not defined in version {context.version}"
            )
            return failed(retry=False, error=_error_of(error))
        try:
            payload = task.decode_payload(message.payload) if task.takes_payload else None
        except EmberError as exc:  # a payload that does not match never will
            return failed(retry=False, error=_error_of(exc))
        args: tuple[Any, ...] = (payload,) if task.takes_payload else ()
        if task.wants_context:
            args = (*args, context)

        async def call() -> tuple[Any, bytes]:
            if task.is_async:
                result = await task.fn(*args)
            else:
                ctx = contextvars.copy_context()
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(None, ctx.run, task.fn, *args)
            try:
                return result, _json.encode(result)
            except (TypeError, msgspec.EncodeError) as exc:
                raise AbortTaskRunError(
                    f"the output of task {task.id!r} is not JSON-serializable: {exc}; return "
                    "JSON types, msgspec Structs, dataclasses or pydantic models"
                ) from exc

        attempt = Attempt(
            task_id=task.id,
            hooks=global_hooks + task.hooks,
            context=context,
            payload=payload,
            last_attempt=message.last_attempt,
            policy_delay_s=message.retry_delay_s,
            log=runtime.log,
        )
        runtime.attempt = self._attempt = attempt
        with attempt_locals():
            self._run_context = contextvars.copy_context()
            outcome = await attempt.run(call)
        if outcome.ok:
            return Done(
                run_id=message.run_id, attempt=message.attempt, ok=True, output=outcome.output
            )
        assert outcome.error is not None
        return failed(
            retry=outcome.retry,
            retry_delay_s=outcome.retry_delay_s,
            error=_error_of(outcome.error),
        )

    def _heartbeat(self, run_id: str) -> None:
        self._link.send(Heartbeat(run_id=run_id))
        self._beat = asyncio.get_running_loop().call_later(
            self._heartbeat_s, self._heartbeat, run_id
        )


def abandon() -> None:
    """Leave now, with every descendant: the daemon is gone or this process was let go."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(Exception):
        _lifeline.kill_descendants()
    os._exit(1)


class _Memory:
    """This process's resident set size, from /proc/self/statm kept open between reads.

    One ``pread`` per read; psutil opens, reads and closes the file every time. The file is
    closed before a checkpoint and reopened on the next read.
    """

    _PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self) -> None:
        self._fd: int | None = None

    def rss(self) -> int:
        if self._fd is None:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._PAGE

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _cpu_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def run_worker(
    *,
    socket_path: str,
    worker_id: int,
    token: str,
    tasks: dict[str, Task[Any, Any, Any]],
    heartbeat_s: float,
    daemon: ProcessIdentity | None = None,
    lock_fd: int = -1,
    cancel_grace_s: float = 5.0,
) -> int:
    """Serve runs until the daemon says stop or goes away; returns the exit status."""
    sys.stdout = _RunStream(sys.stdout, "info")
    sys.stderr = _RunStream(sys.stderr, "error")
    process = RunProcess(tasks, heartbeat_s, daemon, lock_fd, cancel_grace_s)
    asyncio.run(process.serve(socket_path, worker_id, token))
    return 0
