"""OpenTelemetry traces of runs, with real run processes: the span tree, its parents and timings,
spans that outlive their process, a caller's traceparent, retention."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
from conftest import Harness, ember_cli, eventually, http_server, running_daemon

from ember import Runs, RunStatus, Tasks, Wait
from ember._client import Call
from ember._trace_types import RunTrace, Span
from ember._types import TriggerResponse
from ember.daemon import DaemonConfig
from ember.daemon.procs.checkpoint.support import detect

TASKS = {
    "tasks/__init__.py": "",
    "tasks/traced.py": """
        import asyncio
        import os
        from pathlib import Path
        from opentelemetry import trace
        from ember import logger, task, wait

        @task(id="leaf")
        async def leaf(payload: dict) -> int:
            logger.info("leaf working", n=payload["n"])
            return payload["n"] * 2

        @task(id="tree")
        async def tree(payload: dict) -> dict:
            child = await leaf.trigger_and_wait({"n": 3})
            await wait.for_(seconds=payload["s"])
            token = await wait.create_token(idempotency_key=payload["key"])
            result = await wait.for_token(token)
            with logger.trace("compute", step=1):
                logger.info("inside compute")
                with trace.get_tracer("mine").start_as_current_span("raw-otel"):
                    pass
            return {"child": child.output, "token": result.output}

        @task(id="held")
        async def held(payload: dict) -> str:
            logger.info("reaching the wait")  # (an event of the attempt's own span)
            with logger.trace("before"):
                pass
            await wait.for_(seconds=payload["s"])
            logger.info("past the wait")
            with logger.trace("after"):
                pass
            return "done"

        @task(id="emit-then-hang")
        async def emit_then_hang(payload: dict) -> None:
            with logger.trace("before-the-kill"):
                pass
            # (its batch is sent at the end of this loop iteration: the test kills once the
            # flag is there, and a flag written first let it kill before the send)
            await asyncio.sleep(0)
            Path(payload["flag"]).write_text(str(os.getpid()))
            await asyncio.sleep(3600)  # no wait: nothing but the batch's own flush sends the span

        @task(id="noop")
        async def noop(payload: dict) -> None:
            return None

        @task(id="quiet")
        async def quiet(payload: dict) -> None:
            trace.get_current_span().set_attribute("quiet.step", payload["step"])
            logger.info("quiet now")
            await asyncio.sleep(3600)  # no span of its own, no wait: its attempt's span alone
    """,
}


@pytest.fixture
async def h(state_dir: Path) -> AsyncIterator[Harness]:
    async with running_daemon(
        state_dir, checkpoint="park", wait_park_threshold_s=0.1, cancel_grace_s=1.0
    ) as harness:
        info = await harness.register(TASKS)
        assert info.status == "READY", info.error
        yield harness


with tempfile.TemporaryDirectory() as _state:
    CRIU = detect(DaemonConfig(state_dir=Path(_state)))


def _by_name(trace: RunTrace) -> dict[str, Span]:
    return {s.name: s for s in trace.spans}


def _within(inner: Span, outer: Span) -> bool:
    end = outer.end_ns if outer.end_ns is not None else inner.end_ns
    assert inner.end_ns is not None and end is not None
    return outer.start_ns <= inner.start_ns and inner.end_ns <= end


async def test_a_run_with_a_child_a_wait_and_a_token_makes_the_span_tree(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("tree", {"s": 0.3, "key": "tree-token"})
    token = await Wait(h.client).create_token(idempotency_key="tree-token")
    await eventually(lambda: _token_waited(h, token.id, handle.id))
    await Wait(h.client).complete_token(token.id, {"approved": True})
    run = await h.wait(handle.id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output_as() == {"child": 6, "token": {"approved": True}}

    trace = await runs.trace(run.id)
    spans = _by_name(trace)
    root = trace.spans[0]
    assert root.name == "tree" and root.parent_id is None and root.status == "OK"
    assert root.attributes["ctx.run.id"] == run.id
    assert {s.trace_id for s in trace.spans} == {trace.trace_id}
    attempt = spans["Attempt 1"]
    assert attempt.parent_id == root.span_id
    assert attempt.attributes["ctx.attempt.number"] == 1
    assert attempt.attributes["ctx.task.id"] == "tree"
    assert attempt.attributes["ctx.environment.type"] == "dev"
    assert attempt.attributes["ctx.worker.version"] == run.version
    for name in ("trigger_and_wait", "wait.for_", "wait.for_token", "compute"):
        assert spans[name].parent_id == attempt.span_id, name
        assert _within(spans[name], attempt), name
    assert spans["trigger"].parent_id == spans["trigger_and_wait"].span_id
    assert spans["raw-otel"].parent_id == spans["compute"].span_id
    assert spans["compute"].attributes["step"] == 1
    assert [e.name for e in spans["compute"].events] == ["inside compute"]
    # Timings agree with the run's history: the duration wait held at least its duration,
    # and everything lies within the run's own span.
    held = spans["wait.for_"]
    assert held.duration_ms is not None and held.duration_ms >= 300
    assert held.attributes["ember.wait.held"] == "process"
    for span in trace.spans[1:]:
        assert _within(span, root), span.name

    # The child run is in the same trace, under the parent's trigger span.
    child_id = spans["trigger_and_wait"].attributes["ember.run.id"]
    child = await runs.trace(child_id)
    assert child.trace_id == trace.trace_id
    assert child.spans[0].parent_id == spans["trigger"].span_id
    assert [e.name for e in _by_name(child)["Attempt 1"].events] == ["leaf working"]

    # `ember runs trace` prints the same tree, in start order, with what each wait held.
    printed = await asyncio.to_thread(ember_cli, h, "runs", "trace", run.id)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0] == f"trace {trace.trace_id}"
    labels = [line.split("  +")[0].rstrip() for line in lines[1:]]
    assert labels[:4] == ["tree", "└ Attempt 1", "  └ trigger_and_wait", "    └ trigger"]
    assert labels[4:] == ["  └ wait.for_", "  └ wait.for_token", "  └ compute", "    └ raw-otel"]
    assert "held=process" in lines[5] and f"id={child_id}" in lines[3]


async def _token_waited(h: Harness, token_id: str, run_id: str) -> bool:
    return run_id in (await Wait(h.client).retrieve_token(token_id)).waiting_runs


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(
            "criu",
            marks=[
                pytest.mark.criu,
                pytest.mark.skipif(not CRIU.ok, reason=f"no working CRIU: {CRIU.reason}"),
            ],
        ),
        "replay",
    ],
)
async def test_spans_survive_a_checkpoint_and_a_replay(state_dir: Path, strategy: str) -> None:
    async with running_daemon(state_dir, checkpoint=strategy, wait_park_threshold_s=0.1) as h:
        assert (await h.register(TASKS)).status == "READY"
        run = await h.run("held", {"s": 1.0})
        assert run.status is RunStatus.COMPLETED, run.error
        trace = await Runs(h.client).trace(run.id)
    names = [s.name for s in trace.spans]
    waits = [s for s in trace.spans if s.name == "wait.for_"]
    if strategy == "criu":
        # One process, dumped and restored: every span once, the wait held by the checkpoint.
        assert sorted(names) == sorted(["held", "Attempt 1", "before", "wait.for_", "after"])
        assert waits[0].attributes["ember.wait.held"] == "criu"
        # (timers may fire a few ms before their deadline)
        assert waits[0].duration_ms is not None and waits[0].duration_ms >= 950
    else:
        # The process that waited exits and a new one re-executes from the journal: the code
        # before the wait ran twice, the second time its wait answered from the journal. It
        # is one attempt, so one attempt span, holding what each of its processes added.
        assert names.count("Attempt 1") == 1 and names.count("before") == 2
        assert names.count("after") == 1 and len(waits) == 2
        assert [w.attributes.get("ember.wait.replayed", False) for w in waits] == [False, True]
    attempt = _by_name(trace)["Attempt 1"]
    logged = ["reaching the wait", "past the wait"]
    if strategy == "replay":
        logged.insert(0, "reaching the wait")
    assert [e.name for e in attempt.events] == logged
    assert attempt.status == "OK" and attempt.end_ns is not None
    for span in trace.spans:
        if span.name in ("before", "wait.for_", "after"):
            assert span.parent_id == attempt.span_id, span.name
            assert _within(span, attempt), span.name


async def test_spans_survive_a_kill_9_of_their_process(h: Harness, tmp_path: Path) -> None:
    flag = tmp_path / "pid"
    handle = await Tasks(h.client).trigger("emit-then-hang", {"flag": str(flag)}, max_attempts=1)
    await eventually(flag.exists)
    worker = h.daemon.engine.active[handle.id].worker
    assert worker is not None
    os.kill(worker.pid, signal.SIGKILL)
    final = await h.wait(handle.id)
    assert final.status in {RunStatus.CRASHED, RunStatus.FAILED, RunStatus.SYSTEM_FAILURE}
    spans = _by_name(await Runs(h.client).trace(handle.id))
    # The attempt's span is the daemon's, from the attempt's row: its spans hang under it, and
    # it ends, failed, with the attempt, saying why.
    attempt = spans["Attempt 1"]
    assert spans["before-the-kill"].parent_id == attempt.span_id
    assert attempt.status == "ERROR" and attempt.end_ns is not None
    assert "TaskRunCrashed: the run process" in (attempt.status_message or "")


async def test_an_attempt_that_adds_nothing_to_its_span_sends_and_stores_none(
    h: Harness,
) -> None:
    # What every run pays for tracing: its attempt's span is built from the attempt's row.
    run = await h.run("noop", {})
    assert run.status is RunStatus.COMPLETED
    rows = await h.daemon.db.read(
        lambda conn: conn.execute(
            "SELECT count(*) FROM spans WHERE run_id = ?", (run.id,)
        ).fetchone()[0]
    )
    assert rows == 0
    trace = await Runs(h.client).trace(run.id)
    assert [s.name for s in trace.spans] == ["noop", "Attempt 1"]
    root, attempt = trace.spans
    assert attempt.parent_id == root.span_id and attempt.status == "OK"
    assert attempt.attributes["ctx.attempt.number"] == 1
    assert attempt.attributes["ctx.worker.version"] == run.version
    assert attempt.start_ns >= root.start_ns and attempt.end_ns is not None


async def test_a_long_attempt_shows_in_its_trace_while_it_runs(h: Harness) -> None:
    # The attempt's span shows while the attempt runs (the daemon builds it from its row);
    # what the task set on it arrives when it ends.
    handle = await Tasks(h.client).trigger("quiet", {"step": 2}, max_attempts=1)
    runs = Runs(h.client)

    async def attempt_open() -> bool:
        spans = _by_name(await runs.trace(handle.id))
        return "Attempt 1" in spans and spans["Attempt 1"].end_ns is None

    async def task_is_quiet() -> bool:  # (past its set_attribute: the attempt row comes first)
        return any(line.message == "quiet now" for line in (await runs.logs(handle.id)).data)

    await eventually(attempt_open)
    await eventually(task_is_quiet)
    await runs.cancel(handle.id)
    await h.wait(handle.id)
    attempt = _by_name(await runs.trace(handle.id))["Attempt 1"]
    assert attempt.end_ns is not None and attempt.attributes["quiet.step"] == 2


async def test_a_callers_traceparent_is_the_runs_parent(h: Harness) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("app")
    with tracer.start_as_current_span("http request") as request:
        handle = await Tasks(h.client).trigger("leaf", {"n": 1})
    await h.wait(handle.id)
    trace = await Runs(h.client).trace(handle.id)
    context = request.get_span_context()
    assert trace.trace_id == f"{context.trace_id:032x}"
    assert trace.spans[0].parent_id == f"{context.span_id:016x}"
    assert _by_name(trace)["Attempt 1"].trace_id == trace.trace_id


async def test_a_malformed_traceparent_is_refused_naming_the_field(h: Harness) -> None:
    from ember import BadRequest

    with pytest.raises(BadRequest, match=r"options\.traceparent: 'nope' is not a W3C traceparent"):
        await h.client.request(_trigger_call("leaf", {"n": 1}, traceparent="nope"))


def _trigger_call(task: str, payload: object, **options: object) -> Call[TriggerResponse]:
    body = msgspec.json.encode({"payload": payload, "options": options})
    return Call("POST", f"/api/v1/tasks/{task}/trigger", TriggerResponse, body=body)


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector: decodes each export with opentelemetry-proto."""

    got: list[tuple[str, dict[str, object]]]

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: a.value.WhichOneof("value") for a in span.attributes}
                    self.server.got.append(  # type: ignore[attr-defined]
                        (
                            span.span_id.hex(),
                            {
                                "name": span.name,
                                "trace": span.trace_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "attrs": attrs,
                                "auth": self.headers.get("x-api-key"),
                                "type": self.headers["Content-Type"],
                            },
                        )
                    )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[ThreadingHTTPServer]:
    with http_server(_Receiver) as server:
        server.got = []  # type: ignore[attr-defined]
        yield server


async def test_an_otlp_http_collector_gets_the_same_spans(
    state_dir: Path, collector: ThreadingHTTPServer
) -> None:
    port = collector.server_address[1]
    async with running_daemon(
        state_dir,
        otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
        otlp_headers=(("x-api-key", "secret"),),
    ) as h:
        assert (await h.register(TASKS)).status == "READY"
        run = await h.run("leaf", {"n": 2})
        trace = await Runs(h.client).trace(run.id)
        got: list[tuple[str, dict[str, object]]] = collector.got  # type: ignore[attr-defined]
        await eventually(lambda: len(got) >= len(trace.spans))
    exported = dict(got)
    assert set(exported) == {s.span_id for s in trace.spans}
    for span in trace.spans:
        sent = exported[span.span_id]
        assert sent["name"] == span.name and sent["trace"] == span.trace_id
        assert sent["parent"] == (span.parent_id or "")
        assert sent["auth"] == "secret" and sent["type"] == "application/x-protobuf"
    root = exported[trace.spans[0].span_id]
    assert root["attrs"] == {  # type: ignore[comparison-overlap]
        "ctx.run.id": "string_value",
        "ctx.task.id": "string_value",
        "ctx.environment.type": "string_value",
        "ember.run.status": "string_value",
        "ctx.worker.version": "string_value",
    }
    attempt = exported[_by_name(trace)["Attempt 1"].span_id]
    assert attempt["attrs"]["ctx.attempt.number"] == "int_value"  # type: ignore[index]


def test_the_standard_otel_variables_set_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember._errors import ConfigError
    from ember.cli._settings import daemon_config

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=abc%3D,team=core")
    config = daemon_config(None)
    assert config.otlp_endpoint == "http://collector:4318/v1/traces"
    assert config.otlp_headers == (("x-api-key", "abc="), ("team", "core"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:4318/custom")
    assert daemon_config(None).otlp_endpoint == "http://other:4318/custom"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="set it to http/protobuf"):
        daemon_config(None)


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format: str, *args: object) -> None:
        pass


HTTP_TASKS = {
    "tasks/__init__.py": "",
    "tasks/calls.py": """
        import httpx
        from ember import task

        @task(id="caller")
        async def caller(payload: dict) -> str:
            async with httpx.AsyncClient() as client:
                return (await client.get(payload["url"])).text
    """,
}


async def test_an_instrumentation_in_the_config_adds_spans_of_http_calls(state_dir: Path) -> None:
    instrumentor = "opentelemetry.instrumentation.httpx:HTTPXClientInstrumentor"
    with http_server(_Hello) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/greeting"
        async with running_daemon(state_dir, instrumentations=(instrumentor,)) as h:
            assert (await h.register(HTTP_TASKS)).status == "READY"
            run = await h.run("caller", {"url": url})
            assert run.output_as(str) == "hello", run.error
            spans = _by_name(await Runs(h.client).trace(run.id))
    call = spans["GET"]
    assert call.parent_id == spans["Attempt 1"].span_id
    assert call.kind == 2  # CLIENT
    assert call.attributes.get("url.full", call.attributes.get("http.url")) == url
    assert (
        call.attributes.get("http.response.status_code", call.attributes.get("http.status_code"))
        == 200
    )


async def test_an_instrumentation_that_cannot_load_fails_the_version_clearly(
    state_dir: Path,
) -> None:
    async with running_daemon(state_dir, instrumentations=("no_such_module:Instrumentor",)) as h:
        info = await h.register(HTTP_TASKS)
    assert info.status == "FAILED"
    assert "instrumentation 'no_such_module:Instrumentor' of [tool.ember]" in (info.error or "")


def test_instrumentations_in_the_config_must_be_module_class_strings() -> None:
    from ember._errors import ConfigError
    from ember.cli._project import Project
    from ember.cli._settings import daemon_config

    good = Project(root=Path("/tmp"), settings={"instrumentations": ["a.b:C"]})
    assert daemon_config(good).instrumentations == ("a.b:C",)
    bad = Project(root=Path("/tmp"), settings={"instrumentations": "a.b:C"})
    with pytest.raises(ConfigError, match="give a list of 'module:Class' strings"):
        daemon_config(bad)
