"""ThreadSanitizer backend of the emulation (scripts/test_emulation_tsan.sh; not
part of the default test run): each CUDA thread is an OS thread, so TSan
reports accesses from two threads with no barrier between them, with the
lines, even when the results happen to be right. Small inputs: up to 1024
threads per block. Each case runs in a child process, whose TSan report is
checked."""
import os
import subprocess
import sys

import pytest

import emu_utils

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(emu_utils.sanitizer() != "thread",
                                reason="ThreadSanitizer run only (scripts/test_emulation_tsan.sh)")

PRELUDE = (
    "import sys, torch; torch.set_num_threads(1); sys.path.insert(0, %r); import emu_utils; "
    "emu = emu_utils.load(); " % HERE
)


@pytest.fixture(scope="module", autouse=True)
def built():
    emu_utils.load()  # build once, here, not in every child


def run_child(code, extra_env=None):
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = env.get("TSAN_OPTIONS", "") + " exitcode=66"
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code + "; print('DONE')"], capture_output=True,
                          text=True, timeout=600, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_planted_missing_barrier_is_a_race():
    rc, out = run_child("emu._planted('missing_barrier', torch.randn(64))")
    assert "WARNING: ThreadSanitizer: data race" in out, out[-3000:]
    assert "planted_kernels.cu" in out


def test_planted_kernel_with_barrier_is_race_free():
    rc, out = run_child("emu._planted('with_barrier', torch.randn(64)); emu._planted('warp_sum', torch.randn(64))")
    assert rc == 0 and "ThreadSanitizer" not in out and "DONE" in out, out[-3000:]


def test_nms_reduce_has_no_race_when_a_chunk_keeps_no_box():
    """Regression: a chunk that keeps no box ran no barrier before thread 0
    stored state[0], which the other threads read at the start. 128 copies of
    one box, 64 rows per chunk: the second chunk keeps nothing."""
    code = ("b = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(128, 1); s = torch.rand(128); "
            "k = emu.nms(b, s, None, 0.5); assert k.tolist() == [int(s.argmax())], k")
    rc, out = run_child(code, {"INSTSEG_NMS_MASK_BUDGET": "1"})
    assert rc == 0 and "ThreadSanitizer" not in out and "DONE" in out, out[-3000:]


@pytest.mark.parametrize("op", ["roi_align_deterministic_backward", "soft_nms", "paste_masks"])
def test_kernels_are_race_free(op):
    code = {
        "roi_align_deterministic_backward": (
            "from roi_utils import random_rois; r = random_rois(6, 1, 20, 20, malformed=True); "
            "g = torch.randn(6, 3, 2, 2); emu._roi_align_backward(g, r, 1.0, 2, 2, 1, 3, 20, 20, 2, True, False, True)"),
        "soft_nms": ("b = torch.rand(40, 2) * 50; b = torch.cat([b, b + 20], 1); "
                     "emu.soft_nms(b, torch.rand(40), 0.3, 0.5, 0.01, 1)"),
        "paste_masks": ("emu.paste_masks(torch.rand(2, 5, 5), torch.tensor([[1.0, 2, 9, 8], [0, 0, 4, 4]]), 10, 12, 1, "
                        "None, False)"),
    }[op]
    rc, out = run_child(code)
    assert rc == 0 and "ThreadSanitizer" not in out and "DONE" in out, out[-3000:]
