"""Decode one image file to the model's input: RGB, 32x32, uint8.

Shared by data preparation and by ``service.py`` so that training and serving see
pixels produced by the same code.

Resize policy: images that are already 32x32 are used as they are. Others are
scaled (Pillow's reducing draft for JPEG, then bilinear with a reducing gap, which
antialiases) so that the *shorter* side is 32, then centre-cropped to 32x32: the
aspect ratio is kept and the object is assumed centred, as in CIFAR-10. Any mode
becomes RGB: palette and grey images are expanded, CMYK and YCbCr converted,
16-bit and 32-bit grey scaled down to 8 bits (not clipped), and transparency is
composited on black, as CIFAR-style exports of transparent images do. Only the first
frame of an animated GIF or multi-page TIFF is used; EXIF orientation is not applied.

Safety: files over ``MAX_IMAGE_BYTES`` and images over ``MAX_PIXELS`` are refused
before any pixel is decoded (decompression bombs). Pillow's own guard
(``Image.MAX_IMAGE_PIXELS``) stays on as a second line; this module never turns it off.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 32
# Refuse images above this many pixels before decoding them (decompression
# bombs): 40 megapixels is larger than any camera photo people upload, and below
# Pillow's own warning threshold (~89 Mpx), so Pillow's guard never has to fire.
MAX_PIXELS = 40_000_000
# Refuse files above this size without parsing them: no sane training image or
# upload is larger, and it bounds the memory one member of an archive can take.
MAX_IMAGE_BYTES = 64 * 1024**2
_JPEG_SOI = b"\xff\xd8\xff"
_scratch = threading.local()


class InvalidImage(ValueError):
    """The bytes are not a decodable image of acceptable size."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to a (32, 32, 3) uint8 array or raise :class:`InvalidImage`."""
    if not data:
        raise InvalidImage("empty file: expected an image (PNG, JPEG, BMP, GIF, WebP)")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImage(f"file is {len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit for one image; "
                           "send a smaller image")
    if data.startswith(_JPEG_SOI):
        pixels = _decode_jpeg_32(data)
        if pixels is not None:
            return pixels
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise InvalidImage(
                f"image is {width}x{height} pixels, over the {max_pixels:,}-pixel limit "
                "(possible decompression bomb); send a smaller image"
            )
        if img.format == "JPEG" and (width, height) != (SIZE, SIZE):
            img.draft("RGB", (SIZE, SIZE))  # decode at reduced scale: fast and antialiased
        img.load()
    except InvalidImage:
        raise
    except UnidentifiedImageError as exc:
        # Pillow's message names an internal BytesIO object; say what matters instead.
        raise InvalidImage("not a readable image: the bytes are not PNG, JPEG, BMP, GIF, WebP or another "
                           "format Pillow knows; send an image file") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"not a readable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidImage(f"corrupt or truncated image: {exc}") from exc
    return to_rgb32(img)


def _decode_jpeg_32(data: bytes) -> np.ndarray | None:
    """Fast path for the common case, a 32x32 RGB or grey JPEG (all of CIFAR-10 as JPEG).

    Decoding into a reused 32x32 image with Pillow's "jpeg" decoder skips the
    Python-level header parsing of ``Image.open`` and the allocation of a new image,
    which together cost more than decoding a 32x32 JPEG. The decoder is the same
    libjpeg call with the same arguments as the general path, so the pixels are
    identical (tests check this). libjpeg refuses data whose size is not 32x32 or that
    is CMYK or truncated; then None sends it down the general path, which handles or
    reports it.
    """
    scratch = getattr(_scratch, "image", None)
    if scratch is None:  # one per thread: service.py may decode on several threads
        scratch = _scratch.image = Image.new("RGB", (SIZE, SIZE))
    try:
        scratch.frombytes(data, "jpeg", ("RGB", ""))  # every pixel is written, or it raises
    except (ValueError, OSError, SyntaxError):
        return None
    # tobytes + frombuffer: a little cheaper than np.asarray's array-interface path.
    return np.frombuffer(scratch.tobytes(), dtype=np.uint8).reshape(SIZE, SIZE, 3)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits (I;16*, I, F) scaled to L, not clipped."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0  # float images: 0..1 or 0..255
    else:
        top = 65535.0 if values.size and values.max() > 255 else 255.0  # 16-bit data, or 8-bit stored wide
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def to_rgb32(img: Image.Image) -> np.ndarray:
    """Apply the resize policy of this module to a loaded Pillow image."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "La":  # premultiplied grey+alpha: Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
    if img.size != (SIZE, SIZE):
        width, height = img.size
        scale = SIZE / min(width, height)
        new_w, new_h = max(SIZE, round(width * scale)), max(SIZE, round(height * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
        left, top = (new_w - SIZE) // 2, (new_h - SIZE) // 2
        img = img.crop((left, top, left + SIZE, top + SIZE))
    return np.asarray(img, dtype=np.uint8)
