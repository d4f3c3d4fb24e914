"""Whether CRIU checkpoints work here: the binary to trust, its version, and a real smoke test.

:func:`detect` runs when the daemon starts: it finds criu (refusing one that others could
replace while the daemon runs it as root), checks its version against the kernel, and dumps
and restores a Python process started the way run processes are. The verdict is cached in the
state directory per binary, kernel, Python and Ember, so a restart does not test again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ember
from ember.daemon.config import DaemonConfig
from ember.daemon.procs.checkpoint.criu import dump_args, restore_args, run_sync


@dataclass(frozen=True, slots=True)
class CriuSupport:
    """Whether checkpoints work here, and why (or why not)."""

    ok: bool
    reason: str
    binary: str | None = None
    version: str | None = None
    dump_ms: float | None = None
    restore_ms: float | None = None
    # What `criu check` took: most of it is kernel-feature detection when criu has no cache.
    check_ms: float | None = None


def _find_binary(config: DaemonConfig) -> tuple[str | None, str]:
    """The criu binary to run: ``criu_path`` from the config, else the daemon's PATH.

    Nothing else names it (not the smoke-test cache, not a file anyone can write): the
    daemon runs it as root. Returns (the binary or None, why it was refused or not found).
    """
    candidates = [config.criu_path] if config.criu_path else _search_path()
    refused = ""
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        distrust = _untrusted(candidate)
        if distrust is None:
            return os.path.realpath(candidate), ""
        refused = distrust
    if refused:
        return None, refused
    return None, "no criu binary on PATH (CRIU >= 4.2 is needed on kernels >= 6.16)"


def _search_path() -> list[str]:
    folders = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/sbin", "/usr/sbin"]
    return [os.path.join(folder, "criu") for folder in folders if os.path.isabs(folder)]


def _untrusted(binary: str) -> str | None:
    """Why a root daemon must not run this file (None: it may).

    As root, the binary and every folder above it must belong to root and be writable by
    nobody else, or whoever can write there chooses what runs as uid 0.
    """
    if os.geteuid() != 0:
        return None  # an unprivileged daemon runs it as the user who could replace it anyway
    path = Path(os.path.realpath(binary))
    for part in (path, *path.parents):
        info = part.stat()
        if info.st_uid != 0 or info.st_mode & 0o022:
            return (
                f"refusing {binary}: {part} is "
                + ("not owned by root" if info.st_uid != 0 else "writable by group or others")
                + " and the daemon runs criu as root; install criu root-owned (e.g. in"
                " /usr/local/sbin, mode 0755) or point criu_path at such a copy"
            )
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# SIGUSR1 stays blocked and is taken with sigwait: a handler plus pause() lost the signal
# when it came before the restored process was back in pause() (half the smoke tests).
_SMOKE_WORKER = r"""
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
counter = 41
sys.stdout.write("parked\n"); sys.stdout.flush()
signal.sigwait({signal.SIGUSR1})
sys.stdout.write(f"counter {counter + 1}\n"); sys.stdout.flush()
"""


def _smoke_test(binary: str, work: Path) -> tuple[float, float]:
    """Dump and restore a Python process started the way run processes are.

    Raises:
        RuntimeError: a step failed; the message says which and quotes CRIU.
    """
    log_path = work / "out.log"
    images = work / "img"
    images.mkdir(mode=0o700)
    python = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.unshare(0x20000000) == 0, 'unshare failed'\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        f"    exec({_SMOKE_WORKER!r})\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    with open(log_path, "ab") as out:
        parent = subprocess.Popen(
            [sys.executable, "-c", python],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    try:
        deadline = time.monotonic() + 10
        while b"parked" not in log_path.read_bytes():
            if time.monotonic() > deadline or parent.poll() is not None:
                raise RuntimeError("the smoke-test process did not start")
            time.sleep(0.01)
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        target = int(children[0])
        start = time.perf_counter()
        run_sync(
            binary,
            dump_args(target, images),
            images,
            "dump.log",
        )
        dump_ms = (time.perf_counter() - start) * 1000
        parent.wait(10)
        start = time.perf_counter()
        run_sync(
            binary,
            restore_args(images),
            images,
            "restore.log",
        )
        restore_ms = (time.perf_counter() - start) * 1000
        restored = int((images / "pidfile").read_text().strip())
        os.kill(restored, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while b"counter 42" not in log_path.read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError("the restored process did not continue after SIGUSR1")
            time.sleep(0.01)
        os.waitpid(restored, 0)
        return dump_ms, restore_ms
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


CACHE_FILE = "criu-check.json"


def detect(config: DaemonConfig) -> CriuSupport:
    """Decide whether CRIU checkpoints work here: version, privileges, and a real smoke test.

    The smoke-test result is cached in the state directory (0600) per (criu binary, its
    size and mtime, version, kernel, Python, Ember). The cache only says whether the test
    passed: the binary always comes from :func:`_find_binary`.
    """
    if sys.platform != "linux":
        return CriuSupport(False, f"CRIU needs Linux (this is {sys.platform})")
    binary, refused = _find_binary(config)
    if binary is None:
        return CriuSupport(False, refused)
    try:
        version_text = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CriuSupport(False, f"{binary} --version failed: {exc}", binary)
    match = re.search(r"Version:\s*([\d.]+)", version_text)
    version = match.group(1) if match else "unknown"
    kernel = platform.release()
    needed = (4, 2) if _version_tuple(kernel) >= (6, 16) else (4, 0)
    if _version_tuple(version) < needed:
        return CriuSupport(
            False,
            f"criu {version} at {binary} is too old for kernel {kernel}: "
            f"{'.'.join(map(str, needed))} or newer is needed",
            binary,
            version,
        )
    if os.geteuid() != 0:
        return CriuSupport(
            False, "checkpoints need root (or CAP_CHECKPOINT_RESTORE)", binary, version
        )
    info = os.stat(binary)
    key = (
        f"{binary}|{info.st_size}|{info.st_mtime_ns}|{version}|{kernel}|"
        f"{sys.version.split()[0]}|{ember.__version__}"
    )
    cache = config.state_dir / CACHE_FILE
    cached = _read_cache(cache, key)
    if cached is not None:
        return dataclasses.replace(cached, binary=binary, version=version)
    support = _check(binary, version)
    _write_cache(cache, key, support)
    return support


def _check(binary: str, version: str) -> CriuSupport:
    started = time.perf_counter()
    check = subprocess.run([binary, "check"], capture_output=True, text=True, timeout=30)
    check_ms = round((time.perf_counter() - started) * 1000, 1)
    if check.returncode != 0:
        return CriuSupport(
            False, f"criu check failed: {check.stderr.strip()[-300:]}", binary, version
        )
    with tempfile.TemporaryDirectory(prefix="ember-criu-") as work:
        try:
            dump_ms, restore_ms = _smoke_test(binary, Path(work))
        except (RuntimeError, OSError, subprocess.SubprocessError, IndexError) as exc:
            return CriuSupport(False, f"the CRIU smoke test failed: {exc}", binary, version)
    return CriuSupport(
        True,
        f"criu {version}: a real dump and restore worked",
        binary,
        version,
        round(dump_ms, 1),
        round(restore_ms, 1),
        check_ms,
    )


def _read_cache(cache: Path, key: str) -> CriuSupport | None:
    """A cached verdict, if the file is ours, private, and for this exact setup."""
    try:
        with open(cache, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                return None
            cached = json.loads(file.read())
        if cached["key"] != key:
            return None
        verdict = cached["support"]
        return CriuSupport(
            ok=bool(verdict["ok"]),
            reason=str(verdict["reason"]),
            dump_ms=verdict.get("dump_ms"),
            restore_ms=verdict.get("restore_ms"),
            check_ms=verdict.get("check_ms"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache: Path, key: str, support: CriuSupport) -> None:
    verdict = {
        "ok": support.ok,
        "reason": support.reason,
        "dump_ms": support.dump_ms,
        "restore_ms": support.restore_ms,
        "check_ms": support.check_ms,
    }
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as file:
            json.dump({"key": key, "support": verdict}, file)
        os.replace(staging, cache)
