"""``lnmeta info``: what a slide is, without reading pixels."""

from __future__ import annotations

from ..io import jsonio
from . import add_mpp, command


@command("info", help="Print a slide's format, levels, downsamples, µm/px, objective and vendor")
def info(p):
    p.add_argument("slide", help="slide file or OME-Zarr directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_mpp(p)

    def run(args):
        from ..io.slide import open_slide

        slide = open_slide(args.slide, mpp=args.mpp)
        d = slide.info()
        if args.json:
            print(jsonio.dumps(d, indent=2))
        else:
            print(f"file:        {d['path']}")
            print(f"format:      {d['format']}")
            print(f"vendor:      {d['vendor'] or '-'}")
            mpp = f"{d['mpp']:.4f} µm/px ({d['mpp_source']})" if d["mpp"] else "unknown (use --mpp)"
            print(f"mpp:         {mpp}")
            print(f"objective:   {d['objective_power'] or '-'}")
            print("levels:      level  width x height  downsample")
            for i, ((w, h), ds) in enumerate(zip(d["level_dimensions"], d["level_downsamples"], strict=True)):
                print(f"             {i:5d}  {w:>6d} x {h:<6d}  {ds:g}")
            if d["associated_images"]:
                print(f"associated:  {', '.join(d['associated_images'])}")

    return run
