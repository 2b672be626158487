"""One Redis for many workers: 4 processes (the bundled student, the default policy)
guard the same prompts through one real redis-server with an HMAC key; each prompt is
scored once in all (single flight), the others' checks are hits, and every entry reads
back valid and equal to what one process computes alone. (Throughput is measured by
``benchmarks/redis_workers.py`` into its JSON, not asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT


def test_four_workers_score_each_prompt_once(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "redis_workers.py"), "--redis-url"]
    cmd += [redis_url, "--workers", "4", "--prompts", "16", "--out", str(out)]
    cmd += ["--runs", "workers_same_order,workers_rotated"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    for name in ("workers_same_order", "workers_rotated"):
        run = got[name]
        assert run["n_workers"] == 4 and run["checks"] == 4 * 16
        assert run["scored"] == 16, run  # each prompt scored once, by one of the workers
        assert run["hits"] == 3 * 16, run  # ... and a hit for the three others
        assert run["entries"] == run["entries_valid"] == 16  # signed, valid, one per prompt
        assert run["leases_left"] == 0 and run["invalid_events"] == 0
        assert run["lease_timeouts"] == 0
        assert run["max_abs_diff"] < 1e-6  # the shared score is the one computed alone
    # rotated starts: the workers share the scoring out
    assert sum(n > 0 for n in got["workers_rotated"]["scored_per_worker"]) >= 2
