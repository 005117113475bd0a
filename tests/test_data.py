"""instseg_ops.models.data: synthetic shapes generator, image files, COCO dataset and transforms."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg_ops.models.data import (CocoInstanceDataset, Compose, RandomHorizontalFlip, generate_split, hflip,
                                     read_image, render_sample, write_image)
from instseg_ops.models.engine.loader import collate_lists
from instseg_ops.models.data.shapes import main as shapes_main
from instseg_ops.models.data.synthetic import rasterize_ellipse, rasterize_polygon


def load_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def mask_box_xyxy(mask):
    """Tight [x1, y1, x2, y2) box of a non-empty 2-D mask (exclusive end, pixel units)."""
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    cols = np.flatnonzero(np.asarray(mask).any(axis=0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


# ----------------------------------------------------------------------------- generator

@pytest.mark.parametrize("size,size_range", [(64, None), ((40, 72), None), (256, (33, 70))])
def test_generated_split_loads_in_pycocotools_and_masks_round_trip(seed, tmp_path, size, size_range):
    n = 4
    ann_file = generate_split(str(tmp_path), "val", n, size=size, size_range=size_range, seed=seed)
    assert ann_file == os.path.join(str(tmp_path), "annotations", "instances_val.json")
    coco = load_coco(ann_file)
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
        "circle", "ellipse", "rectangle", "triangle", "star", "polygon"]
    assert sorted(coco.getImgIds()) == list(range(1, n + 1))
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for index in range(n):
        image, instances = render_sample(seed, "val", index, size=size, size_range=size_range)
        info = coco.imgs[index + 1]
        assert set(info) >= {"id", "file_name", "height", "width"}
        h, w = image.shape[:2]
        assert (info["height"], info["width"]) == (h, w)
        if size_range is not None:
            assert size_range[0] <= h <= size_range[1] and size_range[0] <= w <= size_range[1]
        elif isinstance(size, tuple):
            assert (h, w) == size
        else:
            assert (h, w) == (size, size)
        with Image.open(os.path.join(str(tmp_path), "val", info["file_name"])) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), image)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[index + 1])), key=lambda a: a["id"])
        assert len(anns) == len(instances) >= 0
        union = np.zeros((h, w), dtype=np.int32)
        for ann, inst in zip(anns, instances):
            assert set(ann) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
            assert ann["iscrowd"] == 0
            assert ann["category_id"] == inst["category_id"]
            assert isinstance(ann["segmentation"]["counts"], str)
            decoded = coco.annToMask(ann)
            np.testing.assert_array_equal(decoded, inst["mask"].astype(np.uint8))
            assert ann["area"] == int(inst["mask"].sum()) >= 20
            x1, y1, x2, y2 = mask_box_xyxy(inst["mask"])
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            np.testing.assert_allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])
            union += inst["mask"]
        assert union.max(initial=0) <= 1, "visible masks of one image must not overlap"


def test_generator_draws_all_categories_and_a_wide_range_of_sizes(seed):
    cats, areas = set(), []
    for index in range(40):
        _, instances = render_sample(seed, "train", index, size=128)
        for inst in instances:
            cats.add(inst["category_id"])
            areas.append(int(inst["mask"].sum()))
    assert cats == {1, 2, 3, 4, 5, 6}
    assert min(areas) < 200 and max(areas) > 0.2 * 128 * 128


def read_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_generation_is_deterministic(seed, tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    argv = ["--train", "3", "--val", "2", "--size", "48", "--seed", str(seed), "--quiet"]
    assert shapes_main(["--out", a] + argv) == 0
    assert shapes_main(["--out", b] + argv) == 0
    other = (seed + 1) % 2**32
    assert shapes_main(["--out", c, "--train", "3", "--val", "2", "--size", "48", "--seed", str(other), "--quiet"]) == 0
    ta, tb, tc = read_tree(a), read_tree(b), read_tree(c)
    expected = {os.path.join("annotations", "instances_train.json"), os.path.join("annotations", "instances_val.json")}
    expected |= {os.path.join("train", f"{i:06d}.png") for i in range(3)}
    expected |= {os.path.join("val", f"{i:06d}.png") for i in range(2)}
    assert set(ta) == expected
    assert ta == tb
    assert set(tc) == expected
    assert ta[os.path.join("annotations", "instances_train.json")] != tc[os.path.join("annotations", "instances_train.json")]
    assert all(ta[k] != tc[k] for k in expected if k.endswith(".png"))
    # an image does not depend on how many were asked for; splits differ
    d = str(tmp_path / "d")
    generate_split(d, "train", 1, size=48, seed=seed)
    assert read_tree(d)[os.path.join("train", "000000.png")] == ta[os.path.join("train", "000000.png")]
    assert ta[os.path.join("train", "000000.png")] != ta[os.path.join("val", "000000.png")]


def test_command_line(tmp_path):
    out = str(tmp_path / "cli")
    r = subprocess.run([sys.executable, "-m", "instseg_ops.models.data.shapes", "--out", out, "--train", "2",
                        "--val", "1", "--size", "32", "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["000000.png", "000001.png"]
    assert sorted(os.listdir(os.path.join(out, "annotations"))) == ["instances_train.json", "instances_val.json"]
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == ["train", "val"]
    assert "img/s" not in r.stderr  # no progress bar when stderr is not a terminal
    r = subprocess.run([sys.executable, "-m", "instseg_ops.models.data.shapes", "--out", out, "--train", "1",
                        "--val", "0", "--size", "32", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_rasterisers_against_references(seed):
    rng = np.random.default_rng(seed)
    h, w = 37, 41
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    # integer-cornered rectangle: exactly its pixel block
    m = rasterize_polygon([[3, 5], [20, 5], [20, 30], [3, 30]], h, w)
    ref = np.zeros((h, w), bool)
    ref[5:30, 3:20] = True
    np.testing.assert_array_equal(m, ref)
    for _ in range(5):
        # convex polygons (random triangles): half-plane test at pixel centres
        pts = rng.uniform(-5, 45, size=(3, 2))
        d1, d2 = pts[1] - pts[0], pts[2] - pts[0]
        if d1[0] * d2[1] - d1[1] * d2[0] < 0:
            pts = pts[::-1]
        inside = np.ones((h, w), bool)
        for i in range(3):
            (xa, ya), (xb, yb) = pts[i], pts[(i + 1) % 3]
            inside &= (xb - xa) * (ys - ya) - (yb - ya) * (xs - xa) > 0
        np.testing.assert_array_equal(rasterize_polygon(pts, h, w), inside)
        # rotated ellipse: the implicit equation over the whole grid
        cx, cy, a, b, ang = rng.uniform(0, 40), rng.uniform(0, 36), rng.uniform(1, 20), rng.uniform(1, 20), rng.uniform(0, 6.3)
        u = ((xs - cx) * np.cos(ang) + (ys - cy) * np.sin(ang)) / a
        v = (-(xs - cx) * np.sin(ang) + (ys - cy) * np.cos(ang)) / b
        np.testing.assert_array_equal(rasterize_ellipse(cx, cy, a, b, ang, h, w), u * u + v * v <= 1)
    # a shape entirely outside the image is empty
    assert not rasterize_polygon([[-10, -10], [-2, -10], [-2, -3]], h, w).any()


# ----------------------------------------------------------------------------- image files

def test_write_image_round_trips_through_pillow(seed, tmp_path):
    rng = np.random.default_rng(seed)
    p = str(tmp_path / "x.png")
    for shape, mode in (((0, 0), "L"), ((0, 0, 1), "L"), ((0, 0, 3), "RGB"), ((0, 0, 4), "RGBA")):
        h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        img = rng.integers(0, 256, size=(h, w) + shape[2:], dtype=np.uint8)
        write_image(p, img)
        with open(p, "rb") as f:
            data = f.read()
        write_image(p, img)
        with open(p, "rb") as f:
            assert f.read() == data  # deterministic bytes
        with Image.open(p) as im:  # Pillow's own decoder is the reference
            assert im.format == "PNG" and im.mode == mode and im.size == (w, h)
            np.testing.assert_array_equal(np.asarray(im), img.reshape(np.asarray(im).shape))
        out = read_image(p)
        assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous
        rgb = np.repeat(img.reshape(h, w, -1), 3, axis=2) if img.ndim == 2 or img.shape[2] == 1 else img[:, :, :3]
        np.testing.assert_array_equal(out, rgb)


def test_read_image_other_modes_and_formats(seed, tmp_path):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(2, 40)), int(rng.integers(2, 40))
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # palette with a transparent entry: looked up, alpha dropped
    palette = rng.integers(0, 256, size=(16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, size=(h, w), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.tobytes())
    im.save(str(tmp_path / "p.png"), transparency=3)
    np.testing.assert_array_equal(read_image(str(tmp_path / "p.png")), palette[idx])
    # grey + alpha: grey repeated
    la = rng.integers(0, 256, size=(h, w, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(str(tmp_path / "la.png"))
    np.testing.assert_array_equal(read_image(str(tmp_path / "la.png")), np.repeat(la[:, :, :1], 3, axis=2))
    # 16-bit grey: the high byte (not Pillow's clipping to 255)
    g16 = rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
    Image.fromarray(g16).save(str(tmp_path / "g16.png"))
    high = (g16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(read_image(str(tmp_path / "g16.png")), np.repeat(high[:, :, None], 3, axis=2))
    # JPEG: what Pillow decodes, as RGB; write_image picks the format from the suffix
    ys, xs = np.mgrid[0:32, 0:48]  # smooth, so that the lossy format stays close
    rgb = np.stack([xs * 4, ys * 6, (xs + ys) * 2], -1).astype(np.uint8) + rng.integers(0, 50, size=3, dtype=np.uint8)
    write_image(str(tmp_path / "a.jpg"), rgb)
    with Image.open(str(tmp_path / "a.jpg")) as im:
        assert im.format == "JPEG"
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.jpg")), ref)
    assert np.abs(ref.astype(int) - rgb).mean() < 4  # lossy, but the same picture


def test_image_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*nope.png"):
        read_image(str(tmp_path / "nope.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        read_image(str(bad))
    p = str(tmp_path / "ok.png")
    write_image(p, np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8))
    with open(p, "rb") as f:
        data = f.read()
    bad.write_bytes(data[:len(data) // 2])  # cut inside the image data
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        read_image(str(bad))
    with pytest.raises(ValueError, match="uint8"):
        write_image(p, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="expected shape"):
        write_image(p, np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        write_image(p, np.zeros((0, 4, 3), np.uint8))


# ----------------------------------------------------------------------------- dataset

@pytest.fixture
def shapes_dir(seed, tmp_path):
    root = str(tmp_path / "shapes")
    generate_split(root, "val", 4, size=(48, 64), seed=seed)
    return root


def check_sample(image, target, height, width):
    assert image.dtype == torch.float32 and image.shape == (3, height, width)
    assert 0.0 <= image.min() and image.max() <= 1.0
    k = target["labels"].shape[0]
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (k, 4)
    assert target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (k, height, width)
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].shape == (k,)
    assert target["area"].dtype == torch.float32 and target["area"].shape == (k,)
    assert isinstance(target["image_id"], int)


def test_dataset_on_generated_split(seed, shapes_dir):
    ds = CocoInstanceDataset(os.path.join(shapes_dir, "val"), os.path.join(shapes_dir, "annotations", "instances_val.json"))
    assert len(ds) == 4 and ds.num_classes == 7
    assert ds.contiguous_to_cat_id == {i: i for i in range(1, 7)}
    for i in range(len(ds)):
        image, target = ds[i]
        check_sample(image, target, 48, 64)
        assert target["image_id"] == i + 1
        img, instances = render_sample(seed, "val", i, size=(48, 64))
        np.testing.assert_array_equal((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), img)
        assert target["labels"].tolist() == [inst["category_id"] for inst in instances]
        for k in range(len(instances)):
            m = target["masks"][k].numpy()
            np.testing.assert_array_equal(m, instances[k]["mask"])
            assert target["boxes"][k].tolist() == [float(v) for v in mask_box_xyxy(m)]
            assert target["area"][k].item() == m.sum()
        assert (target["iscrowd"] == 0).all()


def test_dataset_cache_returns_equal_independent_items(seed, shapes_dir):
    """cache=True: every item equals the uncached one (same flips), and changing a returned
    image or target in place does not change what the cache hands out next."""
    args = (os.path.join(shapes_dir, "val"), os.path.join(shapes_dir, "annotations", "instances_val.json"))
    plain = CocoInstanceDataset(*args, transforms=Compose([RandomHorizontalFlip(0.5, torch.Generator().manual_seed(seed))]))
    cached = CocoInstanceDataset(*args, transforms=Compose([RandomHorizontalFlip(0.5, torch.Generator().manual_seed(seed))]),
                                 cache=True)
    for rep in range(3):
        for i in range(len(plain)):
            (a, ta), (b, tb) = plain[i], cached[i]
            assert torch.equal(a, b)
            assert set(ta) == set(tb)
            for k in ta:
                assert torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k], k
            b.fill_(-1.0)  # the caller scribbles over what it got
            for v in tb.values():
                if isinstance(v, torch.Tensor):
                    v.fill_(7)
    assert len(cached._cache) == len(cached) and plain._cache is None


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


@pytest.fixture
def coco_like(tmp_path):
    """A hand-made COCO folder like real COCO: non-contiguous category ids, polygons, crowd
    (uncompressed RLE), compressed RLE, a degenerate box, an image without annotations."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (30, 40)), ("b.png", (20, 25))):
        write_image(str(img_dir / name), rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    crowd = np.zeros((30, 40), np.uint8)
    crowd[2:10, 30:38] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    # uncompressed RLE: run lengths in column-major order
    flat = crowd.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    blob = np.zeros((20, 25), np.uint8)
    blob[5:15, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 10, "image_id": 7, "category_id": 90, "iscrowd": 0, "area": 150.0,
         "bbox": [5.0, 4.0, 15.0, 10.0], "segmentation": [[5, 4, 20, 4, 20, 14, 5, 14]]},
        {"id": 11, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": float(crowd.sum()),
         "bbox": [30.0, 2.0, 8.0, 8.0], "segmentation": {"counts": counts, "size": [30, 40]}},
        {"id": 12, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 0.0,
         "bbox": [1.0, 1.0, 0.0, 5.0], "segmentation": [[1, 1, 1, 1, 1, 6]]},
        {"id": 13, "image_id": 8, "category_id": 3, "iscrowd": 0,
         "bbox": [3.0, 5.0, 6.0, 10.0], "segmentation": rle},
    ]
    data = {"images": [{"id": 7, "file_name": "a.png", "height": 30, "width": 40},
                       {"id": 8, "file_name": "b.png", "height": 20, "width": 25},
                       {"id": 9, "file_name": "a.png", "height": 30, "width": 40}],
            "annotations": anns,
            "categories": [{"id": 90, "name": "z"}, {"id": 3, "name": "c"}, {"id": 50, "name": "m"}]}
    ann_file = write_json(tmp_path / "ann.json", data)
    assert mask_utils.decode(crowd_rle).sum() == crowd.sum()
    return str(img_dir), ann_file, data, crowd


def test_dataset_on_coco_like_annotations(coco_like):
    img_dir, ann_file, data, crowd = coco_like
    ds = CocoInstanceDataset(img_dir, ann_file)
    assert ds.cat_id_to_contiguous == {3: 1, 50: 2, 90: 3}
    assert ds.contiguous_to_cat_id == {1: 3, 2: 50, 3: 90}
    assert ds.num_classes == 4 and ds.class_names == ["__background__", "c", "m", "z"]
    assert len(ds) == 3
    image, t = ds[0]
    check_sample(image, t, 30, 40)
    assert t["labels"].tolist() == [3]  # crowd and degenerate left out
    assert t["boxes"].tolist() == [[5.0, 4.0, 20.0, 14.0]]
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(data["annotations"][0]["segmentation"], 30, 40)))
    np.testing.assert_array_equal(t["masks"][0].numpy(), ref)
    image, t = ds[1]
    check_sample(image, t, 20, 25)
    assert t["labels"].tolist() == [1] and t["area"].tolist() == [60.0]  # area from the mask when missing
    assert t["boxes"].tolist() == [[3.0, 5.0, 9.0, 15.0]]
    image, t = ds[2]
    check_sample(image, t, 30, 40)
    assert t["labels"].shape == (0,)

    ds_all = CocoInstanceDataset(img_dir, ann_file, skip_crowd=False, skip_degenerate=False)
    _, t = ds_all[0]
    assert t["labels"].tolist() == [3, 1, 1] and t["iscrowd"].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(t["masks"][1].numpy(), crowd)
    assert CocoInstanceDataset(img_dir, ann_file, remove_empty=True).ids == [7, 8]


def test_dataloader_collate(shapes_dir):
    ds = CocoInstanceDataset(os.path.join(shapes_dir, "val"), os.path.join(shapes_dir, "annotations", "instances_val.json"),
                             transforms=Compose([RandomHorizontalFlip(0.5)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_lists)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 3
    for image, target in zip(images, targets):
        check_sample(image, target, 48, 64)
    assert [t["image_id"] for t in targets] == [1, 2, 3]


# ----------------------------------------------------------------------------- transforms

def random_target(rng, h, w, k):
    masks = torch.zeros((k, h, w), dtype=torch.uint8)
    boxes = []
    for i in range(k):
        x1, y1 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        x2, y2 = int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))
        masks[i, y1:y2, x1:x2] = 1
        boxes.append([x1, y1, x2, y2])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "masks": masks,
            "labels": torch.ones(k, dtype=torch.int64), "area": masks.flatten(1).sum(1).float(), "image_id": 1}


def test_flip_consistent_and_involutive(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        h, w, k = int(rng.integers(2, 40)), int(rng.integers(2, 40)), int(rng.integers(0, 5))
        image = torch.rand(3, h, w)
        target = random_target(rng, h, w, k)
        fi, ft = hflip(image, target)
        assert torch.equal(fi, image.flip(-1)) and torch.equal(ft["masks"], target["masks"].flip(-1))
        for i in range(k):
            assert ft["boxes"][i].tolist() == [float(v) for v in mask_box_xyxy(ft["masks"][i].numpy())]
        assert torch.equal(ft["labels"], target["labels"])
        gi, gt = hflip(fi, ft)
        assert torch.equal(gi, image) and torch.equal(gt["masks"], target["masks"])
        assert torch.equal(gt["boxes"], target["boxes"])
        # real-valued boxes: flipping twice is the identity up to rounding
        b = torch.rand(k, 2) * w / 2
        target["boxes"] = torch.cat([b[:, :1], b[:, 1:] * h / w, b[:, :1] + w / 2, b[:, 1:] * h / w + 1], 1)
        _, tt = hflip(*hflip(image, target))
        torch.testing.assert_close(tt["boxes"], target["boxes"])
    image, target = torch.rand(3, 5, 6), random_target(rng, 5, 6, 2)
    fi, ft = RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(fi, image.flip(-1)) and torch.equal(ft["masks"], target["masks"].flip(-1))
    fi, ft = RandomHorizontalFlip(0.0)(image, target)
    assert fi is image and ft is target
    g = torch.Generator().manual_seed(seed)
    flips = [RandomHorizontalFlip(0.5, generator=g)(image, target)[0] is not image for _ in range(64)]
    assert 0 < sum(flips) < 64


# ----------------------------------------------------------------------------- errors

def test_bad_paths_and_malformed_annotation_files(coco_like, tmp_path):
    img_dir, ann_file, data, _ = coco_like
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoInstanceDataset(str(tmp_path / "nope"), ann_file)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoInstanceDataset(img_dir, str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CocoInstanceDataset(img_dir, str(bad))
    write_json(bad, [1, 2])
    with pytest.raises(ValueError, match="expected a JSON object"):
        CocoInstanceDataset(img_dir, str(bad))
    write_json(bad, {k: v for k, v in data.items() if k != "annotations"})
    with pytest.raises(ValueError, match="missing top-level key 'annotations'"):
        CocoInstanceDataset(img_dir, str(bad))
    d = json.loads(json.dumps(data))
    del d["annotations"][1]["bbox"]
    with pytest.raises(ValueError, match=r"annotations\[1\] is missing key 'bbox'"):
        CocoInstanceDataset(img_dir, write_json(bad, d))
    d = json.loads(json.dumps(data))
    del d["images"][0]["file_name"]
    with pytest.raises(ValueError, match=r"images\[0\] is missing key 'file_name'"):
        CocoInstanceDataset(img_dir, write_json(bad, d))
    d = json.loads(json.dumps(data))
    d["annotations"][0]["image_id"] = 12345
    with pytest.raises(ValueError, match="unknown image_id 12345"):
        CocoInstanceDataset(img_dir, write_json(bad, d))
    d = json.loads(json.dumps(data))
    d["annotations"][0]["category_id"] = 4
    with pytest.raises(ValueError, match="unknown category_id 4"):
        CocoInstanceDataset(img_dir, write_json(bad, d))
    d = json.loads(json.dumps(data))
    d["annotations"][0]["segmentation"] = "oops"
    with pytest.raises(ValueError, match="annotation 10 of image 7: segmentation must be"):
        CocoInstanceDataset(img_dir, write_json(bad, d))[0]
    # image files: missing, wrong size, not a PNG
    d = json.loads(json.dumps(data))
    d["images"][0]["file_name"] = "missing.png"
    ds = CocoInstanceDataset(img_dir, write_json(bad, d))
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        ds[0]
    d["images"][0]["file_name"] = "b.png"
    ds = CocoInstanceDataset(img_dir, write_json(bad, d))
    with pytest.raises(ValueError, match="is 20x25 but the annotation file says 30x40"):
        ds[0]
    with open(os.path.join(img_dir, "fake.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    d["images"][0]["file_name"] = "fake.jpg"
    ds = CocoInstanceDataset(img_dir, write_json(bad, d))
    with pytest.raises(ValueError, match="cannot decode image .*fake.jpg"):
        ds[0]
