"""The CMake-built library (CMakeLists.txt, scripts/build_cmake.sh).

Set INSTSEG_CMAKE_LIB to the built libinstseg_ops.so to run these tests:

    lib=$(bash scripts/build_cmake.sh | tail -n 1)
    INSTSEG_CMAKE_LIB=$lib python -m pytest -q tests/test_cmake_library.py

The library is loaded in a subprocess with torch.ops.load_library and without
importing instseg_ops: this process has already imported instseg_ops (see
conftest.py), whose extension registers the same `instseg` namespace, and a
second registration of it is an error. The subprocess's result is compared,
element by element, with a small NumPy RoIAlign written here.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

LIB_ENV = "INSTSEG_CMAKE_LIB"
TOL = 1e-5


@pytest.fixture
def cmake_lib():
    path = os.environ.get(LIB_ENV)
    if not path:
        pytest.skip(f"{LIB_ENV} is not set: build the CMake library with scripts/build_cmake.sh "
                    f"and set {LIB_ENV} to the path of libinstseg_ops.so it prints")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        pytest.fail(f"{LIB_ENV}={path}: no such file")
    return path


# ---------------------------------------------------------------------------
# Independent reference (torchvision's RoIAlign semantics), in float64.


def _bilinear(img, y, x):
    """img: [C, H, W]. The bilinear sample at (y, x), a vector of C values."""
    _, height, width = img.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(img.shape[0])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * img[:, y_low, x_low] + hy * lx * img[:, y_low, x_high]
            + ly * hx * img[:, y_high, x_low] + ly * lx * img[:, y_high, x_high])


def roi_align_numpy(x, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio):
    """aligned=False, sampling_ratio > 0. x: [N, C, H, W], rois: [K, 5]. -> [K, C, ph, pw]."""
    x = np.asarray(x, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    out = np.zeros((rois.shape[0], x.shape[1], pooled_h, pooled_w))
    grid_h = grid_w = sampling_ratio
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        img = x[int(b)]
        x1, y1, x2, y2 = (v * spatial_scale for v in (x1, y1, x2, y2))
        roi_w = max(x2 - x1, 1.0)
        roi_h = max(y2 - y1, 1.0)
        bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                acc = np.zeros(x.shape[1])
                for iy in range(grid_h):
                    sy = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        sx = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += _bilinear(img, sy, sx)
                out[k, :, ph, pw] = acc / (grid_h * grid_w)
    return out


def test_reference_on_a_hand_computed_case():
    # Constant rows: the value at row y is y, so every sample is its y coordinate.
    x = np.broadcast_to(np.arange(6, dtype=np.float64)[:, None], (1, 1, 6, 6)).copy()
    out = roi_align_numpy(x, [[0, 0.0, 0.0, 3.0, 3.0]], 1.0, 3, 3, 2)
    # bin_h = 1, samples at ph + 0.25 and ph + 0.75: mean ph + 0.5.
    np.testing.assert_allclose(out[0, 0], np.array([[0.5] * 3, [1.5] * 3, [2.5] * 3]), atol=1e-12)


# ---------------------------------------------------------------------------
# The CMake library, in a subprocess.

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch

    lib, in_x, in_rois, out_path = sys.argv[1:5]
    try:
        torch.ops.instseg.roi_align
    except (AttributeError, RuntimeError):
        pass
    else:
        raise SystemExit("torch.ops.instseg.roi_align exists before loading the library")
    torch.ops.load_library(lib)
    assert "instseg_ops" not in sys.modules, "instseg_ops was imported"
    assert "instseg_ops._C" not in sys.modules, "instseg_ops._C was imported"

    x = torch.from_numpy(np.load(in_x))
    rois = torch.from_numpy(np.load(in_rois))
    out = torch.ops.instseg.roi_align(x, rois, 1.0, 3, 3, 2, False, False)
    print("shape", list(out.shape), "dtype", out.dtype)
    assert out.dtype == torch.float32, out.dtype
    np.save(out_path, out.contiguous().numpy())
    """
)


def _random_case(rng, n=2, c=3, height=9, width=11, k=6):
    # Values in [0, 1): float32 rounding of the sample coordinates then moves a
    # value by well under the tolerance.
    x = rng.random((n, c, height, width)).astype(np.float32)
    rois = np.zeros((k, 5), dtype=np.float32)
    for i in range(k):
        x1 = rng.uniform(0.0, width - 2.0)
        y1 = rng.uniform(0.0, height - 2.0)
        # Some boxes smaller than one pixel (their size is clamped to 1).
        x2 = rng.uniform(x1, width - 1.0) if i % 3 else x1 + rng.uniform(0.0, 1.0)
        y2 = rng.uniform(y1, height - 1.0) if i % 3 else y1 + rng.uniform(0.0, 1.0)
        rois[i] = (i % 2, x1, y1, x2, y2)  # batch indices 0 and 1
    return x, rois


def test_cmake_library_roi_align_matches_reference(cmake_lib, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed = {seed}")
    rng = np.random.default_rng(seed)
    x, rois = _random_case(rng)

    in_x, in_rois, out_path = tmp_path / "x.npy", tmp_path / "rois.npy", tmp_path / "out.npy"
    np.save(in_x, x)
    np.save(in_rois, rois)
    # Run outside the repository so that nothing from it is importable by accident.
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, cmake_lib, str(in_x), str(in_rois), str(out_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    print(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed (exit code {proc.returncode}):\n"
                    f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")

    out = np.load(out_path)
    assert list(out.shape) == [rois.shape[0], x.shape[1], 3, 3]
    expected = roi_align_numpy(x, rois, 1.0, 3, 3, 2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOL,
                               err_msg=f"seed = {seed}")
