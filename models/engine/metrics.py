"""Run logs: metrics.jsonl and progress-line helpers."""
import datetime
import json
import os
from typing import Any, Dict, Optional

from .checkpoint import atomic_write_text


class MetricsLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Optional[str], truncate_after: Optional[int] = None):
        self.path = path
        self.file = None
        if path is None:
            return
        if truncate_after is not None and os.path.exists(path):
            # Resuming: drop records of iterations after the checkpoint (they will be redone).
            keep = []
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("iter", 0) <= truncate_after:
                        keep.append(line)
            atomic_write_text("".join(line + "\n" for line in keep), path)
        self.file = open(path, "a")

    def write(self, record: Dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))
