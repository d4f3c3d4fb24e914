"""What a run's code reaches while it executes: the runtime behind ``wait``, ``logger`` and
``print``, and its errors as the daemon records them.

A :class:`RunRuntime` per attempt answers waits from the journal when they were completed
before (a replay), else asks the daemon and waits for its ``Resume``; it sends log lines,
cut to what a frame holds. :class:`RunStream` makes stdout and stderr log lines too.
"""

from __future__ import annotations

import asyncio
import io
import time
import traceback
from typing import Any, TextIO

import msgspec

from ember._errors import EmberError, NonDeterminismError
from ember._hooks import WaitInfo, WaitKind
from ember._machines import OOM_KILLED
from ember._metadata import flush_run
from ember._runtime import Context, current_runtime
from ember._streams import flush_streams
from ember._task import json_default
from ember._types import RunError
from ember.daemon.child import tracing
from ember.daemon.child.attempt import Attempt
from ember.daemon.child.channel import Link
from ember.daemon.procs.protocol import MAX_FRAME_BYTES, MAX_LOG_LINE_BYTES, Done, Log, Wait

_json = msgspec.json.Encoder(enc_hook=json_default)
# Each pending wait of the process: its future and the frame that asked (asked again after a
# restore, see RunProcess._suspend).
Waiters = dict[tuple[str, int], tuple[asyncio.Future[bytes], Wait]]
# Trigger.dev's names of the wait kinds, as the wait hooks see them.
_WAIT_KINDS: dict[str, WaitKind] = {
    "DATETIME": "duration",
    "RUN": "run",
    "BATCH": "batch",
    "TOKEN": "token",
}
# Room left in a frame for everything but a Done's output.
_FRAME_MARGIN_BYTES = 1024 * 1024
# Room kept for the marker of a cut log line.
_MARKER_BYTES = 64


# Room kept for the marker of a cut log line.
_MARKER_BYTES = 64


class JournalEntry(msgspec.Struct, frozen=True):
    seq: int
    kind: str
    task_ids: list[str]
    result: msgspec.Raw


class RunRuntime:
    """What ``logger``, ``ctx`` and ``wait`` reach inside one execution of a run."""

    def __init__(
        self,
        context: Context,
        channel: Link,
        generation: int,
        journal: list[JournalEntry],
        waiters: Waiters,
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
        tracing.set_wait_attributes(**{"ember.wait.replayed": True})
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
        # The process may exit (replay) or be dumped during the wait: changes go first.
        await flush_run(self._context.run_id)
        await flush_streams(self._context.run_id)
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
        tracing.flush()  # what ended before the wait reaches the daemon before the process may go
        self._channel.send(asked)
        checkpoints = tracing.checkpoints()
        try:
            result = await future
        finally:
            self._waiters.pop(key, None)
        # The wait's span (the SDK's) says how it was held: a checkpoint, or this process.
        held = "criu" if tracing.checkpoints() > checkpoints else "process"
        tracing.set_wait_attributes(**{"ember.wait.held": held})
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
        tracing.log_event(level, message, attrs)
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

    async def flush_changes(self) -> None:
        """Send the attempt's metadata changes and stream chunks before its end; a refusal
        is logged with the run."""
        try:
            await flush_run(self.context.run_id)
        except EmberError as exc:
            self.log("error", f"metadata changes not applied: {exc}", {})
        try:
            await flush_streams(self.context.run_id)
        except EmberError as exc:
            self.log("error", f"stream chunks not recorded: {exc}", {})


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


class RunStream(io.TextIOBase):
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


def error_of(exc: BaseException) -> RunError:
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


def fit_frame(done: Done) -> Done:
    """``done``, or a failure saying why when its output is more than a frame carries."""
    if done.output is None or len(done.output) <= MAX_FRAME_BYTES - _FRAME_MARGIN_BYTES:
        return done
    return Done(
        run_id=done.run_id,
        attempt=done.attempt,
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
