"""Resumable runs: the heatmap and done-mask written as zarr to a checkpoint folder and
restored by a later run with the same parameters (:class:`Checkpoint`, :func:`run_key`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...io import jsonio

if TYPE_CHECKING:

    from ...io.slide import Slide

CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
class Checkpoint:
    """Heatmap + done-mask saved as zarr in a folder, with the parameters they belong to.

    ``params.json`` is written first; ``state.zarr`` holds ``probability`` (float32) and
    ``done`` (uint8). Rows are written probability first, done-mask second, and zarr
    writes each chunk atomically, so a crash never marks a cell done without its value.
    """

    def __init__(self, root: str | Path, key: dict[str, Any]):
        self.root = Path(root)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self._arrays = None

    @property
    def params_path(self) -> Path:
        return self.root / "params.json"

    def stored_key(self) -> dict[str, Any] | None:
        if not self.params_path.is_file():
            return None
        try:
            return json.loads(self.params_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def matches(self) -> bool:
        return self.stored_key() == self.key

    def load(self, grid_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The saved heatmap and done-mask, or ``None`` when there is nothing to resume."""
        import zarr

        self.damaged = 0
        if not self.matches() or not (self.root / "state.zarr").exists():
            return None
        try:
            g = zarr.open_group(str(self.root / "state.zarr"), mode="r")
            zp, zd = g["probability"], g["done"]
        except (KeyError, ValueError, OSError, TypeError):
            return None
        if zp.shape != tuple(grid_shape) or zd.shape != tuple(grid_shape):
            return None
        prob = np.zeros(grid_shape, np.float32)
        done = np.zeros(grid_shape, bool)
        ch0, ch1 = zp.chunks[0], zp.chunks[1]
        for r0 in range(0, grid_shape[0], ch0):
            for c0 in range(0, grid_shape[1], ch1):
                sl = (slice(r0, r0 + ch0), slice(c0, c0 + ch1))
                try:  # a damaged chunk (a killed disk write, a flipped byte) is recomputed
                    p, d = np.asarray(zp[sl], np.float32), np.asarray(zd[sl]) > 0
                except (RuntimeError, ValueError, OSError) as e:
                    self.damaged += 1
                    warnings.warn(f"{self.root}: discarding a damaged checkpoint chunk at rows "
                                  f"{r0}.., columns {c0}.. ({type(e).__name__}); its patches "
                                  "are computed again", RuntimeWarning, stacklevel=2)
                    continue
                ok = d & np.isfinite(p)
                prob[sl] = np.where(ok, p, 0.0)
                done[sl] = ok
        return prob, done

    def start(self, grid_shape: tuple[int, int], prob: np.ndarray, done: np.ndarray) -> None:
        """Create (or reopen) the store for ``grid_shape``; write params if new."""
        import zarr

        from ...io.atomic import write_text_atomic

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "state.zarr"
        fresh = not self.matches() or not path.exists() or getattr(self, "damaged", 0) > 0
        if not fresh:
            try:
                g = zarr.open_group(str(path), mode="r")
                fresh = (g["probability"].shape != tuple(grid_shape)
                         or g["done"].shape != tuple(grid_shape))
            except (KeyError, ValueError, OSError, TypeError):
                fresh = True
        if fresh:
            import shutil

            if path.exists():
                shutil.rmtree(path)
            write_text_atomic(self.params_path, jsonio.dumps(self.key, indent=1, sort_keys=True),
                              overwrite=True)
            g = zarr.open_group(str(path), mode="w", zarr_format=2)
            ch = (min(256, grid_shape[0]), min(256, grid_shape[1]))
            g.create_array("probability", shape=grid_shape, dtype="float32", chunks=ch,
                           fill_value=0.0)
            g.create_array("done", shape=grid_shape, dtype="uint8", chunks=ch, fill_value=0)
            if done.any():  # what survived a damaged store
                g["probability"][:] = np.where(done, prob, 0.0).astype(np.float32)
                g["done"][:] = done.astype(np.uint8)
        g = zarr.open_group(str(path), mode="r+")
        self._arrays = (g["probability"], g["done"])

    def flush(self, prob: np.ndarray, done: np.ndarray, rows: tuple[int, int] | None = None):
        """Write rows ``[r0, r1)`` (all when ``None``): probability first, then done."""
        if self._arrays is None:
            return
        r0, r1 = rows if rows is not None else (0, prob.shape[0])
        if r1 <= r0:
            return
        zp, zd = self._arrays
        zp[r0:r1] = prob[r0:r1]
        zd[r0:r1] = done[r0:r1].astype(np.uint8)


def run_key(slide: Slide, model_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: slide, model and read parameters."""
    p = Path(slide.path)
    st = p.stat() if p.exists() else None
    return {"version": CHECKPOINT_VERSION,
            "slide": {"path": str(p.resolve()), "shape": list(slide.shape), "mpp": slide.mpp,
                      "bytes": st.st_size if st and p.is_file() else None,
                      "mtime_ns": st.st_mtime_ns if st and p.is_file() else None},
            "model": model_id,
            "params": {k: v for k, v in params.items()}}
