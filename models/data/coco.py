"""A dataset over any COCO-format instance segmentation folder, with transforms.

``CocoInstanceDataset(root_images, ann_file)`` returns ``(image, target)``: image a
float32 Tensor[3, H, W] in [0, 1]; target a dict in torchvision's detection format:
boxes float32 [K, 4] (x1, y1, x2, y2, pixel units), labels int64 [K] (contiguous
1..C; ``dataset.contiguous_to_cat_id`` maps back to COCO category ids), masks uint8
[K, H, W], image_id int, iscrowd int64 [K], area float32 [K].

Segmentations may be polygons, uncompressed RLE (crowd) or compressed RLE. Images are
read with Pillow (``read_image``: PNG, JPEG, ...).
"""
import contextlib
import io
import json
import os

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .io import read_image

__all__ = ["CocoInstanceDataset", "Compose", "RandomHorizontalFlip", "hflip", "read_image", "load_coco_json",
           "decode_segmentation"]


# ----------------------------------------------------------------------------- annotations

def quiet(verbose=False):
    """Silences pycocotools' prints (unless ``verbose``)."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def coco_from_dict(dataset):
    """A pycocotools COCO object from an instances dict (without printing). Annotations get the
    keys COCOeval needs when they lack them: id, iscrowd (0), area (of the mask, or the box)."""
    data = dict(dataset)
    anns = []
    for i, ann in enumerate(dataset.get("annotations", [])):
        ann = dict(ann)
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            _, _, w, h = ann["bbox"]
            ann["area"] = float(w) * float(h)
        anns.append(ann)
    data["annotations"] = anns
    coco = COCO()
    coco.dataset = data
    with quiet():
        coco.createIndex()
    return coco


def load_coco_json(ann_file):
    """Load and check a COCO instances file; errors name the file and the problem."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {ann_file}: expected a JSON object at top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"annotation file {ann_file}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise ValueError(f"annotation file {ann_file}: '{key}' must be a list")
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if not isinstance(img, dict) or key not in img:
                raise ValueError(f"annotation file {ann_file}: images[{i}] is missing key '{key}'")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise ValueError(f"annotation file {ann_file}: categories[{i}] is missing key 'id'")
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    if len(image_ids) != len(data["images"]):
        raise ValueError(f"annotation file {ann_file}: duplicate image ids")
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "category_id", "bbox", "segmentation"):
            if not isinstance(ann, dict) or key not in ann:
                raise ValueError(f"annotation file {ann_file}: annotations[{i}] is missing key '{key}'")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"annotation file {ann_file}: annotations[{i}] refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"annotation file {ann_file}: annotations[{i}] has unknown category_id {ann['category_id']}")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"annotation file {ann_file}: annotations[{i}] bbox must be [x, y, w, h]")
    return data


def decode_segmentation(segm, height, width):
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 mask [height, width]."""
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"RLE size {segm['size']} does not match the image size {[height, width]}")
        if isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm
    else:
        raise ValueError("segmentation must be a list of polygons or an RLE dict with 'counts' and 'size'")
    return mask_utils.decode(rle)


class CocoInstanceDataset(torch.utils.data.Dataset):
    """Images of a COCO-format folder with their instance targets.

    root_images: the folder holding the files named by ``images[].file_name``.
    ann_file: the COCO instances JSON.
    transforms: a callable (image, target) -> (image, target), e.g. ``Compose([...])``.
    skip_crowd: leave out iscrowd=1 annotations (for training targets).
    skip_degenerate: leave out annotations whose box (clipped to the image) has no area.
    remove_empty: leave out images with no annotations left (after the two options above).
    cache: keep each image and target in memory once decoded (the pixels as uint8, the
    masks as uint8), so later epochs skip the image and RLE decoding; about
    H * W * (3 + instances) bytes per image, per process (each DataLoader worker has its own).

    Category ids are mapped to contiguous labels 1..C in increasing id order:
    ``cat_id_to_contiguous`` and ``contiguous_to_cat_id`` (a dict; 0 is background).
    """

    def __init__(self, root_images, ann_file, transforms=None, skip_crowd=True, skip_degenerate=True,
                 remove_empty=False, cache=False):
        if not os.path.isdir(root_images):
            raise FileNotFoundError(f"image folder not found: {root_images}")
        self.root = root_images
        self.ann_file = ann_file
        self.transforms = transforms
        self.skip_crowd = skip_crowd
        self.skip_degenerate = skip_degenerate
        data = load_coco_json(ann_file)
        self.dataset = data
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_id_to_contiguous = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.contiguous_to_cat_id = {v: k for k, v in self.cat_id_to_contiguous.items()}
        self.class_names = ["__background__"] + [c.get("name", str(c["id"])) for c in self.categories]
        self.images = {img["id"]: img for img in data["images"]}
        self.anns_by_image = {img_id: [] for img_id in self.images}
        for ann in data["annotations"]:
            self.anns_by_image[ann["image_id"]].append(ann)
        ids = [img["id"] for img in data["images"]]
        if remove_empty:
            ids = [i for i in ids if self._kept(self.anns_by_image[i], self.images[i])]
        self.ids = ids
        self._coco = None
        self._cache = {} if cache else None

    @property
    def num_classes(self):
        """C + 1 (with background), the model's num_classes."""
        return len(self.categories) + 1

    @property
    def coco(self):
        """A pycocotools COCO object of the annotation file (built on first use)."""
        if self._coco is None:
            self._coco = coco_from_dict(self.dataset)
        return self._coco

    def __len__(self):
        return len(self.ids)

    def _box(self, ann, h, w):
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
        x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
        return [x1, y1, x2, y2]

    def _kept(self, anns, info):
        h, w = int(info["height"]), int(info["width"])
        out = []
        for ann in anns:
            if self.skip_crowd and ann.get("iscrowd", 0):
                continue
            box = self._box(ann, h, w)
            if self.skip_degenerate and not (box[2] > box[0] and box[3] > box[1]):
                continue
            out.append((ann, box))
        return out

    def load_image(self, image_id):
        info = self.images[image_id]
        path = os.path.join(self.root, info["file_name"])
        img = read_image(path)
        if img.shape[0] != int(info["height"]) or img.shape[1] != int(info["width"]):
            raise ValueError(
                f"image {path} is {img.shape[0]}x{img.shape[1]} but the annotation file says "
                f"{info['height']}x{info['width']}"
            )
        return img

    def load_target(self, image_id):
        info = self.images[image_id]
        h, w = int(info["height"]), int(info["width"])
        kept = self._kept(self.anns_by_image[image_id], info)
        masks = np.zeros((len(kept), h, w), dtype=np.uint8)
        for k, (ann, _) in enumerate(kept):
            try:
                masks[k] = decode_segmentation(ann["segmentation"], h, w)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('id')} of image {image_id}: {e}") from None
        boxes = torch.tensor([b for _, b in kept], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cat_id_to_contiguous[a["category_id"]] for a, _ in kept], dtype=torch.int64)
        iscrowd = torch.tensor([int(a.get("iscrowd", 0)) for a, _ in kept], dtype=torch.int64)
        area = torch.tensor(
            [float(a["area"]) if "area" in a else float(masks[k].sum()) for k, (a, _) in enumerate(kept)],
            dtype=torch.float32,
        )
        return {
            "boxes": boxes,
            "labels": labels,
            "masks": torch.from_numpy(masks),
            "image_id": int(image_id),
            "iscrowd": iscrowd,
            "area": area,
        }

    def _load(self, image_id):
        if self._cache is None:
            return self.load_image(image_id), self.load_target(image_id)
        item = self._cache.get(image_id)
        if item is None:
            item = self._cache[image_id] = (self.load_image(image_id), self.load_target(image_id))
        img, target = item
        # Copies, so that transforms or callers changing them in place cannot alter the cache.
        return img, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in target.items()}

    def __getitem__(self, index):
        image_id = self.ids[index]
        img, target = self._load(image_id)
        image = torch.from_numpy(img).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# ----------------------------------------------------------------------------- transforms

class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms!r})"


def hflip(image, target):
    """Mirror the image, masks and boxes left-right."""
    w = image.shape[-1]
    image = image.flip(-1)
    if target is not None:
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]
            target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
    return image, target


class RandomHorizontalFlip:
    """Flip with probability p (drawn from ``generator`` or torch's global one)."""

    def __init__(self, p=0.5, generator=None):
        self.p = p
        self.generator = generator

    def __call__(self, image, target):
        if torch.rand((), generator=self.generator).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"

