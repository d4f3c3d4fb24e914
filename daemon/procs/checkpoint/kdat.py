"""Whether criu can keep its kernel-feature cache, the file it reads instead of re-detecting.

Every criu command first detects what the kernel supports ("kerndat": test mappings,
sockets, namespaces), then saves it as ``/run/criu.kdat`` for the next command. criu keeps
that file only when ``/run`` is a tmpfs, so that a reboot (a new kernel) clears it
(criu/kerndat.c: "Can't keep kdat cache on non-tempfs"). On a systemd host ``/run`` is a
tmpfs; where it is not, each dump and restore pays for the detection again (measured on a
2-core VM with CRIU 4.2: a restore took 27 ms of criu CPU instead of 9, a dump 60 instead of
42).
"""

from __future__ import annotations

from pathlib import Path

# Where criu keeps the cache (its KDAT_RUNDIR, fixed when criu is built).
KDAT_DIR = "/run"


def filesystem_of(path: str, mountinfo: str) -> str | None:
    """The type of the filesystem ``path`` is on, from a ``/proc/<pid>/mountinfo`` text.

    The longest mount point above ``path`` wins; of mounts on the same point, the last
    listed (the one mounted on top). None if no line covers it.
    """
    found: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (found is None or len(point) >= found[0]):
            found = (len(point), line.split(" - ", 1)[1].split()[0])
    return found[1] if found else None


def kdat_cache_problem(check_ms: float | None) -> str | None:
    """Why criu cannot keep its kernel-feature cache here, and the fix (None: it can).

    Args:
        check_ms: what one ``criu check`` took here (the smoke test's), if known: most of it
            is that detection when there is no cache.
    """
    try:
        kind = filesystem_of(KDAT_DIR, Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None  # (no /proc to tell: nothing worth a warning)
    if kind is None or kind == "tmpfs":
        return None
    cost = f", ~{check_ms:.0f} ms (one `criu check` here)" if check_ms is not None else ""
    return (
        f"criu cannot keep its kernel-feature cache: {KDAT_DIR} is {kind}, not a tmpfs, so each "
        f"checkpoint and restore re-detects kernel features{cost}; mount a tmpfs on "
        f"{KDAT_DIR}, as systemd does"
    )
