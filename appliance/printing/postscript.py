"""A streaming PostScript Level 3 writer: DSC structure, page setup, rectangles, text, and
images drawn by the ``image`` operator from Flate- or DCT-compressed, ASCII85-encoded data.

Image data is compressed and encoded a block of rows at a time straight into the output file,
so no whole film (nor whole image, with Flate) is ever held as PostScript in memory.
"""

from __future__ import annotations

import base64
import io
import zlib
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

from .layout import Placement, Rect

# ASCII85 line width; DSC asks for lines under 255 characters.
A85_LINE = 78
# Every image goes to the printer with 8 bits per gray or RGB component, after the tone pipeline.
BITS_PER_COMPONENT = 8


def _number(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def ps_string(text: str) -> str:
    """A PostScript string literal; characters outside printable ASCII become '?' because the
    standard fonts' encoding is not Latin-1."""
    safe = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return "(" + safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def png_predict(rows: np.ndarray, previous: np.ndarray, bpp: int) -> np.ndarray:
    """PNG-filter a block of rows (uint8, shape (h, w*bpp)) given the row above it: per row, the
    cheapest of Sub, Up and Paeth by the usual sum-of-absolute-differences heuristic. Returns
    (h, 1 + w*bpp) bytes, each row led by its filter type, as FlateDecode /Predictor 15 reads."""
    x = rows.astype(np.int16)
    up = np.empty_like(x)
    up[0] = previous
    up[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    up_left = np.zeros_like(x)
    up_left[:, bpp:] = up[:, :-bpp]
    guess = left + up - up_left
    to_left, to_up, to_up_left = np.abs(guess - left), np.abs(guess - up), np.abs(guess - up_left)
    paeth = np.where((to_left <= to_up) & (to_left <= to_up_left), left, np.where(to_up <= to_up_left, up, up_left))
    candidates = np.stack([(x - left) & 0xFF, (x - up) & 0xFF, (x - paeth) & 0xFF]).astype(np.uint8)
    signed = candidates.view(np.int8).astype(np.int16)
    choice = np.abs(signed).sum(axis=2).argmin(axis=0)
    out = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = np.array([1, 2, 4], dtype=np.uint8)[choice]
    out[:, 1:] = candidates[choice, np.arange(x.shape[0])]
    return out


class PostScriptWriter:
    """Writes one document; call ``begin`` once, then ``begin_page``/drawing/``end_page`` per
    page, then ``end``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._page = 0

    def _line(self, text: str) -> None:
        self.out.write(text.encode("ascii") + b"\n")

    def begin(self, pages: int, page_w: float, page_h: float, title: str, creator: str) -> None:
        self._line("%!PS-Adobe-3.0")
        self._line(f"%%Title: {ps_string(title)[1:-1]}")
        self._line(f"%%Creator: {ps_string(creator)[1:-1]}")
        self._line("%%LanguageLevel: 3")
        self._line(f"%%BoundingBox: 0 0 {round(page_w)} {round(page_h)}")
        self._line(f"%%Pages: {pages}")
        self._line("%%DocumentData: Clean7Bit")
        self._line("%%EndComments")
        self._line("%%BeginProlog")
        # Short names keep the page description readable; nothing here depends on the device.
        self._line("/RF { rectfill } bind def")
        self._line("%%EndProlog")

    def begin_page(self, page_w: float, page_h: float, media: str) -> None:
        self._page += 1
        self._line(f"%%Page: {self._page} {self._page}")
        self._line("%%BeginPageSetup")
        self._line(f"%%BeginFeature: *PageSize {media}")
        self._line(f"<< /PageSize [{_number(page_w)} {_number(page_h)}] >> setpagedevice")
        self._line("%%EndFeature")
        self._line("%%EndPageSetup")
        self._line("save")

    def end_page(self) -> None:
        self._line("restore")
        self._line("showpage")

    def end(self) -> None:
        self._line("%%Trailer")
        self._line("%%EOF")

    # ---- drawing ----

    def film_transform(self, placement: Placement) -> None:
        """Map film points onto the page (see layout.Placement)."""
        self._line(f"{_number(placement.origin_x)} {_number(placement.origin_y)} translate")
        if placement.rotated:
            self._line("90 rotate")
        self._line(f"{_number(placement.scale)} dup scale")

    def fill_rect(self, rect: Rect, gray: float) -> None:
        self._line(
            f"{_number(gray)} setgray {_number(rect.x)} {_number(rect.y)} {_number(rect.w)} {_number(rect.h)} RF"
        )

    def stroke_rect(self, rect: Rect, gray: float, width: float) -> None:
        self._line(
            f"{_number(gray)} setgray {_number(width)} setlinewidth "
            f"{_number(rect.x)} {_number(rect.y)} {_number(rect.w)} {_number(rect.h)} rectstroke"
        )

    def text(self, box: Rect, baseline: float, size: float, min_size: float, gray: float, text: str) -> None:
        """Helvetica from the left edge of ``box``; too wide for it at ``size``, the font is shrunk
        (the interpreter measures it: only it has the metrics) down to ``min_size``, and what is
        still too wide is clipped at the box's edge."""
        width = _number(box.w)
        self._line("gsave")
        self._line(f"{_number(box.x)} {_number(box.y)} {width} {_number(box.h)} rectclip {_number(gray)} setgray")
        self._line(f"/Helvetica findfont {_number(size)} scalefont setfont")
        self._line(ps_string(text))
        self._line(
            f"dup stringwidth pop dup {width} gt {{ {width} exch div {_number(size)} mul {_number(min_size)} max "
            "/Helvetica findfont exch scalefont setfont } { pop } ifelse"
        )
        self._line(f"{_number(box.x)} {_number(baseline)} moveto show")
        self._line("grestore")

    def _image_header(
        self, rect: Rect, clip: Rect | None, width: int, height: int, color: bool, interpolate: bool, decode: str
    ) -> None:
        self._line("gsave")
        if clip is not None:
            self._line(f"{_number(clip.x)} {_number(clip.y)} {_number(clip.w)} {_number(clip.h)} rectclip")
        self._line(f"{_number(rect.x)} {_number(rect.y)} translate {_number(rect.w)} {_number(rect.h)} scale")
        space, ranges = ("/DeviceRGB", "[0 1 0 1 0 1]") if color else ("/DeviceGray", "[0 1]")
        self._line(f"{space} setcolorspace")
        # The image's first row is its top: flip y in the image matrix. One entry a line: DSC
        # asks for lines under 255 characters, and the dictionary as one line is longer.
        self._line(f"<< /ImageType 1 /Width {width} /Height {height} /BitsPerComponent {BITS_PER_COMPONENT}"
                   f" /Decode {ranges}")
        self._line(f"   /ImageMatrix [{width} 0 0 -{height} 0 {height}] /Interpolate {str(interpolate).lower()}")
        self._line(f"   /DataSource currentfile /ASCII85Decode filter {decode} filter")
        self._line(">> image")

    def image(
        self,
        rect: Rect,
        width: int,
        height: int,
        chunks: Iterable[np.ndarray],
        color: bool = False,
        interpolate: bool = False,
        clip: Rect | None = None,
    ) -> None:
        """Draw 8-bit rows (gray, or RGB interleaved) into ``rect``, Flate-compressed after PNG
        row prediction (neighbouring pixels of medical images are alike; their differences
        compress far better than the pixels)."""
        colors = 3 if color else 1
        decode = (f"<< /Predictor 15 /Colors {colors} /BitsPerComponent {BITS_PER_COMPONENT} /Columns {width} >>"
                  " /FlateDecode")
        self._image_header(rect, clip, width, height, color, interpolate, decode)
        # After prediction the data are mostly small differences: run-length matching plus
        # Huffman coding is both faster and smaller than full LZ77 search (measured on CR and US).
        compressor = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        pending = b""
        previous = np.zeros(width * colors, dtype=np.uint8)
        for chunk in chunks:
            rows = np.ascontiguousarray(chunk).reshape(chunk.shape[0], width * colors)
            pending += compressor.compress(png_predict(rows, previous, colors).data)
            previous = rows[-1]
            pending = self._a85(pending, final=False)
        pending += compressor.flush()
        self._a85(pending, final=True)
        self._line("~>")
        self._line("grestore")

    def image_jpeg(
        self,
        rect: Rect,
        pixels: np.ndarray,
        quality: int,
        interpolate: bool = False,
        clip: Rect | None = None,
    ) -> None:
        """Draw an 8-bit image (2-D gray or RGB) as baseline JPEG (lossy, much smaller on noisy films)."""
        from PIL import Image

        color = pixels.ndim == 3
        height, width = pixels.shape[:2]
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB" if color else "L").save(buffer, "JPEG", quality=quality, optimize=True)
        self._image_header(rect, clip, width, height, color, interpolate, "/DCTDecode")
        self._a85(buffer.getvalue(), final=True)
        self._line("~>")
        self._line("grestore")

    def _a85(self, data: bytes, final: bool) -> bytes:
        """Encode whole 4-byte groups (all of it when final) and return what is left over."""
        usable = len(data) if final else len(data) - len(data) % 4
        if usable:
            encoded = base64.a85encode(data[:usable], wrapcol=A85_LINE)
            # A line starting with "%" could be taken for a DSC comment by spoolers; ASCII85
            # ignores white space, so indent such lines.
            encoded = encoded.replace(b"\n%", b"\n %")
            if encoded.startswith(b"%"):
                encoded = b" " + encoded
            self.out.write(encoded + b"\n")
        return data[usable:]
