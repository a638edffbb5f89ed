"""Tile-level reading of TIFF pyramids, private to :mod:`napari_lnmeta.io.slide`.

:class:`_TileDecoder` reads a tile's compressed bytes at their file offset and decodes them
in the calling thread (reader threads decode in parallel), checking JPEG tiles
(:func:`jpeg_problem`) and naming a damaged one (:class:`CorruptTileError`);
:class:`TileCache` keeps decoded tiles within a byte budget that the inference engine can
reserve for a run. :mod:`napari_lnmeta.io.slide` re-exports the public names.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError


class CorruptTileError(SlideError):
    """A stored tile cannot be decoded or fails the JPEG integrity checks.

    Names the tile: pyramid ``level``, ``tile`` index ``(row, col)`` in the level's tile
    grid and ``region`` in level-0 pixels ``(row0, col0, row1, col1)``.
    """

    def __init__(self, path: str | Path, level: int, tile: tuple[int, int],
                 region: tuple[int, int, int, int], problem: str):
        self.level, self.tile, self.region = int(level), tuple(tile), tuple(region)
        r0, c0, r1, c1 = self.region
        super().__init__(path, f"corrupt tile at level {self.level}, tile {self.tile} "
                               f"(level-0 rows {r0}-{r1}, cols {c0}-{c1}): {problem}")
        self.reason = problem

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "tile": list(self.tile), "region": list(self.region),
                "problem": self.reason}


def jpeg_problem(data: bytes, *, strict: bool = True, transcode: bool = False) -> str | None:
    """Why a JPEG stream is corrupt, or None when it passes the checks.

    Decoders repair damaged JPEG data silently (a flipped byte shifts colours in the rest
    of the tile). Three checks catch it:

    * structure: SOI first, EOI last (after padding), and in the entropy-coded data every
      ``0xFF`` followed only by a stuffed ``0x00``, the next restart marker in sequence
      (``RST0`` ... ``RST7``), or a segment marker of a following scan;
    * entropy-coded data (``strict``): the whole Huffman stream is decoded by
      libjpeg-turbo (through simplejpeg) with its warnings as errors: a bad Huffman
      code, a stream that ends before the last block or leaves bytes over before EOI.
      The decode runs at 1/8 scale (no full inverse DCT): about the cost of one tile
      decode;
    * ``transcode``: in addition, the stream is parsed by a lossless JPEG → JPEG XL
      transcoder (libjxl through imagecodecs), an independent Huffman parser that
      catches a few flips the decoder accepts (and misses others), at 7–11x a decode.

    Flipping a byte of Huffman data does not always break any rule (any bit string is
    some Huffman code); such tiles are not detectable without the original.
    """
    problem, end = _ends_problem(data)
    if problem is not None:
        return problem
    problem = _structure_problem(data, end)
    if problem is not None or not (strict or transcode):
        return problem
    if strict:
        problem = _decoder_problem(bytes(data[:end]))
        if problem is not None:
            return problem
    if transcode:
        import imagecodecs

        try:
            imagecodecs.jpegxl_encode_jpeg(bytes(data[:end]))
        except Exception as e:  # noqa: BLE001 - any refusal means a damaged stream
            return f"the Huffman-coded data is damaged ({type(e).__name__})"
    return None


def _ends_problem(data: bytes) -> tuple[str | None, int]:
    """SOI first and EOI last (after zero padding): ``(problem or None, end of EOI)``."""
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        return "the JPEG stream does not start with SOI", n
    end = n
    while end > 2 and data[end - 1] == 0:
        end -= 1  # padding after EOI
    if data[end - 2:end] != b"\xff\xd9":
        return "the JPEG stream does not end with EOI (truncated)", end
    return None, end


def _decoder_problem(data: bytes) -> str | None:
    """libjpeg-turbo's complaint about the entropy-coded data, or None."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
    except Exception as e:  # noqa: BLE001 - ValueError with libjpeg's message
        return _libjpeg_problem(e)
    return None


def _libjpeg_problem(err: Exception) -> str:
    """The problem a strict libjpeg-turbo decode (simplejpeg) refused a stream for."""
    msg = str(err).strip().rstrip(".") or type(err).__name__
    return f"the Huffman-coded data is damaged (libjpeg: {msg})"


def tiff_direct_enabled() -> bool:
    """``LNMETA_TIFF_DIRECT`` (default on): read TIFF levels through their tiles."""
    return os.environ.get("LNMETA_TIFF_DIRECT", "1") != "0"


def _structure_problem(data: bytes, end: int) -> str | None:
    """The marker-level check of :func:`jpeg_problem` (``data[:end]`` ends with EOI)."""
    sos = data.find(b"\xff\xda", 2)
    if sos < 0:
        return "the JPEG stream has no scan (SOS)"
    pos = sos + 2
    while True:
        seglen = int.from_bytes(data[pos:pos + 2], "big")
        pos += seglen  # skip the scan header
        rst = 0
        while True:
            i = data.find(b"\xff", pos, end)
            if i < 0 or i + 1 >= end:
                return "the JPEG stream ends inside the entropy-coded data"
            m = data[i + 1]
            if m == 0x00:
                pos = i + 2
            elif 0xD0 <= m <= 0xD7:
                if m != 0xD0 + rst:
                    return f"restart marker RST{m - 0xD0} out of sequence (expected RST{rst})"
                rst = (rst + 1) % 8
                pos = i + 2
            elif m == 0xFF:
                pos = i + 1  # fill byte
            elif m == 0xD9:
                if i + 2 != end:
                    return f"EOI marker inside the data ({end - i - 2} bytes follow it)"
                break
            elif m in (0xC4, 0xDB, 0xDD, 0xDA) or 0xE0 <= m <= 0xEF or m == 0xFE:
                # tables/restart interval/another scan (progressive): skip segments
                while m != 0xDA:
                    seglen = int.from_bytes(data[i + 2:i + 4], "big")
                    i += 2 + seglen
                    if i + 1 >= end or data[i] != 0xFF:
                        return "a marker segment between scans is damaged"
                    m = data[i + 1]
                    if m == 0xD9:
                        return None if i + 2 == end else "EOI marker inside the data"
                pos = i + 2
                break
            else:
                return f"invalid marker 0xFF{m:02X} in the entropy-coded data (byte {i})"
        if m == 0xD9:
            return None


def _jpeg_check_enabled() -> str:
    """``LNMETA_JPEG_CHECK``: ``full`` (default: structure + strict decode), ``transcode``
    (also the JPEG XL transcoder), ``structure`` or ``off``."""
    v = os.environ.get("LNMETA_JPEG_CHECK", "full").strip().lower()
    return v if v in ("full", "transcode", "structure", "off") else "full"


class _TileDecoder:
    """Reads and decodes single tiles of one TIFF pyramid level, without the zarr store.

    The compressed bytes of a tile are read at their file offset (``os.pread``: no shared
    file position, so threads never wait on each other) and decoded by tifffile's decoder
    for the page (imagecodecs, which releases the GIL) in the calling thread: the reader
    threads of inference and training decode in parallel. Only plain layouts qualify: one
    tiled page per level, 8-bit, 3 or 4 interleaved samples, no other dimensions. Set
    ``LNMETA_TIFF_DIRECT=0`` to read everything through the zarr store instead.
    """

    def __init__(self, path: Path, page, level: int = 0, downsample: tuple[float, float] = (1.0, 1.0)):
        self.path = path
        self.level = int(level)
        self.downsample = downsample  # level-0 px per level px (rows, cols)
        self.is_jpeg = int(page.compression) == 7
        self.check = _jpeg_check_enabled() if self.is_jpeg else "off"
        self.th, self.tw = int(page.tilelength), int(page.tilewidth)
        self.h, self.w = int(page.imagelength), int(page.imagewidth)
        self.ntx = -(-self.w // self.tw)
        self.offsets = tuple(int(o) for o in page.dataoffsets)
        self.counts = tuple(int(c) for c in page.databytecounts)
        self.spp = int(page.samplesperpixel)
        # plain baseline JPEG in YCbCr: whole tiles can be decoded elsewhere (on a GPU)
        self.jpeg_ycbcr = (int(page.compression) == 7 and int(page.photometric) == 6
                           and self.spp == 3
                           and getattr(page, "jpegheader", None) is None)
        self.jpegtables = bytes(page.jpegtables) if page.jpegtables is not None else None
        #: YCbCr JPEG tiles are decoded by one strict libjpeg-turbo pass that is also the
        #: entropy check (None: not decided yet; the level's first tile decides, below)
        self._strict_decode: bool | None = None
        self._decode = page.decode
        self._kw: dict = {"_fullsize": True}
        if page.jpegtables is not None:
            self._kw["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            self._kw["jpegheader"] = page.jpegheader
            self.check = "off"  # tiles are pieces of one stream (NDPI), not JPEG files
        self.fill = 0  # value of tiles the writer left out (tifffile's fill value)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        # a slide dropped without close() must not leak its descriptors
        self._finalizer = weakref.finalize(self, _close_fd, self._fd)
        self._local = threading.local()
        self._verified: set[tuple[int, int]] = set()  # tiles that passed the check
        if self.check in ("full", "transcode") and not self._entropy_check_accepts_level():
            self.check = "structure"

    def _full_stream(self, data: bytes) -> bytes:
        if self.jpegtables is not None and len(self.jpegtables) > 4:
            return self.jpegtables[:-2] + data[2:]  # the shared tables merged in
        return data

    def _entropy_check_accepts_level(self, samples: int = 3) -> bool:
        """Whether the entropy-coded-data checks can judge this level's JPEG flavour.

        The strict decoder or the JPEG XL transcoder may refuse valid but unusual streams
        (the transcoder refuses component ids counted from 0, as in some scanners'
        TIFFs); where the first few stored tiles that pass the structure check are
        refused, only the structure is checked."""
        tried = 0
        for i, count in enumerate(self.counts):
            if not count:
                continue
            try:
                data = self._full_stream(self._read(self.offsets[i], count))
            except OSError:
                return True
            if jpeg_problem(data, strict=False) is not None:
                continue
            if self._problem(data) is None:
                return True
            tried += 1
            if tried >= samples:
                return False
        return tried == 0

    def _problem(self, data: bytes) -> str | None:
        """:func:`jpeg_problem` at this level's check (``self.check``)."""
        return jpeg_problem(data, strict=self.check in ("full", "transcode"),
                            transcode=self.check == "transcode")

    @classmethod
    def for_level(cls, path: Path, series_index: int, level: int) -> _TileDecoder | None:
        if not tiff_direct_enabled():
            return None
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                lv = tf.series[series_index].levels[level]
                pages = [p for p in lv.pages if p is not None]
                page = lv.keyframe
                ok = (len(pages) == 1 and page.is_tiled and page.planarconfig == 1
                      and page.samplesperpixel in (3, 4) and page.dtype == np.uint8
                      and int(np.prod(lv.shape)) == int(np.prod(page.shape))
                      and len(page.dataoffsets) == -(-page.imagelength // page.tilelength)
                      * -(-page.imagewidth // page.tilewidth))
                if not ok:
                    return None
                page.decode  # noqa: B018 - build the decoder while the file is open
                base = tf.series[series_index].levels[0].keyframe
                ds = (base.imagelength / page.imagelength, base.imagewidth / page.imagewidth)
                return cls(Path(path), page, level, ds)
        except Exception:
            return None

    @classmethod
    def for_openslide_level(cls, path: Path, level_shapes: list[tuple[int, int]],
                            level: int) -> _TileDecoder | None:
        """The tiled JPEG page of a TIFF whose size is OpenSlide's level ``level``."""
        with open(path, "rb") as fh:
            if fh.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return None
        import tifffile

        h, w = level_shapes[level]
        h0, w0 = level_shapes[0]
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                if (page.is_tiled and int(page.compression) == 7 and page.planarconfig == 1
                        and (int(page.imagelength), int(page.imagewidth)) == (h, w)
                        and len(page.dataoffsets) == -(-page.imagelength // page.tilelength)
                        * -(-page.imagewidth // page.tilewidth)):
                    return cls(Path(path), page, level, (h0 / h, w0 / w))
        return None

    def _read(self, offset: int, count: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd, count, offset)
        fh = getattr(self._local, "fh", None)  # Windows: one handle per thread
        if fh is None:
            fh = self._local.fh = open(self.path, "rb")  # noqa: SIM115
        fh.seek(offset)
        return fh.read(count)

    def _raw(self, ty: int, tx: int) -> bytes | None:
        """The stored bytes of tile ``(ty, tx)``; None for a tile the writer left out."""
        i = ty * self.ntx + tx
        count = self.counts[i]
        return self._read(self.offsets[i], count) if count else None

    def jpeg(self, ty: int, tx: int) -> bytes | None:
        """Tile ``(ty, tx)`` as a complete JPEG stream (the file's shared tables merged
        in), or None for a tile the writer left out. Only for ``jpeg_ycbcr`` levels."""
        data = self._raw(ty, tx)
        if data is not None and self.jpegtables is not None and len(self.jpegtables) > 4:
            # tables stream = SOI tables EOI; tile stream = SOI frame EOI
            data = self.jpegtables[:-2] + data[2:]
        return data

    def verify(self, ty: int, tx: int) -> None:
        """Check tile ``(ty, tx)``'s stored JPEG without decoding it (once per tile)."""
        if self.check == "off" or not (0 <= ty * self.ntx + tx < len(self.counts)):
            return
        if (ty, tx) in self._verified:
            return
        try:
            data = self._raw(ty, tx)
        except OSError as e:
            raise self.corrupt(ty, tx, f"cannot read the stored bytes ({e})") from e
        if data is not None:
            self._check(ty, tx, data)
        self._verified.add((ty, tx))

    def _check(self, ty: int, tx: int, data: bytes) -> None:
        """Raise the :class:`CorruptTileError` of tile ``(ty, tx)`` when its stored bytes
        fail :func:`jpeg_problem` at this level's check."""
        problem = self._problem(self._full_stream(data))
        if problem is not None:
            raise self.corrupt(ty, tx, problem)

    def verify_region(self, y: int, x: int, h: int, w: int) -> None:
        """:meth:`verify` every tile under level pixels ``[y, y+h) x [x, x+w)``."""
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(self.h, y + h), min(self.w, x + w)
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1 if y1 > y0 else 0):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1 if x1 > x0 else 0):
                self.verify(ty, tx)

    def corrupt(self, ty: int, tx: int, problem: str) -> CorruptTileError:
        """The error naming tile ``(ty, tx)`` of this level and where it lies on the slide."""
        dy, dx = self.downsample
        r0, c0 = ty * self.th, tx * self.tw
        r1, c1 = min(r0 + self.th, self.h), min(c0 + self.tw, self.w)
        region = (round(r0 * dy), round(c0 * dx), round(r1 * dy), round(c1 * dx))
        return CorruptTileError(self.path, self.level, (ty, tx), region, problem)

    def tile(self, ty: int, tx: int, *, check: bool = True) -> np.ndarray:
        """Tile ``(ty, tx)`` as ``(rows, cols, 3)`` uint8, cut to the level's extent.

        Raises :class:`CorruptTileError` (naming the tile) when the stored bytes cannot be
        decoded or, for JPEG, fail :func:`jpeg_problem` (``LNMETA_JPEG_CHECK``; a tile is
        checked once; ``check=False`` decodes without checking). A tile the writer left
        out reads as :attr:`fill`.
        """
        rows = min(self.th, self.h - ty * self.th)
        cols = min(self.tw, self.w - tx * self.tw)
        try:
            data = self._raw(ty, tx)
        except OSError as e:
            raise self.corrupt(ty, tx, f"cannot read the stored bytes ({e})") from e
        if data is None:  # a tile the writer left out
            return np.full((rows, cols, 3), self.fill, np.uint8)
        checking = check and self.check != "off" and (ty, tx) not in self._verified
        if checking and self.check == "full" and self._strict(ty, tx, data):
            # The decode that makes the pixels checks the entropy-coded data; it refuses
            # every stream the marker scan refuses (thousands of damaged real tiles,
            # none missed), so the scan (Python, holding the GIL) only names the damage.
            stream = self._full_stream(data)
            problem, end = _ends_problem(stream)
            if problem is None:
                out, problem = self._decode_strict(data)
                if problem is not None:
                    problem = _structure_problem(stream, end) or problem
            if problem is not None:
                raise self.corrupt(ty, tx, problem)
            self._verified.add((ty, tx))
            return np.ascontiguousarray(out[:rows, :cols])
        if checking:
            self._check(ty, tx, data)
            self._verified.add((ty, tx))
        try:
            out = self._decode(data, ty * self.ntx + tx, **self._kw)[0]
        except Exception as e:  # noqa: BLE001 - the decoders raise many types
            raise self.corrupt(ty, tx, f"cannot decode it ({type(e).__name__}: {e})") from e
        if out is None or np.asarray(out).size != self.th * self.tw * self.spp:
            raise self.corrupt(ty, tx, "the decoder returned no or a wrong-sized image")
        out = np.asarray(out).reshape(self.th, self.tw, self.spp)
        return np.ascontiguousarray(out[:rows, :cols, :3])

    def _decode_strict(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        """``(pixels, None)`` from one strict libjpeg-turbo decode, or ``(None, problem)``."""
        import simplejpeg

        try:
            out = simplejpeg.decode_jpeg(self._full_stream(data), colorspace="RGB",
                                         strict=True)
        except Exception as e:  # noqa: BLE001 - ValueError with libjpeg's message
            return None, _libjpeg_problem(e)
        if out.shape != (self.th, self.tw, 3):
            return None, f"the tile decodes to {out.shape[1]}x{out.shape[0]} px, not " \
                         f"{self.tw}x{self.th}"
        return out, None

    def _strict(self, ty: int, tx: int, data: bytes) -> bool:
        """Whether this level's YCbCr tiles are decoded by the strict decoder: decided on
        the first tile checked, which must decode to exactly tifffile's pixels."""
        if self._strict_decode is None:
            ok = False
            if self.jpeg_ycbcr:
                try:
                    ours, problem = self._decode_strict(data)
                    ref = self._decode(data, ty * self.ntx + tx, **self._kw)[0]
                    ok = (problem is None and ref is not None
                          and np.array_equal(ours, np.asarray(ref).reshape(ours.shape)))
                except Exception:  # noqa: BLE001 - the usual decode and check then
                    ok = False
            self._strict_decode = ok
        return self._strict_decode

    def read(self, y: int, x: int, h: int, w: int, *, cache: TileCache | None = None,
             check: bool = True, workers: int = 1) -> np.ndarray:
        """Level pixels ``[y, y+h) x [x, x+w)`` (inside the level) from decoded tiles.

        With ``cache`` the tiles go through it (small reads that share tiles: patches);
        ``workers > 1`` decodes the tiles of a large region in that many threads
        (imagecodecs releases the GIL), each written straight into the output.
        """
        th, tw = self.th, self.tw
        keys = [(ty, tx) for ty in range(y // th, (y + h - 1) // th + 1)
                for tx in range(x // tw, (x + w - 1) // tw + 1)]
        out = np.empty((h, w, 3), np.uint8)

        def one(key: tuple[int, int]) -> None:
            ty, tx = key
            if cache is not None:
                t = cache.get_or_load((self.level, ty, tx),
                                      lambda: self.tile(ty, tx, check=check))
            else:
                t = self.tile(ty, tx, check=check)
            y0, x0 = max(y, ty * th), max(x, tx * tw)
            y1, x1 = min(y + h, ty * th + t.shape[0]), min(x + w, tx * tw + t.shape[1])
            out[y0 - y:y1 - y, x0 - x:x1 - x] = t[y0 - ty * th:y1 - ty * th,
                                                  x0 - tx * tw:x1 - tx * tw]

        if workers > 1 and len(keys) > 2:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(keys))) as ex:
                for _ in ex.map(one, keys):
                    pass
        else:
            for key in keys:
                one(key)
        return out

    def close(self) -> None:
        self._finalizer()


def _close_fd(fd: int) -> None:
    import contextlib

    with contextlib.suppress(OSError):
        os.close(fd)


class TileCache:
    """A thread-safe LRU of decoded tiles, bounded in bytes (0 disables it).

    ``LNMETA_TILE_CACHE_MB`` (default 64) sets the starting size per slide; a job that
    knows its reading pattern may :meth:`reserve` more, up to
    ``LNMETA_TILE_CACHE_MAX_MB`` (default 1024). A cache set to 0 stays off.
    """

    def __init__(self, capacity_bytes: int, max_bytes: int | None = None):
        from collections import OrderedDict

        self.capacity = int(capacity_bytes)
        self.max_bytes = self.capacity if max_bytes is None else max(int(max_bytes),
                                                                     self.capacity)
        self._d: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._loading: dict = {}
        self.loads = 0  # tiles decoded through get_or_load (for benchmarks)

    @classmethod
    def from_env(cls) -> TileCache:
        mb = float(os.environ.get("LNMETA_TILE_CACHE_MB", "64"))
        max_mb = float(os.environ.get("LNMETA_TILE_CACHE_MAX_MB", "1024"))
        return cls(int(mb * 2**20), int(max_mb * 2**20))

    def reserve(self, nbytes: int) -> int:
        """Grow to hold ``nbytes`` (never shrinks, never past the maximum); the new size."""
        if self.capacity > 0:
            self.capacity = max(self.capacity, min(int(nbytes), self.max_bytes))
        return self.capacity

    def get_or_load(self, key, load):
        """The cached value, or ``load()``'s: a tile wanted by several threads at once is
        decoded by the first and waited for by the others."""
        while True:
            with self._lock:
                v = self._d.get(key)
                if v is not None:
                    self._d.move_to_end(key)
                    return v
                ev = self._loading.get(key)
                if ev is None:
                    ev = self._loading[key] = threading.Event()
                    break
            ev.wait()
            with self._lock:
                v = self._d.get(key)
                if v is not None:
                    return v
            if self.capacity <= 0:
                break  # nothing is kept: decode it here
        try:
            v = load()
            self.loads += 1
            self.put(key, v)
            return v
        finally:
            with self._lock:
                if self._loading.get(key) is ev:
                    del self._loading[key]
            ev.set()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value: np.ndarray) -> None:
        if value.nbytes > self.capacity:
            return
        with self._lock:
            if key in self._d:
                return
            self._d[key] = value
            self._size += value.nbytes
            while self._size > self.capacity:
                _, old = self._d.popitem(last=False)
                self._size -= old.nbytes

    def __len__(self) -> int:
        return len(self._d)
