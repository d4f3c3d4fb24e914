"""Environments: API keys that isolate them over TCP, and their variables."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import Harness, running_daemon
from test_api import free_port

from ember import BadRequest, Client, ClientSettings, EnvVars, NotFound, Runs, Tasks

PROJECT = {
    "tasks/__init__.py": "",
    "tasks/t.py": """
        import os
        from ember import Context, ScheduledPayload, schedules, task

        @task(id="env")
        async def env(payload: dict, ctx: Context) -> dict:
            return {"env": ctx.env, "greeting": os.environ.get("GREETING")}

        @schedules.task(id="nightly", cron="0 1 * * *")
        async def nightly(payload: ScheduledPayload) -> None:
            return None
    """,
}


async def test_a_key_sees_and_changes_only_its_environment(state_dir: Path) -> None:
    port = free_port()
    async with running_daemon(state_dir, tcp=f"127.0.0.1:{port}") as h:
        await h.register(PROJECT)
        await h.register(PROJECT, env="prod")
        prod_key = (await h.daemon.create_key("prod", "ci")).key
        dev_key = (state_dir / "dev.key").read_text().strip()
        assert prod_key.startswith("em_prod_")
        url = f"http://127.0.0.1:{port}"
        prod = Client(ClientSettings(socket_path=Path("unused"), url=url, api_key=prod_key))
        dev = Client(ClientSettings(socket_path=Path("unused"), url=url, api_key=dev_key))
        try:
            prod_run = await (await Tasks(prod).trigger("env", {})).result(timeout_s=20)
            assert prod_run == {"env": "prod", "greeting": None}
            (prod_id,) = [r.id for r in (await Runs(prod).list()).data]
            assert (await Runs(dev).list()).data == []
            for action in (
                Runs(dev).retrieve,
                Runs(dev).cancel,
                Runs(dev).replay,
                Runs(dev).logs,
                Runs(dev).poll,
            ):
                with pytest.raises(NotFound, match="does not exist"):
                    await action(prod_id)
            await EnvVars(prod).set("GREETING", "hello prod")
            assert (await EnvVars(dev).list()).data == []
            assert [v.name for v in (await EnvVars(prod).list()).data] == ["GREETING"]
            async with httpx.AsyncClient(base_url=url) as http:
                as_dev = {"authorization": f"Bearer {dev_key}"}
                envs = (await http.get("/api/v1/environments", headers=as_dev)).json()
                assert [e["name"] for e in envs["data"]] == ["dev"]
                versions = (await http.get("/api/v1/versions", headers=as_dev)).json()
                assert {v["env"] for v in versions["data"]} == {"dev"}
                schedules = (await http.get("/api/v1/schedules", headers=as_dev)).json()
                assert {s["env"] for s in schedules["data"]} == {"dev"}
                keys = await http.get("/api/v1/keys", headers=as_dev)
                assert keys.status_code == 403 and "Unix socket" in keys.json()["error"]
                made = await http.post("/api/v1/keys", json={"env": "prod"}, headers=as_dev)
                assert made.status_code == 403
                named = {**as_dev, "x-ember-env": "prod"}
                assert (await http.get("/api/v1/runs", headers=named)).status_code == 403
            # Over the Unix socket the owner manages keys: revoke the prod key.
            async with httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(h.config.api_socket)),
                base_url="http://ember",
            ) as owner:
                listed = (await owner.get("/api/v1/keys?env=prod")).json()["data"]
                (key_id,) = [k["id"] for k in listed if k["name"] == "ci"]
                revoked = await owner.post(f"/api/v1/keys/{key_id}/revoke")
                assert revoked.status_code == 200 and revoked.json()["data"][0]["revoked_at"]
            async with httpx.AsyncClient(base_url=url) as http:
                as_prod = {"authorization": f"Bearer {prod_key}"}
                refused = await http.get("/api/v1/runs", headers=as_prod)
                assert refused.status_code == 401
        finally:
            for client in (prod, dev):
                await client.aclose()


async def test_variables_reach_run_processes_of_their_environment(harness: Harness) -> None:
    await harness.register(PROJECT)
    await harness.register(PROJECT, env="staging")
    variables = EnvVars(harness.client)
    assert (await harness.run("env", {})).output_as()["greeting"] is None
    await variables.set("GREETING", "hello")
    assert (await harness.run("env", {})).output_as() == {"env": "dev", "greeting": "hello"}
    await variables.set("GREETING", "hello again")  # new values reach the next run
    assert (await harness.run("env", {})).output_as()["greeting"] == "hello again"
    # The project's .env (sent by `ember dev`) wins over `ember env set`.
    await variables.upload({"GREETING": "from .env", "OTHER": "x"}, source="dotenv")
    assert (await harness.run("env", {})).output_as()["greeting"] == "from .env"
    listed = (await variables.list()).data
    assert [(v.name, v.source, v.value) for v in listed] == [
        ("GREETING", "dotenv", None),
        ("GREETING", "user", None),
        ("OTHER", "dotenv", None),
    ]
    shown = (await variables.list(show_values=True)).data
    assert {v.value for v in shown} == {"from .env", "hello again", "x"}
    await variables.upload({}, source="dotenv")  # .env emptied
    await variables.delete("GREETING")
    assert (await harness.run("env", {})).output_as()["greeting"] is None
    staging = Client(ClientSettings(socket_path=harness.config.api_socket, env="staging"))
    assert (await (await Tasks(staging).trigger("env", {})).result(20))["env"] == "staging"
    await staging.aclose()


async def test_bad_names_are_refused(harness: Harness) -> None:
    variables = EnvVars(harness.client)
    with pytest.raises(BadRequest, match="reserved for Ember"):
        await variables.set("EMBER_SOCKET", "/tmp/x")
    with pytest.raises(BadRequest, match="not a variable name"):
        await variables.set("1ABC", "x")
    with pytest.raises(NotFound, match="not set"):
        await variables.delete("MISSING")
    wrong = Client(ClientSettings(socket_path=harness.config.api_socket, env="production"))
    with pytest.raises(BadRequest, match="not one of dev, staging, prod or preview"):
        await Runs(wrong).list()
    await wrong.aclose()
    preview = Client(ClientSettings(socket_path=harness.config.api_socket, env="preview/feat-1"))
    assert (await Runs(preview).list()).data == []
    await preview.aclose()
