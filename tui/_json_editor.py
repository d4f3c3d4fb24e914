"""JsonEditor: a TextArea for JSON that highlights with Pygments and says what is wrong.

Textual highlights TextArea text with tree-sitter, an optional extra that Ember does not
depend on; this editor feeds the same highlight map from Pygments' JSON lexer instead (it is
a private hook of TextArea: if a Textual release drops it, the editor stays a plain one).
"""

from __future__ import annotations

from typing import Any

import msgspec
from pygments.lexers.data import JsonLexer  # type: ignore[import-untyped]
from pygments.token import (  # type: ignore[import-untyped]
    Keyword,
    Name,
    Number,
    String,
    _TokenType,
)
from textual.widgets import TextArea

_lexer = JsonLexer()


def _highlight_name(token: _TokenType) -> str | None:
    if token in Name.Tag:
        return "json.label"
    if token in String:
        return "string"
    if token in Number:
        return "number"
    if token in Keyword.Constant:
        return "boolean"
    return None


class JsonEditor(TextArea):
    """Edit a JSON document; :attr:`problem` says why the text is not JSON, if it is not."""

    def __init__(self, text: str = "{}", *, id: str | None = None) -> None:
        super().__init__(
            text, id=id, soft_wrap=False, show_line_numbers=True, tab_behavior="indent"
        )
        self.indent_width = 2

    @property
    def problem(self) -> str | None:
        """None for valid JSON, else the parser's complaint with line and column."""
        try:
            msgspec.json.decode(self.text.encode() or b"null")
        except msgspec.DecodeError as exc:
            return str(exc)
        return None

    def value(self) -> Any:
        """The document, decoded.

        Raises:
            msgspec.DecodeError: it is not valid JSON.
        """
        return msgspec.json.decode(self.text.encode() or b"null")

    def _build_highlight_map(self) -> None:
        highlights = getattr(self, "_highlights", None)
        cache = getattr(self, "_line_cache", None)
        if highlights is None or cache is None:
            super()._build_highlight_map()
            return
        cache.clear()
        highlights.clear()
        row = 0
        column = 0  # in bytes, as TextArea's highlight map counts
        for token, value in _lexer.get_tokens(self.text):
            name = _highlight_name(token)
            for index, piece in enumerate(value.split("\n")):
                if index:
                    row += 1
                    column = 0
                width = len(piece.encode())
                if name is not None and width:
                    highlights[row].append((column, column + width, name))
                column += width
