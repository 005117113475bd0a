"""The model zoo's seams: registry, load_pretrained, FPN top blocks, the second stage's box and
mask stages, one RoI geometry, per-group learning rates, trainer hooks, and packaging."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import instseg_ops
from instseg_ops.models import (
    BoxStage,
    LastLevelMaxPool,
    LastLevelP6P7,
    RoIGeometry,
    get_model,
    list_models,
    load_pretrained,
    register_model,
    resnet_fpn_backbone,
)
from instseg_ops.models.detection import label_and_sample
from instseg_ops.models.engine import HookBase, get_preset
from instseg_ops.models.engine.solver import build_optimizer, parameter_groups

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw):
    return get_model("maskrcnn_tiny_shapes", **kw)


def random_targets(sizes, gen):
    targets = []
    for h, w in sizes:
        k = int(torch.randint(1, 4, (), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w - 20.0, h - 20.0])
        wh = 8 + torch.rand(k, 2, generator=gen) * 10
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 7, (k,), generator=gen), "masks": masks})
    return targets


# ------------------------------------------------------------------------------------ registry

def test_every_registered_model_builds_and_runs():
    names = list_models()
    assert {"maskrcnn_resnet50_fpn", "maskrcnn_resnet_fpn", "maskrcnn_r18_half_shapes", "maskrcnn_tiny_shapes"} <= set(
        names)
    for name in names:
        model = get_model(name)
        assert isinstance(model, torch.nn.Module), name
    with pytest.raises(KeyError, match="unknown model 'nope'.*maskrcnn_resnet50_fpn"):
        get_model("nope")


def test_get_model_passes_overrides_and_registration_refuses_duplicates():
    m = get_model("maskrcnn_tiny_shapes", num_classes=3, box_score_thresh=0.25)
    assert m.roi_heads.box_predictor.cls_score.out_features == 3 and m.roi_heads.score_thresh == 0.25

    @register_model("test_zoo_dummy")
    def dummy(width=2):
        return torch.nn.Linear(width, 1)

    assert get_model("test_zoo_dummy", width=5).in_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_zoo_dummy")(lambda: None)


def test_every_preset_names_a_registered_model():
    from instseg_ops.models.engine.presets import PRESETS, build_model
    for p in PRESETS.values():
        assert p.arch in list_models()
    assert isinstance(build_model(get_preset("tiny_cpu")), torch.nn.Module)


# ------------------------------------------------------------------------------ load_pretrained

def test_load_pretrained_sources_layouts_and_key_report(tmp_path, seed):
    src, dst = tiny(), tiny()
    sd = src.state_dict()
    # A state dict, a trainer-style checkpoint on disk, and DDP's "module." prefix.
    assert load_pretrained(dst, sd).layout == "instseg_ops"
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "iteration": 3}, path)
    report = load_pretrained(dst, str(path))
    assert report.layout == "instseg_ops" and not report.missing_keys and not report.unexpected_keys
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # Missing and unexpected keys are named.
    bad = dict(sd)
    bad.pop("roi_heads.box_head.fc6.bias")
    bad["roi_heads.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys \['roi_heads.box_head.fc6.bias'\].*"
                                           r"unexpected keys \['roi_heads.extra.weight'\]"):
        load_pretrained(tiny(), bad)
    report = load_pretrained(tiny(), bad, strict=False)
    assert report.missing_keys == ["roi_heads.box_head.fc6.bias"]
    assert report.unexpected_keys == ["roi_heads.extra.weight"]
    with pytest.raises(RuntimeError, match="match no known layout"):
        load_pretrained(tiny(), {"something.else": torch.zeros(1)})


def test_load_pretrained_takes_torchvision_checkpoints():
    tvd = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    tv_sd = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict()
    ours = get_model("maskrcnn_resnet50_fpn", num_classes=3)
    assert load_pretrained(ours, tv_sd).layout == "torchvision"
    for k, v in ours.state_dict().items():
        assert torch.equal(v, tv_sd[k]), k


# ----------------------------------------------------------------------------------- backbones

def test_fpn_top_blocks_name_their_levels_and_strides(seed):
    x = torch.randn(1, 3, 128, 96)
    pool = resnet_fpn_backbone(18, "gn", 5, 16, 8)
    out = pool(x)
    assert list(out) == pool.out_features == ["0", "1", "2", "3", "pool"]
    assert pool.strides == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    for name, f in out.items():
        assert f.shape[-2:] == (-(-128 // pool.strides[name]), -(-96 // pool.strides[name])), name
    assert isinstance(pool.fpn.top_block, LastLevelMaxPool)
    assert torch.equal(out["pool"], torch.nn.functional.max_pool2d(out["3"], 1, 2))

    p6p7 = resnet_fpn_backbone(18, "gn", 5, 16, 8, top_block=LastLevelP6P7(16, 16, names=("p6", "p7")))
    out = p6p7(x)
    assert list(out) == ["0", "1", "2", "3", "p6", "p7"] and p6p7.strides["p7"] == 128
    tb = p6p7.fpn.top_block
    want6 = tb.p6(out["3"])
    assert torch.allclose(out["p6"], want6) and torch.allclose(out["p7"], tb.p7(torch.relu(want6)))
    # From C5 (RetinaNet's variant): the body's coarsest feature, 8 * 8 = 64 channels.
    c5 = resnet_fpn_backbone(18, "gn", 5, 16, 8, top_block=LastLevelP6P7(64, 16, use_p5=False))
    body = c5.body(x)
    assert torch.allclose(c5(x)["p6"], c5.fpn.top_block.p6(body["3"]))


# ---------------------------------------------------------------------------------- second stage

def test_box_stage_is_reusable_with_its_own_rules(seed):
    model = tiny().eval()
    rh = model.roi_heads
    feats = model.backbone(torch.randn(2, 3, 64, 64))
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 12.0, 50.0, 60.0]]), torch.tensor([[0.0, 0.0, 63.0, 63.0]])]
    logits, deltas = rh.box_stage(feats, boxes, [(64, 64)] * 2)
    assert logits.shape == (3, 7) and deltas.shape == (3, 28)
    # The same modules under a second stage object with other rules: class-agnostic, other weights.
    from instseg_ops.models.detection import BalancedSampler, BoxCoder, BoxPredictor, Matcher
    stage2 = BoxStage(pooler=rh.box_roi_pool, head=rh.box_head, predictor=BoxPredictor(32, 7, class_agnostic=True),
                      box_coder=BoxCoder((20.0, 20.0, 10.0, 10.0)), matcher=Matcher(0.6, 0.6),
                      sampler=BalancedSampler(8, 0.25), class_agnostic=True)
    logits2, deltas2 = stage2(feats, boxes, [(64, 64)] * 2)
    assert deltas2.shape == (3, 4) and logits2.shape == (3, 7)
    decoded = stage2.decode(deltas2, boxes)
    assert decoded.shape == (3, 1, 4)
    # Round trip of the stage's coder.
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 29.0, 41.0]]), "labels": torch.tensor([2]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}] * 2
    sampled, regression = stage2.sample(boxes, targets)
    for b, r, m in zip(sampled.boxes, regression, sampled.matched):
        back = stage2.box_coder.decode_one(r, b)
        assert torch.allclose(back, targets[0]["boxes"][m], atol=1e-4)
    # Class-agnostic losses use the single regression.
    cls, box = BoxStage.losses(torch.randn(4, 7), torch.randn(4, 4), [torch.tensor([0, 2, 3, 0])],
                               [torch.randn(4, 4)])
    assert cls.isfinite() and box.isfinite() and box > 0


def test_label_and_sample_without_a_box_head(seed):
    from instseg_ops.models.detection import BalancedSampler, Matcher
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 9.0, 10.0]])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([4])}]
    s = label_and_sample(proposals, targets, Matcher(0.5, 0.5), BalancedSampler(16, 0.25), add_gt=True)
    lab = {tuple(b.tolist()): int(c) for b, c in zip(s.boxes[0], s.labels[0])}
    assert lab[(0.0, 0.0, 10.0, 10.0)] == 4 and lab[(50.0, 50.0, 60.0, 60.0)] == 0 and lab[(0.0, 0.0, 9.0, 10.0)] == 4
    assert len(s.boxes[0]) == 4  # the ground truth was added as a proposal


def test_mask_stage_runs_on_given_boxes(seed):
    model = tiny().eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    with torch.no_grad():
        batch, sizes, _ = model.transform(images)
        feats = model.backbone(batch)
        dets = [{"boxes": torch.tensor([[2.0, 3.0, 30.0, 40.0]]), "labels": torch.tensor([3])},
                {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
        out = model.roi_heads.forward_with_given_boxes(feats, dets, sizes)
        logits = model.roi_heads.mask_logits(feats, [dets[0]["boxes"]], sizes[:1])
    assert out[0]["masks"].shape == (1, 1, 28, 28) and out[1]["masks"].shape == (0, 1, 28, 28)
    torch.testing.assert_close(out[0]["masks"][0, 0], logits[0, 3].sigmoid(), rtol=1e-5, atol=1e-6)


def test_one_geometry_object_drives_pools_targets_and_paste():
    for aligned in (False, True):
        m = tiny(aligned=aligned)
        g = m.roi_heads.geometry
        assert g is m.transform.geometry and g == RoIGeometry(aligned)
        assert m.roi_heads.box_roi_pool.aligned is aligned and m.roi_heads.mask_roi_pool.aligned is aligned
        assert g.mask_resize_mode == ("nearest-exact" if aligned else "nearest")
        masks, boxes = torch.rand(2, 28, 28), torch.tensor([[1.5, 2.0, 20.0, 30.0], [0.0, 0.0, 40.0, 10.0]])
        assert torch.equal(g.paste(masks, boxes, (50, 60)),
                           instseg_ops.paste_masks(masks, boxes, (50, 60), padding=1, aligned=aligned))


def test_training_losses_with_an_image_without_annotations(seed):
    model = tiny().train()
    gen = torch.Generator().manual_seed(seed)
    targets = random_targets([(64, 64)], gen)
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)})
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.isfinite() for v in losses.values())
    sum(losses.values()).backward()


# ----------------------------------------------------------------------------------- the engine

def test_parameter_groups_with_lr_multipliers():
    model = tiny()
    plain = parameter_groups(model, 0.1, 1e-4)
    assert [(g["lr"], g["weight_decay"]) for g in plain] == [(0.1, 1e-4), (0.1, 0.0)]
    groups = parameter_groups(model, 0.1, 1e-4, {"backbone": 0.1, "backbone.fpn": 0.5})
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 0.05 if name.startswith("backbone.fpn.") else 0.01 if name.startswith("backbone.") else 0.1
        assert by_param[id(p)] == pytest.approx(want), name
    preset = get_preset("tiny_cpu", lr_multipliers={"backbone": 0.1})
    opt, sched = build_optimizer(model, preset)
    lrs = {g["lr"] / preset.lr for g in opt.param_groups}
    assert len(opt.param_groups) == 4 and {round(x, 6) for x in lrs} <= {0.1 * 1e-3, 1e-3}  # warmup factor


def test_cli_lr_multipliers():
    from instseg_ops.models import train as cli
    args = cli.parse_args(["--preset", "tiny_cpu", "--data", "d", "--out", "o", "--lr-mult", "backbone=0.1",
                           "--lr-mult", "backbone.fpn=0.5"])
    assert cli.preset_from_args(args).lr_multipliers == {"backbone": 0.1, "backbone.fpn": 0.5}
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "tiny_cpu", "--data", "d", "--out", "o", "--lr-mult", "backbone"])


def test_custom_hooks_see_every_step(tmp_path):
    from instseg_ops.models.data import generate_split
    from instseg_ops.models.engine.hooks import default_hooks
    from instseg_ops.models.engine.trainer import Trainer
    data = tmp_path / "data"
    generate_split(str(data), "train", 3, 64, seed=1)

    class Counter(HookBase):
        def __init__(self):
            self.calls = []

        def before_train(self, trainer):
            self.calls.append("start")

        def after_step(self, trainer):
            self.calls.append(trainer.iteration)
            if trainer.iteration == 2:
                trainer.stop("enough")

        def after_train(self, trainer):
            self.calls.append("end")

    preset = get_preset("tiny_cpu", iters=10, warmup_iters=1, milestones=(), log_period=1000)
    counter = Counter()
    t = Trainer(preset, str(data), str(tmp_path / "run"), hooks=default_hooks(preset, 0) + [counter],
                log=lambda *a, **k: None)
    out = t.train()
    assert counter.calls == ["start", 1, 2, "end"] and out["iteration"] == 2
    assert (tmp_path / "run" / "model_final.pth").exists()


# ------------------------------------------------------------------------------------ packaging

@pytest.mark.slow
def test_wheel_holds_every_models_module_and_installs_into_a_fresh_venv(tmp_path):
    """pip wheel (CPU-only build), every .py under models/ inside it as instseg_ops/models/...;
    installed into a fresh venv (torch borrowed from this one), list_models and get_model work."""
    env = dict(os.environ, INSTSEG_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(wheels), str(ROOT)], check=True, env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("instseg_ops-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {"instseg_ops/models/" + str(p.relative_to(ROOT / "models")) for p in (ROOT / "models").rglob("*.py")}
    assert want and want <= names, sorted(want - names)
    assert "instseg_ops/models/assets/maskrcnn_r18_half_shapes.pth" in names  # the demo's checkpoint
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # The fresh venv sees torch and the other dependencies of this one, but not its editable instseg_ops
    # (a path added by a .pth file does not process that directory's own .pth files).
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True)
    code = ("import instseg_ops, instseg_ops.models as m; assert 'site-packages' in instseg_ops.__file__ and "
            "'venv' in instseg_ops.__file__, instseg_ops.__file__; names = m.list_models(); "
            "[m.get_model(n) for n in names]; print(names); from instseg_ops.models import demo; "
            "assert 'venv' in demo.DEMO_CHECKPOINT; demo.load_model(demo.DEMO_CHECKPOINT)")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "maskrcnn_resnet50_fpn" in out.stdout


def test_checkpoints_of_the_earlier_trainer_still_load(tmp_path, seed):
    """Before presets named an architecture, checkpoints held maskrcnn_resnet_fpn's keyword
    arguments (and the since removed fields extra and image_size)."""
    from instseg_ops.models.engine import model_from_checkpoint
    from instseg_ops.models.mask_rcnn import SHAPES_MODELS, maskrcnn_resnet_fpn
    kwargs = dict(SHAPES_MODELS["maskrcnn_tiny_shapes"], num_classes=4)
    src = maskrcnn_resnet_fpn(**kwargs)
    preset = get_preset("tiny_cpu").to_dict()
    del preset["arch"], preset["lr_multipliers"]
    preset.update(model=kwargs, extra={}, image_size=64)
    path = tmp_path / "old.pth"
    torch.save({"model": src.state_dict(), "preset": preset, "categories": {1: "a", 2: "b", 3: "c"}}, path)
    model, names, p = model_from_checkpoint(str(path))
    assert p.arch == "maskrcnn_resnet_fpn" and names == {1: "a", 2: "b", 3: "c"} and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
