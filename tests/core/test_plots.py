"""Report figures: one headless pyplot, a save that replaces the file whole or not at all, PNG bytes."""
from __future__ import annotations

import pytest

from prunekit.core.plots import figure_png, pyplot, save_figure

PNG = b"\x89PNG\r\n\x1a\n"


def test_save_figure_replaces_the_file_whole_or_not_at_all(tmp_path):
    import matplotlib
    plt = pyplot()
    assert matplotlib.get_backend().lower() == "agg" and pyplot() is plt
    path = tmp_path / "plot.png"
    path.write_bytes(b"the previous plot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, path) == path and path.read_bytes().startswith(PNG)
    assert not plt.fignum_exists(fig.number) and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    written = path.read_bytes()

    broken, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])

    def half_then_fail(target, **kw):   # the disk fills up mid-write
        target.write_bytes(PNG + b"half")
        raise OSError("disk full")
    broken.savefig = half_then_fail
    with pytest.raises(OSError, match="disk full"):
        save_figure(broken, path)
    assert path.read_bytes() == written and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert not plt.fignum_exists(broken.number)


def test_figure_png_is_png_bytes():
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.bar([0, 1], [2, 3])
    assert figure_png(fig).startswith(PNG) and not plt.fignum_exists(fig.number)
