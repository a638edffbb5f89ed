"""``lnmeta import-patches``: PatchCamelyon HDF5, a folder per class or a CSV of
``path,label[,slide]`` into a patch set for ``lnmeta train`` (see docs/training.md)."""

from __future__ import annotations

import argparse

from ..io.validate import mpp_arg
from . import add_out, add_overwrite, command, warn

_EPILOG = """\
inputs (the format follows from INPUT):
  PCam_x.h5            PatchCamelyon pair (*_x.h5 + *_y.h5, and *_meta.csv when present:
                       its 'wsi' column becomes the slide); 0.972 µm/px unless --mpp
  FOLDER/              one sub-folder per class of .png/.jpg/.tif images; --groups CSV
                       gives each image's slide/patient (joined on the file name)
  table.csv            columns path,label[,slide] (paths relative to the CSV)

each slide/patient/group becomes one mosaic (OUT.mosaics/<group>.ome.tif), so
--val-slides GROUP,... and --val-fraction split by group; --source names the dataset
for lnmeta train --mix SOURCE=FRACTION.

example (LC25000 lung, binary, split by its augmentation groups):
  lnmeta import-patches lc25000_lung_224/images --groups lc25000_lung_224/labels.csv \\
      --class-map lung_n=normal --class-map lung_aca=tumour --class-map lung_scc=tumour \\
      --mpp 1.0 --source lc25000 --out lc25000.npz
"""


@command("import-patches",
         help="Import PatchCamelyon HDF5, a folder per class or a path,label CSV as a patch set")
def import_patches(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("input", help="*_x.h5 (PatchCamelyon), a folder of class folders, or a CSV")
    add_out(p, "patch-set file to write (.npz)")
    p.add_argument("--mpp", type=mpp_arg("--mpp"), default=None,
                   help="µm/px of the patches (PatchCamelyon: 0.972 by default)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="resize patches to this side (µm/px scaled); default: as they are")
    p.add_argument("--source", default=None,
                   help="dataset source name for --mix (default: pcam, or the input's name)")
    p.add_argument("--classes", default=None,
                   help="class names, negative first, comma-separated (default: from the "
                        "labels; PatchCamelyon: normal,tumour)")
    p.add_argument("--class-map", action="append", metavar="LABEL=CLASS",
                   help="rename a label / class folder (repeat), e.g. lung_aca=tumour")
    p.add_argument("--y", default=None, help="PatchCamelyon labels (default: the *_y.h5 twin)")
    p.add_argument("--meta", default=None,
                   help="PatchCamelyon meta CSV with a 'wsi' column (default: *_meta.csv twin)")
    p.add_argument("--limit", type=int, default=None, help="import only the first N PCam patches")
    p.add_argument("--groups", default=None,
                   help="folder input: CSV with path (file name) and --group-column columns")
    p.add_argument("--group-column", default="group",
                   help="column of --groups naming the slide / patient (default group)")
    p.add_argument("--path-column", default="path", help="CSV input: image path column")
    p.add_argument("--label-column", default="label", help="CSV input: label column")
    p.add_argument("--slide-column", default=None,
                   help="CSV input: slide / patient / group column (default: slide, patient, "
                        "group or wsi when present)")
    add_overwrite(p)

    def run(args):
        from pathlib import Path

        from ..errors import InputError
        from ..progress import TextProgress
        from ..progress import run as drive
        from ..train import importers as im
        from .train import _pairs

        src = Path(args.input)
        cmap = _pairs(args.class_map, "--class-map")
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        h5 = None
        mpp = args.mpp
        if src.suffix == ".h5":
            items, h5 = im.pcam_items(src, args.y, args.meta,
                                      classes=classes or ("normal", "tumour"), limit=args.limit)
            source = args.source or "pcam"
            if mpp is None:
                mpp = im.KNOWN_MPP["pcam"]
            classes = classes or ["normal", "tumour"]
        elif src.is_dir():
            items = im.folder_items(src, class_map=cmap, classes=classes,
                                    groups_csv=args.groups, group_column=args.group_column)
            source = args.source or src.name
            if args.groups is None:
                warn("no --groups: every image is its own group, so a split by group is a "
                     "split by image (near-duplicates may leak)")
        elif src.suffix.lower() == ".csv":
            items = im.csv_items(src, path_column=args.path_column,
                                 label_column=args.label_column, slide_column=args.slide_column,
                                 class_map=cmap, classes=classes)
            source = args.source or src.stem
        else:
            raise InputError(f"{src}: expected a PatchCamelyon *_x.h5 file, a folder of class "
                             "folders or a CSV")
        if mpp is None:
            warn("µm/px unknown (give --mpp): models trained on this set cannot check the "
                 "resolution of the slides they are used on")
        ps = drive(im.import_patches_job(items, args.out, source=source, mpp=mpp,
                                         patch_size=args.patch_size, classes=classes,
                                         h5_x=h5, overwrite=args.overwrite), TextProgress())
        counts = dict(zip(ps.classes, ps.counts().tolist(), strict=True))
        print(f"{args.out}: {len(ps)} patches {counts} in {len(ps.slides)} group(s), "
              f"{ps.patch_size} px at {ps.read_mpp or 'unknown'} µm/px, source {source}")

    return run
