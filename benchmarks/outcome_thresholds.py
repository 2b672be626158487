"""Choose the shipped policies' prompt / answer thresholds on *outcomes* (validation half).

For every validation question of the outcome benchmark (``benchmarks/outcome.py``) this
computes, with the student the policies will run with, the pre-generation signals of the
question (``entropy``, ``risk``), the answer signals of the model's greedy chat answer
(``pmi``, ``risk`` post) and of one sampled regeneration (the exact call the guard makes
on ``reject_answer``: ``pipeline_kwargs={"do_sample": True, "temperature": 1.0}``, served
from the same generation cache), and whether each answer is right. It then replays a grid
of policy designs in the guard's order (prompt rule first, then the answer rule; abstain,
or regenerate once and abstain if the retry fails too) and keeps, per target, the design
with the highest ``catch_rate`` whose ``harm_rate`` stays within the budget:

* ``default``: harm ≤ 0.03 on validation (test target 0.05), catch as high as possible;
* ``strict``: harm ≤ 0.10 (it abstains more; documented as such).

Thresholds are written as quantiles of the student's own calibration values (so a rule
reads ``entropy: {gt_quantile: q}``) and as raw values, to
``benchmarks/results/outcome-thresholds-smollm2.json``. The test half is never read.

    python benchmarks/outcome_thresholds.py --workdir runs/smollm2-chat --extra 40
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _outcome_module() -> Any:
    """benchmarks/outcome.py, loaded by path (a PyPI package is called ``outcome`` too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ssd_outcome_benchmark", ROOT / "benchmarks" / "outcome.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ssd_outcome_benchmark"] = mod
    spec.loader.exec_module(mod)
    return mod


_oc = _outcome_module()
extra_items, install_llm_cache, load_items = _oc.extra_items, _oc.install_llm_cache, _oc.load_items
messages_for, outcome_keys = _oc.messages_for, _oc.outcome_keys
trained_ids, row_key = _oc.trained_ids, _oc.row_key

REGEN = {"pipeline_kwargs": {"do_sample": True, "temperature": 1.0}}
PRE_Q = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, None)
ANS_Q = (None, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def cal_quantile(cal: list[float], value: float) -> float:
    """The calibration quantile of *value* (share of calibration values below it)."""
    return bisect.bisect_left(cal, value) / len(cal)


def simulate(rows: list[dict[str, Any]], design: dict[str, Any]) -> dict[str, Any]:
    pre_m, pre_t = design["pre_metric"], design["pre_t"]
    ans_m, ans_t, mode = design["ans_metric"], design["ans_t"], design["ans_action"]

    def ans_fails(sig: dict[str, float]) -> bool:
        if ans_t is None:
            return False
        v = sig[ans_m]
        return v > ans_t if ans_m == "risk" else v < ans_t

    right, abst, regen = [], [], []
    for r in rows:
        if pre_t is not None and r["pre"][pre_m] > pre_t:
            right.append(False), abst.append(True), regen.append(False)
            continue
        if not ans_fails(r["post"]):
            right.append(r["right"]), abst.append(False), regen.append(False)
            continue
        if mode == "abstain" or ans_fails(r["sample_post"]):
            right.append(False), abst.append(True), regen.append(mode != "abstain")
            continue
        right.append(r["sample_right"]), abst.append(False), regen.append(True)
    return outcome_keys([r["right"] for r in rows], right, abst, (), regen)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/smollm2-chat")
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--recipe", default="training/smollm2-chat.yaml")
    ap.add_argument("--extra", type=int, default=40)
    ap.add_argument("--cache-dir", default="runs/outcome-cache")
    ap.add_argument("--exclude-train-of", default="training/smollm2-pooled.yaml")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/outcome-thresholds-smollm2.json")
    args = ap.parse_args()

    from ssd_guard.cli_demo import load_chat_model
    from ssd_guard.scoring.ssd import SSDScorer

    items = load_items(Path(args.workdir), ("validation",))
    if args.extra:
        items += [i for i in extra_items(Path(args.recipe), args.extra) if i.split == "validation"]
    if args.exclude_train_of:
        seen_rows = trained_ids(args.exclude_train_of.split(","))
        items = [i for i in items if row_key(i.id) not in seen_rows]
    install_llm_cache(Path(args.cache_dir) / "generations.jsonl")
    lm, chat = load_chat_model(max_new_tokens=args.max_new_tokens)
    scorer = SSDScorer.load(args.artifact, lm=lm)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n, it in enumerate(items):
        draft = str(chat.invoke(messages_for(it.question)).content)
        sample = str(chat.invoke(messages_for(it.question), **REGEN).content)
        pre = scorer.prompt_signals([it.question])
        post = scorer.answer_signals([it.question, it.question], [draft, sample], with_risk=True)
        rows.append(
            {
                "id": it.id,
                "source": it.source,
                "right": it.correct(draft),
                "sample_right": it.correct(sample),
                "pre": {k: v[0] for k, v in pre.items()},
                "post": {k: v[0] for k, v in post.items()},
                "sample_post": {k: v[1] for k, v in post.items()},
            }
        )
        if (n + 1) % 50 == 0:
            print(f"{n + 1}/{len(items)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    pre_metrics = ["entropy"] + (["risk"] if "risk" in rows[0]["pre"] else [])
    ans_metrics = ["pmi"] + (["risk"] if "risk" in rows[0]["post"] else [])
    designs = []
    for pm, pq, am, aq, mode in itertools.product(
        pre_metrics, PRE_Q, ans_metrics, ANS_Q, ("abstain", "regenerate")
    ):
        if aq is None and mode == "regenerate":
            continue
        pre_vals = [r["pre"][pm] for r in rows]
        ans_vals = [r["post"][am] for r in rows]
        d = {
            "pre_metric": pm,
            "pre_q": pq,
            "pre_t": None if pq is None else quantile(pre_vals, pq),
            "ans_metric": am,
            "ans_q": aq,
            "ans_t": None if aq is None else quantile(ans_vals, 1 - aq if am == "risk" else aq),
            "ans_action": mode,
        }
        d["validation"] = simulate(rows, d)
        designs.append(d)

    def best(budget: float) -> dict[str, Any]:
        ok = [d for d in designs if d["validation"]["harm_rate"] <= budget]
        return max(ok, key=lambda d: (d["validation"]["catch_rate"], -d["validation"]["harm_rate"]))

    cal = dict(scorer.calibration)
    chosen = {}
    for name, budget in (("default", 0.03), ("strict", 0.10)):
        d = dict(best(budget))
        for side in ("pre", "ans"):
            metric, t = d[f"{side}_metric"], d[f"{side}_t"]
            key = metric if metric != "risk" else ("risk:pre" if side == "pre" else "risk:post")
            values = cal.get(key)
            if t is not None and values:
                d[f"{side}_calibration_quantile"] = round(cal_quantile(values, t), 4)
        d["harm_budget"] = budget
        chosen[name] = d
    base = outcome_keys([r["right"] for r in rows], [r["right"] for r in rows], [False] * len(rows))
    out = {
        "meta": {
            "command": "python benchmarks/outcome_thresholds.py " + " ".join(sys.argv[1:]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "student": scorer.fingerprint,
            "n_validation": len(rows),
            "unguarded": base,
            "calibration_keys": sorted(cal),
            "regeneration": REGEN,
        },
        "chosen": chosen,
        "designs": designs,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for name, d in chosen.items():
        v = d["validation"]
        print(
            f"{name}: {d['pre_metric']}>{d['pre_t']} (q {d['pre_q']}) | {d['ans_metric']} "
            f"{d['ans_t']} (q {d['ans_q']}) {d['ans_action']} -> harm {v['harm_rate']:.3f} "
            f"catch {v['catch_rate']:.3f} acc {v['guarded_accuracy']:.3f}/"
            f"{v['unguarded_accuracy']:.3f} answered_err {v['answered_error']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
