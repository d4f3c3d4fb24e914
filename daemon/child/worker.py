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
import os
import resource
import signal
import sys
import traceback
from typing import Any

import msgspec

from ember._errors import AbortTaskRunError, EmberError, NonDeterminismError
from ember._hooks import global_hooks
from ember._metadata import forget
from ember._runtime import Context, reset_runtime, set_runtime
from ember._streams import forget_streams
from ember._task import Task, json_default
from ember.daemon.child import lifeline as _lifeline
from ember.daemon.child import tracing
from ember.daemon.child.attempt import Attempt, attempt_locals
from ember.daemon.child.channel import Channel, Link, hang_up
from ember.daemon.child.host import (
    Memory,
    abandon,
    await_wake,
    cpu_s,
    host_pid,
    host_ppid,
    reconnect,
    shrink_heap,
)
from ember.daemon.child.lifeline import ProcessIdentity
from ember.daemon.child.runtime import (
    JournalEntry,
    RunRuntime,
    RunStream,
    Waiters,
    error_of,
    fit_frame,
)
from ember.daemon.procs.protocol import (
    Cancel,
    Done,
    Evict,
    Execute,
    Heartbeat,
    Hello,
    Resume,
    Shutdown,
    Suspend,
    ToWorker,
    encode,
)

_json = msgspec.json.Encoder(enc_hook=json_default)
_context_decoder = msgspec.json.Decoder(Context)
# The share of the cancel grace that on_cancel hooks and the run's cleanup may use.
_CANCEL_SHARE = 0.8


_journal_decoder = msgspec.json.Decoder(list[JournalEntry])


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
        self._waiters: Waiters = {}
        self._link = Link()
        self._suspending: asyncio.Task[None] | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._ended: asyncio.Future[None] | None = None
        self._socket = ("", 0, "")  # (path, worker id, token): what reconnecting needs
        self._memory = Memory()

    async def serve(self, socket_path: str, worker_id: int, token: str) -> None:
        loop = asyncio.get_running_loop()
        self._link.bind(loop)
        tracing.bind(self._link.send, loop)
        self._ended = loop.create_future()
        # The daemon cancels with SIGTERM; on_cancel hooks run, then the attempt stops.
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        await self._connect(socket_path, worker_id, token, restored=False)
        try:
            await self._ended
        finally:
            if self._current is not None:
                self._current.cancel()
            tracing.flush()  # a recycled, evicted or stopped process sends its last spans
            channel = self._link.channel
            if channel is not None and channel.transport is not None:
                await hang_up(channel)
            _lifeline.kill_descendants()

    async def _connect(self, socket_path: str, worker_id: int, token: str, restored: bool) -> None:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(
            lambda: Channel(self._on_message, self._on_lost, self._link.set_paused), socket_path
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
                    async with asyncio.timeout(self._cancel_budget_s):
                        await attempt.canceled(current, self._cancel_budget_s)
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
        shrink_heap()
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
        tracing.note_checkpoint()
        tracing.flush()  # no span may stay behind in a buffer that an image might never bring back
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
        await reconnect(lambda: self._connect(*self._socket, restored=True))
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
        runtime = RunRuntime(
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
            with tracing.attempt_span(context, message.traceparent):
                done = await self._call(message, context, runtime)
                await runtime.flush_changes()
        finally:
            forget(message.run_id)
            forget_streams(message.run_id)
            self._attempt = self._run_context = None
            self._beat.cancel()
            reset_runtime(token)
            # What the task forked ends with its attempt (a subreaper holds even the orphans).
            _lifeline.kill_descendants()
        done = fit_frame(done)
        after = resource.getrusage(resource.RUSAGE_SELF)
        # The process's high-water mark is this attempt's peak only if the attempt raised it;
        # otherwise the larger of the sizes it started and ended with.
        if after.ru_maxrss > before.ru_maxrss:
            peak_rss = after.ru_maxrss * 1024  # KiB on Linux
        else:
            peak_rss = max(rss_before, self._memory.rss())
        done = msgspec.structs.replace(
            done, cpu_s=cpu_s(after) - cpu_s(before), peak_rss_bytes=peak_rss
        )
        # The attempt's spans go first, in the same write (one send, one read by the daemon).
        self._link.send(*tracing.take(), done)

    async def _call(self, message: Execute, context: Context, runtime: RunRuntime) -> Done:
        """Run the attempt with its task's lifecycle; the Done that reports it."""
        failed = functools.partial(Done, run_id=message.run_id, attempt=message.attempt, ok=False)
        task = self._tasks.get(message.task_id)
        if task is None:
            error = AbortTaskRunError(
                f"task {message.task_id!r} is not defined in version {context.version}"
            )
            return failed(retry=False, error=error_of(error))
        try:
            payload = task.decode_payload(message.payload) if task.takes_payload else None
        except EmberError as exc:  # a payload that does not match never will
            return failed(retry=False, error=error_of(exc))
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
            error=error_of(outcome.error),
        )

    def _heartbeat(self, run_id: str) -> None:
        self._link.send(Heartbeat(run_id=run_id))
        self._beat = asyncio.get_running_loop().call_later(
            self._heartbeat_s, self._heartbeat, run_id
        )


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
    sys.stdout = RunStream(sys.stdout, "info")
    sys.stderr = RunStream(sys.stderr, "error")
    process = RunProcess(tasks, heartbeat_s, daemon, lock_fd, cancel_grace_s)
    asyncio.run(process.serve(socket_path, worker_id, token))
    return 0
