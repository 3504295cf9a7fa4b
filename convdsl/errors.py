"""Errors and warnings in the `file:line:col: error: message` form.

Every diagnostic carries a `Span` into the source text; `str()` prints the
message, the source line and a caret under the offending span, like a C
compiler does.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based."""

    filename: str
    line: int
    column: int
    end_line: int
    end_column: int  # exclusive
    source: str = ""  # the whole text of the file, for the caret display

    def __repr__(self) -> str:  # keep IR dumps short
        return f"{self.filename}:{self.line}:{self.column}"

    @property
    def location(self) -> str:
        return f"{self.filename}:{self.line}"

    def source_line(self) -> str:
        lines = self.source.splitlines()
        if 1 <= self.line <= len(lines):
            return lines[self.line - 1]
        return ""


def render_diagnostic(kind: str, message: str, span: Span | None) -> str:
    if span is None:
        return f"{kind}: {message}"
    head = f"{span.filename}:{span.line}:{span.column}: {kind}: {message}"
    text = span.source_line()
    if not text:
        return head
    start = max(span.column - 1, 0)
    if span.end_line == span.line and span.end_column > span.column:
        width = span.end_column - span.column
    else:
        width = max(len(text) - start, 1)
    # Keep tabs so the caret lines up under the same glyphs.
    lead = "".join(ch if ch == "\t" else " " for ch in text[:start])
    return f"{head}\n{text}\n{lead}^{'~' * max(width - 1, 0)}"


class ConvDSLError(Exception):
    """A user error in a .cdsl program, or a bad input at run time."""

    def __init__(self, message: str, span: Span | None = None):
        self.message = message
        self.span = span
        self.filename = span.filename if span else None
        self.line = span.line if span else None
        self.column = span.column if span else None
        super().__init__(message)

    def __str__(self) -> str:
        return render_diagnostic("error", self.message, self.span)


class ConvDSLInputError(ConvDSLError, ValueError):
    """A runtime input that does not match its declaration (shape, dtype, size)."""


class ConvDSLWarning(UserWarning):
    """A suspicious but legal program: an unused result, say."""

    def __init__(self, message: str, span: Span | None = None):
        self.message = message
        self.span = span
        super().__init__(render_diagnostic("warning", message, span))

    def __str__(self) -> str:
        return render_diagnostic("warning", self.message, self.span)
