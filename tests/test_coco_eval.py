"""instseg_ops.models.data.coco_eval: COCO evaluation of torchvision-format outputs."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from instseg_ops.models.data import CocoInstanceDataset, Evaluator, evaluate_coco, generate_split, write_image
from instseg_ops.models.data.coco_eval import METRIC_NAMES
from instseg_ops.models.engine.distributed import DistInfo
from instseg_ops.models.engine.evaluation import evaluate

HEADLINE = ("AP", "AP50", "AP75")


@pytest.fixture
def dataset(seed, tmp_path):
    root = str(tmp_path / "shapes")
    generate_split(root, "val", 5, size=(64, 80), seed=seed)
    ds = CocoInstanceDataset(os.path.join(root, "val"), os.path.join(root, "annotations", "instances_val.json"))
    assert sum(len(ds.anns_by_image[i]) for i in ds.ids) > 0
    return ds


def gt_outputs(ds, probabilities=True):
    """Ground truth as model outputs: score 1, masks from the ground truth ([K, 1, H, W])."""
    out = {}
    for i in range(len(ds)):
        _, t = ds[i]
        m = t["masks"][:, None]
        m = m.float() * 0.9 + 0.05 if probabilities else m.bool()
        out[t["image_id"]] = {"boxes": t["boxes"].clone(), "labels": t["labels"].clone(),
                              "scores": torch.ones(len(t["labels"])), "masks": m}
    return out


def empty_output(h, w):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, h, w)}


@pytest.mark.parametrize("probabilities", [True, False])
def test_ground_truth_as_predictions_gives_ap_1(dataset, probabilities):
    preds = gt_outputs(dataset, probabilities)
    metrics = evaluate_coco(preds, dataset)
    assert set(metrics) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        assert list(metrics[t]) == METRIC_NAMES
        for name in HEADLINE:
            assert metrics[t][name] == pytest.approx(1.0), (t, name, metrics[t])
        for name in ("APs", "APm", "APl"):
            assert metrics[t][name] in (-1.0, pytest.approx(1.0))
    # the annotation file path (default mapping) gives the same numbers
    assert evaluate_coco(preds, dataset.ann_file) == metrics


def test_streaming_evaluator_matches_one_shot(dataset):
    preds = gt_outputs(dataset)
    # perturb so that the numbers are not all 1: drop one detection, shift some boxes and masks
    for k, (image_id, o) in enumerate(sorted(preds.items())):
        if k % 2 == 0 and len(o["labels"]):
            o["boxes"][0] += 5.0
            o["masks"][0] = torch.roll(o["masks"][0], shifts=5, dims=-1)
            o["scores"][0] = 0.5
    ev = Evaluator(dataset)
    for image_id in sorted(preds, reverse=True):
        ev.update({image_id: preds[image_id]})
    assert all(isinstance(r["segmentation"]["counts"], str) for r in ev.results["segm"])
    json.dumps(ev.results)  # results are plain JSON-able data (RLEs, no tensors)
    streamed = ev.summarize()
    assert streamed == evaluate_coco(preds, dataset)
    assert ev.summarize() == streamed  # summarize can be called again
    ev.reset()
    assert ev.results == {"bbox": [], "segm": []} and not ev.img_ids


class Replay(torch.nn.Module):
    """A "model" that returns given outputs in order, one per image it is called on."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, images):
        out = [{k: v.clone() for k, v in o.items()} for o in self.outputs[self.calls:self.calls + len(images)]]
        self.calls += len(images)
        return out


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_engine_evaluate_progress_bar_leaves_results_alone(dataset, monkeypatch):
    preds = gt_outputs(dataset)
    for k, o in enumerate(preds[i] for i in dataset.ids):
        if k % 2 == 0 and len(o["labels"]):
            o["boxes"][0] += 4.0
            o["scores"][0] = 0.3
    expected = evaluate_coco(preds, dataset)
    outputs = [preds[i] for i in dataset.ids]
    for progress in (True, False):
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        model = Replay(outputs)
        assert evaluate(model, dataset, DistInfo(), batch_size=2, progress=progress) == expected
        assert model.calls == len(dataset) and model.training  # the train/eval mode is restored
        bar = terminal.getvalue()
        # a bar over the dataset's images (its first draw; later ones are rate-limited), cleared at the end
        assert ("evaluate:   0%|" in bar and f"0/{len(dataset)} [" in bar) if progress else bar == ""
    # not a terminal: no bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert evaluate(Replay(outputs), dataset, DistInfo(), batch_size=3) == expected
    assert sys.stderr.getvalue() == ""


def test_shifted_boxes_give_lower_ap(dataset):
    preds = gt_outputs(dataset)
    for o in preds.values():
        b = o["boxes"]
        w = (b[:, 2] - b[:, 0]).clamp(min=1)
        o["boxes"] = b + torch.stack([w, torch.zeros_like(w), w, torch.zeros_like(w)], 1) * 0.4
        o["masks"] = torch.roll(o["masks"], shifts=4, dims=-1)
    metrics = evaluate_coco(preds, dataset)
    assert 0.0 <= metrics["bbox"]["AP"] < 0.9
    assert 0.0 <= metrics["segm"]["AP"] < 0.9
    assert metrics["bbox"]["AP75"] <= metrics["bbox"]["AP50"]


def test_wrong_labels_give_zero_ap(dataset):
    preds = gt_outputs(dataset)
    for o in preds.values():
        o["labels"] = o["labels"] % 6 + 1
    metrics = evaluate_coco(preds, dataset)
    # a relabelled box can still hit another (e.g. occluded) object of its new category by chance
    assert metrics["bbox"]["AP"] < 0.5 and metrics["segm"]["AP"] < 0.5


def test_empty_predictions_give_zero(dataset):
    h, w = 64, 80
    for preds in ({}, {i: empty_output(h, w) for i in dataset.ids}):
        metrics = evaluate_coco(preds, dataset)
        for t in ("bbox", "segm"):
            assert metrics[t]["AP"] == 0.0 and metrics[t]["AP50"] == 0.0 and metrics[t]["AR100"] == 0.0
    assert set(evaluate_coco({}, dataset, iou_types=("bbox",))) == {"bbox"}
    # masks [K, H, W] and without masks for bbox only
    preds = {i: {k: v for k, v in empty_output(h, w).items() if k != "masks"} for i in dataset.ids}
    assert evaluate_coco(preds, dataset, iou_types=["bbox"])["bbox"]["AP"] == 0.0


def test_non_contiguous_category_ids_map_back(tmp_path):
    """Real COCO has category ids with gaps: labels 1..C map back through the dataset's mapping."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    write_image(str(img_dir / "a.png"), np.zeros((20, 30, 3), np.uint8))
    polys = {90: [2, 2, 12, 2, 12, 10, 2, 10], 3: [15, 5, 28, 5, 28, 18, 15, 18]}
    anns = [{"id": i + 1, "image_id": 1, "category_id": c, "iscrowd": 0, "area": 0.0,
             "bbox": [p[0], p[1], p[4] - p[0], p[5] - p[1]], "segmentation": [p]} for i, (c, p) in enumerate(polys.items())]
    for a in anns:
        a["area"] = float(a["bbox"][2] * a["bbox"][3])
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}], "annotations": anns,
            "categories": [{"id": 3, "name": "c"}, {"id": 90, "name": "z"}]}
    ann_file = str(tmp_path / "ann.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    ds = CocoInstanceDataset(str(img_dir), ann_file)
    preds = gt_outputs(ds)
    assert sorted(preds[1]["labels"].tolist()) == [1, 2]
    for source in (ds, ann_file):
        m = evaluate_coco(preds, source)
        assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)
    # an explicit mapping, as a dict or a sequence indexed by label
    swapped = evaluate_coco(preds, ann_file, contiguous_to_cat_id={1: 90, 2: 3})
    assert swapped["bbox"]["AP"] == 0.0
    assert evaluate_coco(preds, ann_file, contiguous_to_cat_id=[0, 3, 90])["segm"]["AP"] == pytest.approx(1.0)


def test_bad_inputs_give_clear_errors(dataset, tmp_path):
    preds = gt_outputs(dataset)
    some_id = next(i for i in preds if len(preds[i]["labels"]))
    with pytest.raises(ValueError, match="image_id 999 is not in the ground truth"):
        evaluate_coco({999: preds[some_id]}, dataset)
    bad = dict(preds[some_id])
    bad["masks"] = bad["masks"][..., :10]
    with pytest.raises(ValueError, match="paste masks at the original image size"):
        evaluate_coco({some_id: bad}, dataset)
    bad = dict(preds[some_id])
    bad["labels"] = bad["labels"] * 0 + 7
    with pytest.raises(ValueError, match="label 7 has no category id"):
        evaluate_coco({some_id: bad}, dataset)
    bad = {k: v for k, v in preds[some_id].items() if k != "masks"}
    with pytest.raises(ValueError, match="needs 'masks'"):
        evaluate_coco({some_id: bad}, dataset)
    with pytest.raises(ValueError, match="unknown iou type"):
        Evaluator(dataset, iou_types=("keypoints",))
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        evaluate_coco({}, str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="coco_gt must be"):
        evaluate_coco({}, 42)


def test_mask_scores_rank_the_masks_and_the_detection_scores_are_scored_too(dataset, seed):
    """Outputs with ``mask_scores`` (CenterMask's MaskIoU rescoring): segm AP ranks the masks by
    them, "segm_unscored" by the detection scores, in one evaluation; each equals an evaluation
    of outputs that carry only that score."""
    gen = torch.Generator().manual_seed(seed)
    preds = gt_outputs(dataset)
    for o in preds.values():
        # a corrupted mask per image (half the ground truth's mask wiped) next to the good ones
        k = len(o["scores"])
        o["masks"] = torch.cat([o["masks"], o["masks"] * (torch.rand(o["masks"].shape, generator=gen) < 0.5)])
        o["boxes"], o["labels"] = o["boxes"].repeat(2, 1), o["labels"].repeat(2)
        o["scores"] = torch.rand(2 * k, generator=gen)
        o["mask_scores"] = torch.cat([torch.full((k,), 0.9), torch.full((k,), 0.1)])
    both = evaluate_coco(preds, dataset)
    assert set(both) == {"bbox", "segm", "segm_unscored"}
    by_mask = evaluate_coco({i: {**o, "scores": o["mask_scores"]} for i, o in preds.items()}, dataset,
                            iou_types=("segm",))
    by_det = evaluate_coco({i: {k: v for k, v in o.items() if k != "mask_scores"} for i, o in preds.items()},
                           dataset, iou_types=("segm",))
    assert both["segm"] == by_mask["segm"] and both["segm_unscored"] == by_det["segm"]
    assert both["segm"]["AP"] == pytest.approx(1.0) and both["segm_unscored"]["AP"] < 1.0
    with pytest.raises(ValueError, match="mask_scores"):
        evaluate_coco({i: {**o, "mask_scores": o["mask_scores"][:1]} for i, o in list(preds.items())[:1]}, dataset)
