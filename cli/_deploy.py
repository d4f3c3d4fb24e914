"""``ember deploy``, ``ember promote`` and ``ember versions``.

A deploy builds the project's snapshot, uploads it to the daemon (the local one, or a
remote one with ``--profile``), and follows the daemon's build (requirements into the
version's own virtual environment, then indexing the tasks) line by line until the version
is READY (and current, unless ``--skip-promotion``) or FAILED.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from ember._admin_types import BuildProgress, EnvironmentList
from ember._client import Call, Client
from ember._errors import EmberError
from ember._types import VersionInfo, VersionList
from ember.cli._common import JsonFlag, ProfileOption, fail, make_client, print_json, run_async
from ember.cli._project import Project, find_project, snapshot, snapshot_files
from ember.daemon.engine.environments import check_env_name

_POLL_S = 0.25


def say(text: str, colour: str | None = None) -> None:
    """Print one progress line."""
    typer.secho(f"○ {text}", fg=colour)


def size_text(size: int) -> str:
    """``12.3 KB``."""
    return f"{size / 1024:.1f} KB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.1f} MB"


def environment_name(env: str, branch: str | None, root: Path) -> str:
    """``staging``, ``prod`` or ``preview/<branch>`` (the git branch when none is given)."""
    if env == "dev":
        fail("`ember deploy` targets staging, prod or preview; `ember dev` makes dev versions")
    if env == "preview":
        branch = branch or _git_branch(root)
        if not branch:
            fail("--env preview needs --branch NAME (or a git checkout to take it from)")
        env = f"preview/{branch}"
    elif branch is not None:
        fail("--branch goes with --env preview")
    try:
        return check_env_name(env)
    except EmberError as exc:
        fail(str(exc))


def _git_branch(root: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--abbrev-ref", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    branch = result.stdout.strip()
    return branch if result.returncode == 0 and branch != "HEAD" else None


def _dry_run(project: Project, archive: bytes, env: str, where: str) -> Path:
    folder = project.root / ".ember" / "tmp" / f"deploy-{datetime.now():%Y%m%d-%H%M%S}"
    files = folder / "files"
    files.mkdir(parents=True)
    (folder / "snapshot.tar.gz").write_bytes(archive)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        tar.extractall(files, filter="data")
    typer.echo(f"Would ship {len(members)} files ({size_text(len(archive))} compressed):")
    for member in members:
        typer.echo(f"  {member.name:60} {size_text(member.size):>10}")
    has_requirements = any(m.name == "requirements.txt" for m in members)
    if has_requirements:
        typer.echo("  requirements.txt: installed into the version's own virtual environment")
    say(f"Dry run: nothing uploaded. It would go to {env} on {where}.")
    say(f"The build lies in {folder} (snapshot.tar.gz, and files/ unpacked)")
    return folder


def _dry_run_image(project: Project, files: Path, env: str, push: str | None) -> None:
    """Show the image's build context: its Dockerfile and what each part holds."""
    from ember.daemon.builds.base_image import base_tag
    from ember.daemon.builds.images import image_tag, project_name, version_context

    tag = image_tag(project_name(files), "<version>", env)
    context = version_context(files, None, tag)
    (files.parent / "Dockerfile").write_text(context.dockerfile)
    say(f"The image {tag} would be built FROM {base_tag()} (imported from this Python):")
    for line in context.dockerfile.splitlines():
        typer.echo(f"  │ {line}")
    parts: dict[str, list[int]] = {}
    for arcname, path in context.files:
        counts = parts.setdefault(arcname.split("/", 1)[0], [0, 0])
        counts[0] += 1
        counts[1] += path.stat().st_size
    described = {"code": "the version's code", "site": "Ember and its dependencies"}
    for part, (n, size) in parts.items():
        what = described.get(part, "")
        typer.echo(f"  {part + '/':8} {n:6} files {size_text(size):>10}  {what}")
    if any(m.name == "requirements.txt" for m in files.iterdir()):
        typer.echo("  venv/    the version's virtual environment, once the daemon installs it")
    if push is not None:
        typer.echo(f"  then pushed to {push}/{tag.split(':')[0]}")
    say(f"Its Dockerfile is {files.parent / 'Dockerfile'}")


async def _follow(client: Client, info: VersionInfo) -> VersionInfo:
    """Print the build's log as it grows; return the version once it is built."""
    line = 0
    while True:
        call = Call(
            "GET", f"/api/v1/versions/{info.id}/build", BuildProgress, params={"from": line}
        )
        progress = await client.request(call)
        for text in progress.lines:
            typer.echo(f"  │ {text}")
        line = progress.next_line
        if progress.version.status != "BUILDING":
            return progress.version
        await asyncio.sleep(_POLL_S)


async def _send_bundle(
    client: Client, project: Project, skip_promotion: bool, image_params: dict[str, str]
) -> VersionInfo:
    """Send the blobs the remote lacks (resuming a cut-off deploy), with a progress bar."""
    from ember.sync._bundle import plan_bundle, send_bundle

    plan = await plan_bundle(client, snapshot_files(project))
    held = plan.total_bytes - plan.to_send_bytes
    say(
        f"Sending {size_text(plan.to_send_bytes)} of {size_text(plan.total_bytes)} to "
        f"{client.settings.where} ({size_text(held)} already there)"
    )
    with typer.progressbar(length=max(plan.to_send_bytes, 1), label="  uploading") as bar:
        info = await send_bundle(
            client, plan, promote=not skip_promotion, progress=bar.update, image_params=image_params
        )
        bar.update(max(plan.to_send_bytes, 1) - bar.pos)
    return info


def deploy(
    env: Annotated[str, typer.Option("--env", "-e", help="staging, prod or preview.")] = "prod",
    branch: Annotated[
        str | None, typer.Option("--branch", "-b", help="Preview branch (default: git's).")
    ] = None,
    skip_promotion: Annotated[
        bool, typer.Option("--skip-promotion", help="Build it, but keep the current version.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would ship; upload nothing.")
    ] = False,
    project_dir: Annotated[Path, typer.Option("--project", "-p", help="Project folder.")] = Path(
        "."
    ),
    profile: ProfileOption = None,
    image: Annotated[
        bool | None,
        typer.Option(
            "--image/--no-image",
            help="Also build the version's Docker image ember/<project>:<version> "
            "(default: [tool.ember] image).",
        ),
    ] = None,
    push: Annotated[
        str | None,
        typer.Option("--push", metavar="REGISTRY", help="Push the image to this registry."),
    ] = None,
) -> None:
    """Build a version of the project, upload it, and make it current."""
    try:
        project = find_project(project_dir)
    except EmberError as exc:
        fail(str(exc))
    name = environment_name(env, branch, project.root)
    client = make_client(None if profile else name, profile)
    if profile is not None:
        name = client.settings.env  # the profile's key decides it
    say(f"Building the snapshot of {project.root}…")
    try:
        archive, count = snapshot(project)
    except EmberError as exc:
        fail(str(exc))
    say(f"Snapshot ready: {count} files, {size_text(len(archive))}")
    with_image = push is not None or (
        image if image is not None else bool(project.settings.get("image"))
    )
    if dry_run:
        folder = _dry_run(project, archive, name, client.settings.where)
        if with_image:
            _dry_run_image(project, folder / "files", name, push)
        return

    async def go() -> VersionInfo:
        started = time.monotonic()
        image_params = {"image": "true"} if with_image else {}
        if push is not None:
            image_params["push"] = push
        if profile is not None:
            info = await _send_bundle(client, project, skip_promotion, image_params)
        else:
            say(f"Uploading {size_text(len(archive))} to {client.settings.where} ({name})…")
            params = {"promote": "false" if skip_promotion else "true", "wait": "false"}
            params.update(image_params)
            call = Call(
                "POST", "/api/v1/versions", VersionInfo, body=archive, params=params, timeout_s=600
            )
            info = await client.request(call)
        say(f"Uploaded in {time.monotonic() - started:.1f}s")
        if info.status == "BUILDING":
            say(f"Building version {info.id} on the daemon…")
            info = await _follow(client, info)
        else:
            say(f"No changes since version {info.id}: nothing to build")
        await client.aclose()
        return info

    info: VersionInfo = run_async(go())
    if info.status == "FAILED":
        typer.secho(info.error or "", fg=typer.colors.RED, err=True)
        fail(f"version {info.id} failed to build; {name} keeps its current version")
    names = ", ".join(t.id for t in info.tasks) or "no tasks"
    if info.is_current:
        say(
            f"Deployed {info.id} to {name}, now current ({len(info.tasks)} tasks: {names})", "green"
        )
    else:
        say(f"Deployed {info.id} to {name} without promoting it ({len(info.tasks)} tasks)", "green")
        say(f"Make it current with `ember promote {info.id} --env {name}`")


def promote(
    version: Annotated[str, typer.Argument(help="The version, e.g. 20261121.3.")],
    env: Annotated[str, typer.Option("--env", "-e", help="Its environment.")] = "prod",
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Make a version current: new runs lock to it (runs executing finish on theirs)."""
    client = make_client(None if profile else env, profile)
    call = Call("POST", f"/api/v1/versions/{version}/promote", VersionInfo, body=b"")
    info: VersionInfo = run_async(client.request(call))
    if as_json:
        print_json(info)
    else:
        say(f"Version {info.id} is now current in {info.env}", "green")


def versions(
    env: Annotated[
        str | None, typer.Option("--env", "-e", help="One environment (default: all).")
    ] = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List versions by environment, the current one marked with *."""

    async def go() -> dict[str, list[VersionInfo]]:
        base = make_client(env, profile)
        names = [env] if env else []
        if not names:
            envs = Call("GET", "/api/v1/environments", EnvironmentList)
            names = [e.name for e in (await base.request(envs)).data if e.versions]
        found = {}
        for name in names:
            client = base if profile or env else make_client(name)
            listed = Call("GET", "/api/v1/versions", VersionList)
            found[name] = (await client.request(listed)).data
        return found

    listing: dict[str, list[VersionInfo]] = run_async(go())
    if as_json:
        print_json(listing)
        return
    if not any(listing.values()):
        typer.echo("no versions yet: `ember dev` or `ember deploy` makes one")
    for name, found in listing.items():
        typer.secho(name, bold=True)
        for info in found:
            mark = "*" if info.is_current else " "
            colour = {"FAILED": typer.colors.RED, "BUILDING": typer.colors.YELLOW}.get(info.status)
            status = typer.style(f"{info.status:8}", fg=colour)
            created = f"{info.created_at.astimezone():%Y-%m-%d %H:%M:%S}"
            tasks = f"{len(info.tasks)} tasks"
            typer.echo(f"  {mark} {info.id:14} {status} {created}  {tasks}")
