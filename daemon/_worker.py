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

from ember._errors import AbortTaskRunError, PayloadValidationError
from ember._runtime import Context, current_runtime, reset_runtime, set_runtime
from ember._task import Task
from ember._types import RunError
from ember.daemon._protocol import (
    Cancel,
    Done,
    Execute,
    FrameDecoder,
    Heartbeat,
    Hello,
    Log,
    Message,
    Shutdown,
    ToWorker,
    encode,
)

_json = msgspec.json.Encoder()
_context_decoder = msgspec.json.Decoder(Context)


class _Channel:
    """The write side of the connection to the daemon."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def send(self, message: Message) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(message))


class _RunRuntime:
    """What ``logger`` and ``ctx`` reach inside one attempt."""

    def __init__(self, context: Context, channel: _Channel) -> None:
        self._context = context
        self._channel = channel

    @property
    def context(self) -> Context:
        return self._context

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


class RunProcess:
    """One run process's loop: hello, then execute what the daemon sends."""

    def __init__(self, tasks: dict[str, Task[Any, Any, Any]], heartbeat_s: float) -> None:
        self._tasks = tasks
        self._heartbeat_s = heartbeat_s
        self._current: asyncio.Task[None] | None = None
        self._process = psutil.Process()

    async def serve(self, socket_path: str, worker_id: int, token: str) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        channel = _Channel(writer)
        channel.send(Hello(worker_id=worker_id, token=token, pid=os.getpid()))
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
                    elif isinstance(message, Cancel) and self._current is not None:
                        self._current.cancel()
                    elif isinstance(message, Shutdown):
                        if self._current is not None:
                            await asyncio.wait({self._current})
                        return
                read = loop.create_task(reader.read(65536))
        finally:
            read.cancel()
            if self._current is not None:
                self._current.cancel()
            writer.close()

    async def _execute(self, message: Execute, channel: _Channel) -> None:
        context = _context_decoder.decode(message.context)
        token = set_runtime(_RunRuntime(context, channel))
        cpu_start = time.process_time()
        peak_rss = self._process.memory_info().rss
        beat = asyncio.get_running_loop().create_task(self._heartbeats(message.run_id, channel))
        done: Done
        try:
            output = await self._call(message, context)
            done = Done(run_id=message.run_id, attempt=message.attempt, ok=True, output=output)
        except asyncio.CancelledError:
            raise
        except (AbortTaskRunError, PayloadValidationError) as exc:
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
