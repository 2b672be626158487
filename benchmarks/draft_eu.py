"""DraftEU (arXiv 2602.01956) on SmolLM2-135M-Instruct: cost, estimation error, AUROC.

    OMP_NUM_THREADS=1 python benchmarks/draft_eu.py        # after ssd-guard distill-drafts

Needs the finished ``ssd-guard distill-drafts --config training/smollm2-drafts.yaml``
work directory (``runs/smollm2-drafts``) and its data directory (``runs/smollm2-pooled``).
Reports

(a) training time per stage, artifact size, and the drafts' diversity on validation:
    the K-way JSD among drafts (the variance term) and the mean *pairwise* JSD;
(b) on ``--n-rmse`` validation prompts (greedy answer + ``--samples`` sampled answers),
    the RMSE of the token-level EU estimate against a reference: the mutual information
    (JSD) among ``--members`` perturbed copies of the target, perturbed by the same
    family as the OSD proxy (low-rank Gaussian noise on the last decoder layers + head,
    the recipe's scale and rank), on the exact text the target sees. For context, the
    RMSE of a zero predictor and of the variance term alone, and Spearman correlations;
(c) AUROC of ``draft_eu`` (and of each raw statistic) for "the greedy answer is wrong"
    on the TriviaQA test rows, with a bootstrap interval.

Writes ``benchmarks/results/draft-eu-smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.drafts.model import (
    Segments,
    TargetParts,
    embed_segments,
    flat_logit_index,
    gather_logit_states,
    head_logits,
    mutual_information,
    run_stack,
    sample_deltas,
)
from ssd_guard.models import load_causal_lm
from ssd_guard.scoring.draft_eu import FEATURES, DraftEUScorer
from ssd_guard.training.metrics import auroc, bootstrap_ci, spearman

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@torch.inference_mode()
def reference_mi(
    scorer: DraftEUScorer,
    texts: list[str],
    answers: list[str],
    *,
    members: int,
    seed: int,
) -> list[np.ndarray | None]:
    """Per row: the MI among ``members`` perturbed targets at each answer token."""
    parts: TargetParts = scorer.parts
    m = scorer.manifest
    start = parts.num_layers - m.proxy.perturb_layers
    out: list[np.ndarray | None] = [None] * len(texts)
    rows = []
    for i, (t, a) in enumerate(zip(texts, answers)):
        a_ids = scorer.answer_ids(a)
        use_prefix, q = scorer._split(t)
        if a_ids and q and use_prefix:
            rows.append((i, q, a_ids))
    for b in range(0, len(rows), 8):
        chunk = rows[b : b + 8]
        seg = Segments.build(
            scorer._prefix,
            [q for _, q, _ in chunk],
            [a for _, _, a in chunk],
            list(range(len(chunk))),
        ).to(parts.device)
        hidden = run_stack(
            parts, [parts.layers[i] for i in range(start)], seg, embed_segments(parts, seg)
        )
        lps = []
        for k in range(members):
            g = torch.Generator().manual_seed(seed * 1000 + k)
            ids = list(range(start, parts.num_layers))
            deltas, hd = sample_deltas(
                parts,
                ids,
                sigma=m.proxy.noise_scale,
                rank=m.proxy.rank,
                generator=g,
                head=m.proxy.perturb_head,
            )
            _, hq, ha = run_stack(parts, [parts.layers[i] for i in ids], seg, hidden, deltas)
            st = parts.norm(gather_logit_states(seg, hq, ha))
            lps.append(torch.log_softmax(head_logits(parts, st, hd).float(), -1))
        mi = mutual_information(torch.stack(lps)).double().cpu().numpy()
        _, _, per_row = flat_logit_index(seg)
        for (i, _, _), idx in zip(chunk, per_row):
            out[i] = mi[idx]
    return out


@torch.inference_mode()
def pairwise_jsd(scorer: DraftEUScorer, texts: list[str], answers: list[str]) -> float:
    """Mean over draft pairs and answer tokens of JSD(q_i, q_j) (nats)."""
    vals = []
    for b in range(0, len(texts), 16):
        rows = []
        for t, a in zip(texts[b : b + 16], answers[b : b + 16]):
            a_ids = scorer.answer_ids(a)
            use_prefix, q = scorer._split(t)
            if a_ids and q and use_prefix:
                rows.append((q, a_ids))
        if not rows:
            continue
        seg = Segments.build(
            scorer._prefix, [q for q, _ in rows], [a for _, a in rows], list(range(len(rows)))
        ).to(scorer.parts.device)
        lq = torch.stack([scorer._logprobs(d, seg) for d in scorer.drafts])
        k = lq.shape[0]
        for i in range(k):
            for j in range(i + 1, k):
                vals.append(mutual_information(lq[[i, j]]).double().cpu().numpy())
    return float(np.mean(np.concatenate(vals))) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-drafts")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--n-rmse", type=int, default=30)
    ap.add_argument("--samples", type=int, default=3, help="sampled answers per RMSE prompt")
    ap.add_argument("--members", type=int, default=6, help="perturbed targets in the reference")
    ap.add_argument("--n-pairwise", type=int, default=100)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "draft-eu-smollm2.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    art = args.workdir / "artifact"
    lm = load_causal_lm("smollm2-135m-instruct", dtype="bf16")
    scorer = DraftEUScorer.load(art, lm)
    prompts = _jsonl(args.data_dir / "prompts.jsonl")
    by_id = {p["id"]: p for p in prompts}
    labels = {x["id"]: x for x in _jsonl(args.data_dir / "labels.jsonl")}
    teacher: dict[str, list[str]] = {}
    for path in sorted((args.data_dir / "teacher").glob("shard-*.jsonl")):
        for rec in _jsonl(path):
            teacher[rec["id"]] = rec["samples"]
    split = json.loads((args.data_dir / "split.json").read_text())
    res: dict[str, Any] = {
        "artifact": str(art.relative_to(ROOT)) if art.is_relative_to(ROOT) else str(art)
    }

    # (a) cost and diversity
    timings = json.loads((args.workdir / "timings.json").read_text())
    res["training_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    res["training_seconds_total"] = round(sum(timings.values()), 1)
    res["artifact_bytes"] = _dir_bytes(art)
    res["artifact_mib"] = round(_dir_bytes(art) / 2**20, 2)
    res["manifest_training"] = scorer.manifest.training
    val = [i for i in split["validation"] if i in labels]
    t0 = time.perf_counter()
    sub = val[: args.n_pairwise]
    res["val_pairwise_jsd_mean"] = pairwise_jsd(
        scorer, [by_id[i]["text"] for i in sub], [labels[i]["default"] for i in sub]
    )
    res["val_kway_jsd_mean"] = scorer.manifest.training.get("val_jsd_mean")
    print(
        "pairwise JSD", res["val_pairwise_jsd_mean"], f"{time.perf_counter() - t0:.0f}s", flush=True
    )

    # (b) RMSE against perturbed-target MI
    t0 = time.perf_counter()
    ids = val[: args.n_rmse]
    texts, answers = [], []
    for i in ids:
        for a in [labels[i]["default"], *teacher.get(i, [])[: args.samples]]:
            texts.append(by_id[i]["text"])
            answers.append(a)
    ref = reference_mi(scorer, texts, answers, members=args.members, seed=12345)
    est = scorer.token_scores(texts, answers, formatted=True)
    r_all, e_all, j_all, k_all = [], [], [], []
    for r, e in zip(ref, est):
        if r is None or e is None:
            continue
        assert len(r) == len(e["eu"])
        r_all.append(r)
        e_all.append(e["eu"])
        j_all.append(e["jsd"])
        k_all.append(e["kl"])
    rr, ee, jj, kk = (np.concatenate(x) for x in (r_all, e_all, j_all, k_all))

    def rmse(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - rr) ** 2)))

    res["rmse"] = {
        "n_prompts": len(ids),
        "n_sequences": len(r_all),
        "n_tokens": int(rr.size),
        "members": args.members,
        "noise_scale": scorer.manifest.proxy.noise_scale,
        "reference_mi_mean": float(rr.mean()),
        "draft_eu_mean": float(ee.mean()),
        "draft_jsd_mean": float(jj.mean()),
        "draft_kl_mean": float(kk.mean()),
        "rmse_draft_eu": rmse(ee),
        "rmse_variance_only": rmse(jj),
        "rmse_zero": rmse(np.zeros_like(rr)),
        "spearman_eu_vs_reference": spearman(ee, rr),
        "spearman_jsd_vs_reference": spearman(jj, rr),
        "spearman_kl_vs_reference": spearman(kk, rr),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("rmse", json.dumps(res["rmse"], indent=1), flush=True)

    # (c) AUROC on the TriviaQA test rows
    t0 = time.perf_counter()
    test = [i for i in split["test"] if i in labels and by_id[i]["source"] == "triviaqa"]
    allv = scorer.score_pairs_all(
        [by_id[i]["text"] for i in test], [labels[i]["default"] for i in test], formatted=True
    )
    y = np.array([0 if labels[i]["correct"] else 1 for i in test])
    ok = np.isfinite(np.array(allv["draft_eu"]))
    auc: dict[str, Any] = {"n": int(ok.sum()), "n_wrong": int(y[ok].sum())}
    for name in ("draft_eu", *FEATURES):
        s = np.array(allv[name])[ok]
        ci = bootstrap_ci(auroc, y[ok], s, n_boot=1000, seed=0)
        auc[name] = {"auroc": ci.value, "ci95": [ci.low, ci.high]}
    auc["seconds"] = round(time.perf_counter() - t0, 1)
    auc["seconds_per_pair"] = round(auc["seconds"] / max(1, len(test)), 4)
    res["auroc_triviaqa_test"] = auc
    print("auroc", json.dumps(auc, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
