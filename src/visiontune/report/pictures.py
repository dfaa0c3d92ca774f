"""Picture grids for the report sections tasks add (report/sections.py): one row per validation image, one column
per view (ground truth, before, after). Panels are uint8 arrays [H, W, 3]; no torch here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save_grid(rows: Sequence[Sequence[Any]], titles: Sequence[str], out: Path, cell: float = 3.0) -> Path:
    """`rows` of panels (each an array [H, W, 3]) drawn as a grid with `titles` over the first row, saved to `out`."""
    import matplotlib

    matplotlib.use("Agg")  # reports are written on headless machines
    import matplotlib.pyplot as plt

    columns = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(cell * columns, cell * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            axes[r][c].set_axis_off()
            if c < len(row):
                axes[r][c].imshow(row[c])
            if r == 0 and c < len(titles):
                axes[r][c].set_title(titles[c])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
