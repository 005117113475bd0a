"""Synthetic "shapes" instance segmentation data in COCO layout.

Each image has a textured background (a two-colour gradient, random stripes and
pixel noise) and a few filled shapes of six categories drawn one after the other,
so later shapes occlude earlier ones. An instance's mask is the part of it still
visible at the end; instances with a tiny visible part are dropped. Shapes are
rasterised with numpy at pixel centres (x + 0.5, y + 0.5): circles and ellipses by
their implicit equation, everything else by even-odd point-in-polygon.

Randomness: image ``index`` of split ``split`` is drawn from its own generator
seeded by ``(seed, crc32(split), index)``, so an image does not depend on how many
images were asked for, and the same arguments give byte-identical files (PNGs written
with Pillow).
"""
import json
import math
import os
import sys
import zlib

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .io import write_image

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 5, "name": "star", "supercategory": "shape"},
    {"id": 6, "name": "polygon", "supercategory": "shape"},
]
CATEGORY_IDS = {c["name"]: c["id"] for c in CATEGORIES}

MIN_VISIBLE_PIXELS = 20
MIN_VISIBLE_FRACTION = 0.10
MIN_SHAPE_SIZE = 8.0


# ----------------------------------------------------------------------------- rasterisation

def _window(x0, y0, x1, y1, height, width):
    """Integer pixel window [r0, r1) x [c0, c1) covering the real box, clipped to the image."""
    c0 = max(int(math.floor(x0)) - 1, 0)
    r0 = max(int(math.floor(y0)) - 1, 0)
    c1 = min(int(math.ceil(x1)) + 1, width)
    r1 = min(int(math.ceil(y1)) + 1, height)
    return r0, r1, c0, c1


def _grid(r0, r1, c0, c1):
    ys = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
    return xs, ys


def rasterize_ellipse(cx, cy, a, b, angle, height, width):
    """Boolean mask [height, width]: pixel centres inside the ellipse with semi-axes a, b rotated by angle."""
    mask = np.zeros((height, width), dtype=bool)
    ca, sa = math.cos(angle), math.sin(angle)
    ex = math.sqrt((a * ca) ** 2 + (b * sa) ** 2)
    ey = math.sqrt((a * sa) ** 2 + (b * ca) ** 2)
    r0, r1, c0, c1 = _window(cx - ex, cy - ey, cx + ex, cy + ey, height, width)
    if r0 >= r1 or c0 >= c1:
        return mask
    xs, ys = _grid(r0, r1, c0, c1)
    dx, dy = xs - cx, ys - cy
    u = (dx * ca + dy * sa) / a
    v = (-dx * sa + dy * ca) / b
    mask[r0:r1, c0:c1] = u * u + v * v <= 1.0
    return mask


def rasterize_polygon(points, height, width):
    """Boolean mask [height, width]: pixel centres inside the polygon (even-odd rule).

    points: [N, 2] array of (x, y) vertices in pixel coordinates (pixel (c, r) spans
    [c, c+1) x [r, r+1)).
    """
    pts = np.asarray(points, dtype=np.float64)
    mask = np.zeros((height, width), dtype=bool)
    r0, r1, c0, c1 = _window(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max(), height, width)
    if r0 >= r1 or c0 >= c1:
        return mask
    xs, ys = _grid(r0, r1, c0, c1)
    inside = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    n = len(pts)
    for i in range(n):
        xa, ya = pts[i]
        xb, yb = pts[(i + 1) % n]
        if ya == yb:
            continue
        # rows whose centre line crosses this edge (half-open in y), then the crossing's x
        crosses = (ya <= ys) != (yb <= ys)  # [rows, 1]
        x_cross = xa + (ys - ya) * (xb - xa) / (yb - ya)  # [rows, 1]
        inside ^= crosses & (xs < x_cross)
    mask[r0:r1, c0:c1] = inside
    return mask


def _regular_star(cx, cy, r_out, r_in, n_points, rot):
    k = np.arange(2 * n_points)
    ang = rot + k * math.pi / n_points
    rad = np.where(k % 2 == 0, r_out, r_in)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def sample_shape(rng, category, height, width):
    """Draw the parameters of one shape and rasterise it. Returns a bool mask [height, width]."""
    short = min(height, width)
    max_size = max(MIN_SHAPE_SIZE + 1.0, 0.9 * short)
    # log-uniform size (diameter / longest extent) from ~8 px to most of the image
    size = float(math.exp(rng.uniform(math.log(MIN_SHAPE_SIZE), math.log(max_size))))
    cx = float(rng.uniform(0.1, 0.9) * width)
    cy = float(rng.uniform(0.1, 0.9) * height)
    rot = float(rng.uniform(0.0, 2.0 * math.pi))
    if category == "circle":
        r = size / 2
        return rasterize_ellipse(cx, cy, r, r, 0.0, height, width)
    if category == "ellipse":
        a = size / 2
        b = a * float(rng.uniform(0.3, 0.8))
        return rasterize_ellipse(cx, cy, a, b, rot, height, width)
    if category == "rectangle":
        w = size
        h = size * float(rng.uniform(0.3, 1.0))
        if rng.uniform() < 0.5:  # half of them axis-aligned
            rot = 0.0
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64) / 2
        c, s = math.cos(rot), math.sin(rot)
        pts = corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
        return rasterize_polygon(pts, height, width)
    if category == "triangle":
        # three vertices around the centre at well-separated angles
        ang = rot + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.4, 0.4, size=3)
        rad = size / 2 * rng.uniform(0.7, 1.0, size=3)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        return rasterize_polygon(pts, height, width)
    if category == "star":
        n_points = int(rng.integers(5, 9))
        r_out = size / 2
        r_in = r_out * float(rng.uniform(0.35, 0.6))
        return rasterize_polygon(_regular_star(cx, cy, r_out, r_in, n_points, rot), height, width)
    if category == "polygon":
        n = int(rng.integers(5, 10))
        ang = rot + np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        rad = size / 2 * rng.uniform(0.5, 1.0, size=n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        return rasterize_polygon(pts, height, width)
    raise ValueError(f"unknown shape category {category!r}")


# ----------------------------------------------------------------------------- textures

def _background(rng, height, width):
    ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    ang = rng.uniform(0.0, 2.0 * math.pi)
    t = (xs * math.cos(ang) + ys * math.sin(ang)).astype(np.float32)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0 = rng.uniform(0, 255, size=3).astype(np.float32)
    c1 = rng.uniform(0, 255, size=3).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)
    for _ in range(int(rng.integers(0, 4))):  # stripes: a periodic band pattern at a random angle
        sa = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 0.5 * max(height, width))
        duty = rng.uniform(0.15, 0.5)
        phase = rng.uniform(0.0, 1.0)
        coord = (xs * width * math.cos(sa) + ys * height * math.sin(sa)) / period + phase
        band = (coord - np.floor(coord)) < duty
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        alpha = np.float32(rng.uniform(0.15, 0.6))
        img = np.where(band[..., None], img * (1 - alpha) + colour * alpha, img)
    return img


def _fill(rng, img, mask):
    """Paint a shape: a random colour, a faint gradient across it, then leave noise to the caller."""
    rows, cols = np.nonzero(mask)
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    shade = rng.uniform(-40, 40, size=3).astype(np.float32)
    span = max(int(cols.max() - cols.min()), 1) if len(cols) else 1
    t = ((cols - (cols.min() if len(cols) else 0)) / span).astype(np.float32)
    img[rows, cols] = colour + t[:, None] * shade


# ----------------------------------------------------------------------------- samples

def sample_rng(seed, split, index):
    """The generator of image ``index`` of ``split`` (independent of the number of images)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(index)])))


def render_sample(seed, split, index, size=256, size_range=None, max_objects=8):
    """Render one image. Returns (image uint8 [H, W, 3], instances) where instances is a list
    of dicts {"category_id", "mask" (bool [H, W], the visible part)} in drawing order,
    already filtered (tiny visible parts dropped).

    size: int or (height, width); size_range: (min, max) to draw height and width
    independently and uniformly in [min, max] instead.
    """
    rng = sample_rng(seed, split, index)
    if size_range is not None:
        lo, hi = int(size_range[0]), int(size_range[1])
        if not (1 <= lo <= hi):
            raise ValueError(f"size_range must be 1 <= min <= max, got {size_range}")
        height = int(rng.integers(lo, hi + 1))
        width = int(rng.integers(lo, hi + 1))
    elif isinstance(size, (tuple, list)):
        height, width = int(size[0]), int(size[1])
    else:
        height = width = int(size)
    if height < 16 or width < 16:
        raise ValueError(f"image size must be at least 16x16, got {height}x{width}")
    img = _background(rng, height, width)
    names = [c["name"] for c in CATEGORIES]
    n_obj = int(rng.integers(1, max_objects + 1))
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the shape seen at each pixel
    drawn = []
    for k in range(n_obj):
        name = names[int(rng.integers(len(names)))]
        mask = sample_shape(rng, name, height, width)
        full_area = int(mask.sum())
        if full_area == 0:
            continue
        _fill(rng, img, mask)
        owner[mask] = k
        drawn.append((k, CATEGORY_IDS[name], full_area))
    noise = rng.normal(0.0, float(rng.uniform(2.0, 12.0)), size=img.shape).astype(np.float32)
    image = np.clip(img + noise, 0, 255).round().astype(np.uint8)
    instances = []
    for k, cat_id, full_area in drawn:
        visible = owner == k
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * full_area:
            continue
        instances.append({"category_id": cat_id, "mask": visible})
    return image, instances


def encode_mask(mask):
    """COCO RLE of a bool/uint8 [H, W] mask, with counts as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_bbox(mask):
    """Tight [x, y, w, h] box (pixel units) of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def generate_split(root, split, num_images, size=256, size_range=None, seed=0, max_objects=8, png_level=6,
                   progress=False):
    """Write ``root/split/*.png`` and ``root/annotations/instances_{split}.json``.

    progress: show a tqdm bar (with ETA) on stderr when it is a terminal.
    Returns the path of the annotation file.
    """
    if num_images < 0:
        raise ValueError("num_images must be >= 0")
    img_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    bar = tqdm(range(num_images), desc=split, unit="img", leave=False,
               disable=not progress or not sys.stderr.isatty())
    for index in bar:
        image, instances = render_sample(seed, split, index, size=size, size_range=size_range, max_objects=max_objects)
        h, w = image.shape[:2]
        image_id = index + 1
        file_name = f"{index:06d}.png"
        write_image(os.path.join(img_dir, file_name), image, png_level=png_level)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for inst in instances:
            m = inst["mask"]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": inst["category_id"],
                "segmentation": encode_mask(m),
                "area": int(m.sum()),
                "bbox": mask_bbox(m),
                "iscrowd": 0,
            })
    dataset = {
        "info": {"description": f"synthetic shapes, split {split}, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    ann_file = os.path.join(ann_dir, f"instances_{split}.json")
    with open(ann_file, "w") as f:
        json.dump(dataset, f, separators=(",", ":"))
    return ann_file
