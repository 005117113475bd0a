"""Training loop, checkpoints, DDP and demo of instseg_ops.models (tiny CPU configurations)."""
import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from instseg_ops.models import demo, list_models
from instseg_ops.models import train as cli
from instseg_ops.models.engine import checkpoint, hooks, loader, presets, solver, trainer
from instseg_ops.models.data import generate_split, read_image, write_image

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_split(str(root), "train", 6, size=SIZE, seed=3, max_objects=3)
    generate_split(str(root), "val", 2, size=SIZE, seed=3, max_objects=3)
    return str(root)


@pytest.fixture(scope="module")
def two_image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes2")
    generate_split(str(root), "train", 2, size=SIZE, seed=5, max_objects=3)
    return str(root)


def quiet(*args, **kwargs):
    pass


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def iteration_losses(records):
    return {r["iter"]: r["loss"] for r in records if "losses" in r}


# ------------------------------------------------------------------------------------- presets

def test_presets_settings():
    from instseg_ops.models.mask_rcnn import SHAPES_MODELS
    r18 = presets.get_preset("shapes_r18_cpu")
    kw = SHAPES_MODELS[r18.arch]
    assert kw["depth"] == 18 and kw["norm"] in ("gn", "bn") and kw["num_classes"] == 7
    assert kw["trainable_layers"] == 5 and kw["min_size"] == kw["max_size"] == 256
    assert r18.momentum == 0.9 and r18.weight_decay > 0 and r18.warmup_iters > 0
    assert all(0 < m < r18.iters for m in r18.milestones) and r18.gamma == 0.1
    fast = presets.get_preset("shapes_r18_fast_cpu")
    kw = SHAPES_MODELS[fast.arch]
    assert kw["mask_positives_per_image"] == 8 and fast.time_budget > 0 and fast.optimizer == "sgd"
    assert fast.scale_schedule == ((0.3, 0.625), (0.6, 0.75)) and kw["aligned"]
    r50 = presets.get_preset("shapes_r50_gpu")
    kw = SHAPES_MODELS[r50.arch]
    assert kw["depth"] == 50 and kw["norm"] != "frozen_bn" and kw["num_classes"] == 7
    assert kw["min_size"] == 512 and r50.amp
    # Every preset names a registered model.
    assert all(p.arch in list_models() for p in presets.PRESETS.values())
    # The model kwargs are valid for the builder.
    model = presets.build_model(r18)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in model.parameters())
    # Shorter schedules scale the milestones; unknown names are refused.
    short = presets.get_preset("shapes_r18_cpu", iters=300)
    assert short.iters == 300 and list(short.milestones) == [210, 270] and short.warmup_iters <= 75
    assert presets.PRESETS["shapes_r18_cpu"].iters == 2000  # the registry itself is untouched
    with pytest.raises(KeyError):
        presets.get_preset("nope")
    with pytest.raises(KeyError):
        presets.get_preset("tiny_cpu", not_a_field=1)


def test_warmup_multistep_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    sched = solver.WarmupLR(opt, milestones=(6, 8), gamma=0.1, warmup_iters=4, warmup_factor=0.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5, 0.75, 1, 1, 0.1, 0.1, 0.01, 0.01], atol=1e-12)


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0, momentum=0.9)
    warm, total = 3, 13
    sched = solver.WarmupLR(opt, milestones=(5,), warmup_iters=warm, warmup_factor=0.1, mode="cosine",
                                total_iters=total)
    lrs = []
    for _ in range(total + 2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [2.0 * (0.1 + 0.9 * i / warm) for i in range(warm)]
    expect += [2.0 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / (total - warm))))
               for i in range(warm, total + 2)]
    np.testing.assert_allclose(lrs, expect, atol=1e-12)
    assert lrs[warm] == 2.0 and lrs[total] == 0.0 and lrs[-1] == 0.0  # milestones ignored, stays at 0
    with pytest.raises(ValueError, match="schedule"):
        solver.WarmupLR(opt, milestones=(), mode="linear")
    with pytest.raises(ValueError, match="total_iters"):
        solver.WarmupLR(opt, milestones=(), warmup_iters=5, mode="cosine", total_iters=5)


def test_optimizer_choice_and_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    for name, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        p = presets.get_preset("tiny_cpu", optimizer=name, weight_decay=0.05, lr=1e-3)
        opt, _ = solver.build_optimizer(model, p)
        assert type(opt) is cls
        decay, no_decay = opt.param_groups
        # Only the convolution's weight is decayed; its bias and the norm's affine parameters are not.
        assert [t.shape for t in decay["params"]] == [model[0].weight.shape] and decay["weight_decay"] == 0.05
        assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    args = cli.parse_args(["--preset", "tiny_cpu", "--data", "d", "--out", "o", "--optimizer", "adamw",
                         "--weight-decay", "0.05"])
    p = cli.preset_from_args(args)
    assert (p.optimizer, p.weight_decay) == ("adamw", 0.05)
    assert not p.cache_data  # tiny_cpu's default
    base = ["--preset", "shapes_r18_fast_cpu", "--data", "d", "--out", "o"]
    assert cli.preset_from_args(cli.parse_args(base)).cache_data
    assert not cli.preset_from_args(cli.parse_args(base + ["--no-cache-data"])).cache_data
    assert cli.preset_from_args(cli.parse_args(["--preset", "tiny_cpu", "--data", "d", "--out", "o",
                                            "--cache-data"])).cache_data
    with pytest.raises(ValueError, match="optimizer"):
        solver.build_optimizer(model, presets.get_preset("tiny_cpu", optimizer="adam"))


def test_adamw_loss_decreases_on_a_repeated_batch(two_image_dir, tmp_path):
    p = presets.get_preset("tiny_cpu", iters=24, batch_size=2, lr=2e-3, optimizer="adamw", weight_decay=0.05,
                           warmup_iters=3, milestones=(), hflip_prob=0.0, log_period=1000)
    result = trainer.train(p, two_image_dir, str(tmp_path / "run"), device="cpu", seed=0, log=quiet)
    losses = [r["loss"] for r in result["losses"]]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_sharded_batches_cover_and_resume():
    full = loader.ShardedBatches(10, 2, seed=1, rank=0, world_size=1)
    it = iter(full)
    first = [next(it) for _ in range(10)]  # two epochs of 5 batches
    assert sorted(i for b in first[:5] for i, _ in b) == list(range(10))
    assert [i for b in first[:5] for i, _ in b] != [i for b in first[5:] for i, _ in b]  # reshuffled
    resumed = iter(loader.ShardedBatches(10, 2, seed=1, rank=0, world_size=1, start=7))
    assert next(resumed) == first[7]
    # Two ranks split each global batch; together they are the 1-process order for batch 4.
    r0 = loader.ShardedBatches(10, 2, seed=1, rank=0, world_size=2)
    r1 = loader.ShardedBatches(10, 2, seed=1, rank=1, world_size=2)
    both = loader.ShardedBatches(10, 4, seed=1, rank=0, world_size=1)
    for b in range(4):
        assert r0.batch(b) + r1.batch(b) == both.batch(b)
    epoch = [i for b in range(3) for part in (r0.batch(b), r1.batch(b)) for i, _ in part]
    assert set(epoch) == set(range(10))  # 12 slots: all 10 samples, 2 wrapped around


# ------------------------------------------------------------------------------------- training

def test_loss_decreases_on_a_repeated_batch(two_image_dir, tmp_path):
    p = presets.get_preset("tiny_cpu", iters=24, batch_size=2, lr=0.02, warmup_iters=3, milestones=(),
                           hflip_prob=0.0, log_period=1000)
    result = trainer.train(p, two_image_dir, str(tmp_path / "run"), device="cpu", seed=0, log=quiet)
    losses = [r["loss"] for r in result["losses"]]
    assert len(losses) == 24 and all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.8 * first, (first, last, losses)
    print(f"first 4 mean {first:.4f}, last 4 mean {last:.4f}")
    recs = read_metrics(str(tmp_path / "run"))
    assert recs[0]["config"]["name"] == "tiny_cpu"
    its = [r for r in recs if "losses" in r]
    assert [r["iter"] for r in its] == list(range(1, 25))
    assert set(its[0]["losses"]) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                     "loss_rpn_box_reg"}
    assert {"lr", "time", "data_time"} <= set(its[0])
    assert recs[-1].get("done") is True


def test_time_budget_stops_and_decays(two_image_dir, tmp_path):
    # A 6-second budget (1 s kept for the end): training stops on time with iterations to spare,
    # and the learning rate drops by gamma as each budget fraction passes.
    p = presets.get_preset("tiny_cpu", iters=100000, batch_size=2, lr=0.02, warmup_iters=0, milestones=(50,),
                           time_budget=0.1, budget_milestones=(0.5, 0.75), budget_reserve_s=1.0, gamma=0.1,
                           log_period=100000)
    t0 = time.perf_counter()
    result = trainer.train(p, two_image_dir, str(tmp_path / "run"), device="cpu", seed=0, log=quiet)
    wall = time.perf_counter() - t0
    n = result["iteration"]
    assert 3 <= n < 100000 and wall < 6.0 + 30.0, (n, wall)  # + one iteration and the final evaluation
    recs = read_metrics(str(tmp_path / "run"))
    lrs = [r["lr"] for r in recs if "lr" in r]
    assert len(lrs) == n
    levels = sorted(set(lrs), reverse=True)
    np.testing.assert_allclose(levels, [0.02, 0.002, 0.0002][:len(levels)], rtol=1e-9)
    assert len(levels) == 3 and lrs == sorted(lrs, reverse=True)  # both decays happened, in order
    done = recs[-1]
    assert done["done"] is True and done["stopped_by_time_budget"] is True
    assert 5.0 - 0.5 <= done["budget_elapsed"]  # stopped only once budget - reserve was used
    ck = checkpoint.load_checkpoint(str(tmp_path / "run" / "model_final.pth"))
    assert len(ck["scheduler"]["milestones"]) == 2 and ck["budget_elapsed"] >= 5.0 - 0.5
    with pytest.raises(ValueError, match="step schedule"):
        trainer.train(presets.get_preset("tiny_cpu", time_budget=1.0, schedule="cosine"), two_image_dir,
                str(tmp_path / "bad"), device="cpu", log=quiet)


def test_eval_at_minutes_evaluates_once_per_mark(shapes_dir, tmp_path):
    # The hook alone, on a clock it is given: one evaluation per mark, after the first step that
    # ends past it; marks passed together give one evaluation; marks passed before a resume none.
    class Clock:
        def __init__(self):
            self.used, self.iteration, self.evals, self.records = 0.0, 0, [], []
            self.info = type("Info", (), {"is_main": True})()
            self.metrics = type("M", (), {"write": lambda _, rec: self.records.append(rec)})()

        def budget_used_here(self):
            return self.used

        def log(self, msg):
            pass

        def run_eval(self, max_images):
            self.evals.append((self.iteration, max_images))
            return {"segm": {"AP": 0.0}}

    c = Clock()
    h = hooks.EvalAtMinutes((2.0, 1.0, 3.0, 3.5))
    c.budget_used_before, c.used = 0.0, 30.0
    h.before_train(c)
    for it, used in [(1, 59.0), (2, 61.0), (3, 90.0), (4, 215.0), (5, 400.0)]:
        c.iteration, c.used = it, used
        h.after_step(c)
    assert c.evals == [(2, 0), (4, 0)]
    assert [(r["iter"], r["eval_at_minutes"]) for r in c.records] == [(2, 1.0), (4, 3.5)]  # 2, 3, 3.5 in one step
    c2 = Clock()
    c2.budget_used_before = c2.used = 150.0  # resumed after 2.5 minutes: marks 1 and 2 passed in the earlier run
    h2 = hooks.EvalAtMinutes((1.0, 2.0, 3.0))
    h2.before_train(c2)
    c2.iteration, c2.used = 7, 185.0
    h2.after_step(c2)
    assert c2.evals == [(7, 0)] and c2.records[0]["eval_at_minutes"] == 3.0
    with pytest.raises(ValueError, match="positive"):
        hooks.EvalAtMinutes((0.0,))

    # In a real run: a mark passed by the first step evaluates all val images once, recorded
    # with its iteration, besides the final evaluation; a mark never reached does nothing.
    p = presets.get_preset("tiny_cpu", iters=2, batch_size=2, warmup_iters=0, eval_at_minutes=(1e-5, 1e4),
                           log_period=100000, eval_period=0)
    trainer.train(p, shapes_dir, str(tmp_path / "run"), device="cpu", seed=0, log=quiet)
    recs = read_metrics(str(tmp_path / "run"))
    marks = [r for r in recs if "eval_at_minutes" in r]
    evals = [r for r in recs if "eval" in r]
    assert [(r["iter"], r["eval_at_minutes"]) for r in marks] == [(1, 1e-5)]
    assert [(r["iter"], r["eval_images"]) for r in evals] == [(1, 2), (2, 2)]
    base = ["--preset", "tiny_cpu", "--data", "d", "--out", "o"]
    assert cli.preset_from_args(cli.parse_args(base + ["--eval-at-minutes", "30,15"])).eval_at_minutes == (30.0, 15.0)
    assert presets.Preset.from_dict(json.loads(json.dumps(p.to_dict()))).eval_at_minutes == (1e-5, 1e4)
    for bad in ("0", "-1", "a", ""):
        with pytest.raises(SystemExit):
            cli.parse_args(base + ["--eval-at-minutes", bad])


def test_model_arg_overrides_the_builder_kwargs():
    base = ["--preset", "tiny_cpu", "--data", "d", "--out", "o"]
    p = cli.preset_from_args(cli.parse_args(base + ["--model-arg", "num_classes=5", "--model-arg", "norm=gn",
                                                    "--model-arg", "min_size=(64, 96)"]))
    ref = presets.get_preset("tiny_cpu")
    assert p.model == {**ref.model, "num_classes": 5, "norm": "gn", "min_size": (64, 96)}
    assert cli.preset_from_args(cli.parse_args(base)).model == ref.model
    for bad in ("num_classes", "=3", "a b=1"):
        with pytest.raises(SystemExit):
            cli.parse_args(base + ["--model-arg", bad])


def test_scale_schedule_helpers_cli_and_preset_round_trip(two_image_dir, tmp_path):
    sch = ((0.5, 0.5), (0.8, 0.75))
    assert [hooks.scale_at(sch, f) for f in (0.0, 0.49, 0.5, 0.79, 0.8, 1.0)] == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    assert hooks.scale_at(((0.8, 0.75), (0.5, 0.5)), 0.6) == 0.75  # the order of the entries does not matter
    assert hooks.scale_at((), 0.0) == 1.0
    base = ["--preset", "tiny_cpu", "--data", "d", "--out", "o"]
    p = cli.preset_from_args(cli.parse_args(base + ["--scale-schedule", "0.5:0.5,0.8:0.75"]))
    assert p.scale_schedule == sch
    assert presets.Preset.from_dict(json.loads(json.dumps(p.to_dict()))).scale_schedule == sch
    assert cli.preset_from_args(cli.parse_args(base + ["--scale-schedule", "none"])).scale_schedule == ()
    assert cli.preset_from_args(cli.parse_args(base)).scale_schedule == presets.get_preset("tiny_cpu").scale_schedule
    for bad in ("0.5", "1.5:0.5", "0.5:0", "a:b", "0.5:0.5:1"):
        with pytest.raises(SystemExit):
            cli.parse_args(base + ["--scale-schedule", bad])
    with pytest.raises(ValueError, match="scale_schedule"):
        trainer.train(presets.get_preset("tiny_cpu", scale_schedule=((0.5, -1.0),)), two_image_dir, str(tmp_path / "bad"),
                device="cpu", log=quiet)


def test_transform_train_scale_applies_only_in_training():
    from instseg_ops.models.detection import DetectionTransform, RoIGeometry
    t = DetectionTransform(64, 64, [0.0] * 3, [1.0] * 3, channels_last=False, geometry=RoIGeometry(aligned=True))
    img = torch.rand(3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 9:41, 17:49] = 1
    target = {"boxes": torch.tensor([[17.0, 9.0, 49.0, 41.0]]), "labels": torch.tensor([1]), "masks": masks}
    t.train_scale = 0.5
    t.train()
    batch, sizes, targets = t([img], [target])
    assert batch.shape == (1, 3, 32, 32) and sizes == [(32, 32)]
    torch.testing.assert_close(targets[0]["boxes"], target["boxes"] / 2)
    # nearest-exact at factor 2: output pixel i reads input pixel 2i + 1 (torch's "nearest": 2i)
    assert torch.equal(targets[0]["masks"], masks[:, 1::2, 1::2])
    torch.testing.assert_close(batch[0], torch.nn.functional.interpolate(img[None], size=(32, 32), mode="bilinear",
                                                                         align_corners=False)[0])
    t.eval()
    batch, sizes, _ = t([img])
    assert batch.shape == (1, 3, 64, 64) and sizes == [(64, 64)]
    torch.testing.assert_close(batch[0], img)


def test_training_follows_the_scale_schedule(two_image_dir, tmp_path, monkeypatch):
    # Iterations 1-2 of 4 at half size, 3-4 at full size: the backbone sees it.
    seen = []
    build = presets.build_model

    def build_and_watch(preset):
        model = build(preset)
        model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
        return model

    monkeypatch.setattr(trainer, "build_model", build_and_watch)
    lines = []
    p = presets.get_preset("tiny_cpu", iters=4, batch_size=2, scale_schedule=((0.5, 0.5),), eval_period=0,
                           log_period=1000)
    res = trainer.train(p, two_image_dir, str(tmp_path / "run"), device="cpu", seed=0,
                  log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert seen == [(32, 32), (32, 32), (64, 64), (64, 64)], seen
    assert all(np.isfinite(r["loss"]) for r in res["losses"])
    assert any("0.5x" in line and "iteration 1" in line for line in lines), lines
    assert any("1x" in line and "iteration 3" in line for line in lines), lines
    ck = checkpoint.load_checkpoint(str(tmp_path / "run" / "model_final.pth"))
    assert presets.Preset.from_dict(ck["preset"]).scale_schedule == ((0.5, 0.5),)


def test_resume_reproduces_the_next_losses(shapes_dir, tmp_path):
    p = presets.get_preset("tiny_cpu", iters=4, batch_size=2, checkpoint_period=2, eval_period=0, hflip_prob=0.5)
    a = str(tmp_path / "a")
    full = trainer.train(p, shapes_dir, a, device="cpu", seed=1, log=quiet)
    assert os.path.exists(os.path.join(a, "checkpoint_0000002.pth"))
    ck = checkpoint.load_checkpoint(os.path.join(a, "checkpoint_0000002.pth"))
    assert ck["iteration"] == 2 and ck["data"]["batches_consumed"] == 2
    assert {"model", "optimizer", "scheduler", "rng_per_rank", "preset", "categories"} <= set(ck)
    assert {"torch", "numpy", "python"} <= set(ck["rng_per_rank"][0])

    # The resumed run loads its data in a worker process: per-sample seeds make the flips the same.
    b = str(tmp_path / "b")
    p_workers = presets.get_preset("tiny_cpu", iters=4, batch_size=2, checkpoint_period=2, eval_period=0,
                                   hflip_prob=0.5, workers=1)
    res = trainer.train(p_workers, shapes_dir, b, device="cpu", seed=1,
                  resume_from=os.path.join(a, "checkpoint_0000002.pth"), log=quiet)
    want = [r["loss"] for r in full["losses"][2:]]
    got = [r["loss"] for r in res["losses"]]
    assert [r["iter"] for r in res["losses"]] == [3, 4]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert res["checksums"] == full["checksums"]  # the same final weights

    # Command line --resume in the run directory after a "crash" past iteration 2: the newest
    # checkpoint is used and metrics.jsonl keeps one record per iteration.
    with open(os.path.join(a, "last_checkpoint"), "w") as f:
        f.write("checkpoint_0000002.pth\n")
    out = cli.main(["--preset", "tiny_cpu", "--data", shapes_dir, "--out", a, "--iters", "4", "--batch-size", "2",
                  "--checkpoint-every", "2", "--device", "cpu", "--seed", "1", "--resume", "--eval-every", "0"])
    np.testing.assert_allclose([r["loss"] for r in out["losses"]], want, rtol=0, atol=1e-6)
    its = [r["iter"] for r in read_metrics(a) if "losses" in r]
    assert its == [1, 2, 3, 4]


def test_amp_and_gradient_clipping_on_cpu(two_image_dir, tmp_path):
    # On the CPU --amp means bfloat16 autocast (no grad scaler); clipping logs the gradient norm.
    p = presets.get_preset("tiny_cpu", iters=2, batch_size=2, amp=True, clip_grad=0.5, eval_period=0)
    run = str(tmp_path / "run")
    res = trainer.train(p, two_image_dir, run, device="cpu", seed=0, log=quiet)
    assert all(np.isfinite(r["loss"]) for r in res["losses"])
    recs = [r for r in read_metrics(run) if "losses" in r]
    assert len(recs) == 2 and all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in recs)
    assert checkpoint.load_checkpoint(os.path.join(run, "model_final.pth"))["scaler"] is None


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    checkpoint.atomic_save({"x": torch.arange(3)}, path)
    assert torch.equal(checkpoint.load_checkpoint(path)["x"], torch.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file's mode, not mkstemp's 0600

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"x": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(checkpoint.load_checkpoint(path)["x"], torch.arange(3))  # the old file, untouched
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no temporary left behind

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"x": 1}, str(tmp_path / "new.pth"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no partial new file either


def test_old_checkpoints_are_pruned(two_image_dir, tmp_path):
    p = presets.get_preset("tiny_cpu", iters=5, batch_size=2, checkpoint_period=1, eval_period=0)
    run = str(tmp_path / "run")
    trainer.train(p, two_image_dir, run, device="cpu", seed=0, keep_checkpoints=2, log=quiet)
    assert sorted(f for f in os.listdir(run) if f.endswith(".pth")) == [
        "checkpoint_0000003.pth", "checkpoint_0000004.pth", "model_final.pth"]
    assert checkpoint.find_resume_checkpoint(run) == os.path.join(run, "model_final.pth")


def test_evaluation_and_final_checkpoint(shapes_dir, tmp_path):
    p = presets.get_preset("tiny_cpu", iters=2, batch_size=2, eval_period=1, eval_images=1, checkpoint_period=0)
    run = str(tmp_path / "run")
    res = trainer.train(p, shapes_dir, run, device="cpu", seed=0, log=quiet)
    evals = [r for r in read_metrics(run) if "eval" in r]
    assert [r["iter"] for r in evals] == [1, 2]
    assert [r["eval_images"] for r in evals] == [1, 2]  # periodic: the first image; final: all
    for iou in ("bbox", "segm"):
        assert set(evals[-1]["eval"][iou]) >= {"AP", "AP50", "AP75"}
        assert -1.0 <= evals[-1]["eval"][iou]["AP"] <= 1.0
    assert res["eval"] == evals[-1]["eval"]
    ck = checkpoint.load_checkpoint(os.path.join(run, "model_final.pth"))
    assert ck["iteration"] == 2 and ck["categories"][1] == "circle" and len(ck["categories"]) == 6
    assert sorted(f for f in os.listdir(run) if f.endswith(".tmp")) == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "instseg_ops.models.train", "--preset", "tiny_cpu", "--iters", "3", "--batch-size", "1",
           "--checkpoint-every", "2", "--eval-every", "0", "--device", "cpu", "--workers", "0", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_processes_gloo_keep_replicas_identical(shapes_dir, tmp_path):
    run = str(tmp_path / "ddp")
    torchrun_train("--data", shapes_dir, "--out", run)
    recs = read_metrics(run)
    sums = [r["replica_checksums"] for r in recs if "replica_checksums" in r]
    assert [r["iter"] for r in recs if "replica_checksums" in r] == [2, 3]
    for s in sums:
        assert len(s) == 2 and s[0] == s[1], sums
    assert recs[0]["world_size"] == 2
    assert [r["iter"] for r in recs if "losses" in r] == [1, 2, 3]  # rank 0 logs alone
    ck = checkpoint.load_checkpoint(os.path.join(run, "model_final.pth"))
    assert len(ck["rng_per_rank"]) == 2 and ck["world_size"] == 2
    assert not any(k.startswith("module.") for k in ck["model"])
    # The saved final weights are the replicas' weights.
    model = presets.build_model(presets.Preset.from_dict(ck["preset"]))
    model.load_state_dict(ck["model"])
    assert checkpoint.param_checksum(model) == sums[-1][0]
    # The final evaluation ran sharded over both ranks and was gathered on rank 0.
    evals = [r for r in recs if "eval" in r]
    assert len(evals) == 1 and evals[0]["eval_images"] == 2 and "segm" in evals[0]["eval"]

    # Resuming both ranks from the iteration-2 checkpoint gives the same iteration-3 loss and weights.
    run2 = str(tmp_path / "ddp_resumed")
    torchrun_train("--data", shapes_dir, "--out", run2, "--resume-from", os.path.join(run, "checkpoint_0000002.pth"))
    recs2 = read_metrics(run2)
    assert iteration_losses(recs2) == {3: iteration_losses(recs)[3]}
    assert [r["replica_checksums"] for r in recs2 if "replica_checksums" in r] == [sums[-1]]


# ------------------------------------------------------------------------------------- demo

def test_draw_detections_numpy():
    img = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((1, 40, 60), bool)
    mask[0, 20:30, 10:20] = True
    out = demo.draw_detections(img, [[5, 15, 30, 35]], [3], [0.87], mask, {3: "rectangle"})
    assert out.shape == img.shape and out.dtype == np.uint8 and (img == 100).all()
    color = demo.PALETTE[0]
    assert (out[25, 5] == color).all()  # left box edge
    np.testing.assert_array_equal(out[25, 15], np.rint(0.5 * 100 + 0.5 * color.astype(float)))  # blended mask
    assert (out[37, 50] == 100).all()  # untouched background
    label_region = out[:15, :]
    assert (label_region == color).all(axis=-1).sum() > 20  # label background above the box
    # the text: white (antialiased) on this dark colour, inside the label background above the box;
    # nothing below it is lighter than the grey background (green 100; the colour's green is 25)
    light = out[..., 1] > 150
    assert light[:15].sum() > 10 and not (out[15:, :, 1] > 100).any()
    # Boxes at the border and no detections at all.
    demo.draw_detections(img, [[-5, -5, 100, 100]], [1], [1.0], None)
    assert (demo.draw_detections(img, np.zeros((0, 4)), [], [], np.zeros((0, 40, 60))) == img).all()


def test_demo_writes_png_of_the_image_size(shapes_dir, tmp_path):
    p = presets.get_preset("tiny_cpu", iters=1, batch_size=2, eval_period=0)
    run = str(tmp_path / "run")
    trainer.train(p, shapes_dir, run, device="cpu", seed=0, log=quiet)
    src = read_image(os.path.join(shapes_dir, "val", "000000.png"))
    image = str(tmp_path / "in.png")
    write_image(image, np.ascontiguousarray(src[:50, :, :3]))  # not square: 50 x 64
    out = str(tmp_path / "out.png")
    demo.main(["--checkpoint", os.path.join(run, "model_final.pth"), "--image", image, "--out", out,
               "--score-thresh", "0.0"])
    drawn = read_image(out)
    assert drawn.shape == (50, SIZE, 3) and drawn.dtype == np.uint8
    # Nothing scores above 1.5: --min-shown draws the best ones anyway, in score order.
    model, names = demo.load_model(os.path.join(run, "model_final.pth"), "cpu")
    everything = demo.run_demo("", image, out, 0.0, model=model, names=names)["scores"]
    det = demo.run_demo("", image, out, 1.5, model=model, names=names, min_shown=2)
    assert np.array_equal(det["scores"], np.sort(everything)[::-1][:2])
    assert len(demo.run_demo("", image, out, 1.5, model=model, names=names)["scores"]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # A greyscale input gives an RGB drawing of its size.
    grey = str(tmp_path / "grey.png")
    write_image(grey, np.ascontiguousarray(src[:40, :30, 0]))
    demo.main(["--checkpoint", os.path.join(run, "model_final.pth"), "--image", grey, "--out", out])
    assert read_image(out).shape == (40, 30, 3)
