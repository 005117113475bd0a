"""csrc/cuda/ms_deform_attn_kernel.cu executed on the CPU through the CUDA emulation
(tests/emu_utils.py), under the three thread/block schedules, against the CPU op: forward,
the atomic backward and the deterministic (sort + gather) backward, all dtypes, non-finite
and far-outside locations, empty inputs, and grid-stride wrap-around (a two-block grid)."""
import pytest
import torch

import emu_utils
from test_cuda_emulated import DTYPES, close, emu, poisoned, schedule  # noqa: F401  (fixtures)
from test_ms_deform_attn import random_problem, tables

cpu = torch.ops.instseg
# The kernels accumulate in float32 for half types, as the CPU op does, in another order.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check_backwards(emu, value, st, lsi, loc, attn, tol):
    """Both backwards (atomic and deterministic) of the emulated kernels against the CPU op."""
    go = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
    for det in (False, True):
        got = emu._ms_deform_attn_backward(go, value, st, lsi, loc, attn, det)
        want = cpu._ms_deform_attn_backward(go, value, st, lsi, loc, attn, det)
        for g, w in zip(got, want):
            close(g, w, tol)


def problem(seed, dtype, **kw):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, dtype, **kw)
    st, lsi = tables(shapes)
    if dtype in (torch.float16, torch.bfloat16):
        loc, attn = loc.float(), attn.float()  # locations and weights in float32, as under autocast
    return value, st, lsi, loc, attn


@pytest.mark.parametrize("dtype", DTYPES)
def test_ms_deform_attn_forward(emu, schedule, seed, dtype):
    for trial in range(3):
        value, st, lsi, loc, attn = problem(seed + trial, dtype)
        close(emu.ms_deform_attn(value, st, lsi, loc, attn, False), cpu.ms_deform_attn(value, st, lsi, loc, attn),
              TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_ms_deform_attn_backward(emu, schedule, seed, dtype, deterministic):
    for trial in range(2):
        value, st, lsi, loc, attn = problem(seed + trial, dtype, lq=7)
        go = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                         generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        got = emu._ms_deform_attn_backward(go, value, st, lsi, loc, attn, deterministic)
        want = cpu._ms_deform_attn_backward(go, value, st, lsi, loc, attn, deterministic)
        for g, w in zip(got, want):
            close(g, w, TOL[dtype] * 4)


def test_deterministic_backward_is_bitwise_repeatable(emu, seed):
    value, st, lsi, loc, attn = problem(seed, torch.float32, lq=9)
    go = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    runs = []
    for sched in emu_utils.SCHEDULES:  # other thread orders may not change a deterministic result
        emu_utils.configure(sched, seed)
        runs.append(emu._ms_deform_attn_backward(go, value, st, lsi, loc, attn, True))
    emu_utils.configure()
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_nonfinite_locations_and_empty_inputs(emu, schedule, seed):
    value, st, lsi, loc, attn = problem(seed, torch.float32, lq=6)
    loc = loc.clone()
    loc.view(-1)[::7] = float("nan")
    loc.view(-1)[1::11] = float("inf")
    loc.view(-1)[2::13] = -1e30
    close(emu.ms_deform_attn(value, st, lsi, loc, attn, False), cpu.ms_deform_attn(value, st, lsi, loc, attn), 2e-5)
    check_backwards(emu, value, st, lsi, loc, attn, 1e-4)
    empty = problem(seed, torch.float32, lq=0)
    out = emu.ms_deform_attn(*empty, False)
    assert out.shape == (empty[0].shape[0], 0, empty[0].shape[2] * empty[0].shape[3])
    go = torch.zeros(out.shape)
    gv, gl, ga = emu._ms_deform_attn_backward(go, *empty, True)
    assert torch.equal(gv, torch.zeros_like(empty[0])) and gl.numel() == 0 and ga.numel() == 0


def test_grid_stride_loops_wrap_around(emu, seed, monkeypatch):
    monkeypatch.setenv("INSTSEG_MSDA_MAX_BLOCKS", "2")  # every kernel's grid-stride loop goes round
    emu_utils.configure("random", seed)
    try:
        value, st, lsi, loc, attn = problem(seed, torch.float32, n=2, lq=40, max_hw=12)
        close(emu.ms_deform_attn(value, st, lsi, loc, attn, False), cpu.ms_deform_attn(value, st, lsi, loc, attn),
              2e-5)
        check_backwards(emu, value, st, lsi, loc, attn, 1e-4)
    finally:
        emu_utils.configure()
