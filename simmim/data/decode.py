"""Image files and bytes to uint8 (H, W, 3) RGB: libjpeg-turbo JPEG decoding at the scale a transform needs
(`decode_needs`), OpenCV for other formats, EXIF orientation applied."""
from __future__ import annotations

import os
from functools import partial
from typing import Callable

import albumentations as A
import cv2
import numpy as np
import simplejpeg

from simmim.data.transforms import TrainAugment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG file's first bytes
EXIF_SEARCH = 1 << 18  # bytes at the start of a JPEG searched for its EXIF segment (it precedes the image data)


def read_image(path: str | os.PathLike, min_short: int = 0, min_area: int = 0) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB (see `decode_image`). Raises OSError if the file cannot be
    read, ValueError if it does not decode."""
    return decode_image(np.fromfile(path, dtype=np.uint8), str(path), min_short, min_area)


def decode_image(data: bytes | np.ndarray, name: str = "image", min_short: int = 0, min_area: int = 0) -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3) RGB, EXIF orientation applied (JPEG, PNG, WebP).

    JPEGs are decoded by libjpeg-turbo (simplejpeg) at 1/2, 1/4 or 1/8 scale (DCT scaling: the inverse DCT,
    upsampling and color conversion shrink, the entropy decoding does not) when the result still has a short
    side >= min_short and an area >= min_area (both 0: full size): give what the transform needs
    (`decode_needs`). Other formats, and JPEGs simplejpeg does not take (CMYK), go through
    ``cv2.imdecode(IMREAD_UNCHANGED)``: grayscale is repeated to 3 channels, an alpha channel composited onto
    black, 16-bit values divided by 257 (rounded). Truncated or corrupt files raise ValueError naming `name`.
    """
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    image = None
    if data[:2].tobytes() == b"\xff\xd8":
        image = _decode_jpeg(data, name, min_short, min_area)
    if image is None:
        image = _decode_cv2(data, name)
    return _orient(image, _exif_orientation(data))


def _decode_jpeg(data: np.ndarray, name: str, min_short: int, min_area: int) -> np.ndarray | None:
    """simplejpeg at the largest 1/f (f = 8, 4, 2, 1) that keeps min_short and min_area; None if it cannot."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):
            return None
        factor = next(f for f in (8, 4, 2, 1) if f == 1 or (min_short or min_area) and (
            min(height, width) / f >= min_short and height * width / f ** 2 >= min_area))
        scale = {} if factor == 1 else {"min_height": -(-height // factor), "min_width": -(-width // factor)}
        image = simplejpeg.decode_jpeg(data, colorspace="GRAY" if colorspace == "Gray" else "RGB", **scale)
    except ValueError as error:
        raise ValueError(f"cannot decode image {name}: the file is corrupt, truncated or not an image ({error})")
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 or image.shape[2] == 1 else image


def _decode_cv2(data: np.ndarray, name: str) -> np.ndarray:
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        width, height = (int.from_bytes(data[i:i + 4].tobytes(), "big") for i in (16, 20))  # a PNG's IHDR
        limit = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))  # OpenCV's, default 2^30
        if data[:8].tobytes() == PNG_SIGNATURE and width * height > limit:
            raise ValueError(f"cannot decode image {name}: it is {width}x{height} pixels, above OpenCV's limit of "
                             f"{limit}; resize it, or raise the limit (environment variable "
                             f"OPENCV_IO_MAX_IMAGE_PIXELS)")
        raise ValueError(f"cannot decode image {name}: the file is corrupt, truncated or not an image")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype} in {name}: only 8- and 16-bit images are supported")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] in (2, 4):  # gray + alpha or BGRA
        alpha = image[..., -1:].astype(np.float32) / 255
        image = np.rint(image[..., :-1] * alpha).astype(np.uint8)
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation (1..8) of a JPEG (APP1 segment), PNG (eXIf chunk) or WebP (EXIF chunk) in its first
    EXIF_SEARCH bytes; 1 when it has none (other formats: their decoder's)."""
    raw = data[:EXIF_SEARCH].tobytes()
    if raw[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(raw) and raw[pos] == 0xFF:
            marker, length = raw[pos + 1], int.from_bytes(raw[pos + 2:pos + 4], "big")
            if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
                return 1
            segment = raw[pos + 4:pos + 2 + length]
            if marker == 0xE1 and segment[:6] == b"Exif\0\0":
                return _tiff_orientation(segment[6:])
            pos += 2 + length
    elif raw[:8] == PNG_SIGNATURE:  # chunks: length (big-endian), type, data, CRC
        pos = 8
        while pos + 8 <= len(raw):
            length, kind = int.from_bytes(raw[pos:pos + 4], "big"), raw[pos + 4:pos + 8]
            if kind == b"eXIf":
                return _tiff_orientation(raw[pos + 8:pos + 8 + length])
            pos += 12 + length
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":  # chunks: type, length (little-endian), data padded to even
        pos = 12
        while pos + 8 <= len(raw):
            kind, length = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
            if kind == b"EXIF":
                tiff = raw[pos + 8:pos + 8 + length]
                return _tiff_orientation(tiff[6:] if tiff[:6] == b"Exif\0\0" else tiff)
            pos += 8 + length + length % 2
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of EXIF's TIFF structure (IFD0), 1 when absent or out of 1..8."""
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    for i in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        if int.from_bytes(entry[:2], order) == 0x0112:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """The upright image of EXIF orientation 1..8: 2 mirrored, 3 turned 180, 4 flipped, 5 transposed, 6 turned
    90 counterclockwise, 7 transversed, 8 turned 90 clockwise (as stored)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 0, 2)  # 5; then 6 = mirror, 7 = both, 8 = flip
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        image = image[:, ::-1]
    if orientation in (3, 4):
        image = image[::-1]
    return np.ascontiguousarray(image)


def decode_needs(transform: A.Compose | TrainAugment) -> dict[str, int]:
    """{"min_short", "min_area"} of a decoded image (`decode_image`) for the transform's output to keep full
    detail: a random resized crop must still span img_size pixels across its smallest crop (area fraction
    scale[0], aspect ratio within `ratio`); a resize of the short side to S needs a short side >= S. Zeros
    (a full decode) for other transforms."""
    if isinstance(transform, TrainAugment):
        size = max(transform.size)
        area = size ** 2 / (transform.scale[0] * min(transform.ratio[0], 1 / transform.ratio[1]))
        return {"min_short": size, "min_area": int(np.ceil(area))}
    first = transform.transforms[0]
    if isinstance(first, A.SmallestMaxSize):
        return {"min_short": first.max_size if isinstance(first.max_size, int) else max(first.max_size),
                "min_area": 0}
    return {"min_short": 0, "min_area": 0}


def shard_decode(transform: TrainAugment | A.Compose) -> Callable[[bytes], np.ndarray]:
    """A shard sample's image bytes -> uint8 (H, W, 3), decoded at the scale the transform needs (`decode_needs`)."""
    return partial(decode_image, name="sample", **decode_needs(transform))
