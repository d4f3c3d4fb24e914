"""The run process: connects to the daemon and executes runs one at a time.

It is forked from a zygote that already imported the task modules. Tasks run on a plain
asyncio loop (uvloop's io_uring fd cannot be checkpointed); ``def`` tasks run in a thread.
Whatever a task prints is also recorded as log lines of its run, as Trigger.dev records
``console.log``.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import os
import signal
import sys
import time
import traceback
from typing import Any, TextIO

import msgspec
import psutil

from ember._errors import (
    AbortTaskRunError,
    EmberError,
    NonDeterminismError,
    PayloadValidationError,
)
from ember._runtime import Context, current_runtime, reset_runtime, set_runtime
from ember._task import Task
from ember._types import RunError
from ember.daemon._protocol import (
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

_json = msgspec.json.Encoder()
_context_decoder = msgspec.json.Decoder(Context)


class _Channel:
    """The write side of the connection to the daemon; replaced after a restore."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))


class _JournalEntry(msgspec.Struct, frozen=True):
    seq: int
    kind: str
    task_ids: list[str]
    result: msgspec.Raw


_journal_decoder = msgspec.json.Decoder(list[_JournalEntry])


class _RunRuntime:
    """What ``logger``, ``ctx`` and ``wait`` reach inside one execution of a run."""

    def __init__(
        self,
        context: Context,
        channel: _Channel,
        generation: int,
        journal: list[_JournalEntry],
        waiters: dict[tuple[str, int], asyncio.Future[bytes]],
    ) -> None:
        self._context = context
        self._channel = channel
        self._generation = generation
        self._journal = {entry.seq: entry for entry in journal}
        self._waiters = waiters
        self._seq = 0

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

    async def wait(
        self,
        seq: int,
        kind: str,
        *,
        resume_at: float | None = None,
        targets: list[str] | None = None,
        task_ids: list[str] | None = None,
    ) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        key = (self._context.run_id, seq)
        self._waiters[key] = future
        self._channel.send(
            Wait(
                run_id=self._context.run_id,
                attempt=self._context.attempt,
                seq=seq,
                kind=kind,
                resume_at=resume_at,
                targets=targets or [],
                task_ids=task_ids or [],
            )
        )
        try:
            return await future
        finally:
            self._waiters.pop(key, None)

    def log(self, level: str, message: str, attrs: dict[str, Any]) -> None:
        try:
            encoded = _json.encode(attrs) if attrs else b""
        except (TypeError, msgspec.EncodeError):
            encoded = _json.encode({k: repr(v) for k, v in attrs.items()})
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


class _RunStream(io.TextIOBase):
    """stdout/stderr that also records each complete line as a log line of the current run."""

    def __init__(self, underlying: TextIO, level: str) -> None:
        self._underlying = underlying
        self._level = level
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._underlying.write(text)
        runtime = current_runtime()
        if runtime is not None:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                runtime.log(self._level, line, {})
        return len(text)

    def flush(self) -> None:
        self._underlying.flush()


def _error_of(exc: BaseException) -> RunError:
    return RunError(
        name=type(exc).__name__,
        message=str(exc),
        stack="".join(traceback.format_exception(exc)),
    )


def host_pid() -> int:
    """This process's PID as the daemon sees it, also as PID 1 of its own PID namespace."""
    try:
        # /proc is the host's (no mount namespace): /proc/self names the host PID.
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


class RunProcess:
    """One run process's loop: hello, then execute what the daemon sends."""

    def __init__(self, tasks: dict[str, Task[Any, Any, Any]], heartbeat_s: float) -> None:
        self._tasks = tasks
        self._heartbeat_s = heartbeat_s
        self._current: asyncio.Task[None] | None = None
        self._process = psutil.Process()
        self._waiters: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    async def serve(self, socket_path: str, worker_id: int, token: str) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        channel = _Channel(writer)
        channel.send(Hello(worker_id=worker_id, token=token, pid=host_pid()))
        loop = asyncio.get_running_loop()
        # The daemon cancels with SIGTERM; stop the attempt and leave.
        stop: asyncio.Future[None] = loop.create_future()

        def on_sigterm() -> None:
            if not stop.done():
                stop.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        decoder = FrameDecoder(ToWorker)
        read: asyncio.Task[bytes] = loop.create_task(reader.read(65536))
        try:
            while True:
                waitables: list[asyncio.Future[Any]] = [read, stop]
                await asyncio.wait(waitables, return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    return
                data = read.result()
                if not data:
                    return  # the daemon is gone: nothing we do now would be recorded
                for message in decoder.feed(data):
                    if isinstance(message, Execute):
                        self._current = loop.create_task(self._execute(message, channel))
                    elif isinstance(message, Resume):
                        self._resume(message)
                    elif isinstance(message, Suspend):
                        reader = await self._suspend(socket_path, worker_id, token, channel)
                        decoder = FrameDecoder(ToWorker)
                    elif isinstance(message, Cancel | Evict) and self._current is not None:
                        self._current.cancel()
                        if isinstance(message, Evict):
                            # The run resumes later by replay in a fresh process.
                            await asyncio.wait({self._current})
                            return
                    elif isinstance(message, Shutdown):
                        if self._current is not None:
                            await asyncio.wait({self._current})
                        return
                read = loop.create_task(reader.read(65536))
        finally:
            read.cancel()
            if self._current is not None:
                self._current.cancel()
            channel.writer.close()

    def _resume(self, message: Resume) -> None:
        future = self._waiters.get((message.run_id, message.seq))
        if future is None or future.done():
            return
        if message.error is not None:
            error = NonDeterminismError if message.nondeterministic else EmberError
            future.set_exception(error(message.error))
        else:
            future.set_result(message.result)

    async def _suspend(
        self, socket_path: str, worker_id: int, token: str, channel: _Channel
    ) -> asyncio.StreamReader:
        """Get ready for a checkpoint: close every channel, park until SIGUSR1, reconnect.

        The daemon dumps this process once the channel closes; after a restore (or if the
        dump failed) it sends SIGUSR1. Both cases take the same path from here.
        """
        from ember._client import default_client

        sys.stdout.flush()
        sys.stderr.flush()
        # Connections to the API would be sockets leading out of the dumped tree.
        await default_client().aclose()
        loop = asyncio.get_running_loop()
        woke: asyncio.Future[None] = loop.create_future()

        def on_sigusr1() -> None:
            if not woke.done():
                woke.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, on_sigusr1)
        channel.writer.close()
        await channel.writer.wait_closed()
        await woke
        loop.remove_signal_handler(signal.SIGUSR1)
        reader, writer = await asyncio.open_unix_connection(socket_path)
        channel.writer = writer
        channel.send(Hello(worker_id=worker_id, token=token, pid=host_pid(), restored=True))
        return reader

    async def _execute(self, message: Execute, channel: _Channel) -> None:
        context = _context_decoder.decode(message.context)
        journal = _journal_decoder.decode(message.journal)
        runtime = _RunRuntime(context, channel, message.generation, journal, self._waiters)
        token = set_runtime(runtime)
        cpu_start = time.process_time()
        peak_rss = self._process.memory_info().rss
        beat = asyncio.get_running_loop().create_task(self._heartbeats(message.run_id, channel))
        done: Done
        try:
            output = await self._call(message, context)
            done = Done(run_id=message.run_id, attempt=message.attempt, ok=True, output=output)
        except asyncio.CancelledError:
            raise
        except (AbortTaskRunError, PayloadValidationError, NonDeterminismError) as exc:
            done = Done(
                run_id=message.run_id,
                attempt=message.attempt,
                ok=False,
                retry=False,
                error=_error_of(exc),
            )
        except (Exception, SystemExit) as exc:
            done = Done(
                run_id=message.run_id, attempt=message.attempt, ok=False, error=_error_of(exc)
            )
        finally:
            beat.cancel()
            reset_runtime(token)
        peak_rss = max(peak_rss, self._process.memory_info().rss)
        channel.send(
            msgspec.structs.replace(
                done, cpu_s=time.process_time() - cpu_start, peak_rss_bytes=peak_rss
            )
        )

    async def _call(self, message: Execute, context: Context) -> bytes:
        task = self._tasks.get(message.task_id)
        if task is None:
            raise AbortTaskRunError(
                f"task {message.task_id!r} is not defined in version {context.version}"
            )
        args: tuple[Any, ...] = ()
        if task.takes_payload:
            args = (task.decode_payload(message.payload),)
        if task.wants_context:
            args = (*args, context)
        if task.is_async:
            result = await task.fn(*args)
        else:
            ctx = contextvars.copy_context()
            result = await asyncio.get_running_loop().run_in_executor(None, ctx.run, task.fn, *args)
        try:
            return _json.encode(result)
        except (TypeError, msgspec.EncodeError) as exc:
            raise AbortTaskRunError(
                f"the output of task {task.id!r} is not JSON-serializable: {exc}; return "
                "JSON types, msgspec Structs or dataclasses"
            ) from exc

    async def _heartbeats(self, run_id: str, channel: _Channel) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            channel.send(Heartbeat(run_id=run_id))


def run_worker(
    *,
    socket_path: str,
    worker_id: int,
    token: str,
    tasks: dict[str, Task[Any, Any, Any]],
    heartbeat_s: float,
) -> int:
    """Serve runs until the daemon says stop or goes away; returns the exit status."""
    sys.stdout = _RunStream(sys.stdout, "info")
    sys.stderr = _RunStream(sys.stderr, "error")
    process = RunProcess(tasks, heartbeat_s)
    asyncio.run(process.serve(socket_path, worker_id, token))
    return 0
