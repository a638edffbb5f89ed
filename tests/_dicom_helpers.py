"""Real DICOM whole-slide images for tests, made from real slide pixels with pydicom.

:func:`write_dicom_wsi` writes one level as a DICOM *VL Whole Slide Microscopy Image*
instance (SOP class 1.2.840.10008.5.1.4.1.1.77.1.6, ``TILED_FULL``, baseline JPEG
frames, pixel spacing in the shared functional groups), the layout OpenSlide 4 reads.
:func:`dicom_from_slide` turns a real slide (CMU-1-Small-Region.svs) into a single-file
DICOM slide or a series folder with one instance per level.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def write_dicom_wsi(rgb: np.ndarray, path: Path, *, mpp: float, tile: int = 256,
                    study: str | None = None, series: str | None = None,
                    frame_of_reference: str | None = None,
                    image_type: str = "VOLUME") -> Path:
    """Write ``rgb`` (``(H, W, 3)`` uint8) as one TILED_FULL VL WSI instance at ``mpp``."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    h, w = rgb.shape[:2]
    frames = []
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)  # TILED_FULL: edge tiles padded
            part = rgb[ty:ty + tile, tx:tx + tile]
            t[:part.shape[0], :part.shape[1]] = part
            buf = io.BytesIO()
            Image.fromarray(t).save(buf, "JPEG", quality=92, subsampling=1)  # 4:2:2
            frames.append(buf.getvalue())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.FrameOfReferenceUID = frame_of_reference or generate_uid()
    ds.Modality = "SM"
    ds.PatientName = "Anonymous"
    ds.PatientID = "0"
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.Rows, ds.Columns = tile, tile
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.ImagedVolumeWidth = w * mpp / 1000  # mm
    ds.ImagedVolumeHeight = h * mpp / 1000
    ds.ImagedVolumeDepth = 0.001
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm: row spacing, column spacing
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def slide_pixels(path: Path) -> tuple[np.ndarray, float]:
    """Level 0 of a real slide (OpenSlide) and its µm/px."""
    import openslide

    osr = openslide.OpenSlide(str(path))
    try:
        rgba = np.asarray(osr.read_region((0, 0), 0, osr.dimensions))
        return np.ascontiguousarray(rgba[..., :3]), float(osr.properties["openslide.mpp-x"])
    finally:
        osr.close()


def dicom_from_slide(src: Path, dest: Path, *, levels: int = 1) -> Path:
    """A DICOM slide of ``src``'s real pixels: one ``.dcm`` file (``levels=1``, ``dest`` is
    the file) or a series folder with one instance per level (``dest`` is the folder;
    level ``k`` is level 0 reduced ``2**k`` times)."""
    from pydicom.uid import generate_uid

    rgb, mpp = slide_pixels(src)
    if levels == 1:
        return write_dicom_wsi(rgb, dest, mpp=mpp)
    dest.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    img = rgb
    for k in range(levels):
        write_dicom_wsi(img, dest / f"level{k}.dcm", mpp=mpp * 2 ** k, study=study,
                        series=series, frame_of_reference=frame)
        h, w = img.shape[:2]
        img = img[:h - h % 2, :w - w % 2].reshape(h // 2, 2, w // 2, 2, 3).mean(
            axis=(1, 3)).round().astype(np.uint8)
    return dest


_BUILT: dict[tuple[str, int], Path] = {}


def cached_dicom(src: Path, *, levels: int = 1) -> Path:
    """:func:`dicom_from_slide` built once per process (in a temporary folder): copy it
    before handing it to anything that might write beside it."""
    import atexit
    import shutil
    import tempfile

    key = (str(src), levels)
    if key not in _BUILT:
        tmp = Path(tempfile.mkdtemp(prefix="lnmeta-dicom-"))
        atexit.register(shutil.rmtree, tmp, True)
        dest = tmp / ("slide.dcm" if levels == 1 else "series")
        _BUILT[key] = dicom_from_slide(src, dest, levels=levels)
    return _BUILT[key]
