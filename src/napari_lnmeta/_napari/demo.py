"""``make demo``: the main job on the bundled sample slide, with a napari screenshot.

Run as ``python -m napari_lnmeta._napari.demo --out out/demo`` (under Xvfb when headless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo", help="output folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari

    from ..io.slide import open_slide
    from .layers import slide_layer_data
    from .sample import sample_path

    svs = str(sample_path("CMU-1-Small-Region.svs"))
    t0 = time.perf_counter()
    slide = open_slide(svs)
    info = slide.info()
    print(json.dumps(info, indent=2))
    viewer = napari.Viewer(show=False)
    data, kw, kind = slide_layer_data(slide)
    viewer.add_image(data, **kw)
    viewer.reset_view()
    shot = out / "screenshot.png"
    viewer.screenshot(str(shot), canvas_only=False, flash=False)
    (out / "slide_info.json").write_text(json.dumps(info, indent=2))
    viewer.close()
    print(f"wrote {shot} and {out / 'slide_info.json'} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
