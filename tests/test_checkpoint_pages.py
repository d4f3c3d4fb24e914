"""Small CRIU images: pages read from a zygote's shared base by address, the rest zstd-compressed.

The codec is checked on real files everywhere, against a reader that resolves an image's pages
as criu restore does (its own pages in order, ``PE_PARENT`` ones from the parent folder at the
same address); the end-to-end test needs a working CRIU and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from conftest import eventually, running_daemon
from test_checkpoint import TASKS

from ember import Runs, Tasks
from ember.daemon import DaemonConfig
from ember.daemon.procs.checkpoint.pagemap import (
    PE_PARENT,
    PE_PRESENT,
    Entry,
    Pagemap,
    read_pagemap,
    write_pagemap,
)
from ember.daemon.procs.checkpoint.pages import (
    CHUNK_PAGES,
    OLD_DELTA_FILE,
    PACKED,
    PAGE,
    make_base,
    pack,
    page_files,
    unpack,
)
from ember.daemon.procs.checkpoint.support import detect

with tempfile.TemporaryDirectory() as _state:
    SUPPORT = detect(DaemonConfig(state_dir=Path(_state)))

LAZY = 1 << 1

# The head and first two entries of a pagemap criu 4.2 wrote for the bench's task.
CRIU_PAGEMAP = bytes.fromhex(
    "1943565425400856020000000801"
    "0e0000000880a0adc8fbbe15100020042801"
    "0e0000000880e0adc8fbbe15100020042802"
)


def _image(folder: Path, memory: dict[int, bytes], process: int = 1, pages_id: int = 1) -> None:
    """Write ``memory`` (address → page) as criu would: one present entry per run of pages."""
    folder.mkdir(exist_ok=True)
    entries: list[Entry] = []
    for vaddr in sorted(memory):
        last = entries[-1] if entries else None
        if last and last.vaddr + last.pages * PAGE == vaddr:
            entries[-1] = Entry(last.vaddr, last.pages + 1, last.flags)
        else:
            entries.append(Entry(vaddr, 1, PE_PRESENT | LAZY))
    write_pagemap(folder / f"pagemap-{process}.img", Pagemap(pages_id, entries))
    (folder / f"pages-{pages_id}.img").write_bytes(b"".join(memory[v] for v in sorted(memory)))


def _restored(images: Path, process: int = 1) -> dict[int, bytes]:
    """An image's memory as criu restore reads it."""
    pagemap = read_pagemap(images / f"pagemap-{process}.img")
    own = images / f"pages-{pagemap.pages_id}.img"
    data = own.read_bytes() if own.exists() else b""
    memory: dict[int, bytes] = {}
    parent: dict[int, bytes] | None = None
    at = 0
    for entry in pagemap.entries:
        for vaddr in range(entry.vaddr, entry.vaddr + entry.pages * PAGE, PAGE):
            if entry.flags & PE_PARENT:
                parent = parent if parent is not None else _restored(images / "parent", process)
                memory[vaddr] = parent[vaddr]
            else:
                memory[vaddr] = data[at : at + PAGE]
                at += PAGE
    assert at == len(data), "every page of the page file is read"
    return memory


def _fill(byte: bytes) -> bytes:
    return byte * PAGE


def test_a_pagemap_criu_wrote_reads_and_writes_back_byte_for_byte(tmp_path: Path) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(CRIU_PAGEMAP)
    pagemap = read_pagemap(tmp_path / "pagemap-1.img")
    assert pagemap.pages_id == 1
    assert [(e.pages, e.flags) for e in pagemap.entries] == [(1, PE_PRESENT), (2, PE_PRESENT)]
    assert pagemap.entries[1].vaddr - pagemap.entries[0].vaddr == 2 * PAGE
    write_pagemap(tmp_path / "again.img", pagemap)
    assert (tmp_path / "again.img").read_bytes() == CRIU_PAGEMAP


@pytest.mark.parametrize("cut", [0, 4, 9, len(CRIU_PAGEMAP) - 1])
def test_a_damaged_pagemap_is_refused_with_its_name(tmp_path: Path, cut: int) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(CRIU_PAGEMAP[:cut])
    with pytest.raises(ValueError, match=r"pagemap-1\.img"):
        read_pagemap(tmp_path / "pagemap-1.img")


def test_pages_equal_to_the_bases_at_their_address_are_read_from_it(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    zygote = {0x10000 + i * PAGE: _fill(bytes([65 + i])) for i in range(4)}
    zygote |= {0x80000 + i * PAGE: os.urandom(PAGE) for i in range(3)}
    _image(first, zygote)
    base = make_base(first, tmp_path / "bases")
    # A fork later: one page changed, two more after the base's, one page the base holds
    # elsewhere (not at this address: literal), a child process the base has no pagemap of.
    memory = dict(zygote)
    memory[0x11000] = os.urandom(PAGE)
    memory |= {0x14000: _fill(b"y"), 0x15000: zygote[0x80000]}
    child = {0x30000: _fill(b"c"), 0x31000: os.urandom(PAGE)}
    _image(second, memory)
    _image(second, child, process=2, pages_id=2)
    packed = pack(second, base)
    assert packed.literal_pages == 3 + 2
    assert packed.raw_bytes == (len(memory) + len(child)) * PAGE
    assert page_files(second) == [], "criu's page files give way to the packed ones"
    assert packed.packed_bytes < 4 * PAGE
    written = unpack(second, base.folder)
    assert {p.name for p in written} == {"pages-1.img", "pages-2.img", "parent"}
    assert _restored(second) == memory
    assert _restored(second, process=2) == child
    entries = read_pagemap(second / "pagemap-1.img").entries
    assert [(hex(e.vaddr), e.pages, e.flags & PE_PARENT) for e in entries] == [
        ("0x10000", 1, PE_PARENT),
        ("0x11000", 1, 0),
        ("0x12000", 2, PE_PARENT),
        ("0x14000", 2, 0),
        ("0x80000", 3, PE_PARENT),
    ]
    # The base's own image is all references to it.
    assert pack(first, base).literal_pages == 0
    unpack(first, base.folder)
    assert _restored(first) == zygote


def test_unpacking_never_writes_through_to_the_base(tmp_path: Path) -> None:
    # The first image's page file is a link to the base's; a daemon killed after packing and
    # before removing it leaves it there, and writing the literal pages back must replace it.
    first = tmp_path / "first"
    zygote = {0x10000 + i * PAGE: os.urandom(PAGE) for i in range(3)}
    _image(first, zygote)
    base = make_base(first, tmp_path / "bases")
    kept = (base.folder / "pages-1.img").read_bytes()
    pack(first, base)
    os.link(base.folder / "pages-1.img", first / "pages-1.img")
    for _ in range(2):
        unpack(first, base.folder)
        assert _restored(first) == zygote
    assert (base.folder / "pages-1.img").read_bytes() == kept


def test_long_runs_of_shared_pages_are_compared_a_chunk_at_a_time(tmp_path: Path) -> None:
    count = 3 * CHUNK_PAGES + 5
    zygote = {0x400000 + i * PAGE: os.urandom(PAGE) for i in range(count)}
    first, same, changed = tmp_path / "f", tmp_path / "s", tmp_path / "c"
    _image(first, zygote)
    base = make_base(first, tmp_path / "bases")
    _image(same, zygote)
    assert pack(same, base).literal_pages == 0
    assert [e.pages for e in read_pagemap(same / PACKED / "pagemap-1.img").entries] == [count]
    one_new = dict(zygote)
    one_new[0x400000 + 300 * PAGE] = os.urandom(PAGE)
    _image(changed, one_new)
    assert pack(changed, base).literal_pages == 1
    unpack(changed, base.folder)
    assert _restored(changed) == one_new
    assert [e.pages for e in read_pagemap(changed / "pagemap-1.img").entries] == [
        300,
        1,
        count - 301,
    ]


def test_an_image_whose_base_is_gone_is_refused_with_the_reason(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _image(images, {0x1000: _fill(b"a")})
    base = make_base(images, tmp_path / "bases")
    pack(images, base)
    for file in base.folder.iterdir():
        file.unlink()
    base.folder.rmdir()
    with pytest.raises(ValueError, match=r"shared base .* missing"):
        unpack(images, base.folder)


def test_a_page_file_shorter_than_its_pagemap_leaves_the_image_as_criu_wrote_it(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    _image(images, {0x1000: _fill(b"a"), 0x2000: _fill(b"b")})
    base = make_base(tmp_path / "images", tmp_path / "bases")
    with open(images / "pages-1.img", "r+b") as pages:
        pages.truncate(PAGE)
    with pytest.raises(ValueError, match="shorter than its pagemap"):
        pack(images, base)
    assert not (images / PACKED).exists()
    assert unpack(images, base.folder) == [], "an image never packed is criu's as it is"
    assert (images / "pages-1.img").stat().st_size == PAGE


def test_an_image_an_earlier_ember_packed_is_refused_so_the_run_replays(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / OLD_DELTA_FILE).write_bytes(b"EMBRPGD1")
    with pytest.raises(ValueError, match="earlier Ember"):
        unpack(images, None)


@pytest.mark.criu
@pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}")
async def test_a_compressed_image_restores_with_its_memory(state_dir: Path) -> None:
    async with running_daemon(state_dir, checkpoint="criu", wait_park_threshold_s=0.5) as h:
        assert (await h.register(TASKS)).status == "READY"
        tasks, runs = Tasks(h.client), Runs(h.client)
        handles = [await tasks.trigger("remember", {"s": 4}) for _ in range(2)]
        root = state_dir / "checkpoints"
        await eventually(
            lambda: all((root / x.id / "meta.json").exists() for x in handles), timeout_s=30
        )
        bases = list((state_dir / "checkpoint-bases").iterdir())
        assert len(bases) == 1, "both processes come from one zygote: one base holds its pages"
        for handle in handles:
            images = root / handle.id
            meta = json.loads((images / "meta.json").read_text())
            assert page_files(images) == [] and (images / PACKED).is_dir()
            assert meta["bytes"] * 10 < meta["raw_page_bytes"], meta
        for handle in handles:
            done = await h.wait(handle.id)
            output = done.output_as()
            lines = (await runs.logs(handle.id)).data
            assert output["secret"] == float(lines[0].attrs["secret"])
            assert output["count"] == 1000
            assert any("not shared, packed in" in s.description for s in done.snapshots)
        await eventually(lambda: not any((state_dir / "checkpoint-bases").iterdir()))
        assert not any(root.iterdir())
