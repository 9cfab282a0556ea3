"""A request's uploads to model input, off the event loop, with the work bounded per request.

Uploads are decoded in worker threads, not on the event loop, so health checks and other
clients' requests keep being answered while an upload is decoded; the one exception is a
request of small 32x32 JPEGs (:data:`INLINE_JPEG_BYTES`), whose decoding costs less than the
hand-off. The work is bounded before it starts: each image by
:data:`serving.images.MAX_PIXELS`, each request by :data:`MAX_REQUEST_PIXELS`, both read from
the headers. Two lanes keep a costly request from delaying cheap ones:

- the *cheap* lane (one thread per CPU) reads every header of a request and decodes the
  request at once when it is cheap (:data:`CHEAP_PIXELS`, :data:`CHEAP_JPEG_PASSES`; CIFAR-sized images
  always are);
- a costly request's images go to the *costly* lane, one thread at the lowest CPU priority,
  so costly requests queue behind each other and take only CPU that nothing else wants.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from serving.cpu import renice

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Most pixels the images of one request may decode to together: 64 images of 512x512, or four
# of the largest one image may be. It bounds one request's decoding to tens of milliseconds.
MAX_REQUEST_PIXELS = 16 * 1024 * 1024
# Most pixel passes the JPEG decoder may make for one request: each scan of a progressive JPEG passes
# over every pixel it declares, however few bytes the scan holds and whatever scale it decodes at. One
# JPEG at the limits of serving/images.py (16 Mpx declared, 64 scans) fills it, ~0.5 s of one core; a
# progressive photo of 12 Mpx in 10 scans takes a ninth.
MAX_REQUEST_JPEG_PASSES = 16 * 1024 * 1024 * 64
# A request decoding to at most this many pixels (64 images of 64x64), its JPEGs in at most this many
# pixel passes (~2 ms), is decoded as soon as its headers are read: the cost of a second hand-off would be
# more than the decoding.
CHEAP_PIXELS = 64 * 64 * 64
CHEAP_JPEG_PASSES = 4 * 1024 * 1024
# A request of single-scan 32x32 JPEGs no larger than this each (CIFAR-10's are ~1 KB, quality 100
# ~3 KB) is decoded on the event loop by the fast path: ~20 us an image, bounded by its size like
# parsing the request, where the hand-off to a thread and back cost more than the decoding
# (docs/decisions/decoding.md). A progressive JPEG's cost grows with its scans, not its bytes: the lanes.
INLINE_JPEG_BYTES = 8 * 1024
# The costly lane's niceness: it runs when the cores are otherwise idle.
COSTLY_NICE = 19
# Not 32x32, so the warm-up takes the general path and not the JPEG fast path.
SIZE_OF_WARM_UP = 48


class Refused(ValueError):
    """A request's uploads cannot be decoded: not an image, or over a pixel budget. The message says which."""


class Decoder:
    """Decodes a request's uploads to (n, 32, 32, 3) uint8 in the two lanes of this module."""

    def __init__(self, threads: int, nice: int) -> None:
        self._cheap = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode",
                                         initializer=renice, initargs=(nice,))
        self._costly = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-costly",
                                          initializer=renice, initargs=(COSTLY_NICE,))

    def warm_up(self) -> None:
        """Decode a blank PNG and JPEG once: Pillow loads its format plugins on first use, not in a request."""
        import io

        from PIL import Image

        blanks = []
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.new("RGB", (SIZE_OF_WARM_UP, SIZE_OF_WARM_UP)).save(buf, fmt)
            blanks.append(buf.getvalue())
        open_all(blanks)

    async def __call__(self, files: list[bytes]) -> np.ndarray:
        import numpy as np

        from serving.images import decode_jpeg_32, jpeg_scans

        if all(len(data) <= INLINE_JPEG_BYTES and jpeg_scans(data) == 1 for data in files):
            inline = [decode_jpeg_32(data) for data in files]
            if all(pixels is not None for pixels in inline):
                return inline[0][None] if len(inline) == 1 else np.stack(inline)
        loop = asyncio.get_running_loop()
        pixels, pending = await loop.run_in_executor(self._cheap, open_all, files)
        if pending:
            await loop.run_in_executor(self._costly, load_all, pixels, pending)
        return np.stack(pixels)


def open_all(files: list[bytes]) -> tuple[list, dict[int, Image.Image]]:
    """Headers of every file checked against both budgets; a cheap request decoded, a costly one's images returned.

    Returns (pixels, pending): ``pixels[i]`` is the decoded (32, 32, 3) array of file ``i``, or
    None while it is in ``pending`` (its opened, undecoded image). Raises :class:`Refused`.
    """
    from serving.images import (SIZE, InvalidImage, decode_jpeg_32, decoded_pixels, is_jpeg, jpeg_frame, jpeg_scans,
                                open_image)

    pixels: list = []
    pending: dict[int, Image.Image] = {}
    total = passes = 0
    for i, data in enumerate(files):
        fast = decode_jpeg_32(data)
        if fast is not None:
            pixels.append(fast)
            total += SIZE * SIZE
            continue
        try:
            pending[i] = open_image(data)
        except InvalidImage as exc:
            raise Refused(f"{_which(i, files)}: {exc}") from exc
        pixels.append(None)
        if is_jpeg(pending[i]):
            passes += jpeg_frame(data)[1] * jpeg_scans(data)
            if passes > MAX_REQUEST_JPEG_PASSES:
                raise Refused(f"the JPEGs of this request take over {MAX_REQUEST_JPEG_PASSES:,} pixel passes to decode "
                              f"(declared pixels times scans, at {_which(i, files)}), the limit per request; send "
                              "fewer or smaller images, or baseline (not progressive) JPEGs")
        total += decoded_pixels(pending[i])
        if total > MAX_REQUEST_PIXELS:
            raise Refused(f"the images of this request decode to over {MAX_REQUEST_PIXELS:,} pixels together (at "
                          f"{_which(i, files)}), the limit per request; send fewer or smaller images")
    if total <= CHEAP_PIXELS and passes <= CHEAP_JPEG_PASSES:
        load_all(pixels, pending)
        pending = {}
    return pixels, pending


def load_all(pixels: list, pending: dict[int, Image.Image]) -> None:
    """Decode each pending image into its place in ``pixels``; raises :class:`Refused` for a corrupt one."""
    from serving.images import InvalidImage, load, to_rgb32

    for i, img in pending.items():
        try:
            pixels[i] = to_rgb32(load(img))
        except InvalidImage as exc:
            raise Refused(f"{_which(i, pixels)}: {exc}") from exc


def _which(i: int, files: list) -> str:
    return f"file {i} (0-based)" if len(files) > 1 else "file"
