"""``SamAutomaticMaskGenerator``: segment-anything's automatic mask generator (same
arguments, defaults and output dictionaries), computed on the model's device.

Differences from the official pipeline that leave its results unchanged:

- the IoU threshold is applied to the low-resolution predictions before any mask is
  upsampled (the predicted IoU does not depend on the upsampling), so only the survivors
  are upsampled to the crop's resolution;
- masks stay binary tensors (cropped) until the within-crop and cross-crop NMS have run,
  and only the kept masks are uncropped and run-length encoded (``masks_to_rle``);
- the stability score, mask boxes, RLE and the small-region cleanup (``connected_components``,
  no OpenCV) are instseg_ops ops; NMS is ``instseg_ops.batched_nms``.
"""
import math
from itertools import product
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .factored_decoder import FactoredMaskDecoder
from .model import Sam
from .predictor import SamPredictor

# --- helpers of segment-anything's utils/amg.py (same results) -----------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """n x n points at the centres of an n x n grid over [0, 1]^2, (n * n, 2) XY, rows first."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    return [build_point_grid(int(n_per_side / (scale_per_layer ** i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float
                        ) -> Tuple[List[List[int]], List[int]]:
    """The full image, then (2^i)^2 overlapping crops for each layer i = 1..n_layers (XYXY)."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def box_xyxy_to_xywh(box):
    box = list(box)
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def area_from_rle(rle: Dict[str, Any]) -> int:
    return sum(rle["counts"][1::2])


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed column-major RLE -> (h, w) bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(w, h).transpose()


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    from pycocotools import mask as mask_utils
    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def calculate_stability_score(masks: Tensor, mask_threshold: float, threshold_offset: float) -> Tensor:
    """|logits > thr + offset| / |logits > thr - offset| per mask (float32)."""
    from instseg_ops import stability_score
    return stability_score(masks, mask_threshold, threshold_offset)


def batched_mask_to_box(masks: Tensor) -> Tensor:
    """XYXY boxes (inclusive max, as the official) of (..., H, W) binary masks; [0, 0, 0, 0] for empty."""
    from instseg_ops import masks_to_boxes
    return masks_to_boxes(masks)


def mask_to_rle_pytorch(masks: Tensor) -> List[Dict[str, Any]]:
    from instseg_ops import masks_to_rle
    return masks_to_rle(masks)


def is_box_near_crop_edge(boxes: Tensor, crop_box: List[int], orig_box: List[int], atol: float = 20.0) -> Tensor:
    """Boxes (in crop coordinates) within ``atol`` of a crop edge that is not an image edge."""
    crop_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop_t[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig_t[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def uncrop_boxes_xyxy(boxes: Tensor, crop_box: List[int]) -> Tensor:
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: Tensor, crop_box: List[int]) -> Tensor:
    return points + torch.tensor([crop_box[0], crop_box[1]], device=points.device)


def uncrop_masks(masks: Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> Tensor:
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def remove_small_regions(mask: Tensor, area_thresh: float, mode: str) -> Tuple[Tensor, bool]:
    """Fills holes (``mode="holes"``) or removes islands (``"islands"``) smaller than
    ``area_thresh`` in a (H, W) bool mask, 8-connected (islands: if all are small, the largest
    is kept). Returns the mask and whether it changed. ``connected_components``, no OpenCV."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    from instseg_ops import connected_components
    holes = mode == "holes"
    mask = torch.as_tensor(mask, dtype=torch.bool)
    working = mask ^ holes
    labels, areas = connected_components(working[None], connectivity=8)
    labels, areas = labels[0], areas[0]
    # areas[k] is the pixel count of component k + 1 (label 0 is the background)
    small = (areas > 0) & (areas < area_thresh)
    if not bool(small.any()):
        return mask, False
    keep_label = torch.zeros(areas.numel() + 1, dtype=torch.bool, device=mask.device)
    if holes:
        keep_label[0] = True
        keep_label[1:] = small
    else:
        keep_label[1:] = (areas > 0) & ~small
        if not bool(keep_label.any()):
            keep_label[int(torch.argmax(areas)) + 1] = True
    return keep_label[labels.long()], True


class MaskData:
    """A dict of per-mask fields (tensors, arrays or lists) filtered and concatenated together."""

    def __init__(self, **kwargs) -> None:
        self._stats = dict(kwargs)

    def __setitem__(self, key: str, item: Any) -> None:
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self):
        return self._stats.items()

    def filter(self, keep: Tensor) -> None:
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, Tensor):
                self._stats[k] = v[torch.as_tensor(keep, device=v.device)]
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[keep.detach().cpu().numpy()]
            elif isinstance(v, list):
                idx = keep.detach().cpu()
                if idx.dtype == torch.bool:
                    idx = idx.nonzero().flatten()
                self._stats[k] = [v[int(i)] for i in idx]
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}")

    def cat(self, new: "MaskData") -> None:
        for k, v in new.items():
            if k not in self._stats or self._stats[k] is None:
                self._stats[k] = v
            elif isinstance(v, Tensor):
                self._stats[k] = torch.cat([self._stats[k], v], dim=0)
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([self._stats[k], v], axis=0)
            elif isinstance(v, list):
                self._stats[k] = self._stats[k] + list(v)
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}")

    def to_numpy(self) -> None:
        for k, v in self._stats.items():
            if isinstance(v, Tensor):
                self._stats[k] = v.detach().cpu().numpy()


def _batched_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    import instseg_ops
    return instseg_ops.batched_nms(boxes.float(), scores, torch.zeros_like(boxes[:, 0]), iou_threshold)


class SamAutomaticMaskGenerator:
    """Masks for a whole image from a grid of single-point prompts (segment-anything's
    ``SamAutomaticMaskGenerator``; same arguments, defaults and ``generate`` output)."""

    def __init__(self, model: Sam, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, point_grids: Optional[List[np.ndarray]] = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask", *,
                 exact_decoder: bool = False) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grid must be provided.")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                           crop_n_points_downscale_factor)
        else:
            self.point_grids = point_grids
        if len(self.point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids: {len(self.point_grids)} grids for {crop_n_layers + 1} crop layers")
        if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
            raise ValueError(f"Unknown output_mode {output_mode}.")
        if output_mode == "coco_rle":
            import pycocotools.mask  # noqa: F401  (fail early, as the official)
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be positive, got {points_per_batch}")
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        # False: decode the point batches with FactoredMaskDecoder (the image-side work shared
        # across prompts; same masks up to float rounding), True: the plain MaskDecoder
        self.exact_decoder = exact_decoder
        self._factored = None

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks of an (H, W, 3) uint8 RGB image: a list of dicts with ``segmentation``
        (per ``output_mode``), ``area``, ``bbox`` (XYWH), ``predicted_iou``, ``point_coords``,
        ``stability_score`` and ``crop_box`` (XYWH)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"generate: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(data, self.min_mask_region_area,
                                                  max(self.box_nms_thresh, self.crop_nms_thresh))
        masks = data["masks"]
        rles = mask_to_rle_pytorch(masks) if self.output_mode != "binary_mask" else None
        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in rles]
        elif self.output_mode == "uncompressed_rle":
            segmentations = rles
        else:
            segmentations = list(masks.cpu().numpy())
        # in chunks: a sum over bool masks first converts them to int64, 8 bytes per pixel
        flat = masks.flatten(1)
        areas = [a for s in range(0, len(flat), 16) for a in flat[s:s + 16].sum(1).tolist()]
        data["masks"] = None
        data.to_numpy()
        anns = []
        for i in range(len(segmentations)):
            anns.append({
                "segmentation": segmentations[i],
                "area": int(areas[i]),
                "bbox": box_xyxy_to_xywh(data["boxes"][i].tolist()),
                "predicted_iou": data["iou_preds"][i].item(),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": data["stability_score"][i].item(),
                "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i].tolist()),
            })
        return anns

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))
        if len(crop_boxes) > 1 and len(data["iou_preds"]):
            crop = data["crop_boxes"].float()
            scores = 1 / ((crop[:, 2] - crop[:, 0]) * (crop[:, 3] - crop[:, 1]))
            data.filter(_batched_nms(data["boxes"], scores.to(data["boxes"].device), self.crop_nms_thresh))
        # uncrop the kept masks to the image
        h, w = orig_size
        full = torch.zeros((len(data["crop_masks"]), h, w), dtype=torch.bool, device=self.predictor.device)
        for i, (m, cb) in enumerate(zip(data["crop_masks"], data["crop_boxes"].tolist())):
            full[i, cb[1]:cb[3], cb[0]:cb[2]] = m
        data["masks"] = full
        del data["crop_masks"]
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer_idx: int,
                      orig_size: Tuple[int, ...]) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = cropped.shape[:2]
        self.predictor.set_image(cropped)
        if not self.exact_decoder:
            model = self.predictor.model
            pe_model = model.prompt_encoder
            self._factored = FactoredMaskDecoder(
                model.mask_decoder, self.predictor.features, pe_model.get_dense_pe(),
                pe_model.no_mask_embed.weight.reshape(1, -1, 1, 1))
        points_scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * points_scale
        data = MaskData()
        for start in range(0, len(points_for_image), self.points_per_batch):
            points = points_for_image[start:start + self.points_per_batch]
            data.cat(self._process_batch(points, crop_size, crop_box, orig_size))
        self.predictor.reset_image()
        self._factored = None
        dev = self.predictor.device
        if "iou_preds" not in data:
            data = MaskData(iou_preds=torch.zeros(0, device=dev), boxes=torch.zeros((0, 4), dtype=torch.long,
                            device=dev), points=torch.zeros((0, 2), dtype=torch.float64, device=dev),
                            stability_score=torch.zeros(0, device=dev), crop_masks=[])
        if len(data["iou_preds"]):
            data.filter(_batched_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["iou_preds"]), dtype=torch.long,
                                          device=dev).reshape(-1, 4)
        return data

    def _process_batch(self, points: np.ndarray, im_size: Tuple[int, ...], crop_box: List[int],
                       orig_size: Tuple[int, ...]) -> MaskData:
        orig_h, orig_w = orig_size
        pred = self.predictor
        dev = pred.device
        in_points = torch.as_tensor(pred.transform.apply_coords(points, im_size), device=dev)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=dev)
        iou_thresh = self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        if self._factored is not None:
            # only the masks that pass the IoU threshold are upscaled (the rest are not computed)
            sparse, _ = pred.model.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]), boxes=None,
                                                  masks=None)
            low_res, iou_preds = self._factored(sparse, multimask_output=True, iou_threshold=iou_thresh)
        else:
            low_res, iou_preds = pred._decode(in_points[:, None, :], in_labels[:, None], None, None, True)
        n_out = iou_preds.shape[1]
        iou_preds = iou_preds.flatten(0, 1)
        pts = torch.as_tensor(points.repeat(n_out, axis=0), device=dev)
        keep = torch.ones_like(iou_preds, dtype=torch.bool)
        if iou_thresh is not None:
            keep = iou_preds > iou_thresh
        if self._factored is None or iou_thresh is None:
            low_res = low_res.flatten(0, 1)[keep]
        iou_preds, pts = iou_preds[keep], pts[keep]
        # only the survivors are upsampled, in chunks that bound the memory
        thr = pred.model.mask_threshold
        stab, masks = [], []
        for s in range(0, low_res.shape[0], 16):
            logits = pred.model.postprocess_masks(low_res[s:s + 16, None], pred.input_size, pred.original_size)[:, 0]
            stab.append(calculate_stability_score(logits, thr, self.stability_score_offset))
            masks.append(logits > thr)
        if masks:
            stability, masks = torch.cat(stab), torch.cat(masks)
        else:
            stability = torch.zeros(0, device=dev)
            masks = torch.zeros((0,) + tuple(im_size), dtype=torch.bool, device=dev)
        keep = torch.ones_like(stability, dtype=torch.bool)
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
        masks, iou_preds, pts, stability = masks[keep], iou_preds[keep], pts[keep], stability[keep]
        boxes = batched_mask_to_box(masks)
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        return MaskData(iou_preds=iou_preds[keep], points=pts[keep], stability_score=stability[keep],
                        boxes=boxes[keep], crop_masks=list(masks[keep]))

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fills small holes and removes small islands of every mask; masks that changed get
        score 0 and unchanged ones 1 for a box NMS (the official rule), and the changed masks
        that survive replace their originals."""
        masks = mask_data["masks"]
        if masks.shape[0] == 0:
            return mask_data
        new_masks, scores = [], []
        for m in masks:
            m2, changed_holes = remove_small_regions(m, min_area, "holes")
            m2, changed_islands = remove_small_regions(m2, min_area, "islands")
            new_masks.append(m2)
            scores.append(float(not (changed_holes or changed_islands)))
        new = torch.stack(new_masks)
        boxes = batched_mask_to_box(new)
        scores_t = torch.as_tensor(scores, device=boxes.device)
        keep = _batched_nms(boxes, scores_t, nms_thresh)
        changed = scores_t[keep] == 0.0
        idx = keep[changed]
        masks = masks.clone()
        masks[idx] = new[idx]
        mask_data["masks"] = masks
        b = mask_data["boxes"].clone()
        b[idx] = boxes[idx].to(b.dtype)
        mask_data["boxes"] = b
        mask_data.filter(keep)
        return mask_data
