"""Tumour mask from the DAB (brown) channel of a cytokeratin IHC, and its transfer onto the H&E.

Seed 000 labels H&E patches from the consecutive CK19 IHC: brown deposits mark tumour
cells. The mask is made here in four steps:

1. **DAB optical density** by Ruifrok colour deconvolution (:func:`~.stain.deconvolve`,
   scikit-image units: 0 on glass, about 0.1 for strong DAB).
2. **Threshold.** Automatic: Otsu's threshold of the (lightly smoothed) DAB density over
   *tissue*, i.e. every pixel that absorbs light (summed OD > ``tissue_od``); DAB-positive
   and DAB-negative tissue are the two classes Otsu separates. A DAB-negative slide has no
   second class, so the threshold is never below ``min_threshold`` (0.03: fainter brown is
   counterstain cross-talk, see docs/registration.md). The user can set it instead.
3. **Clean-up** in micrometres: opening (specks), closing (joins the membranes and
   cytoplasm of neighbouring cells; the nuclei of a membranous stain are holes), holes
   below ``fill_holes_um2`` filled, objects below ``min_area_um2`` dropped.
4. Optional **tumour-associated fibrosis** (seed 000's "Tumor+FIB"): tissue within
   ``fibrosis_um`` of the tumour becomes class 2, or a user-drawn region does.

For a whole slide everything runs tile by tile on the fixed (H&E) grid, with a halo so the
morphology is the same as on the whole image: each tile of the output reads only the
part of the IHC that maps onto it (:meth:`~.registration.Transform.warp_slide_region`),
so memory is bounded by the tile size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..progress import Progress

if TYPE_CHECKING:
    from collections.abc import Generator

    from ..io.frame import SlideFrame
    from ..io.slide import Slide
    from .registration import Transform

#: label values of the transferred mask
BACKGROUND, TUMOUR, FIBROSIS = 0, 1, 2
LABEL_NAMES = {TUMOUR: "tumour", FIBROSIS: "fibrosis"}
#: RGBA colours stored in the OME-Zarr ``image-label`` metadata
LABEL_COLORS = {TUMOUR: (220, 30, 30, 255), FIBROSIS: (240, 170, 0, 255)}


@dataclass
class DabParams:
    """How the DAB mask is made (micrometres, or pixels when µm/px is unknown).

    Parameters
    ----------
    threshold
        DAB optical density above which a pixel is DAB-positive; ``None``: automatic
        (Otsu over tissue, never below ``min_threshold``).
    min_threshold
        Floor of the automatic threshold.
    tissue_od
        Summed optical density (R+G+B) above which a pixel is tissue, not glass.
    smooth_um
        Gaussian sigma applied to the DAB density before thresholding.
    open_um, close_um
        Radii of the morphological opening and closing.
    fill_holes_um2
        Holes smaller than this are filled.
    min_area_um2
        Objects smaller than this are dropped.
    fibrosis_um
        When set, tissue within this distance of the tumour is labelled fibrosis (2).
    """

    threshold: float | None = None
    min_threshold: float = 0.03
    tissue_od: float = 0.15
    smooth_um: float = 1.0
    open_um: float = 1.5
    close_um: float = 4.0
    fill_holes_um2: float = 400.0
    min_area_um2: float = 200.0
    fibrosis_um: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def halo_um(self) -> float:
        """How far the clean-up looks: the halo a tile needs for seamless results."""
        span = 3 * self.smooth_um + self.open_um + self.close_um + (self.fibrosis_um or 0.0)
        return span + math.sqrt(max(self.min_area_um2, self.fill_holes_um2))


def dab_density(rgb: np.ndarray) -> np.ndarray:
    """DAB optical density ``(H, W)`` float32 of an RGB image (Ruifrok deconvolution)."""
    from .stain import deconvolve

    return deconvolve(np.asarray(rgb)[..., :3])[..., 2].astype(np.float32)


def tissue_pixels(rgb: np.ndarray, tissue_od: float = 0.15) -> np.ndarray:
    """Pixels that absorb light (summed OD > ``tissue_od``): tissue, not glass."""
    from .stain import rgb_to_od

    return rgb_to_od(np.asarray(rgb)[..., :3]).sum(-1) > tissue_od


def auto_threshold(rgb: np.ndarray, params: DabParams | None = None, *,
                   mpp: float | None = None) -> float:
    """Otsu's threshold of the smoothed DAB density over tissue, floored at ``min_threshold``.

    Compute it once per slide (on a low-resolution image of the whole IHC, or of a
    region) and reuse it for every tile, so tiles agree.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    p = params or DabParams()
    px = 1.0 if mpp is None else float(mpp)
    dab = dab_density(rgb)
    if p.smooth_um > 0:
        dab = ndi.gaussian_filter(dab, p.smooth_um / px)
    tissue = tissue_pixels(rgb, p.tissue_od)
    vals = dab[tissue]
    if vals.size < 16 or float(vals.max() - vals.min()) <= 1e-6:
        return float(p.min_threshold)
    if vals.size > 2_000_000:
        vals = vals[:: vals.size // 2_000_000 + 1]
    return float(max(threshold_otsu(vals), p.min_threshold))


def dab_mask(rgb: np.ndarray, params: DabParams | None = None, *, mpp: float | None = None,
             threshold: float | None = None, fibrosis_region: np.ndarray | None = None,
             ) -> tuple[np.ndarray, float]:
    """Labels ``(H, W)`` uint8 (0 background, 1 tumour, 2 fibrosis) of an IHC image.

    Parameters
    ----------
    rgb
        IHC image (a tile, a view, or a whole low-resolution slide).
    params
        :class:`DabParams`; distances are in µm at ``mpp`` µm/px (pixels when ``None``).
    threshold
        Overrides ``params.threshold`` (e.g. the slide-wide automatic threshold).
    fibrosis_region
        Optional user-drawn bool mask: tissue inside it that is not tumour becomes
        fibrosis (in addition to ``params.fibrosis_um``).

    Returns
    -------
    (labels, threshold)
    """
    from scipy import ndimage as ndi

    p = params or DabParams()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise InputError(f"expected an RGB IHC image, got shape {rgb.shape}")
    px = 1.0 if mpp is None else float(mpp)
    thr = threshold if threshold is not None else p.threshold
    if thr is None:
        thr = auto_threshold(rgb, p, mpp=mpp)
    dab = dab_density(rgb)
    if p.smooth_um > 0:
        dab = ndi.gaussian_filter(dab, p.smooth_um / px)
    tissue = tissue_pixels(rgb, p.tissue_od)
    pos = (dab > thr) & tissue
    pos = _clean(pos, p, px)
    labels = pos.astype(np.uint8)
    if p.fibrosis_um:
        ring = _disk_dilate(pos, p.fibrosis_um / px) & ~pos & tissue
        labels[ring] = FIBROSIS
    if fibrosis_region is not None:
        region = np.asarray(fibrosis_region, dtype=bool) & tissue & ~pos
        labels[region] = FIBROSIS
    return labels, float(thr)


def _disk(r: float) -> np.ndarray:
    r = max(float(r), 0.0)
    n = int(math.floor(r))
    yy, xx = np.mgrid[-n:n + 1, -n:n + 1]
    return (yy * yy + xx * xx) <= r * r + 1e-9


def _disk_dilate(mask: np.ndarray, r: float) -> np.ndarray:
    """Dilation by a disk of radius ``r`` px, via a distance transform (any radius, fast)."""
    from scipy import ndimage as ndi

    if r <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask) <= r


def _clean(pos: np.ndarray, p: DabParams, px: float) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage import morphology

    out = pos
    if p.open_um > 0 and p.open_um / px >= 0.5:
        out = ndi.binary_opening(out, structure=_disk(p.open_um / px))
    if p.close_um > 0 and p.close_um / px >= 0.5:
        r = p.close_um / px
        # closing = dilate then erode; the erosion via the distance transform of the
        # complement keeps large radii cheap, and a padded border keeps edges open
        pad = int(math.ceil(r)) + 1
        padded = np.pad(out, pad)
        dil = ndi.distance_transform_edt(~padded) <= r
        out = (ndi.distance_transform_edt(dil) > r)[pad:-pad, pad:-pad] | out
    if p.fill_holes_um2 > 0:
        out = morphology.remove_small_holes(out, max_size=max(p.fill_holes_um2 / px ** 2, 1.0))
    if p.min_area_um2 > 0:
        out = morphology.remove_small_objects(out, max_size=max(p.min_area_um2 / px ** 2, 1.0))
    return out


# --------------------------------------------------------------------------------------
# Whole-slide transfer onto the H&E grid
# --------------------------------------------------------------------------------------
@dataclass
class TransferResult:
    """What :func:`transfer_mask_job` wrote (or computed)."""

    path: Path | None
    frame: SlideFrame
    shape: tuple[int, int]
    threshold: float
    params: DabParams
    tumour_fraction: float
    labels: np.ndarray | None = None  # only when no path was given (small outputs)


def mask_downsample(fixed_shape: tuple[int, int], fixed_mpp: float | None, *,
                    mask_mpp: float | None = 2.0, max_size: int = 32768) -> float:
    """Level-0 fixed px per mask px: ``mask_mpp`` µm/px when µm/px is known, else ≤ ``max_size``."""
    known = fixed_mpp is not None and mask_mpp is not None
    ds = max(1.0, mask_mpp / fixed_mpp) if known else 1.0
    return float(max(ds, max(fixed_shape) / max_size))


def slide_threshold_job(moving: Slide, params: DabParams | None = None, *,
                        max_size: int = 4096) -> Generator[Progress, None, float]:
    """The automatic DAB threshold of a whole IHC slide (progress generator returning it).

    Bounded work: the IHC is read at most ``max_size`` px a side (from the pyramid level
    nearest that size), then :func:`auto_threshold` runs on that image. ``params.threshold``
    set: returned as is, nothing is read.
    """
    from .registration.inputs import _Source

    p = params or DabParams()
    if p.threshold is not None:
        return float(p.threshold)
    src = _Source(moving)
    ds = max(1.0, max(src.shape) / max_size)
    size = (max(int(round(src.shape[0] / ds)), 1), max(int(round(src.shape[1] / ds)), 1))
    yield Progress(0, 2, f"reading the IHC at {size[1]}x{size[0]} px")
    rgb = src.read(size)
    mpp = None if src.mpp is None else src.mpp * ds
    yield Progress(1, 2, "DAB threshold (Otsu)")
    thr = auto_threshold(rgb, p, mpp=mpp)
    yield Progress(2, 2, f"DAB threshold {thr:.3f}")
    return thr


def slide_threshold(moving: Slide, params: DabParams | None = None, *,
                    max_size: int = 4096) -> float:
    """:func:`slide_threshold_job`, run to the end."""
    from ..progress import run

    return run(slide_threshold_job(moving, params, max_size=max_size))


def mask_region(transform: Transform, moving: Slide, origin: tuple[float, float],
                shape: tuple[int, int], downsample: float, params: DabParams | None = None, *,
                threshold: float, fixed_mpp: float | None = None,
                fibrosis_region: np.ndarray | None = None) -> np.ndarray:
    """Labels of a region of the fixed (H&E) grid, from the registered IHC.

    The IHC is resampled onto the fixed grid with a halo, the mask is made there (so
    distances and areas are H&E micrometres), and the halo is cropped.
    """
    p = params or DabParams()
    mpp_out = None if fixed_mpp is None else fixed_mpp * downsample
    halo = int(math.ceil(p.halo_um() / (mpp_out or 1.0))) + 2
    h, w = int(shape[0]), int(shape[1])
    o = (origin[0] - halo * downsample, origin[1] - halo * downsample)
    rgb = transform.warp_slide_region(moving, o, (h + 2 * halo, w + 2 * halo), downsample)
    region = None
    if fibrosis_region is not None:
        region = np.pad(np.asarray(fibrosis_region, bool), halo)
    labels, _ = dab_mask(rgb, p, mpp=mpp_out, threshold=threshold, fibrosis_region=region)
    return labels[halo:halo + h, halo:halo + w]


def transfer_mask_job(fixed: Slide, moving: Slide, transform: Transform, out: str | Path | None,
                  params: DabParams | None = None, *, downsample: float | None = None,
                  mask_mpp: float | None = 2.0, tile: int = 1024, overwrite: bool = False,
                  ) -> Generator[Progress, None, TransferResult]:
    """Make the DAB mask from ``moving`` (IHC) on the grid of ``fixed`` (H&E) and write it.

    A progress generator. Tiles of ``tile`` × ``tile`` mask pixels are computed one at a
    time (each with its halo) and stored in a temporary zarr array beside ``out``; the
    multiscale OME-Zarr label image is then written from it with
    :func:`~napari_lnmeta.io.omezarr.write_ome_zarr` (atomic). With ``out=None`` the
    labels are returned in memory instead (small slides, tests, the widget).

    Returns
    -------
    TransferResult
    """
    import shutil
    import uuid

    from ..io.frame import SlideFrame
    from ..io.omezarr import write_ome_zarr

    p = params or DabParams()
    _check_transform_fits(transform, fixed, moving)
    ds = downsample or mask_downsample(fixed.shape, fixed.mpp, mask_mpp=mask_mpp)
    oh, ow = math.ceil(fixed.shape[0] / ds), math.ceil(fixed.shape[1] / ds)
    frame = SlideFrame(downsample=ds, origin=(0.0, 0.0), slide_mpp=fixed.mpp,
                       slide=fixed.name, slide_shape=tuple(fixed.shape))
    tiles = [(r, c) for r in range(0, oh, tile) for c in range(0, ow, tile)]
    total = len(tiles) + 2
    yield Progress(0, total, "DAB threshold")
    thr = slide_threshold(moving, p)
    yield Progress(1, total, f"DAB threshold {thr:.3f}")
    tmp_dir = None
    if out is None:
        store: Any = np.zeros((oh, ow), np.uint8)
    else:
        import zarr

        from ..io.atomic import check_output

        out = Path(out)
        check_output(out, overwrite=overwrite, inputs=(fixed.path, moving.path))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = out.with_name(f".{out.name}.tiles-{uuid.uuid4().hex[:8]}")
        store = zarr.open_array(str(tmp_dir), mode="w", shape=(oh, ow), dtype=np.uint8,
                                chunks=(tile, tile), fill_value=0, zarr_format=2)
    n_tumour = 0
    try:
        for i, (r, c) in enumerate(tiles):
            h, w = min(tile, oh - r), min(tile, ow - c)
            lab = mask_region(transform, moving, (r * ds, c * ds), (h, w), ds, p,
                              threshold=thr, fixed_mpp=fixed.mpp)
            store[r:r + h, c:c + w] = lab
            n_tumour += int((lab == TUMOUR).sum())
            yield Progress(i + 2, total, f"mask tile {i + 1}/{len(tiles)}")
        result = TransferResult(None, frame, (oh, ow), thr, p, n_tumour / max(oh * ow, 1))
        if out is None:
            result.labels = store
        else:
            import dask.array as da

            attrs = {"dab_threshold": thr, "dab_params": p.to_json(),
                     "labels": {str(k): v for k, v in LABEL_NAMES.items()},
                     "transform": {"fixed": transform.fixed.to_json(),
                                   "moving": transform.moving.to_json(),
                                   "mode": transform.mode}}
            write_ome_zarr(out, da.from_zarr(store), frame=frame, kind="labels",
                           name=f"{fixed.name} tumour (DAB of {moving.name})", chunks=512,
                           overwrite=overwrite, attrs=attrs, colors=LABEL_COLORS,
                           inputs=(fixed.path, moving.path))
            result.path = out
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    yield Progress(total, total, "mask written" if out is not None else "mask done")
    return result


def _check_transform_fits(transform: Transform, fixed: Slide, moving: Slide) -> None:
    """The transform must have been made for slides of these sizes."""
    for role, info, slide in (("fixed", transform.fixed, fixed), ("moving", transform.moving, moving)):
        if tuple(info.shape) != tuple(slide.shape):
            raise InputError(
                f"{slide.path}: is {slide.shape[1]}x{slide.shape[0]} px but the transform's "
                f"{role} slide ({info.name}) was {info.shape[1]}x{info.shape[0]} px; "
                "was it registered with other slides?")


def mask_outlines(labels: np.ndarray, frame: SlideFrame, *,
                  min_area_px: float = 4.0) -> list[Any]:
    """Outlines of each class of a label mask as level-0 polygons (for QuPath GeoJSON)."""
    from ..io.annotations import mask_to_polygons

    polys = []
    for value, name in LABEL_NAMES.items():
        m = np.asarray(labels) == value
        if m.any():
            polys += mask_to_polygons(m, frame, label=name, min_area_px=min_area_px)
    return polys
