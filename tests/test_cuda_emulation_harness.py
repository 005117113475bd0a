"""The emulation bites: tiny kernels with planted bugs
(tests/cuda_emulation/planted_kernels.cu) are caught, with errors that name
the offending source lines. Out-of-bounds accesses need AddressSanitizer: those
tests run only in the ASan run (scripts/test_emulation_asan.sh)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import emu_utils

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cuda_emulation", "planted_kernels.cu")


def line_of(tag):
    """`planted_kernels.cu:N` of the line marked `PLANTED: tag`."""
    with open(SOURCE) as f:
        for i, text in enumerate(f, 1):
            if text.rstrip().endswith(f"PLANTED: {tag}"):
                return f"planted_kernels.cu:{i}"
    raise AssertionError(f"no line marked {tag}")


@pytest.fixture(scope="module")
def emu():
    return emu_utils.load()


def run(emu, name, x, schedule="index", seed=0):
    emu_utils.configure(schedule, seed)
    try:
        return emu._planted(name, x)
    finally:
        emu_utils.configure()


def test_control_kernels_are_right(emu, seed):
    x = torch.randn(256)
    for schedule in emu_utils.SCHEDULES:
        out = run(emu, "with_barrier", x, schedule, seed)
        assert torch.equal(out, torch.cat([torch.zeros(1), x[:-1]]))
    for schedule in emu_utils.SCHEDULES:
        v = torch.randn(64)
        v[32:] = -v[32:].abs()  # the second warp: any(x > 0) is false
        out = run(emu, "warp_sum", v, schedule, seed)
        w = v.view(2, 32)
        votes = torch.tensor([11000.0, 10000.0])
        want = torch.tensor([496.0, 1520.0]).repeat_interleave(32) + votes.repeat_interleave(32)
        want[0::32] = w.sum(1) + votes
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)


def test_missing_barrier_caught_by_reverse_and_random_order(emu, seed):
    """Index order hides the missing __syncthreads (thread i - 1 has written
    before thread i reads); reverse and random orders expose it."""
    x = torch.randn(256)
    want = torch.cat([torch.zeros(1), x[:-1]])
    assert torch.equal(run(emu, "missing_barrier", x, "index"), want)
    for schedule in ("reverse", "random"):
        y = torch.randn(256)  # fresh values: stale shared memory from an earlier launch differs
        got = run(emu, "missing_barrier", y, schedule, seed)
        assert not torch.equal(got, torch.cat([torch.zeros(1), y[:-1]])), schedule


@pytest.mark.parametrize("schedule", emu_utils.SCHEDULES)
def test_divergent_warp_vote_names_both_sites(emu, schedule):
    with pytest.raises(RuntimeError, match="divergent warp collectives") as e:
        run(emu, "divergent_vote", torch.randn(64), schedule)
    msg = str(e.value)
    assert line_of("divergent_vote_even") in msg and line_of("divergent_vote_odd") in msg
    assert "__ballot_sync(mask 0xffffffff)" in msg


def test_exited_lane(emu):
    with pytest.raises(RuntimeError, match="has exited") as e:
        run(emu, "exited_lane", torch.randn(32))
    assert line_of("exited_lane") in str(e.value) and "lane 5" in str(e.value)


def test_divergent_barrier(emu):
    with pytest.raises(RuntimeError, match="divergent __syncthreads") as e:
        run(emu, "divergent_barrier", torch.randn(64), "random", 3)
    msg = str(e.value)
    assert line_of("divergent_barrier_a") in msg and line_of("divergent_barrier_b") in msg


def test_deadlock(emu):
    with pytest.raises(RuntimeError, match="deadlock") as e:
        run(emu, "deadlock", torch.randn(32))
    msg = str(e.value)
    assert line_of("deadlock_shfl") in msg and line_of("deadlock_barrier") in msg


@pytest.mark.parametrize("name,pattern", [
    ("too_many_threads", "more than 1024 threads"),
    ("grid_too_high", r"beyond \(2\^31 - 1, 65535, 65535\)"),
    ("too_much_shared", "more than the 48 KiB"),
    ("empty_grid", "empty grid"),
])
def test_launch_limits(emu, name, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        run(emu, name, torch.randn(64))


def test_emulation_recovers_after_errors(emu, seed):
    """Fibers stopped mid-kernel by an error are reset: later launches work."""
    for name in ("divergent_vote", "deadlock", "exited_lane"):
        with pytest.raises(RuntimeError):
            run(emu, name, torch.randn(64))
        x = torch.randn(256)
        assert torch.equal(run(emu, "with_barrier", x, "random", seed), torch.cat([torch.zeros(1), x[:-1]]))


@pytest.mark.skipif(emu_utils.sanitizer() != "address", reason="AddressSanitizer run only (scripts/test_emulation_asan.sh)")
@pytest.mark.parametrize("name,kind", [
    ("oob_static_shared", "global-buffer-overflow"),  # a function-local static: ASan's globals
    ("oob_dynamic_shared", "heap-buffer-overflow"),
    ("oob_global", "heap-buffer-overflow"),
])
def test_out_of_bounds_caught_by_address_sanitizer(emu, name, kind):
    """In a child process (ASan aborts it), with this run's preloads."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import emu_utils; "
        "emu_utils.load()._planted(%r, torch.randn(64)); print('NOT CAUGHT')" % (HERE, name)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    report = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NOT CAUGHT" not in report, report[-3000:]
    assert f"ERROR: AddressSanitizer: {kind}" in report, report[-3000:]
    assert re.search(re.escape(line_of(name)), report), report[-3000:]
