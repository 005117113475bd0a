"""Image files through Pillow: ``read_image`` (any format Pillow reads, as RGB uint8) and
``write_image`` (uint8 arrays, format from the file name's suffix)."""
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["read_image", "write_image"]


def read_image(path):
    """Read an image file as a uint8 array [H, W, 3] (RGB).

    Grey images are repeated over the three channels, alpha is dropped (not composited),
    palette images are looked up, 16-bit samples keep their high byte. The pixels are
    returned as stored (no EXIF rotation).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip to 255
                img = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                img = np.repeat(img[:, :, None], 3, axis=2)
            else:
                img = np.array(im.convert("RGB"))  # a writable copy
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # what Pillow raises for bad files
        raise ValueError(f"cannot decode image {path}: {e}") from None
    return np.ascontiguousarray(img)


def write_image(path, image, png_level=6):
    """Write a uint8 array [H, W], [H, W, 1] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA) to
    ``path``; the format comes from the suffix (PNG: zlib level ``png_level``). The same array
    and arguments always give the same bytes."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"write_image: expected a uint8 array, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"write_image: expected shape [H, W] or [H, W, 1|3|4], got {tuple(np.shape(image))}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"write_image: empty image {tuple(a.shape)}")
    im = Image.fromarray(np.ascontiguousarray(a))
    ext = os.path.splitext(str(path))[1].lower()
    options = {"compress_level": int(png_level)} if ext == ".png" else {}
    im.save(path, **options)
