"""The model benchmarks, one command: each family against its peer or its sibling, in one run.

    python benchmarks/bench_models.py                      # every family, short settings
    python benchmarks/bench_models.py mask2former -- --repeats 5
    python benchmarks/bench_models.py centermask cascade

Families and what they time (each script's docstring has the details; rows go to
benchmarks/out/*.json):
  maskrcnn     Mask R-CNN R50-FPN vs torchvision's, per stage (bench_maskrcnn.py)
  mask2former  Mask2Former R50 vs transformers', end to end and the pixel decoder (bench_models_mask2former.py)
  centermask   CenterMask-Lite V-19 vs the Mask R-CNN R-18 preset model, per stage (bench_models_centermask.py)
  cascade      Cascade's second stage vs Mask R-CNN's (bench_models_cascade.py)
Arguments after ``--`` go to every script run.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {
    "maskrcnn": ("bench_maskrcnn.py", ["--quick"]),
    "mask2former": ("bench_models_mask2former.py", ["--quick"]),
    "centermask": ("bench_models_centermask.py", ["--quick"]),
    "cascade": ("bench_models_cascade.py", ["--quick"]),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    names = argv or list(SCRIPTS)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        sys.exit(f"unknown families {unknown}; choose from {list(SCRIPTS)}")
    failed = []
    for name in names:
        script, default = SCRIPTS[name]
        cmd = [sys.executable, os.path.join(HERE, script)] + (extra or default)
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
