"""What every benchmark script does with its output: print it, keep it, save it for --out.

Scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path and they import
it as `_report`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class Report:
    """Prints lines as they come and keeps them, so the same text can be saved."""

    def __init__(self, out: str | Path | None = None) -> None:
        self.lines: list[str] = []
        self.out = out

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        """Right-aligned columns, two spaces apart, a dashed rule under the header."""
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        for row in [header, ["-" * w for w in widths], *rows]:
            self("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))

    def save(self, out: str | Path | None = None) -> None:
        path = out or self.out
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("\n".join(self.lines) + "\n")


def publish(lines: Iterable[str], out: str | Path | None) -> None:
    """Print a finished report and save it to `out`."""
    report = Report(out)
    for line in lines:
        report(line)
    report.save()
