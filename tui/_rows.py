"""RunRows: the runs the table has loaded, newest first, kept current by events.

The table never holds the whole store: it holds the pages loaded so far (the daemon lists
newest first with the run id as cursor) and the runs that arrived by event since. Run ids
are ULIDs, so sorting by id is sorting by creation time, and a run's place is found by
binary search rather than by scanning.

Two orders are kept: ``loaded`` (every run the daemon's filters let through) and ``shown``
(those that also pass the client-side search words); without search words they are the same
list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ember._types import RunSummary


def _position(ids: Sequence[str], run_id: str) -> int:
    """Where ``run_id`` belongs in a list sorted by id descending (binary search)."""
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high) // 2
        if ids[middle] > run_id:
            low = middle + 1
        else:
            high = middle
    return low


def _place(ids: list[str], run_id: str) -> None:
    """Put an id in its place: at the end for the next page's runs, which is the usual case."""
    if not ids or run_id < ids[-1]:
        ids.append(run_id)
    else:
        ids.insert(_position(ids, run_id), run_id)


class RunRows:
    """Loaded runs, in the order the table shows them.

    Args:
        search: the client-side filter on top of the daemon's; None shows every loaded run.
    """

    def __init__(self, search: Callable[[RunSummary], bool] | None = None) -> None:
        self.runs: dict[str, RunSummary] = {}
        self.loaded: list[str] = []
        self.next_cursor: str | None = None
        self.exhausted = False
        self._search = search
        self._shown: list[str] | None = [] if search is not None else None

    def set_search(self, search: Callable[[RunSummary], bool] | None) -> None:
        """Change the client-side filter; the loaded runs stay."""
        self._search = search
        if search is None:
            self._shown = None
        else:
            self._shown = [i for i in self.loaded if search(self.runs[i])]

    @property
    def shown(self) -> list[str]:
        """Ids of the rows on screen, top to bottom."""
        return self.loaded if self._shown is None else self._shown

    def __len__(self) -> int:
        return len(self.shown)

    def __getitem__(self, row: int) -> RunSummary:
        return self.runs[self.shown[row]]

    def row_of(self, run_id: str) -> int | None:
        """The row showing a run, or None."""
        shown = self.shown
        row = _position(shown, run_id)
        return row if row < len(shown) and shown[row] == run_id else None

    def add_page(self, page: Sequence[RunSummary], next_cursor: str | None) -> int:
        """Append a page of older runs; returns how many rows became visible."""
        before = len(self.shown)
        for run in page:
            if run.id in self.runs:
                self._update(run)
                continue
            self.runs[run.id] = run
            _place(self.loaded, run.id)
            if self._shown is not None and self._search is not None and self._search(run):
                _place(self._shown, run.id)
        self.next_cursor = next_cursor
        self.exhausted = next_cursor is None
        return len(self.shown) - before

    def apply(self, run: RunSummary, matches: bool) -> tuple[str, int | None]:
        """Take a run change from the event stream.

        Args:
            run: the run as it is now.
            matches: whether it passes the daemon's filters (for runs not loaded yet).

        Returns:
            ``("updated", row)``, ``("inserted", row)`` or ``("ignored", None)``; the row is
            None when the run changed but is hidden by the search.
        """
        if run.id in self.runs:
            if not self._update(run):
                return "ignored", None
            return "updated", self.row_of(run.id)
        if not matches:
            return "ignored", None
        # An older run not loaded yet arrives with its page; only place runs inside the
        # loaded range (or anywhere once every page is loaded).
        if self.loaded and run.id < self.loaded[-1] and not self.exhausted:
            return "ignored", None
        self.runs[run.id] = run
        self.loaded.insert(_position(self.loaded, run.id), run.id)
        if self._shown is None:
            return "inserted", self.row_of(run.id)
        if self._search is not None and self._search(run):
            row = _position(self._shown, run.id)
            self._shown.insert(row, run.id)
            return "inserted", row
        return "inserted", None

    def _update(self, run: RunSummary) -> bool:
        old = self.runs[run.id]
        # Events and pages can cross: never let an older view of a run replace a newer one,
        # and never bring a final run back to life.
        if run.updated_at < old.updated_at or (old.status.is_final and not run.status.is_final):
            return False
        self.runs[run.id] = run
        return True
