"""Decode any image into the model's input: RGB, 32x32, uint8.

Shared by data preparation and by ``service.py`` so that training and serving see
pixels produced by the same code.

Resize policy: images that are already 32x32 are used as they are. Others are
scaled (Pillow's reducing draft for JPEG, then bilinear with a reducing gap, which
antialiases) so that the *shorter* side is 32, then centre-cropped to 32x32: the
aspect ratio is kept and the object is assumed centred, as in CIFAR-10. Any mode
(L, P, RGBA, CMYK, I;16, ...) becomes RGB; transparency is composited on black,
the same as CIFAR-style exports of transparent images.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 32
# Refuse images above this many pixels before decoding them (decompression
# bombs): 40 megapixels is larger than any camera photo people upload.
MAX_PIXELS = 40_000_000


class InvalidImage(ValueError):
    """The bytes are not a decodable image of acceptable size."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to a (32, 32, 3) uint8 array or raise :class:`InvalidImage`."""
    if not data:
        raise InvalidImage("empty file: expected an image (PNG, JPEG, BMP, GIF, WebP)")
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
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"not a readable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise InvalidImage(f"corrupt or truncated image: {exc}") from exc
    return to_rgb32(img)


def to_rgb32(img: Image.Image) -> np.ndarray:
    """Apply the resize policy of this module to a loaded Pillow image."""
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
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
