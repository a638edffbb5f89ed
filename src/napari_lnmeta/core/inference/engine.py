"""The run: :func:`run_inference_job`, the progress generator that ties grid, readers,
model and checkpoints together.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError, ModelError
from ...models.io import resolve_device
from ...progress import Job, Progress
from .checkpoint import Checkpoint, run_key
from .config import InferenceConfig, InferenceResult, PartialHeatmap
from .forward import PatchModel, auto_batch_size, is_oom, stain_transform
from .loading import _model_identity, load_inference_model, plan_read
from .readers import context_grid, make_reader, tile_working_set

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...io.slide import Slide
    from ...models.io import ModelMeta
    from ..tissue import TissueMask

#: batch sizes probed per loaded network (dropped with the network)
_PROBED_BATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FORWARD_THREAD: list = []
_FORWARD_LOCK = threading.Lock()


def cpu_forward_thread():
    """The one thread that runs CPU forward passes (a single-worker executor), kept for
    the process: torch's OpenMP team is built once for it, not again for every batch in
    a new thread (in ``lnmeta predict`` of CMU-1-Small-Region with resnet18 on a 2-core
    machine, 10 batches took 0.69 s with a new thread each and 0.61 s on the kept one).
    Runs started at the same time queue their batches on it."""
    with _FORWARD_LOCK:
        if not _FORWARD_THREAD:
            from concurrent.futures import ThreadPoolExecutor

            _FORWARD_THREAD.append(ThreadPoolExecutor(1, thread_name_prefix="lnmeta-forward"))
        return _FORWARD_THREAD[0]


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def run_inference_job(slide: Slide, config: InferenceConfig | None = None, *,
                  model: tuple[nn.Module, ModelMeta] | None = None,
                  checkpoint_dir: str | Path | None = None,
                  tissue: TissueMask | None = None,
                  on_mismatch: str = "restart") -> Job[InferenceResult]:
    """Tumour probability heatmap of a slide, as a progress generator.

    Parameters
    ----------
    slide
        An open slide.
    config
        Run parameters (:class:`InferenceConfig`); defaults use the bundled model.
    model
        An in-memory ``(network, ModelMeta)`` instead of ``config.model``.
    checkpoint_dir
        Save progress here and resume from it (see module docstring).
    tissue
        A precomputed tissue mask (otherwise detected with ``config.tissue_*``).
    on_mismatch
        When ``checkpoint_dir`` holds a run with other parameters (slide, model, read
        parameters): ``"restart"`` discards it, ``"error"`` raises :class:`InputError`.

    Yields
    ------
    Progress
        ``done``/``total`` patches; every ``partial_seconds`` the step's ``partial`` is a
        :class:`PartialHeatmap` (a copy of the heatmap so far).

    Returns
    -------
    InferenceResult

    Raises
    ------
    ModelError
        Missing or unusable model, patch size or classes that do not match the request.
    InputError
        No tissue, unknown µm/px where one is needed, a CUDA device that is not there.
    """
    from ...progress import in_thread
    from ..tiling import make_grid
    from ..tissue import tissue_mask_job

    cfg = config or InferenceConfig()
    if cfg.on_corrupt_tile not in ("fail", "skip"):
        raise InputError(f"on_corrupt_tile must be 'fail' or 'skip', got {cfg.on_corrupt_tile!r}")
    if cfg.on_corrupt_tile == "skip" and cfg.decode != "cpu":
        raise InputError("skipping corrupt tiles (--on-corrupt-tile skip) needs CPU decoding "
                         "(--decode cpu): tiles decoded on the device are not checked")
    t0 = time.perf_counter()
    timing: dict[str, Any] = {}
    yield Progress(0, 0, "loading model")  # at once: the bar moves in the first second
    device = yield from in_thread(resolve_device, cfg.device, message="loading model")
    import torch  # imported by resolve_device: instant here
    net, meta, mpath = yield from in_thread(load_inference_model, cfg, device, model,
                                            message="loading model", info=timing)
    mname = str(mpath) if mpath else "model"
    params, warns = plan_read(slide, meta, cfg, model_path=mname)
    from ...models.spatial import context_size

    ctx = context_size(meta)  # > 1: the model reads a k x k neighbourhood per patch
    if ctx > 1:
        params["context"] = ctx
    stain = stain_transform(meta.normalisation, device)
    pm = PatchModel(net, meta, device, tumour=params["tumour_index"], tta=cfg.tta, amp=cfg.amp,
                    channels_last=cfg.channels_last, stain=stain, compile=cfg.compile,
                    model_path=mname)
    timing["model_s"] = time.perf_counter() - t0
    model_id = None
    if checkpoint_dir is not None:
        # the checkpoint's model hash (a read of the whole file) runs beside tissue
        # detection; it is needed only when the checkpoint is opened
        from concurrent.futures import ThreadPoolExecutor

        ex = ThreadPoolExecutor(1, thread_name_prefix="lnmeta-model-hash")
        model_id = ex.submit(_model_identity, mpath, net, meta)
        ex.shutdown(wait=False)  # the thread ends with the hash

    t1 = time.perf_counter()
    yield Progress(0, 0, "detecting tissue")
    tissue_corrupt: list[dict[str, Any]] = []
    if tissue is None:  # a mask already computed with these parameters is re-used
        from ...io.slide import CorruptTileError

        try:
            tissue = yield from tissue_mask_job(slide, target_mpp=cfg.tissue_mpp,
                                                method=cfg.tissue_method)
        except CorruptTileError as e:
            if cfg.on_corrupt_tile != "skip":
                raise
            # a damaged tile of the overview only blurs the tissue mask: use it as decoded
            tissue_corrupt.append(e.to_json())
            warns.append(f"tissue detection read a corrupt tile ({e.reason}) at level "
                         f"{e.level}, tile {e.tile}; the tissue mask there may be wrong")
            with slide.unchecked_reads():
                tissue = yield from tissue_mask_job(slide, target_mpp=cfg.tissue_mpp,
                                                    method=cfg.tissue_method)
    grid = yield from in_thread(make_grid, slide, patch_size=params["patch_size"],
                                stride=params["stride"], mpp=params["mpp"],
                                level=params["level"], tissue=tissue,
                                min_tissue=cfg.min_tissue, message="patch grid")
    if len(grid) == 0:
        raise InputError(f"{slide.path}: no patch has at least {cfg.min_tissue:.0%} tissue "
                         f"(tissue covers {tissue.area_fraction:.1%} of the slide)")
    params.update({"read_mpp": grid.mpp, "read_level": grid.level,
                   "downsample": grid.downsample, "size0": grid.size0,
                   "stride0": grid.stride0, "grid_shape": list(grid.grid_shape)})
    timing["tissue_s"] = time.perf_counter() - t1
    frame = grid.frame()
    prob = np.zeros(grid.grid_shape, dtype=np.float32)
    done = np.zeros(grid.grid_shape, dtype=bool)
    in_grid = np.zeros(grid.grid_shape, dtype=bool)
    in_grid[grid.index[:, 0], grid.index[:, 1]] = True

    ckpt = None
    resumed = 0
    if checkpoint_dir is not None:
        ckpt = Checkpoint(checkpoint_dir, run_key(slide, model_id.result(), params))
        if on_mismatch == "error" and ckpt.stored_key() is not None and not ckpt.matches():
            raise InputError(f"{Path(checkpoint_dir).parent}: holds an unfinished run with other "
                             "parameters (slide, model, µm/px, patch size, stride or TTA); pass "
                             "--overwrite / overwrite=True to start over")
        state = ckpt.load(grid.grid_shape)
        if state is not None:
            prob, done = state
            done &= in_grid
            if cfg.on_corrupt_tile == "fail":  # cells a skipping run left unknown: retry
                done &= ~np.isnan(prob)
            prob[~done] = 0.0
            resumed = int(done.sum())
        ckpt.start(grid.grid_shape, prob, done)

    todo = np.flatnonzero(~done[grid.index[:, 0], grid.index[:, 1]])
    total = len(grid)
    n_done = total - len(todo)

    def partial() -> PartialHeatmap:
        return PartialHeatmap(prob.copy(), done.copy(), frame)

    yield Progress(n_done, total, "tissue ready" if not resumed else
                   f"resuming ({resumed} patches done)", partial())

    t2 = time.perf_counter()
    read_grid = context_grid(grid, ctx)
    if cfg.batch_size:
        bs = int(cfg.batch_size)
    else:  # probed once per loaded network and setting (warm runs skip the probe)
        probe_key = (str(device), read_grid.patch_size, bool(cfg.tta), bool(cfg.amp),
                     bool(cfg.channels_last), bool(cfg.compile), int(cfg.max_batch_size),
                     repr(meta.normalisation))
        known = _PROBED_BATCH.setdefault(net, {}) if model is None else {}
        bs = known.get(probe_key)
        if not bs:  # a probe forward: on the CPU in the thread the batches will use
            bs = yield from in_thread(
                auto_batch_size, pm, read_grid.patch_size, max_batch=cfg.max_batch_size,
                message="batch size", executor=None if device.type == "cuda"
                else cpu_forward_thread())
        timing["batch_probed"] = probe_key not in known
        known[probe_key] = bs
    bs = max(1, min(bs, cfg.max_batch_size))
    timing["batch_probe_s"] = time.perf_counter() - t2
    micro = bs  # forward size; halves on out-of-memory
    ooms = 0
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    cuda = device.type == "cuda"
    reader, timing["reader"] = make_reader(slide, read_grid, batches, batch_size=bs,
                                           device=device, workers=cfg.workers,
                                           depth=cfg.prefetch, decode=cfg.decode,
                                           on_corrupt_tile=cfg.on_corrupt_tile)
    cache = 0
    if timing["reader"] == "threads":
        # the batches being read at once (prefetch depth + the one in the model) share
        # tiles: keep them decoded
        cache = tile_working_set(slide, read_grid, batches, max(1, cfg.prefetch) + 1)
        if cache:
            slide.reserve_tile_cache(cache)
    timing["tile_cache_reserved_mb"] = cache / 2**20

    def forward(x_host: torch.Tensor) -> torch.Tensor:
        """Probabilities of one host batch, splitting it on out-of-memory."""
        nonlocal micro, ooms
        out = []
        i = 0
        while i < len(x_host):
            n = min(micro, len(x_host) - i)
            try:
                x = x_host[i:i + n].to(device, non_blocking=True)
                out.append(pm.probs(x))
                i += n
            except Exception as e:
                if not is_oom(e) or micro == 1:
                    raise
                ooms += 1
                micro = max(1, micro // 2)
                if cuda:
                    torch.cuda.empty_cache()
        return torch.cat(out) if len(out) > 1 else out[0]

    pending: tuple | None = None  # (indices, slot, probs on device/host) of the last batch
    last_ckpt = last_partial = time.perf_counter()
    dirty = [math.inf, -1]  # heatmap rows changed since the last checkpoint
    n_run = 0
    t_loop = time.perf_counter()

    def collect(item) -> None:
        nonlocal n_done, n_run
        idx, slot, p_dev = item
        p = p_dev.float().cpu().numpy()
        reader.release(slot)
        bad = ~np.isfinite(p)
        if bad.any():
            raise ModelError(mname, f"produced {int(bad.sum())} non-finite probabilities "
                             "(NaN/inf): its weights or metadata are broken")
        corrupt = getattr(reader, "corrupt", None)
        if corrupt:
            p[[int(k) in corrupt for k in idx]] = np.nan  # unknown: a corrupt tile
        rows, cols = grid.index[idx, 0], grid.index[idx, 1]
        prob[rows, cols] = p
        done[rows, cols] = True
        dirty[0] = min(dirty[0], int(rows.min()))
        dirty[1] = max(dirty[1], int(rows.max()) + 1)
        n_done += len(idx)
        n_run += len(idx)

    def checkpoint() -> None:
        if ckpt is not None and dirty[1] > dirty[0]:
            ckpt.flush(prob, done, (int(dirty[0]), int(dirty[1])))
        dirty[0], dirty[1] = math.inf, -1

    try:
        for idx, x_host, slot in reader:
            if cuda:  # queued asynchronously: returns at once
                p_dev = forward(x_host)
            else:  # a CPU batch may take seconds: Cancel is still answered meanwhile
                p_dev = yield from in_thread(forward, x_host, interval=0.25,
                                             beat=Progress(n_done, total, "inference"),
                                             executor=cpu_forward_thread())
            # On CUDA the previous batch's result is fetched after this one is queued, so
            # the GPU never idles while Python copies results.
            if pending is not None:
                collect(pending)
            pending = (idx, slot, p_dev)
            if not cuda:
                collect(pending)
                pending = None
            now = time.perf_counter()
            part = None
            if now - last_partial >= cfg.partial_seconds:
                part, last_partial = partial(), now
            if now - last_ckpt >= cfg.checkpoint_seconds:
                checkpoint()
                last_ckpt = now
            yield Progress(n_done, total, "inference", part)
        if pending is not None:
            collect(pending)
            pending = None
    finally:
        reader.close()
        checkpoint()
    t_inf = time.perf_counter() - t_loop
    timing.update({"inference_s": t_inf, "read_wait_s": reader.wait_s,
                   "patches": total, "patches_run": n_run, "patches_resumed": resumed,
                   "patches_per_s": n_run / t_inf if t_inf > 0 else None,
                   "total_s": time.perf_counter() - t0, "oom_backoffs": ooms,
                   "forward_batch_size": micro})
    unknown = done & in_grid & np.isnan(prob)
    corrupt_tiles: dict[tuple, dict[str, Any]] = {}
    for d in tissue_corrupt + [e.to_json() for e in getattr(reader, "corrupt", {}).values()]:
        corrupt_tiles.setdefault((d["level"], *d["tile"]), d)
    if unknown.any():
        warns.append(f"{int(unknown.sum())} heatmap cells are unknown (NaN): their patches "
                     f"touch {len(corrupt_tiles) or 'earlier-found'} corrupt tile(s) of the "
                     "slide, skipped (--on-corrupt-tile skip)")
    yield Progress(total, total, "inference done", partial())
    return InferenceResult(probability=prob, scored=done & in_grid & ~unknown, frame=frame,
                           grid=grid, unknown=unknown,
                           corrupt_tiles=[corrupt_tiles[k] for k in sorted(corrupt_tiles)],
                           tissue=tissue, meta=meta, params=params, timing=timing,
                           device=str(device), batch_size=bs, slide_path=str(slide.path),
                           model_path=str(mpath) if mpath else None, config=cfg,
                           warnings=warns, resumed=resumed)
