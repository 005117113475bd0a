"""Build script for instseg_ops.

Builds one extension, ``instseg_ops._C``, from csrc/ with torch's cpp_extension.

Environment switches:
  INSTSEG_CUDA=auto|1|0   auto (default): build the CUDA kernels when torch is a CUDA
                          build and nvcc is found; 1: require them; 0: CPU only.
  TORCH_CUDA_ARCH_LIST    architectures to compile for; default: the visible GPU's,
                          or 9.0 (H100/H200) when no GPU is visible.
  CUDA_HOME               CUDA toolkit root; default /usr/local/cuda when it has nvcc.
  MAX_JOBS                parallel compile jobs (ninja).
  INSTSEG_DEBUG=1         -O0 -g builds (and -G -lineinfo for CUDA).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch's CUDA_HOME detection can settle on a directory without nvcc; prefer the
# standard toolkit location before cpp_extension is imported.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    mode = os.environ.get("INSTSEG_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off", "cpu"):
        return False
    cuda_home = cpp_extension.CUDA_HOME
    nvcc_ok = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    available = torch.version.cuda is not None and nvcc_ok
    if mode in ("1", "true", "yes", "on", "cuda"):
        if not available:
            raise RuntimeError(
                "INSTSEG_CUDA=1 but no CUDA toolchain usable with this torch "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})"
            )
        return True
    return available


def _default_arch_list():
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "9.0"


def extensions():
    with_cuda = _want_cuda()
    debug = os.environ.get("INSTSEG_DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's Linux builds and runs serially
        # unless the caller is compiled with OpenMP too. The libgomp that torch
        # already loaded is the one used at run time.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = (["-O0", "-G"] if debug else ["-O3"]) + ["-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    what = f"with CUDA kernels (arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else "CPU-only"
    print(f"instseg_ops: building {what}")
    return [ext_cls("instseg_ops._C", sources, extra_compile_args=extra, extra_link_args=link)]


setup(
    # models/ (the design card's top-level folder) is installed as instseg_ops.models, with
    # every subpackage under it found automatically.
    packages=find_packages(include=["instseg_ops", "instseg_ops.*"]) + ["instseg_ops.models"]
    + ["instseg_ops.models." + p for p in find_packages("models")],
    package_dir={"instseg_ops.models": "models"},
    # The demo's checkpoint (float16 weights of the shapes preset's recorded run, 8 MB).
    package_data={"instseg_ops.models": ["assets/*.pth"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
