"""Small CRIU images: page deltas against a zygote's shared base, zstd-compressed.

The codec is checked on real files everywhere; the end-to-end test needs a working CRIU and
is skipped with the reason elsewhere.
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
from ember.daemon.procs.checkpoint.pages import (
    CHUNK_PAGES,
    DELTA_FILE,
    PAGE,
    make_base,
    pack,
    page_files,
    unpack,
)
from ember.daemon.procs.checkpoint.support import detect

with tempfile.TemporaryDirectory() as _state:
    SUPPORT = detect(DaemonConfig(state_dir=Path(_state)))


def _pages(*fills: bytes) -> bytes:
    return b"".join(fill * (PAGE // len(fill)) for fill in fills)


def test_a_delta_writes_back_every_page_shared_or_not(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "pages-1.img").write_bytes(_pages(b"a", b"b", b"c", b"d"))
    base = make_base(first, tmp_path / "bases")
    # Shared pages out of order and repeated, new ones (one incompressible), two files.
    noise = os.urandom(PAGE)
    expected = {
        "pages-1.img": _pages(b"c", b"d", b"x", b"a") + noise + _pages(b"a"),
        "pages-2.img": _pages(b"b", b"y"),
    }
    for name, data in expected.items():
        (second / name).write_bytes(data)
    packed = pack(second, base)
    assert packed.literal_pages == 3
    assert packed.raw_bytes == 8 * PAGE
    assert page_files(second) == [], "the page files give way to the delta"
    assert (second / DELTA_FILE).stat().st_size < 2 * PAGE
    written = unpack(second, base.file)
    assert {p.name: p.read_bytes() for p in written} == expected
    # The base's own image is all references to it.
    assert pack(first, base).literal_pages == 0
    assert unpack(first, base.file)[0].read_bytes() == _pages(b"a", b"b", b"c", b"d")


def test_pages_in_the_bases_order_are_matched_in_place_without_hashing(tmp_path: Path) -> None:
    # Over two chunks of distinct pages, as a zygote's fork holds them.
    shared = [os.urandom(PAGE) for _ in range(3 * CHUNK_PAGES + 5)]
    first, same, changed, shifted = (tmp_path / name for name in ("f", "s", "c", "sh"))
    for folder in (first, same, changed, shifted):
        folder.mkdir()
    (first / "pages-1.img").write_bytes(b"".join(shared))
    base = make_base(first, tmp_path / "bases")
    (same / "pages-1.img").write_bytes(b"".join(shared))
    assert pack(same, base).literal_pages == 0
    assert base.index is None, "pages where the base has them need no digest index"
    one_new = [*shared[:300], os.urandom(PAGE), *shared[301:]]
    (changed / "pages-1.img").write_bytes(b"".join(one_new))
    # One page more at the front: every page is one later than in the base.
    later = [os.urandom(PAGE), *shared]
    (shifted / "pages-1.img").write_bytes(b"".join(later))
    assert pack(changed, base).literal_pages == 1
    assert pack(shifted, base).literal_pages == 1
    assert unpack(same, base.file)[0].read_bytes() == b"".join(shared)
    assert unpack(changed, base.file)[0].read_bytes() == b"".join(one_new)
    assert unpack(shifted, base.file)[0].read_bytes() == b"".join(later)


def test_a_delta_whose_base_is_gone_is_refused_with_the_reason(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(_pages(b"a"))
    base = make_base(images, tmp_path / "bases")
    pack(images, base)
    base.file.unlink()
    with pytest.raises(ValueError, match=r"shared base .* missing"):
        unpack(images, base.file)


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
            assert page_files(images) == [] and (images / DELTA_FILE).exists()
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
