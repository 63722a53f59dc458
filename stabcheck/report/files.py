"""Writing report files atomically: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from stabcheck.errors import UsageError

if TYPE_CHECKING:
    from stabcheck.report.model import Report


def write_reports(
    report: Report,
    *,
    json: str | Path | None = None,
    html: str | Path | None = None,
    junit: str | Path | None = None,
    markdown: str | Path | None = None,
    csv: str | Path | None = None,
    json_to_stdout: bool = False,
) -> None:
    """Render every requested report first, then write each atomically, so a failed render writes nothing."""
    from stabcheck.report.html import render_html
    from stabcheck.report.json import render_json
    from stabcheck.report.junit import render_junit
    from stabcheck.report.markdown import render_markdown
    from stabcheck.report.table import render_csv

    rendered: list[tuple[Path | None, str]] = []
    if json_to_stdout:
        rendered.append((None, render_json(report)))
    for path, render in ((json, render_json), (html, render_html), (junit, render_junit), (markdown, render_markdown), (csv, render_csv)):
        if path is not None:
            rendered.append((Path(path), render(report)))
    for path, _ in rendered:
        if path is not None and path.is_dir():
            raise UsageError(f"cannot write report to {path}: it is a directory. Pass a file path.")
    for path, text in rendered:
        if path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            atomic_write_text(path, text)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist. Create it first.")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        # mkstemp creates the file readable by its owner only; give reports the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
