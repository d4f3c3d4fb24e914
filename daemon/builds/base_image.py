"""The base image of every version's image, made from the daemon's own Python.

No registry is reachable, so there is no ``FROM python``: ``ember/base:py<version>-<hash>``
is imported (``docker import``) from a root filesystem of the daemon's interpreter, its
standard library (tests, IDLE, Tk and the static library left out) and the shared libraries
that ``ldd`` finds for them and for the installed packages, at their host paths, as regular
files (a symlink such as /lib64/ld-linux... could point where the image has nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from docker import DockerClient

BASE_REPO = "ember/base"
# Parts of the standard library a task never imports, and the static libpython (~60 MB).
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}


def _interpreter() -> Path:
    return Path(sys.executable).resolve()


def _linked(paths: list[Path]) -> set[Path]:
    """The shared libraries these binaries load (the loader included), by ldd."""
    found: set[Path] = set()
    for chunk in range(0, len(paths), 200):
        batch = [str(p) for p in paths[chunk : chunk + 200]]
        result = subprocess.run(["ldd", *batch], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            for word in line.split():
                if word.startswith("/") and not word.endswith(":"):
                    found.add(Path(word))
    return found


def base_files() -> list[tuple[str, Path]]:
    """(path in the image, host file) of the base root filesystem."""
    interpreter = _interpreter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [interpreter]
    for path in sorted(stdlib.rglob("*")):
        parts = path.relative_to(stdlib).parts
        if parts and (parts[0] in _STDLIB_SKIP or parts[0].startswith("config-")):
            continue
        if path.is_file():
            files.append(path)
    binaries = [interpreter, *(p for p in files if p.suffix == ".so")]
    # The system libraries the daemon's packages link too (msgspec's libpthread, ...): a
    # version's image copies those packages (or their like from its own environment).
    for directory in {sysconfig.get_paths()["platlib"], sysconfig.get_paths()["purelib"]}:
        binaries += Path(directory).rglob("*.so")
    libs = set()
    for lib in _linked(binaries):
        libs.add(lib)
        libs.add(lib.resolve())
    return [(str(p).lstrip("/"), p) for p in [*files, *sorted(libs)]]


def base_tag() -> str:
    """The base image's reference: the interpreter's version and a hash of what it is."""
    interpreter = _interpreter()
    stat = interpreter.stat()
    digest = hashlib.sha256(f"{interpreter}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    version = "{}.{}.{}".format(*sys.version_info[:3])
    return f"{BASE_REPO}:py{version}-{digest.hexdigest()[:12]}"


def _write_base(out: Any) -> None:
    interpreter = _interpreter()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in ("tmp", "etc", "usr/bin", "dev", "proc", "sys"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for arcname, path in base_files():
            # Regular files at the paths the loader asks for: a symlink (/lib64/ld-linux...)
            # would point at a path the image may not have (Debian's merged /usr).
            info = tar.gettarinfo(path.resolve(), arcname)
            with open(path, "rb") as source:
                tar.addfile(info, source)
        for name, text in {
            "etc/passwd": "root:x:0:0::/root:/bin/false\n",
            "etc/group": "root:x:0:\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        # ``python3`` on PATH, for people who `docker run` the image by hand.
        link = tarfile.TarInfo("usr/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, str(interpreter)
        tar.addfile(link)


def ensure_base(client: DockerClient, say: Callable[[str], None]) -> str:
    """The base image's reference, imported from the host's Python if it is not there yet."""
    import docker

    tag = base_tag()
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    say(f"Making the base image {tag} from {_interpreter()} (no registry: docker import)")
    started = time.monotonic()
    with tempfile.TemporaryFile() as rootfs:
        _write_base(rootfs)
        rootfs.seek(0)
        repository, _, version = tag.partition(":")
        client.api.import_image_from_data(
            rootfs.read(), repository=repository, tag=version, changes=['CMD ["python3"]']
        )
    say(f"Base image ready in {time.monotonic() - started:.1f}s")
    return tag
