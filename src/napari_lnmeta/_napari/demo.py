"""``make demo``: the main job on the bundled sample slide, with a napari screenshot.

Opens the bundled Aperio sample (CMU-1-Small-Region.svs), detects tissue, runs the
bundled default patch classifier over it (tissue-masked, 8-fold test-time augmentation)
and writes the full result folder of ``lnmeta predict`` — probability heatmap, binary
and 3-tier maps (OME-Zarr), lesions (QuPath GeoJSON), overview PNG, ``summary.json`` —
then shows the slide with those layers in napari and saves a screenshot.

Run as ``python -m napari_lnmeta._napari.demo --out out/demo`` (under Xvfb when headless).
The equivalent command line is::

    lnmeta predict src/napari_lnmeta/data/CMU-1-Small-Region.svs -o out/demo/predict \\
        --stride 4 --tta --overwrite

The default model is a low-magnification screening model trained on one CAMELYON16
slide (see docs/training.md); the sample slide is not a lymph node and has no
metastasis, so its heatmap shows what the model makes of ordinary H&E tissue.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo", help="output folder (replaced)")
    ap.add_argument("--stride", type=int, default=4,
                    help="patch step in read pixels (the model's patch is 16)")
    ap.add_argument("--no-screenshot", action="store_true", help="skip napari")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from ..core.inference import InferenceConfig
    from ..core.predict import predict_to_folder_job
    from ..io import jsonio
    from ..io.slide import open_slide
    from ..progress import TextProgress, run
    from .sample import sample_path

    t0 = time.perf_counter()
    slide = open_slide(sample_path("CMU-1-Small-Region.svs"))
    info = slide.info()
    (out / "slide_info.json").write_text(jsonio.dumps(info, indent=2))
    print(f"slide:   {slide.path} ({info['level_dimensions'][0][0]} x {info['level_dimensions'][0][1]} px, "
          f"{slide.mpp} µm/px)")
    cfg = InferenceConfig(stride=args.stride, tta=True, device="auto")
    pred = run(predict_to_folder_job(slide, out / "predict", cfg, overwrite=True), TextProgress())
    s = pred.summary()
    print(f"tissue:  {s['tissue']['area_mm2']:.2f} mm² "
          f"({100 * s['tissue']['fraction']:.0f}% of the slide)")
    print(f"model:   {s['model']['architecture']} ({s['model']['patch_size']} px at "
          f"{s['model']['mpp']} µm/px), {s['counts']['patches']} patches on {s['device']}")
    print(f"score:   max {s['score']['max']:.3f}, top-{s['score']['top_k']} mean "
          f"{s['score']['top_k_mean']:.3f}; {s['counts']['lesions']} lesion candidates")

    if not args.no_screenshot:
        shot = screenshot(slide, pred, out / "screenshot.png")
        print(f"napari:  {shot}")
    print(f"results: {out / 'predict'} (summary.json, probability.ome.zarr, tiers.ome.zarr, "
          f"lesions.geojson, overview.png)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def screenshot(slide, pred, path: Path) -> Path:
    """Show the slide, tissue and prediction layers in napari and save the window."""
    # torch/torchvision are already imported (by the run above) before Qt/OpenGL start.
    import napari

    from ..core.tissue import TISSUE_COLOR, TISSUE_LABEL
    from .layers import slide_layer_data
    from .prediction_layers import labels_layer_data, prediction_layer_data

    viewer = napari.Viewer(show=False, title="napari-lnmeta demo")
    try:
        data, kw, _ = slide_layer_data(slide)
        viewer.add_image(data, **kw)
        tissue = pred.result.tissue
        tdata, tkw, _ = labels_layer_data(tissue.labels(), tissue.frame,
                                          {TISSUE_LABEL: TISSUE_COLOR}, name="Tissue",
                                          opacity=0.25)
        tkw["visible"] = False
        viewer.add_labels(tdata, **tkw)
        for data, kw, kind in prediction_layer_data(pred):
            getattr(viewer, f"add_{kind}")(data, **kw)
        viewer.window.resize(1400, 1000)
        viewer.reset_view()
        viewer.screenshot(str(path), canvas_only=False, flash=False)
    finally:
        viewer.close()
    return path


if __name__ == "__main__":
    sys.exit(main())
