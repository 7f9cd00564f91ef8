"""Plain-text tables for the terminal and for Markdown (docs/PERFORMANCE.md pastes them)."""

from __future__ import annotations


def fmt(value: float | int | str | bool | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return value


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def load(before_after: tuple[float, float]) -> str:
    return f"{before_after[0]:.1f}→{before_after[1]:.1f}"


def render(headers: list[str], rows: list[list[str]], *, markdown: bool = False, text_columns: int = 1) -> str:
    """The first `text_columns` columns are left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = [c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(padded)

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
