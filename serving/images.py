"""Decode one image file to the model's input: RGB, 32x32, uint8.

Shared by data preparation and by ``service.py`` so that training and serving see
pixels produced by the same code.

Formats: PNG, JPEG, BMP, GIF and WebP (:data:`FORMATS`), whatever the bytes claim
otherwise. Pillow would open any format it has a plugin for, and some plugins hand the
data to external programs (EPS to Ghostscript): an upload never reaches one.

Resize policy: images that are already 32x32 are used as they are. Others are scaled
so that the *shorter* side is 32 (antialiased: JPEG decodes at a reduced scale, other
formats are box-reduced by an integer factor first, then bilinear), then centre-cropped
to 32x32: the aspect ratio is kept and the object is assumed centred, as in CIFAR-10.
Any mode becomes RGB: palette and grey images are expanded, CMYK and YCbCr converted,
16-bit and 32-bit grey scaled down to 8 bits (not clipped), and transparency is
composited on black, as CIFAR-style exports of transparent images do. Reducing comes
before every conversion that copies pixels, so a large image costs one decode and no
full-size copies in float. Only the first frame of an animated GIF, PNG or WebP is used;
EXIF orientation is not applied.

Cost bounds, checked from the header before any pixel is decoded: files over
``MAX_IMAGE_BYTES`` and images that would decode to more than ``MAX_PIXELS`` pixels are
refused, and a JPEG, which decodes at a reduced scale, may declare at most
``MAX_PIXELS * JPEG_DRAFT_ALLOWANCE`` (a progressive JPEG buffers coefficients for its
declared size). Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) stays on behind these.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 32
# The formats an upload or a training image may be in; every other Pillow plugin stays unused.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# Most pixels one image may decode to: a few megapixels cover any photo a 32x32 classifier is
# sent at the scale it is decoded (a JPEG decodes at up to 1/8 of its size), and bound the work
# and memory of one image (a 16-bit RGBA PNG of this size is 32 MB decoded).
MAX_PIXELS = 4 * 1024 * 1024
# A JPEG decodes at a reduced scale, so it may declare more pixels than it decodes, but not
# without bound: progressive JPEGs keep coefficients for every declared pixel until the last scan.
JPEG_DRAFT_ALLOWANCE = 4
# Refuse files above this size without parsing them: no sane training image or
# upload is larger, and it bounds the memory one member of an archive can take.
MAX_IMAGE_BYTES = 64 * 1024**2
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_SOS = b"\xff\xda"
# Most scans one JPEG may have. A progressive JPEG's every scan passes over all its coefficients, and with
# arithmetic coding a scan of a few hundred bytes makes the decoder do tens of thousands of steps: bytes and
# pixels do not bound its cost, scans times pixels do (a request's total: serving/decoding.py). Encoders'
# progressive scripts use about 10 (libjpeg's: 10 for colour).
MAX_JPEG_SCANS = 64
# Frame (SOF) markers, whose segment declares the image's size and coding. With arithmetic coding (the
# second set) a JPEG's cost is bounded by neither its bytes nor its scans: a well-compressing stream of a few
# kilobytes makes the decoder visit every coefficient of every block once per scan (1.3 KB declaring
# 4096x4096 decoded in 0.58 s here). Encoders write Huffman coding unless told otherwise: refused.
_HUFFMAN_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7))
_ARITHMETIC_FRAMES = frozenset((0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# JPEG colour spaces the fast path converts to RGB as Pillow does; CMYK and YCCK take the general path.
_FAST_COLORSPACES = ("YCbCr", "Gray", "RGB")


class InvalidImage(ValueError):
    """The bytes are not a decodable image of acceptable size."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to a (32, 32, 3) uint8 array or raise :class:`InvalidImage`."""
    pixels = decode_jpeg_32(data)
    if pixels is not None:
        return pixels
    return to_rgb32(load(open_image(data, max_pixels=max_pixels)))


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``data`` as a Pillow image whose header is read and checked; no pixel is decoded yet.

    A JPEG is set to decode at the smallest scale that still covers 32x32 (Pillow's draft), so
    :func:`decoded_pixels` is what :func:`load` will really produce. Raises :class:`InvalidImage`.
    """
    if not data:
        raise InvalidImage("empty file: expected an image (PNG, JPEG, BMP, GIF, WebP)")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImage(f"file is {len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit for one image; "
                           "send a smaller image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = img.size
        if is_jpeg(img):
            if (frame := jpeg_frame(data)[0]) not in _HUFFMAN_FRAMES:
                raise InvalidImage("arithmetic-coded JPEG: not accepted, its decoding cost is not bounded by its "
                                   "size; send it re-encoded (Huffman coding, encoders' default)"
                                   if frame in _ARITHMETIC_FRAMES else
                                   "JPEG whose frame header cannot be found from its markers; send it re-encoded")
            if (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
                raise InvalidImage(f"JPEG of {scans} scans, over the {MAX_JPEG_SCANS} one image may have (a "
                                   "progressive JPEG has about 10); send it re-encoded")
            if width * height > max_pixels * JPEG_DRAFT_ALLOWANCE:
                raise _too_large(width, height, max_pixels * JPEG_DRAFT_ALLOWANCE)
            if (width, height) != (SIZE, SIZE):
                img.draft("RGB", (SIZE, SIZE))  # decode at reduced scale: fast and antialiased
        if decoded_pixels(img) > max_pixels:
            raise _too_large(width, height, max_pixels)
    except InvalidImage:
        raise
    except UnidentifiedImageError as exc:
        # Pillow's message names an internal BytesIO object; say what matters instead.
        raise InvalidImage("not a readable image: the bytes are not a PNG, JPEG, BMP, GIF or WebP image; "
                           "send one of those") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"not a readable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a corrupt header
        raise InvalidImage(f"corrupt or truncated image: {exc}") from exc
    return img


def decoded_pixels(img: Image.Image) -> int:
    """Pixels :func:`load` decodes for an image from :func:`open_image` (after any JPEG draft)."""
    return img.size[0] * img.size[1]


def load(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image`; raises :class:`InvalidImage` for corrupt data."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidImage(f"corrupt or truncated image: {exc}") from exc
    return img


def _too_large(width: int, height: int, limit: int) -> InvalidImage:
    return InvalidImage(f"image is {width}x{height} pixels, over the {limit:,}-pixel limit for one image "
                        "(a 32x32 classifier needs far fewer; possible decompression bomb); send a smaller image")


def decode_jpeg_32(data: bytes) -> np.ndarray | None:
    """Fast path for the common case, a 32x32 RGB or grey JPEG (all of CIFAR-10 as JPEG); else None.

    simplejpeg reads the header and decodes straight into a new array, with libjpeg-turbo's default
    (accurate) DCT and upsampling, as Pillow's decoder: the pixels are identical (tests check
    this), at about a third of Pillow's cost for an image this small. The Pillow 13 wheels bundle
    libjpeg-turbo 3.2, which runs CPUID for every decoder object, and under a hypervisor each
    CPUID is a VM exit (https://github.com/oven-sh/bun/pull/42990 describes it; decision record:
    docs/decisions/jpeg-decoder.md). Anything else (another size, CMYK, truncated or corrupt data)
    returns None and goes down the general path, which handles or reports it.
    """
    if (not data.startswith(_JPEG_SOI) or len(data) > MAX_IMAGE_BYTES or jpeg_scans(data) > MAX_JPEG_SCANS
            or jpeg_frame(data)[0] not in _HUFFMAN_FRAMES):
        return None
    import simplejpeg

    # simplejpeg 1.9.0 raises KeyError for a subsampling it has no name for (4:4:1), which Pillow decodes.
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (width, height) != (SIZE, SIZE) or colorspace not in _FAST_COLORSPACES:
            return None
        # strict (the default): a warning, such as data that ends early, raises rather than returning grey rows.
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, KeyError):
        return None


def jpeg_scans(data: bytes) -> int:
    """The scans of JPEG ``data``, counted by their SOS markers: never fewer than there are (entropy-coded
    data cannot hold the marker's bytes), more only where metadata happens to hold them."""
    return data.count(_JPEG_SOS)


def is_jpeg(img: Image.Image) -> bool:
    """Whether Pillow opened a JPEG: also a JPEG with a multi-picture segment, which it opens as MPO."""
    from PIL.JpegImagePlugin import JpegImageFile

    return isinstance(img, JpegImageFile)


def jpeg_frame(data: bytes) -> tuple[int | None, int]:
    """JPEG ``data``'s frame marker and the pixels its blocks cover (its declared size rounded up to whole
    16x16 units: a one-pixel row costs a row of blocks); (None, 0) where no frame header comes before a scan.

    The segments are walked as libjpeg reads them: bytes between segments other than a marker are skipped,
    so a byte put there cannot hide the frame from this walk but not from the decoder.
    """
    i, end = 2, len(data) - 9
    while i <= end:
        if data[i] != 0xFF or data[i + 1] == 0x00:  # not a marker: libjpeg skips it
            i += 1 if data[i] != 0xFF else 2
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before a marker
            i += 1
        elif marker in _HUFFMAN_FRAMES or marker in _ARITHMETIC_FRAMES:
            # length (2 bytes), sample precision (1), height (2), width (2)
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return marker, (height + 15) // 16 * 16 * ((width + 15) // 16 * 16)
        elif marker == 0xDA:  # a scan before any frame
            break
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a segment
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None, 0


def to_rgb32(img: Image.Image) -> np.ndarray:
    """Apply the resize policy of this module to a loaded Pillow image."""
    img, top = _reducible(img)
    factor = min(img.size) // (2 * SIZE)  # what resize's reducing_gap=2 would reduce by, done first
    if factor >= 2:
        img = img.reduce(factor)
    img = _to_rgb(img, top)
    if img.size != (SIZE, SIZE):
        width, height = img.size
        scale = SIZE / min(width, height)
        new_w, new_h = max(SIZE, round(width * scale)), max(SIZE, round(height * scale))
        left, top_edge = (new_w - SIZE) // 2, (new_h - SIZE) // 2
        # Only the centre crop is resampled, as its box in the source: scaling the whole image first would
        # make a thin one (32 / its height) times larger, 1.3 GB for a 336-byte 262144x1 PNG.
        to_x, to_y = width / new_w, height / new_h
        box = (left * to_x, top_edge * to_y, (left + SIZE) * to_x, (top_edge + SIZE) * to_y)
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def _reducible(img: Image.Image) -> tuple[Image.Image, float]:
    """``img`` in a mode whose pixels can be averaged (L, RGB, La, RGBa, I or F), and its white level.

    Transparency becomes premultiplied alpha, so that averaging and then dropping alpha is
    compositing on black. The white level of a wide grey image (I, F) is taken from the whole
    image before it is reduced: 16-bit data scales from 65535, 8-bit data stored wide from 255,
    float images from 1.0 or 255.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        img = img.convert("I") if mode == "I;16" else Image.fromarray(np.asarray(img).astype(np.int32))
    elif mode == "1":
        img = img.convert("L")
    elif mode == "P" and "transparency" in img.info or mode in ("PA", "RGBA", "LA"):
        img = img.convert("RGBA").convert("RGBa") if mode != "LA" else img.convert("La")
    elif mode not in ("L", "RGB", "La", "RGBa", "I", "F"):  # P without transparency, CMYK, YCbCr, ...
        img = img.convert("RGB")
    if img.mode == "I":
        return img, 65535.0 if (img.getextrema()[1] or 0) > 255 else 255.0
    if img.mode == "F":
        return img, 1.0 if (img.getextrema()[1] or 0) <= 1.0 else 255.0
    return img, 255.0


def _to_rgb(img: Image.Image, top: float) -> Image.Image:
    """A reduced image from :func:`_reducible` as 8-bit RGB (alpha dropped: composited on black)."""
    if img.mode in ("I", "F"):  # small by now: a float copy costs nothing
        values = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("La", "RGBa"):
        img = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBa" else img.split()[0]
    return img.convert("RGB") if img.mode != "RGB" else img
