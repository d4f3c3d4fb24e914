"""The worker channel: length-prefixed msgpack frames between the daemon, zygotes and runs.

Two conversations share the framing:

- daemon ↔ zygote, over a socketpair made when the zygote starts: the zygote reports the
  tasks it indexed, forks run processes on request and reports their exit;
- daemon ↔ run process, over the daemon's worker socket: the run process says hello, then
  executes one run at a time and streams logs, heartbeats and the outcome.

Each message is a tagged ``msgspec.Struct`` encoded as a msgpack array; fields added later
must have defaults so that older peers keep working.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from ember._types import RunError, TaskInfo

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024
# A log line's message (and its attributes) beyond this is cut by the run process, with a
# marker, so that no log frame nears MAX_FRAME_BYTES.
MAX_LOG_LINE_BYTES = 1024 * 1024


class Message(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag=True):
    """Base of every worker-channel message."""


# -- daemon ↔ zygote -------------------------------------------------------------------


class Indexed(Message, frozen=True, tag="indexed"):
    """Zygote → daemon: the task modules are imported (or failed to import)."""

    tasks: list[TaskInfo] = []
    error: str | None = None


class Fork(Message, frozen=True, tag="fork"):
    """Daemon → zygote: fork a run process that says hello with this id and token."""

    worker_id: int
    token: str
    # The cgroup.procs files the child writes its PID to before it runs anything (its
    # machine preset's cgroup), and else the memory it may add to what it inherits
    # (RLIMIT_DATA; 0: none). See procs/cgroups.py.
    cgroup_procs: list[str] = []
    memory_rlimit: int = 0


class Forked(Message, frozen=True, tag="forked"):
    """Zygote → daemon: a run process was forked."""

    worker_id: int
    pid: int


class Exited(Message, frozen=True, tag="exited"):
    """Zygote → daemon: a run process it forked exited (``status`` < 0: killed by -status)."""

    pid: int
    status: int


# -- daemon ↔ run process --------------------------------------------------------------


class Hello(Message, frozen=True, tag="hello"):
    """Run process → daemon: first frame on a new connection (``restored``: after a restore)."""

    worker_id: int
    token: str
    pid: int
    restored: bool = False


class Execute(Message, frozen=True, tag="execute"):
    """Daemon → run process: execute one attempt of a run."""

    run_id: str
    attempt: int
    task_id: str
    payload: bytes
    context: bytes
    generation: int = 0
    journal: bytes = b"[]"
    # Whether a failure of this attempt ends the run (no attempts left): on_failure fires.
    last_attempt: bool = False
    # The retry policy's delay after a failure of this attempt (what catch_error is told).
    retry_delay_s: float = 0.0
    # The wait this execution resumes from, replayed from the journal: on_resume fires for it.
    resumed_seq: int = 0
    # The W3C traceparent naming the attempt's span, which the daemon builds from the attempt's
    # row: the process's spans are its children ("": tracing is off).
    traceparent: str = ""


class Cancel(Message, frozen=True, tag="cancel"):
    """Daemon → run process: cancel the attempt running now."""

    run_id: str


class Resume(Message, frozen=True, tag="resume"):
    """Daemon → run process: the wait ``seq`` is over; ``result`` is its JSON outcome."""

    run_id: str
    seq: int
    result: bytes = b"null"
    error: str | None = None
    nondeterministic: bool = False


class Suspend(Message, frozen=True, tag="suspend"):
    """Daemon → run process: close your channels and park until SIGUSR1 (checkpoint)."""

    run_id: str


class Evict(Message, frozen=True, tag="evict"):
    """Daemon → run process: drop the waiting run and exit (it resumes by replay)."""

    run_id: str


class Shutdown(Message, frozen=True, tag="shutdown"):
    """Daemon → run process: finish the attempt under way, if any, then exit."""


class Log(Message, frozen=True, tag="log"):
    """Run process → daemon: a log line of the running attempt."""

    run_id: str
    attempt: int
    ts: float
    level: str
    message: str
    attrs: bytes = b""


class SpanRecord(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One ended OpenTelemetry span, as a run process reports it; or an attempt span's extras.

    Extras (what an attempt's code added to the attempt's span, ``child/attempt_span.py``)
    have the span id ``<attempt span id>:<piece>`` and the attempt's span as their parent.

    Attributes:
        trace_id: 32 hex digits.
        span_id: 16 hex digits (extras: see above).
        parent_id: the parent span's id ("" for a trace's root).
        kind: OTel's SpanKind value (0 internal, 1 server, 2 client, 3 producer, 4 consumer).
        start_ns: the start, in nanoseconds since the epoch (the host's clock).
        end_ns: the end, likewise.
        status: 0 unset, 1 ok, 2 error.
        attrs: the attributes as a JSON object.
        events: the events as a JSON list of ``{"name", "time_ns", "attrs"}``.
    """

    trace_id: str
    span_id: str
    parent_id: str = ""
    name: str
    kind: int = 0
    start_ns: int
    end_ns: int
    status: int = 0
    status_message: str = ""
    attrs: bytes = b"{}"
    events: bytes = b"[]"


class Spans(Message, frozen=True, tag="spans"):
    """Run process → daemon: spans that ended, in one batch, for the run they belong to."""

    run_id: str
    spans: list[SpanRecord] = []


class Heartbeat(Message, frozen=True, tag="heartbeat"):
    """Run process → daemon: the attempt is alive."""

    run_id: str


class Wait(Message, frozen=True, tag="wait"):
    """Run process → daemon: the run waits (its ``seq``-th wait of this generation).

    Attributes:
        kind: DATETIME, RUN, BATCH or TOKEN.
        resume_at: the deadline of a DATETIME wait (epoch seconds).
        targets: the child run ids (RUN, BATCH) or the token id (TOKEN).
        task_ids: the children's task ids, to detect a replay that took another path.
    """

    run_id: str
    attempt: int
    seq: int
    kind: str
    resume_at: float | None = None
    targets: list[str] = []
    task_ids: list[str] = []


class Done(Message, frozen=True, tag="done"):
    """Run process → daemon: the attempt ended.

    Attributes:
        output: the JSON output when ``ok``.
        error: why it failed otherwise.
        retry: False when the error must not be retried (AbortTaskRunError, bad payload,
            a 4xx of the daemon, catch_error's skip_retrying).
    """

    run_id: str
    attempt: int
    ok: bool
    output: bytes | None = None
    error: RunError | None = None
    retry: bool = True
    # catch_error's choice of delay before the retry; None: the retry policy's.
    retry_delay_s: float | None = None
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0


ToZygote = Fork
FromZygote = Indexed | Forked | Exited
ToWorker = Execute | Cancel | Shutdown | Resume | Suspend | Evict
FromWorker = Hello | Log | Spans | Heartbeat | Wait | Done

_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    """Return one frame: a 4-byte big-endian length, then the msgpack body."""
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into messages of the given union type.

    Args:
        union: the message types this side may receive.
    """

    def __init__(self, union: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(union)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the messages now complete.

        Raises:
            ValueError: a frame announces more than ``MAX_FRAME_BYTES`` or does not decode.
        """
        buffer = self._buffer
        buffer += data
        messages = []
        offset = 0
        end = len(buffer)
        while end - offset >= 4:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"worker frame of {size} bytes is over the limit")
            if end - offset - 4 < size:
                break
            start = offset + 4
            try:
                messages.append(self._decoder.decode(memoryview(buffer)[start : start + size]))
            except msgspec.DecodeError as exc:
                raise ValueError(f"undecodable worker frame: {exc}") from exc
            offset = start + size
        if offset:
            del buffer[:offset]
        return messages
