"""Hostile slides: absurd declared sizes, DICOM files real and fake, names that lie."""

from __future__ import annotations

import shutil

from tests._tiff_helpers import huge_tiff

from ._framework import Spec, Workspace, case

CMU1 = "cmu1_small_region_svs/CMU-1-Small-Region.svs"




def _dicom(ws: Workspace, levels: int = 1):
    from tests._dicom_helpers import cached_dicom

    src = cached_dicom(ws.shared / CMU1, levels=levels)
    if levels == 1:
        return shutil.copy(src, ws.path("slide.dcm"))
    return shutil.copytree(src, ws.path("series"))


@case("tissue on a 138-byte TIFF declaring 10^6 x 10^6 px", expect="error")
def _huge_tissue(ws: Workspace) -> Spec:
    slide = huge_tiff(ws.path("huge.tif"))
    return Spec(["tissue", str(slide), "-o", str(ws.path("out.ome.zarr"))], inputs=[slide],
                timeout=60, subprocess=True)


@case("info on a 138-byte TIFF declaring 10^6 x 10^6 px", expect="error")
def _huge_info(ws: Workspace) -> Spec:
    slide = huge_tiff(ws.path("huge.tif"))
    return Spec(["info", str(slide)], inputs=[slide], timeout=60)


@case("predict on a 138-byte TIFF declaring 10^5 x 10^5 px in one strip", expect="error")
def _huge_strip_predict(ws: Workspace) -> Spec:
    slide = huge_tiff(ws.path("strip.tif"), side=10**5)
    return Spec(["predict", str(slide), "-o", str(ws.path("pred"))], inputs=[slide],
                timeout=60, subprocess=True)


@case("info on a DICOM WSI file", expect="success")
def _dicom_info(ws: Workspace) -> Spec:
    slide = _dicom(ws)
    return Spec(["info", str(slide), "--json"], inputs=[slide])


def _mask_check(out):
    def check(_ws):
        from napari_lnmeta.core.tissue import TissueMask

        if not out.exists():
            return "no tissue mask written"
        tm = TissueMask.load(out)
        if tm.slide_mpp is None or abs(tm.slide_mpp - 0.499) > 1e-6:
            return f"mask lost the slide's µm/px: {tm.slide_mpp}"
        if tuple(tm.slide_shape) != (2967, 2220) or not 0.05 < tm.area_fraction < 0.95:
            return f"implausible mask: {tm.slide_shape}, {tm.area_fraction:.3f} tissue"
        return None

    return check


@case("tissue on a DICOM WSI file", expect="success")
def _dicom_file_tissue(ws: Workspace) -> Spec:
    slide = _dicom(ws)
    out = ws.path("tissue.ome.zarr")
    return Spec(["tissue", str(slide), "-o", str(out)], inputs=[slide], outputs=[out],
                check=_mask_check(out))


@case("tissue on a DICOM series folder", expect="success")
def _dicom_tissue(ws: Workspace) -> Spec:
    folder = _dicom(ws, levels=2)
    out = ws.path("tissue.ome.zarr")
    return Spec(["tissue", str(folder), "-o", str(out)], inputs=[folder], outputs=[out],
                check=_mask_check(out))


@case("info on a .dcm that is a DICOM but not a slide", expect="error")
def _dicom_not_wsi(ws: Workspace) -> Spec:
    fake = ws.path("ct.dcm")
    fake.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\x00" * 4)
    return Spec(["info", str(fake)], inputs=[fake])


@case("info on a .dcm holding text", expect="error")
def _dicom_text(ws: Workspace) -> Spec:
    fake = ws.path("notes.dcm")
    fake.write_text("not a DICOM file\n" * 20)
    return Spec(["info", str(fake)], inputs=[fake])


@case("tissue on an SVS renamed .png (content decides)", expect="success")
def _svs_named_png(ws: Workspace) -> Spec:
    slide = ws.copy_shared(CMU1, "scan.png")
    out = ws.path("tissue.ome.zarr")
    return Spec(["tissue", str(slide), "-o", str(out)], inputs=[slide], outputs=[out],
                check=_mask_check(out))


@case("info on a DICOM series folder missing its full-resolution file", expect="success")
def _dicom_partial_series(ws: Workspace) -> Spec:
    folder = _dicom(ws, levels=2)
    (folder / "level0.dcm").unlink()
    return Spec(["info", str(folder)], inputs=[folder])
