"""Image box pixels: decoding what an N-SET carries, the tone pipeline, and magnification.

Grayscale pixels (8-bit, or 12 bits stored in 16; MONOCHROME1/2) go through one lookup table
built per image box: stored value -> Presentation LUT -> P-value -> MONOCHROME1 and Polarity
inversion -> density range -> printer calibration -> 8-bit gray. Applying the table row-chunk by
row-chunk keeps a 60 MB image from being copied whole. RGB (planar 0 or 1) is kept as 8-bit.
Magnification (REPLICATE, BILINEAR, CUBIC) resamples by an integer factor, in row blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from . import statuses
from .errors import PrintError
from .layout import density_to_gray

# Rows per chunk when streaming an image: ~1-4 MB of pixels at a time.
CHUNK_ROWS = 256

# (Bits Allocated, Bits Stored) of the grayscale images an image box takes; color is 8-bit RGB.
GRAY_BIT_DEPTHS = ((8, 8), (16, 8), (16, 10), (16, 12), (16, 16))
COLOR_BITS = 8


@dataclass(frozen=True)
class PresentationLut:
    """A Presentation LUT: a shape (IDENTITY, LIN OD) or a table of P-values."""

    shape: Literal["IDENTITY", "LIN OD", "TABLE"]
    first_mapped: int = 0
    output_bits: int = 8
    table: np.ndarray | None = None  # uint16 entries

    @staticmethod
    def from_dataset(ds: Dataset) -> PresentationLut:
        """From an N-CREATE attribute list; raises PrintError with 0x0120/0x0106."""
        if "PresentationLUTSequence" in ds and len(ds.PresentationLUTSequence):
            item = ds.PresentationLUTSequence[0]
            if "LUTDescriptor" not in item or "LUTData" not in item:
                raise PrintError(statuses.MISSING_ATTRIBUTE, "Presentation LUT Sequence lacks LUT Descriptor/Data")
            descriptor = [int(v) for v in item.LUTDescriptor]
            if len(descriptor) != 3 or descriptor[2] not in range(8, 17):
                raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"LUT Descriptor {descriptor} not supported")
            entries = descriptor[0] or 65536
            data = item.LUTData
            if isinstance(data, bytes):
                table = np.frombuffer(data, dtype="<u2")
            else:
                table = np.asarray(data if isinstance(data, list | tuple) else [data], dtype=np.int64)
            table = table[:entries].astype(np.uint16)
            if len(table) < 2:
                raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, "LUT Data has fewer than 2 entries")
            return PresentationLut("TABLE", descriptor[1], descriptor[2], table)
        shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
        if not shape:
            raise PrintError(statuses.MISSING_ATTRIBUTE, "neither Presentation LUT Shape nor Sequence")
        if shape not in ("IDENTITY", "LIN OD"):
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"Presentation LUT Shape {shape!r} not supported")
        return PresentationLut("LIN OD" if shape == "LIN OD" else "IDENTITY")


@dataclass(frozen=True)
class ImagePixels:
    """The image of one image box as received: (rows, columns) uint8/uint16 for grayscale,
    (rows, columns, 3) uint8 for RGB. ``data`` usually views the received bytes (no copy)."""

    rows: int
    columns: int
    photometric: str  # MONOCHROME1, MONOCHROME2, RGB
    bits_stored: int
    high_bit: int
    data: np.ndarray
    aspect: tuple[int, int] = (1, 1)  # Pixel Aspect Ratio: vertical, horizontal

    @property
    def is_color(self) -> bool:
        return self.photometric == "RGB"


def _required(item: Dataset, keyword: str) -> object:
    if keyword not in item or item[keyword].value is None:
        raise PrintError(statuses.MISSING_ATTRIBUTE, f"image sequence item lacks {keyword}")
    return item[keyword].value


def decode_image(item: Dataset, color: bool) -> ImagePixels:
    """Read a Basic Grayscale/Color Image Sequence item; raises PrintError on what we cannot print."""
    samples = int(_required(item, "SamplesPerPixel"))  # type: ignore[call-overload]
    photometric = str(_required(item, "PhotometricInterpretation")).strip().upper()
    rows = int(_required(item, "Rows"))  # type: ignore[call-overload]
    columns = int(_required(item, "Columns"))  # type: ignore[call-overload]
    bits_allocated = int(_required(item, "BitsAllocated"))  # type: ignore[call-overload]
    bits_stored = int(_required(item, "BitsStored"))  # type: ignore[call-overload]
    high_bit = int(_required(item, "HighBit"))  # type: ignore[call-overload]
    representation = int(_required(item, "PixelRepresentation"))  # type: ignore[call-overload]
    raw = _required(item, "PixelData")
    invalid = statuses.INVALID_ATTRIBUTE_VALUE
    if rows < 1 or columns < 1:
        raise PrintError(invalid, f"image of {rows}x{columns} pixels")
    if representation != 0:
        raise PrintError(invalid, "signed pixels (Pixel Representation 1) are not allowed in print")
    if color:
        if samples != 3 or photometric != "RGB" or bits_allocated != COLOR_BITS or bits_stored != COLOR_BITS:
            raise PrintError(invalid, f"color image must be 8-bit RGB, got {samples}x{bits_allocated} {photometric}")
    else:
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise PrintError(invalid, f"grayscale image must be MONOCHROME1/2, got {samples} x {photometric}")
        if (bits_allocated, bits_stored) not in GRAY_BIT_DEPTHS:
            raise PrintError(invalid, f"Bits Allocated/Stored {bits_allocated}/{bits_stored} not supported")
    if not (bits_stored - 1 <= high_bit < bits_allocated):
        raise PrintError(invalid, f"High Bit {high_bit} with Bits Stored {bits_stored}")
    if not isinstance(raw, bytes | bytearray):
        raise PrintError(invalid, "Pixel Data is not a byte string")
    count = rows * columns * samples
    dtype = np.dtype("<u2") if bits_allocated == 16 else np.dtype(np.uint8)
    if len(raw) < count * dtype.itemsize:
        raise PrintError(invalid, f"Pixel Data has {len(raw)} bytes, {rows}x{columns}x{samples} needs more")
    flat = np.frombuffer(raw, dtype=dtype, count=count)
    if color:
        planar = int(item.get("PlanarConfiguration", 0) or 0)
        if planar == 1:
            data = np.ascontiguousarray(flat.reshape(3, rows, columns).transpose(1, 2, 0))
        else:
            data = flat.reshape(rows, columns, 3)
    else:
        data = flat.reshape(rows, columns)
    aspect = (1, 1)
    if "PixelAspectRatio" in item and item.PixelAspectRatio:
        values = [int(v) for v in item.PixelAspectRatio]
        if len(values) == 2 and values[0] > 0 and values[1] > 0:
            aspect = (values[0], values[1])
    return ImagePixels(rows, columns, photometric, bits_stored, high_bit, data, aspect)


def gray_lut(
    pixels: ImagePixels,
    plut: PresentationLut | None,
    reverse: bool,
    min_density: int,
    max_density: int,
    paper_white: bool,
    calibration: tuple[int, ...] | None,
) -> np.ndarray:
    """The uint8 table indexed by a stored pixel value (the whole 8- or 16-bit domain)."""
    domain = 65536 if pixels.data.dtype == np.uint16 else 256
    values = np.arange(domain, dtype=np.int64)
    # Bits outside Bits Stored/High Bit are not pixel data (overlays in old images).
    values = (values >> (pixels.high_bit - pixels.bits_stored + 1)) & ((1 << pixels.bits_stored) - 1)
    top = (1 << pixels.bits_stored) - 1
    if plut is not None and plut.shape == "TABLE" and plut.table is not None:
        entries = len(plut.table)
        # A table sized for another bit depth is stretched over this image's range.
        if entries != top + 1 or plut.first_mapped:
            index = np.rint((values - plut.first_mapped) * (entries - 1) / max(top - plut.first_mapped, 1))
        else:
            index = values
        index = np.clip(index, 0, entries - 1).astype(np.int64)
        p = plut.table[index].astype(np.float64) / ((1 << plut.output_bits) - 1)
    else:
        p = values.astype(np.float64) / top
    p = np.clip(p, 0.0, 1.0)
    if pixels.photometric == "MONOCHROME1":
        p = 1.0 - p
    if reverse:
        p = 1.0 - p
    dark = density_to_gray(max_density)
    light = 1.0 if paper_white else density_to_gray(min_density)
    if plut is not None and plut.shape == "LIN OD":
        # P-values linear in optical density between Max and Min Density.
        low = 0 if paper_white else min_density
        gray = 10.0 ** (-(max_density - p * (max_density - low)) / 100.0)
    else:
        gray = dark + p * (light - dark)
    out = np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
    if calibration is not None:
        out = np.asarray(calibration, dtype=np.uint8)[out]
    return out


def color_lut(reverse: bool) -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)
    return (255 - values).astype(np.uint8) if reverse else values


def iter_chunks(pixels: ImagePixels, lut: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The printed 8-bit pixels, a block of rows at a time."""
    for start in range(0, pixels.rows, chunk_rows):
        yield lut[pixels.data[start : start + chunk_rows]]


def printed(pixels: ImagePixels, lut: np.ndarray) -> np.ndarray:
    """The whole printed 8-bit image (for magnification, JPEG and previews)."""
    return lut[pixels.data]


# ---- magnification -----------------------------------------------------------------------------

def _keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5), the usual 'CUBIC' of image scaling."""
    a = -0.5
    t = np.abs(t)
    return np.where(
        t <= 1,
        (a + 2) * t**3 - (a + 3) * t**2 + 1,
        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0),
    )


def _taps(size: int, factor: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, shape (size*factor, taps), for resampling one axis."""
    out = np.arange(size * factor)
    # Output pixel centres in input coordinates (pixel-centre aligned, like most scalers).
    x = (out + 0.5) / factor - 0.5
    base = np.floor(x).astype(np.int64)
    offsets = np.array([0, 1]) if kind == "BILINEAR" else np.array([-1, 0, 1, 2])
    index = base[:, None] + offsets[None, :]
    distance = x[:, None] - index
    weights = 1.0 - np.abs(distance) if kind == "BILINEAR" else _keys_cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return np.clip(index, 0, size - 1), weights.astype(np.float32)


def magnify(image: np.ndarray, factor: int, kind: str) -> np.ndarray:
    """Enlarge an 8-bit image (2-D or RGB) by an integer factor: REPLICATE repeats pixels,
    BILINEAR and CUBIC interpolate (separably, a block of rows at a time)."""
    if factor <= 1 or kind == "NONE":
        return image
    if kind == "REPLICATE":
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    rows, columns = image.shape[:2]
    col_index, col_weights = _taps(columns, factor, kind)
    row_index, row_weights = _taps(rows, factor, kind)
    out = np.empty((rows * factor, columns * factor) + image.shape[2:], dtype=np.uint8)
    extra = (None,) * (image.ndim - 2)
    block = max(1, CHUNK_ROWS // factor)
    for start in range(0, rows * factor, block * factor):
        stop = min(rows * factor, start + block * factor)
        needed = row_index[start:stop]
        lo, hi = int(needed.min()), int(needed.max()) + 1
        # Horizontal pass over just the input rows this block needs.
        source = image[lo:hi].astype(np.float32)
        wide = np.zeros((hi - lo, columns * factor) + image.shape[2:], dtype=np.float32)
        for t in range(col_index.shape[1]):
            wide += source[:, col_index[:, t]] * col_weights[(slice(None), t) + extra]
        # Vertical pass.
        tall = np.zeros((stop - start, columns * factor) + image.shape[2:], dtype=np.float32)
        for t in range(row_index.shape[1]):
            tall += wide[needed[:, t] - lo] * row_weights[(slice(start, stop), t) + (None,) + extra]
        out[start:stop] = np.clip(np.rint(tall), 0, 255).astype(np.uint8)
    return out
