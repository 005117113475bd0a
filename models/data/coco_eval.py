"""COCO evaluation (pycocotools COCOeval) of model outputs in torchvision's format.

``evaluate_coco(predictions, coco_gt)`` scores a dict image_id -> output at once;
``Evaluator`` does the same incrementally: ``update()`` turns each image's output
into COCO results straight away (masks thresholded and RLE-encoded, one image at a
time) and keeps only those, so a loop need not hold any mask tensors.

Outputs: boxes float [K, 4] (x1, y1, x2, y2) in original image coordinates, labels
int [K] (contiguous ids 1..C), scores float [K], optional mask_scores float [K] (the
segm results' scores when given, e.g. CenterMask's MaskIoU rescoring; ``summarize`` then also
reports the masks ranked by ``scores`` as "segm_unscored"), masks [K, 1, H, W] or [K, H, W]
(probabilities, thresholded at ``mask_threshold``, or already binary/bool) at the
image's size. Labels map back to COCO category ids through ``contiguous_to_cat_id``
(taken from a ``CocoInstanceDataset`` when one is passed as ground truth; by default
the categories' ids in increasing order, the same rule as the dataset's).
"""
import copy
import os

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco import coco_from_dict, load_coco_json, quiet

__all__ = ["evaluate_coco", "Evaluator", "coco_from_dict", "outputs_to_coco_results", "METRIC_NAMES"]

METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
IOU_TYPES = ("bbox", "segm")


def _as_coco(coco_gt):
    """Accept a COCO object, a path to an instances JSON, an instances dict or a dataset
    with ``.coco`` (CocoInstanceDataset). Returns (COCO, mapping or None)."""
    if isinstance(coco_gt, COCO):
        return coco_gt, None
    if isinstance(coco_gt, (str, os.PathLike)):
        return coco_from_dict(load_coco_json(os.fspath(coco_gt))), None
    if isinstance(coco_gt, dict):
        return coco_from_dict(coco_gt), None
    if hasattr(coco_gt, "coco") and hasattr(coco_gt, "contiguous_to_cat_id"):
        return coco_gt.coco, dict(coco_gt.contiguous_to_cat_id)
    raise TypeError(f"coco_gt must be a COCO object, an annotation file path, a dict or a CocoInstanceDataset, "
                    f"got {type(coco_gt).__name__}")


def _default_mapping(coco):
    cat_ids = sorted(c["id"] for c in coco.dataset.get("categories", []))
    return {i + 1: cid for i, cid in enumerate(cat_ids)}


def _numpy(x, dtype=None):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def outputs_to_coco_results(image_id, output, contiguous_to_cat_id, iou_types=IOU_TYPES, mask_threshold=0.5,
                            image_size=None):
    """One image's output dict -> {iou_type: [COCO result dicts]} (RLE counts as str).

    image_size: (height, width) that masks must have (checked when given).
    """
    image_id = int(image_id)
    scores = _numpy(output["scores"], np.float64).reshape(-1)
    labels = _numpy(output["labels"], np.int64).reshape(-1)
    n = scores.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"image {image_id}: {labels.shape[0]} labels but {n} scores")
    try:
        cat_ids = [int(contiguous_to_cat_id[int(lab)]) for lab in labels]
    except KeyError as e:
        raise ValueError(f"image {image_id}: label {e.args[0]} has no category id in the mapping") from None
    out = {}
    if "bbox" in iou_types:
        boxes = _numpy(output["boxes"], np.float64).reshape(-1, 4)
        if boxes.shape[0] != n:
            raise ValueError(f"image {image_id}: {boxes.shape[0]} boxes but {n} scores")
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        out["bbox"] = [
            {"image_id": image_id, "category_id": cat_ids[k], "bbox": [float(v) for v in xywh[k]],
             "score": float(scores[k])}
            for k in range(n)
        ]
    if "segm" in iou_types:
        if "masks" not in output:
            raise ValueError(f"image {image_id}: segm evaluation needs 'masks' in the output")
        masks = output["masks"]
        if not isinstance(masks, torch.Tensor):
            masks = torch.as_tensor(np.asarray(masks))
        masks = masks.detach()
        if masks.dim() == 4:
            if masks.shape[1] != 1:
                raise ValueError(f"image {image_id}: masks must be [K, 1, H, W] or [K, H, W], got {tuple(masks.shape)}")
            masks = masks[:, 0]
        if masks.dim() != 3 or masks.shape[0] != n:
            raise ValueError(f"image {image_id}: masks must be [K, 1, H, W] or [K, H, W] with K={n}, "
                             f"got {tuple(output['masks'].shape)}")
        if image_size is not None and tuple(masks.shape[-2:]) != tuple(image_size):
            raise ValueError(f"image {image_id}: masks are {tuple(masks.shape[-2:])} but the image is "
                             f"{tuple(image_size)} (paste masks at the original image size)")
        binary = masks if masks.dtype == torch.bool else masks > mask_threshold
        segm_scores = scores
        if "mask_scores" in output:  # e.g. CenterMask's score x predicted mask IoU
            segm_scores = _numpy(output["mask_scores"], np.float64).reshape(-1)
            if segm_scores.shape[0] != n:
                raise ValueError(f"image {image_id}: {segm_scores.shape[0]} mask_scores but {n} scores")
        segm = []
        if n:
            arr = np.asfortranarray(binary.to(torch.uint8).cpu().numpy().transpose(1, 2, 0))
            rles = mask_utils.encode(arr)
            for k, rle in enumerate(rles):
                rle["counts"] = rle["counts"].decode("ascii")
                r = {"image_id": image_id, "category_id": cat_ids[k], "segmentation": rle,
                     "score": float(segm_scores[k])}
                if segm_scores is not scores:
                    r["det_score"] = float(scores[k])
                segm.append(r)
        out["segm"] = segm
    return out


class Evaluator:
    """Streaming COCO evaluation.

    ev = Evaluator(dataset_or_coco_or_ann_file)
    for images, targets in loader:
        outputs = model(images)
        ev.update({t["image_id"]: o for t, o in zip(targets, outputs)})
    metrics = ev.summarize()   # {"bbox": {"AP": ...}, "segm": {...}}

    Only the images passed to ``update`` (with or without detections) are evaluated;
    if none were, all ground-truth images are.
    """

    def __init__(self, coco_gt, iou_types=IOU_TYPES, contiguous_to_cat_id=None, mask_threshold=0.5):
        self.coco_gt, mapping = _as_coco(coco_gt)
        iou_types = tuple(iou_types)
        for t in iou_types:
            if t not in IOU_TYPES:
                raise ValueError(f"unknown iou type {t!r} (expected 'bbox' and/or 'segm')")
        self.iou_types = iou_types
        if contiguous_to_cat_id is None:
            contiguous_to_cat_id = mapping if mapping is not None else _default_mapping(self.coco_gt)
        if not isinstance(contiguous_to_cat_id, dict):  # a sequence indexed by label
            contiguous_to_cat_id = {i: c for i, c in enumerate(contiguous_to_cat_id)}
        self.contiguous_to_cat_id = contiguous_to_cat_id
        self.mask_threshold = mask_threshold
        self.coco_evals = {}
        self.reset()

    def reset(self):
        self.results = {t: [] for t in self.iou_types}
        self.img_ids = set()
        self.mask_scored = False  # some output carried mask_scores: also report "segm_unscored"

    def update(self, outputs_by_image_id):
        for image_id, output in outputs_by_image_id.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image_id {image_id} is not in the ground truth")
            info = self.coco_gt.imgs[image_id]
            size = (int(info["height"]), int(info["width"])) if "height" in info and "width" in info else None
            res = outputs_to_coco_results(image_id, output, self.contiguous_to_cat_id, self.iou_types,
                                          self.mask_threshold, size)
            for t in self.iou_types:
                self.results[t].extend(res[t])
            self.img_ids.add(image_id)
            self.mask_scored = self.mask_scored or "mask_scores" in output

    def synchronize(self, all_gather) -> None:
        """Merges the results of every process into each: ``all_gather(obj)`` returns the list
        of every rank's ``obj`` (``torch.distributed.all_gather_object``, or ``lambda o: [o]``
        in a single process). Ranks' image sets must not overlap."""
        parts = all_gather((self.results, sorted(self.img_ids), self.mask_scored))
        self.reset()
        for results, img_ids, mask_scored in parts:
            for iou_type, res in results.items():
                self.results[iou_type].extend(res)
            self.img_ids.update(img_ids)
            self.mask_scored = self.mask_scored or mask_scored

    def _results_coco(self, iou_type):
        if iou_type == "segm_unscored":  # the masks ranked by the detection scores
            results = [{**r, "score": r["det_score"]} for r in self.results["segm"]]
        else:
            results = self.results[iou_type]
        if results:
            with quiet():
                return self.coco_gt.loadRes([dict(r) for r in results])  # loadRes edits the dicts
        # loadRes cannot take an empty list: an empty result set by hand
        dt = COCO()
        dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
        with quiet():
            dt.createIndex()
        return dt

    def summarize(self, verbose=False):
        """Run COCOeval per iou type. Returns {iou_type: {metric: value}} (METRIC_NAMES;
        -1 where COCO has no ground truth for a metric, e.g. APs without small objects).
        When the outputs carried ``mask_scores`` (the segm results are ranked by them), the
        same masks ranked by the detection ``scores`` are scored too, as "segm_unscored"."""
        metrics = {}
        types = list(self.iou_types)
        if "segm" in types and self.mask_scored:
            types.append("segm_unscored")
        for t in types:
            dt = self._results_coco(t)
            ev = COCOeval(self.coco_gt, dt, iouType="segm" if t == "segm_unscored" else t)
            if self.img_ids:
                ev.params.imgIds = sorted(self.img_ids)
            with quiet(verbose):
                if verbose:
                    print(f"IoU metric: {t}")
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            self.coco_evals[t] = ev
            metrics[t] = {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats)}
        return metrics


def evaluate_coco(predictions, coco_gt, iou_types=IOU_TYPES, contiguous_to_cat_id=None, mask_threshold=0.5,
                  verbose=False):
    """Evaluate {image_id: output} against ground truth (COCO object, annotation file path,
    instances dict or CocoInstanceDataset). Returns {"bbox": {"AP", "AP50", "AP75", "APs",
    "APm", "APl", "AR1", ...}, "segm": {...}}."""
    ev = Evaluator(coco_gt, iou_types=iou_types, contiguous_to_cat_id=contiguous_to_cat_id,
                   mask_threshold=mask_threshold)
    ev.update(predictions)
    return ev.summarize(verbose=verbose)
