"""What every report's figures share (knockout, width-search, width and layer importance, the pipeline summary):
matplotlib on its headless backend, and a save that never leaves half a PNG behind."""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (set once per process): reports are drawn where no display exists, in
    Ray workers and on CI machines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay `fig` out and write it to `path` as PNG through a temp file beside it (a reader sees the old file or the
    whole new one), then close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def figure_png(fig, dpi: int = 100) -> bytes:
    """Lay `fig` out and return it as PNG bytes (for an output written whole, e.g. by write_atomically); close it."""
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return buf.getvalue()
