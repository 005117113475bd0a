"""A small PNG encoder and decoder (zlib + struct + numpy, no imaging library).

The encoder writes 8-bit greyscale, RGB or RGBA images, non-interlaced, with the
"Up" filter on every row and a fixed zlib level, so the same array always gives
the same bytes. The decoder reads non-interlaced PNGs with 8-bit samples in any
colour type (greyscale, RGB, palette, greyscale+alpha, RGBA), 16-bit samples
(kept to their high byte) and all five row filters.
"""
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# colour type -> samples per pixel
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(image, level=6):
    """Encode a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] as PNG bytes."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"encode_png: expected a uint8 array, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"encode_png: expected shape [H, W], [H, W, 1|3|4], got {tuple(np.shape(image))}")
    h, w, c = a.shape
    if h == 0 or w == 0:
        raise ValueError("encode_png: empty image")
    color_type = {1: 0, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(a).reshape(h, w * c)
    up = np.empty((h, w * c + 1), dtype=np.uint8)
    up[:, 0] = 2  # filter type "Up" for every row
    up[0, 1:] = rows[0]
    up[1:, 1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps modulo 256
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"".join([
        PNG_SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(up.tobytes(), level)),
        _chunk(b"IEND", b""),
    ])


def write_png(path, image, level=6):
    data = encode_png(image, level)
    with open(path, "wb") as f:
        f.write(data)


def _paeth_row(cur, prev, bpp):
    # pure Python: each byte depends on the reconstructed byte bpp to its left
    n = len(cur)
    for i in range(n):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        if pa <= pb and pa <= pc:
            pred = a
        elif pb <= pc:
            pred = b
        else:
            pred = c
        cur[i] = (cur[i] + pred) & 0xFF


def _average_row(cur, prev, bpp):
    n = len(cur)
    for i in range(n):
        a = cur[i - bpp] if i >= bpp else 0
        cur[i] = (cur[i] + ((a + prev[i]) >> 1)) & 0xFF


def _unfilter(raw, h, stride, bpp):
    if len(raw) < h * (stride + 1):
        raise ValueError("PNG: image data is truncated")
    data = np.frombuffer(raw, dtype=np.uint8, count=h * (stride + 1)).reshape(h, stride + 1)
    filters = data[:, 0]
    if filters.max(initial=0) > 4:
        raise ValueError(f"PNG: unknown row filter type {int(filters.max())}")
    out = np.empty((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        f = filters[y]
        line = data[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:  # Sub: running sum along x, per byte of the pixel
            pad = (-stride) % bpp
            v = np.concatenate([line, np.zeros(pad, np.uint8)]).reshape(-1, bpp)
            cur = np.cumsum(v, axis=0, dtype=np.uint8).reshape(-1)[:stride]
        elif f == 2:
            cur = line + prev
        else:
            buf = bytearray(line.tobytes())
            (_average_row if f == 3 else _paeth_row)(buf, prev.tobytes(), bpp)
            cur = np.frombuffer(bytes(buf), dtype=np.uint8)
        out[y] = cur
        prev = out[y]
    return out


def decode_png(data):
    """Decode PNG bytes to a uint8 array [H, W, C] (C = 1, 2, 3 or 4; palette images give 3 or 4)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("decode_png: expected bytes")
    data = bytes(data)
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    pos = 8
    header = None
    palette = None
    trns = None
    idat = []
    while True:
        if pos + 8 > len(data):
            raise ValueError("PNG: truncated file (no IEND chunk)")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ValueError(f"PNG: truncated {kind!r} chunk")
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"PNG: CRC mismatch in {kind!r} chunk")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            trns = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG: missing IHDR chunk")
    w, h, depth, color_type, compression, filter_method, interlace = header
    if color_type not in _CHANNELS:
        raise ValueError(f"PNG: invalid colour type {color_type}")
    if depth not in (8, 16):
        raise ValueError(f"PNG: bit depth {depth} is not supported (only 8 and 16)")
    if color_type == 3 and depth != 8:
        raise ValueError("PNG: palette images must have 8-bit indices here")
    if interlace != 0:
        raise ValueError("PNG: interlaced images are not supported")
    if compression != 0 or filter_method != 0:
        raise ValueError("PNG: unknown compression or filter method")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"PNG: corrupt image data ({e})") from None
    channels = _CHANNELS[color_type]
    bpp = channels * depth // 8
    rows = _unfilter(raw, h, w * bpp, bpp)
    if depth == 16:
        img = rows.reshape(h, w, channels, 2)[..., 0]  # big-endian: keep the high byte
    else:
        img = rows.reshape(h, w, channels)
    if color_type == 3:
        if palette is None:
            raise ValueError("PNG: palette image without a PLTE chunk")
        idx = img[..., 0]
        if idx.size and int(idx.max()) >= len(palette):
            raise ValueError("PNG: palette index out of range")
        rgb = palette[idx]
        if trns is not None:
            alpha = np.full(len(palette), 255, np.uint8)
            t = np.frombuffer(trns, dtype=np.uint8)[: len(palette)]
            alpha[: len(t)] = t
            img = np.concatenate([rgb, alpha[idx][..., None]], axis=2)
        else:
            img = rgb
    return np.ascontiguousarray(img)


def read_png(path):
    with open(path, "rb") as f:
        return decode_png(f.read())
