"""Seed 001's dataset separability: features → PCA → k-means against the sources.

Can two patch sources (two hospitals, two scanners, two datasets to be merged) be told
apart from their features alone? Seed 001 answers with an unsupervised check:

1. features of every patch from a backbone without its head (a registry architecture,
   randomly initialised unless an ``init`` safetensors file gives weights, or a trained
   lnmeta patch model; nothing is downloaded), see
   :func:`napari_lnmeta.models.extractor.load_extractor`;
2. PCA to 2 dimensions (:func:`pca`);
3. k-means with k = 2 (k-means++ initialisation, several restarts, lowest inertia kept;
   :func:`kmeans`);
4. the clusters against the source labels: **accuracy** after the best one-to-one
   matching of clusters to sources (Hungarian algorithm,
   :func:`scipy.optimize.linear_sum_assignment`;
   :func:`~napari_lnmeta.core.metrics.hungarian_accuracy`), **silhouette** of the clusters
   in the PCA plane (:func:`~napari_lnmeta.core.metrics.silhouette_score`) and the
   **adjusted Rand index** between clusters and sources
   (:func:`~napari_lnmeta.core.metrics.adjusted_rand_index`).

An accuracy near 0.5 and ARI near 0 mean the sources are not separable (they can be
merged); seed 001 runs it before and after stain normalisation
(:mod:`napari_lnmeta.core.stain`) to show that normalisation removes the source shortcut.
silhouette and ARI are implemented in numpy in :mod:`napari_lnmeta.core.metrics` (scikit-learn is not a runtime
dependency); they equal scikit-learn's ``silhouette_score`` and ``adjusted_rand_score``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io import jsonio
from ..progress import Job, Progress
from .metrics import adjusted_rand_index, hungarian_accuracy, silhouette_score

if TYPE_CHECKING:
    from torch import nn


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --------------------------------------------------------------------------------------
# PCA and k-means (numpy)
# --------------------------------------------------------------------------------------
def pca(x: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Projection on the first principal components and their explained-variance ratios.

    Signs are fixed (the largest loading of each component is positive) so results are
    reproducible.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InputError(f"PCA needs an (N >= 2, D) matrix, got {x.shape}")
    xc = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(n_components, vt.shape[0])
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    signs[signs == 0] = 1
    comps = vt[:k] * signs[:, None]
    var = s ** 2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return xc @ comps.T, ratio


def kmeans(x: np.ndarray, k: int = 2, *, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; the run with the lowest inertia of ``n_init``.

    Returns ``(labels, centres, inertia)``.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < k:
        raise InputError(f"k-means with k={k} needs at least {k} samples, got {n}")
    rng = np.random.default_rng(seed)
    best = (None, None, np.inf)
    for _ in range(max(1, n_init)):
        c = np.empty((k, x.shape[1]))
        c[0] = x[rng.integers(n)]
        d2 = ((x - c[0]) ** 2).sum(axis=1)
        for j in range(1, k):
            tot = d2.sum()
            idx = rng.choice(n, p=d2 / tot) if tot > 0 else rng.integers(n)
            c[j] = x[idx]
            d2 = np.minimum(d2, ((x - c[j]) ** 2).sum(axis=1))
        lab = np.zeros(n, np.int64)
        for _it in range(max_iter):
            dist = ((x[:, None, :] - c[None]) ** 2).sum(axis=2)
            lab = dist.argmin(axis=1)
            new = np.array([x[lab == j].mean(axis=0) if (lab == j).any() else c[j]
                            for j in range(k)])
            shift = ((new - c) ** 2).sum()
            c = new
            if shift <= tol:
                break
        dist = ((x[:, None, :] - c[None]) ** 2).sum(axis=2)
        lab = dist.argmin(axis=1)
        inertia = float(dist[np.arange(n), lab].sum())
        if inertia < best[2]:
            best = (lab, c, inertia)
    return best[0], best[1], best[2]


# --------------------------------------------------------------------------------------
# Patch sources
# --------------------------------------------------------------------------------------
@dataclass
class SeparabilityConfig:
    """Parameters of :func:`separability_job`.

    Attributes
    ----------
    backbone
        Registry architecture (``"resnet18"``, seed 001) or an lnmeta model file.
    init
        Safetensors weights for a registry backbone (none: random, seeded).
    patch_size
        Patches are resized to this side (``None``: the first patch's side).
    max_patches
        At most this many patches per source (a seeded random subset).
    patch_mpp
        Read slide patches at this µm/px (``None``: level 0).
    stain
        Also run after stain normalisation with this method (``"macenko"``,
        ``"vahadane"``, ``"reinhard"``), or ``None``.
    stain_target
        A stain-target JSON (:class:`~napari_lnmeta.io.stain_target.StainTarget`); default:
        fitted on a mosaic of patches from both sources.
    k, n_components, n_init, seed, batch_size, device
        k-means clusters, PCA dimensions, restarts, random seed, feature batch, device.
    """

    backbone: str = "resnet18"
    init: str | None = None
    patch_size: int | None = None
    max_patches: int = 500
    patch_mpp: float | None = None
    stain: str | None = "macenko"
    stain_target: str | None = None
    k: int = 2
    n_components: int = 2
    n_init: int = 10
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"


@dataclass
class PatchSource:
    """Patches of one source, ``(N, S, S, 3)`` uint8, with where each came from."""

    name: str
    patches: np.ndarray
    ids: list[str] = field(default_factory=list)


def _resize_patch(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def load_patch_source(source: str | Path, *, max_patches: int = 500,
                      patch_size: int | None = None, patch_mpp: float | None = None,
                      seed: int = 0, name: str | None = None) -> PatchSource:
    """Patches from a folder of images (searched recursively) or a slide's tissue grid.

    A folder: every ``.png``/``.jpg``/``.tif`` image, RGB, resized to ``patch_size``
    (default: the first image's side). A slide: non-overlapping ``patch_size`` (default
    224) patches over tissue at ``patch_mpp`` (default level 0). ``max_patches`` of them
    are drawn at random (seeded).
    """
    src = Path(source)
    label = name or src.name
    rng = np.random.default_rng(seed)
    if src.is_dir() and not src.name.lower().endswith(".zarr"):
        files = sorted(f for f in src.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                       and f.is_file())
        if not files:
            raise InputError(f"{src}: no images (.png, .jpg, .tif) in this folder")
        if len(files) > max_patches:
            files = [files[i] for i in np.sort(rng.choice(len(files), max_patches,
                                                          replace=False))]
        from PIL import Image

        out = []
        for f in files:
            try:
                with Image.open(f) as im:
                    img = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise InputError(f"{f}: not a readable image ({e})") from e
            if patch_size is None:
                patch_size = int(min(img.shape[:2]))
            out.append(_resize_patch(img, int(patch_size)))
        return PatchSource(label, np.stack(out).astype(np.uint8),
                           [str(f.relative_to(src)) for f in files])
    from ..io.slide import open_slide
    from .tiling import make_grid, read_patches
    from .tissue import tissue_mask

    slide = open_slide(src)
    ps = int(patch_size or 224)
    grid = make_grid(slide, patch_size=ps, mpp=patch_mpp, level=None if patch_mpp else 0,
                     tissue=tissue_mask(slide), min_tissue=0.5)
    if len(grid) == 0:
        raise InputError(f"{src}: no tissue patch of {ps} px")
    idx = np.arange(len(grid))
    if len(idx) > max_patches:
        idx = np.sort(rng.choice(len(idx), max_patches, replace=False))
    patches = read_patches(slide, grid, idx)
    ids = [f"{int(r)},{int(c)}" for r, c in grid.coords[idx]]
    return PatchSource(name or slide.name, patches, ids)


# --------------------------------------------------------------------------------------
# Separability
# --------------------------------------------------------------------------------------
@dataclass
class SeparabilityResult:
    """One run of features → PCA → k-means against the source labels."""

    accuracy: float
    silhouette: float
    ari: float
    explained_variance: list[float]
    inertia: float
    coords: np.ndarray       # (N, n_components) PCA coordinates
    source: np.ndarray       # (N,) 0 = first source, 1 = second
    cluster: np.ndarray      # (N,) k-means cluster
    names: tuple[str, str]
    stain: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "silhouette": self.silhouette, "ari": self.ari,
                "explained_variance": self.explained_variance, "inertia": self.inertia,
                "n": [int((self.source == 0).sum()), int((self.source == 1).sum())],
                "sources": list(self.names), "stain": self.stain}


def cluster_separability(features: np.ndarray, source: np.ndarray, *, k: int = 2,
                         n_components: int = 2, n_init: int = 10, seed: int = 0,
                         names: tuple[str, str] = ("A", "B"),
                         stain: str | None = None) -> SeparabilityResult:
    """PCA → k-means → Hungarian accuracy, silhouette (PCA plane) and ARI of features."""
    f = np.asarray(features, dtype=np.float64)
    src = np.asarray(source)
    coords, ratio = pca(f, n_components)
    lab, _, inertia = kmeans(coords, k, n_init=n_init, seed=seed)
    try:
        sil = silhouette_score(coords, lab)
    except InputError:
        sil = float("nan")  # k-means put everything in one cluster
    return SeparabilityResult(accuracy=hungarian_accuracy(src, lab), silhouette=sil,
                              ari=adjusted_rand_index(src, lab),
                              explained_variance=[float(v) for v in ratio], inertia=inertia,
                              coords=coords, source=src.astype(np.int64), cluster=lab,
                              names=names, stain=stain)


def extract_patch_features_job(patches: np.ndarray, *, backbone: str = "resnet18",
                               init: str | None = None, batch_size: int = 32,
                               device: str = "cpu", seed: int = 0,
                               extractor: tuple[nn.Module, Any] | None = None
                               ) -> Job[np.ndarray]:
    """Penultimate-layer features of uint8 ``(N, S, S, 3)`` patches (a progress generator).

    ``extractor``: an already built ``(model, BackboneInfo)`` of
    :func:`~napari_lnmeta.models.extractor.load_extractor` (else built from ``backbone``).
    """
    import torch

    from ..models.extractor import load_extractor
    from .features import make_preprocessor

    ps = int(patches.shape[1])
    model, info = extractor or load_extractor(backbone, init=init, seed=seed, patch_size=ps,
                                              device=device)
    prep = make_preprocessor(info, device)
    out = np.empty((len(patches), info.feature_dim), np.float32)
    n = len(patches)
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = prep(patches[i:i + batch_size])
            out[i:i + batch_size] = model(x).float().reshape(len(x), -1).cpu().numpy()
            yield Progress(min(n, i + batch_size), n, "features")
    return out


def _normalise_all(patches: np.ndarray, target) -> np.ndarray:
    from .stain import normalise

    return np.stack([normalise(p, target) for p in patches])


def separability_job(a: PatchSource | str | Path, b: PatchSource | str | Path,
                     config: SeparabilityConfig | None = None
                     ) -> Job[dict[str, SeparabilityResult]]:
    """Seed 001's separability check of two patch sources, raw and stain-normalised.

    Returns ``{"raw": result}`` plus ``{"normalised": result}`` when ``config.stain``.
    """
    cfg = config or SeparabilityConfig()
    yield Progress(0, 1, "reading patches")
    if not isinstance(a, PatchSource):
        a = load_patch_source(a, max_patches=cfg.max_patches, patch_size=cfg.patch_size,
                              patch_mpp=cfg.patch_mpp, seed=cfg.seed)
    ps = cfg.patch_size or int(a.patches.shape[1])
    if not isinstance(b, PatchSource):
        b = load_patch_source(b, max_patches=cfg.max_patches, patch_size=ps,
                              patch_mpp=cfg.patch_mpp, seed=cfg.seed + 1)
    if a.patches.shape[1:] != b.patches.shape[1:]:
        b = PatchSource(b.name, np.stack([_resize_patch(p, a.patches.shape[1])
                                          for p in b.patches]), b.ids)
    if min(len(a.patches), len(b.patches)) < 2:
        raise InputError("each source needs at least 2 patches")
    names = (a.name, b.name)
    if names[0] == names[1]:
        names = (f"A: {names[0]}", f"B: {names[1]}")
    x = np.concatenate([a.patches, b.patches])
    src = np.r_[np.zeros(len(a.patches), np.int64), np.ones(len(b.patches), np.int64)]
    runs = [("raw", x, None)]
    if cfg.stain:
        from ..io.stain_target import StainTarget
        from .stain import fit_target

        yield Progress(0, 1, f"{cfg.stain} stain normalisation")
        if cfg.stain_target:
            target = StainTarget.load(cfg.stain_target)
        else:
            rng = np.random.default_rng(cfg.seed)
            pick = np.r_[rng.choice(len(a.patches), min(32, len(a.patches)), replace=False),
                         len(a.patches) + rng.choice(len(b.patches), min(32, len(b.patches)),
                                                     replace=False)]
            target = fit_target(x[pick].reshape(-1, x.shape[2], 3), cfg.stain,
                                source="both sources")
        runs.append(("normalised", _normalise_all(x, target), cfg.stain))
    from ..models.extractor import load_extractor

    ext = load_extractor(cfg.backbone, init=cfg.init, seed=cfg.seed, patch_size=int(x.shape[1]),
                         device=cfg.device)
    out: dict[str, SeparabilityResult] = {}
    for key, data, stain in runs:
        feats = yield from extract_patch_features_job(data, batch_size=cfg.batch_size,
                                                      device=cfg.device, extractor=ext)
        out[key] = cluster_separability(feats, src, k=cfg.k, n_components=cfg.n_components,
                                        n_init=cfg.n_init, seed=cfg.seed, names=names,
                                        stain=stain)
    return out


def separability_figure_png(results: dict[str, SeparabilityResult], *, dpi: int = 110) -> bytes:
    """Scatter plots of the PCA plane (colour: source, marker: k-means cluster), one panel
    per run, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(results)
    fig = Figure(figsize=(4.2 * n, 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    markers = ["o", "^", "s", "D", "v"]
    for i, (key, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, n, i + 1)
        for s in (0, 1):
            for c in np.unique(r.cluster):
                m = (r.source == s) & (r.cluster == c)
                if not m.any():
                    continue
                ax.scatter(r.coords[m, 0], r.coords[m, 1] if r.coords.shape[1] > 1
                           else np.zeros(int(m.sum())), s=10, alpha=0.6, color=f"C{s}",
                           marker=markers[int(c) % len(markers)],
                           label=f"{r.names[s]} / cluster {int(c)}")
        title = key if r.stain is None else f"{key} ({r.stain})"
        ax.set_title(f"{title}\nacc {r.accuracy:.3f}  sil {r.silhouette:.3f}  "
                     f"ARI {r.ari:.3f}", fontsize=9)
        ev = r.explained_variance
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f} %)")
        if len(ev) > 1:
            ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f} %)")
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


SEPARABILITY_FILES = ("separability.json", "separability.png", "points.csv")


def write_separability(results: dict[str, SeparabilityResult], out_dir: str | Path, *,
                       config: SeparabilityConfig | None = None, overwrite: bool = False,
                       inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """``separability.json``, ``separability.png`` and ``points.csv`` (PCA coordinates,
    source and cluster of every patch), atomically; existing ones refused unless
    ``overwrite``."""
    from ..io.atomic import output_lock

    with output_lock(out_dir):  # one writer per output
        return _write_separability_locked(results, out_dir, config=config, overwrite=overwrite, inputs=inputs)


def _write_separability_locked(results: dict[str, SeparabilityResult], out_dir: str | Path, *,
                               config: SeparabilityConfig | None = None, overwrite: bool = False,
                               inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    from ..errors import OutputExistsError
    from ..io.atomic import check_inputs, write_bytes_atomic, write_text_atomic

    out = Path(out_dir)
    check_inputs(out, inputs, whole=False)
    for name in SEPARABILITY_FILES:
        check_inputs(out / name, inputs)
    for name in SEPARABILITY_FILES:
        if (out / name).exists() and not overwrite:
            raise OutputExistsError(out / name)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": write_bytes_atomic(out / "separability.png",
                                       separability_figure_png(results), overwrite=True)}
    lines = ["run,source,cluster," + ",".join(f"pc{i + 1}" for i in
                                              range(next(iter(results.values())).coords.shape[1]))]
    for key, r in results.items():
        for s, c, xy in zip(r.source, r.cluster, r.coords, strict=True):
            lines.append(f"{key},{r.names[s]},{int(c)}," + ",".join(f"{v:.6g}" for v in xy))
    paths["csv"] = write_text_atomic(out / "points.csv", "\n".join(lines) + "\n", overwrite=True)
    d = {"format": "lnmeta-separability", "version": 1,
         "config": None if config is None else asdict(config),
         "results": {k: r.to_json() for k, r in results.items()},
         "reading": "accuracy near 0.5, ARI near 0 and silhouette near 0: the sources are "
                    "not separable by their features (seed 001)"}
    paths["json"] = write_text_atomic(out / "separability.json", jsonio.dumps(d, indent=1),
                                      overwrite=True)
    return paths
