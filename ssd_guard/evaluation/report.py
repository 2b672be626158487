"""The markdown report of `ssd-guard evaluate`, rendered from ``results.json``'s content."""

from __future__ import annotations

import math
from typing import Any

from ssd_guard.evaluation.reference import POST_REFERENCE, REFERENCE_MAP

__all__ = ["render_report"]

_WHEN = {"pre": "pre-generation", "post": "post-generation"}
_DESCRIPTION = {
    "SSD": "SSD student: Rényi-2 entropy of the predicted answer mixture",
    "TD-std": "teacher dispersion: mean per-dimension std of the K sample embeddings",
    "TD-trace": "teacher dispersion: trace of the covariance of the K sample embeddings",
    "SE-cos": "semantic entropy, classes by embedding cosine similarity",
    "SE-string": "semantic entropy, classes by normalised string match",
    "SE-NLI": "semantic entropy, classes by bidirectional entailment (local NLI model)",
    "SEP": "semantic-entropy probe (logistic regression on the prompt hidden state)",
    "PCP": "P(I know) probe (logistic regression on the prompt hidden state)",
    "SSD-loglik": "SSD student: -log-likelihood of the default answer's embedding",
    "SE-cos-answer": "-log share of the default answer's meaning class among the samples",
    "TD-answer": "1 - cosine(default answer, mean of the sample embeddings)",
    "SSD-pmi": "SSD student: -(log p(answer | prompt) - log p(answer)) (pointwise MI)",
    "SSD-consensus": "SSD student: distance of the answer to the predicted mixture mean",
    "risk": "combined risk, pre-generation: logistic regression on SSD entropy + PCP + SEP "
    "(probes on the student's features; fitted on train)",
    "risk-post": "combined risk: + the default answer's SSD signals (loglik, pmi, consensus)",
    "risk-post-gen": "combined risk: + the generation's token statistics (mean / min token "
    "log-prob, mean token entropy)",
    "gen-tok_lp_mean": "-mean token log-prob of the default answer (generation statistic)",
    "gen-tok_lp_min": "-min token log-prob of the default answer (generation statistic)",
    "gen-tok_entropy_mean": "mean token entropy of the default answer (generation statistic)",
    "SemGrad": "gradient of the entropy-weighted answer NLL w.r.t. a prompt hidden state "
    "(upper layers), one forward + backward pass (arXiv 2605.04638)",
    "HybridGrad": "a * mean abs(dL/dW_lm_head) + (1 - a) * SemGrad, a = exp(-mean token entropy)",
    "DraftEU": "draft-model epistemic uncertainty: JSD among drafts + KL(mixture || proxy), "
    "aggregated by a logistic regression (arXiv 2602.01956)",
}


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _ci(d: dict[str, Any] | None, spec: str = ".3f") -> str:
    if not d:
        return "n/a"
    return f"{_f(d['value'], spec)} [{_f(d.get('low'), spec)}, {_f(d.get('high'), spec)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _verdict(ours: dict[str, Any], ref: float) -> str:
    v, lo, hi = ours["value"], ours.get("low"), ours.get("high")
    if v is None or not math.isfinite(v):
        return "n/a"
    if hi is not None and math.isfinite(hi) and hi < ref:
        return f"**below** by {ref - v:.3f} (CI excludes the paper's value)"
    if lo is not None and math.isfinite(lo) and lo > ref:
        return f"above by {v - ref:.3f} (CI excludes the paper's value)"
    if v < ref:
        return f"below by {ref - v:.3f} (within our CI)"
    return f"at or above, +{v - ref:.3f} (within our CI)"


def _comparison(results: dict[str, Any]) -> list[str]:
    ref = results["reference"]
    pre = results["hallucination"]["pre_generation"]
    rows: list[list[str]] = []
    below: list[str] = []
    for method, paper in ref["hallucination_auroc"].items():
        ours_name = REFERENCE_MAP.get(method, method)
        if method == "SE" and "SE-NLI" in pre:  # the paper's SE uses NLI too
            ours_name = "SE-NLI"
        if ours_name not in pre:
            continue
        ours = pre[ours_name]["auroc"]
        verdict = _verdict(ours, paper)
        if "below" in verdict:
            below.append(method)
        rows.append([method, ours_name, f"{paper:.3f}", _ci(ours), verdict])
    mm = results.get("mismatch")
    if mm:
        lo, hi = ref["mismatch_auroc"]
        v = mm["auroc"]["value"]
        verdict = (
            f"**below** the paper's range by {lo - v:.3f}"
            if v is not None and v < lo
            else ("within the paper's range" if v is not None and v <= hi else "above the range")
        )
        if v is not None and v < lo:
            below.append("mismatch")
        rows.append(["mismatch", "SSD-loglik", f"{lo:.2f}–{hi:.2f}", _ci(mm["auroc"]), verdict])
    post = results["hallucination"]["post_generation"].get("SSD-loglik")
    if post:
        v = post["auroc"]["value"]
        verdict = "**below chance**" if v is not None and v < 0.5 else "no paper number"
        if v is not None and v < 0.5:
            below.append("SSD-loglik")
        rows.append(["post-generation", "SSD-loglik", "—", _ci(post["auroc"]), verdict])
    post_all = results["hallucination"]["post_generation"]
    for name, ref_post in POST_REFERENCE.items():
        if name in post_all:
            ours = post_all[name]["auroc"]
            verdict = _verdict(ours, float(ref_post["auroc"]))
            if "below" in verdict:
                below.append(name)
            rows.append([name, name, f"{ref_post['auroc']:.2f}", _ci(ours), verdict])
    meta = results["meta"]
    lines = [
        "## Beside the paper",
        "",
        f"Reference: {ref['source']}. Ours: {meta.get('base_model') or 'one base model'}, "
        f"one dataset ({meta.get('recipe') or 'this work dir'}), {meta['n_test']} test prompts.",
        "",
        *_table(["method", "ours", "paper", "ours: AUROC [95% CI]", "verdict"], rows),
        "",
    ]
    lines += _why(results, below)
    return lines


def _why(results: dict[str, Any], below: list[str]) -> list[str]:
    meta = results["meta"]
    hall = results["hallucination"]
    pre = hall["pre_generation"]
    if not below:
        return ["We are not below the paper on any of these numbers.", ""]
    acc = meta.get("greedy_accuracy_test")
    widths = [
        r["auroc"]["high"] - r["auroc"]["low"]
        for r in pre.values()
        if r["auroc"].get("high") is not None and r["auroc"].get("low") is not None
    ]
    out = [
        f"### Where we are below, and why ({', '.join(below)})",
        "",
        "Plainly: the numbers marked **below** are lower than the paper's. What we can say "
        "about why, from this run's own data:",
        "",
        f"- **Model scale.** The paper averages over 3B–8B base models; this is "
        f"{meta.get('base_model') or 'a small model'}. It answers "
        f"{_f(acc, '.1%') if acc is not None else 'few'} of the test questions correctly, so "
        "the signal any scorer can read (samples, hidden states) is weaker than at 3B–8B, "
        "and the few correct answers make the positive class (wrong answers) dominant "
        f"({_f(hall['positive_rate'], '.1%')}): every AUROC rests on only "
        f"{round((1 - hall['positive_rate']) * meta['n_test'])} correct answers.",
    ]
    fid = results.get("fidelity", {}).get("spearman_ssd_entropy_vs", {}).get("TD-std")
    if fid and ({"SSD", "mismatch", "SSD-loglik"} & set(below)):
        td = pre.get("TD-std", {}).get("auroc", {}).get("value")
        out.append(
            "- **Distillation fidelity.** The student reproduces the teacher's dispersion only "
            f"partly: Spearman ρ(SSD entropy, TD-std) = {_f(fid['value'], '.2f')} on the test "
            f"prompts, while TD itself reaches AUROC {_f(td)} here. SSD can only be as good as "
            f"its imitation of the teacher, learnt from {meta['n_train']} training prompts of "
            "one dataset (more training prompts, or another layer, may raise it)."
        )
    if "SSD-loglik" in below:
        v = results["hallucination"]["post_generation"]["SSD-loglik"]["auroc"]["value"]
        out.append(
            f"- **SSD-loglik is below chance** (AUROC {_f(v)}): on this run the default "
            "answers the student finds *likely* are wrong more often than those it finds "
            "unlikely. The answer head models where the model's sampled answers go; for a "
            "model that is wrong most of the time, that is mostly where wrong answers go, and "
            "a weakly fitted head (see fidelity) does not recover the agreement signal that "
            "TD-answer shows."
        )
    sat = results.get("se_saturation", {})
    if sat:
        parts = ", ".join(f"{k}: {_f(v, '.0%')}" for k, v in sat.items())
        out.append(
            "- **Noisy samples saturate SE.** At T=1 this model rarely repeats itself: the "
            "share of test prompts whose K samples fall into K distinct meaning classes is "
            f"{parts}. Those prompts all get the maximum SE (log K), so the sample-based "
            "scores can only rank the rest, and the student learns from these saturated "
            "targets."
        )
    if "SE" in below or "SEP" in below:
        out.append(
            "- **No NLI model.** The paper's SE clusters answers by bidirectional "
            "entailment with an NLI model; none ships in a registry package, so SE-cos uses "
            f"MiniLM cosine similarity (threshold {_f(meta.get('se_threshold'), 'g')}) and "
            "SE-string exact matches. Pass `--nli-model DIR` to use a local NLI model."
        )
    if "SemGrad" in below:
        post_all = hall["post_generation"]
        best_tok = (
            max((post_all[k]["auroc"]["value"], k) for k in post_all if k.startswith("gen-tok_"))
            if any(k.startswith("gen-tok_") for k in post_all)
            else None
        )
        out.append(
            "- **SemGrad at this scale.** The paper's 0.86 is on 4B-8B models; here the "
            "gradient of the entropy-weighted answer NLL with respect to the prompt's hidden "
            "states (at the position the Semantic Preservation Score search picks) does not "
            "separate right from wrong answers "
            f"(SemGrad {_f(post_all['SemGrad']['auroc']['value'])}, HybridGrad "
            f"{_f(post_all.get('HybridGrad', {}).get('auroc', {}).get('value'))})"
            + (
                f", while the answer's own token statistics do ({best_tok[1]} {best_tok[0]:.3f})"
                if best_tok
                else ""
            )
            + ". The maths is checked against finite differences "
            "(tests/unit/scoring/test_semgrad.py) and "
            "every anchor position from -1 to -8 gives 0.45-0.53: the sensitivity of a 135M "
            "model's output to meaning-preserving changes of its input carries no correctness "
            "signal we can measure."
        )
    out.append(
        "- **Labels.** Correctness is alias matching after normalisation (with containment), "
        "not a human or LLM judge: paraphrased right answers count as wrong and loose "
        "containment matches as right, which caps every scorer's AUROC."
    )
    if widths:
        out.append(
            f"- **Sample size.** {meta['n_test']} test prompts: the 95% intervals are "
            f"{min(widths):.2f}–{max(widths):.2f} wide, so differences of a few points "
            "between scorers (and to the paper) are within noise."
        )
    if "mismatch" in below:
        out.append(
            "- **Mismatch.** The foreign answers are other prompts' default answers from the "
            "same dataset and the same model, often the same kind of answer (a name, a "
            "place, a year), so they are hard negatives; and the answer head inherits the "
            "fidelity limit above."
        )
    out.append("")
    return out


def render_report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    hall = results["hallucination"]
    lines: list[str] = [
        f"# ssd-guard evaluation: {meta.get('recipe') or 'work dir'}"
        + (f" ({meta['base_model']})" if meta.get("base_model") else ""),
        "",
    ]
    if meta.get("command"):
        lines += ["Made with:", "", "```bash", str(meta["command"]), "```", ""]
    dev = meta.get("device", {})
    lines += [
        "## Setup",
        "",
        *_table(
            ["", ""],
            [
                ["work dir", f"`{meta['workdir']}`"],
                ["base model", str(meta.get("base_model"))],
                ["SSD layer", str(meta.get("ssd_layer"))],
                [
                    "prompts (train / validation / test)",
                    f"{meta['n_train']} / {meta['n_validation']} / {meta['n_test']} "
                    "(report: test only)",
                ],
                ["teacher samples per prompt (K)", str(meta.get("n_samples"))],
                ["greedy accuracy on test", _f(meta.get("greedy_accuracy_test"), ".3f")],
                [
                    "bootstrap",
                    f"{meta['n_boot']} paired resamples, seed {meta['seed']}, 95% percentile",
                ],
                ["SE cosine threshold", _f(meta.get("se_threshold"), "g")],
                [
                    "machine",
                    f"{dev.get('processor')}, {dev.get('cpu_count')} CPUs, "
                    f"{dev.get('torch_threads')} torch threads, GPU: {dev.get('cuda') or 'none'}",
                ],
                ["versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())],
                ["date", str(meta.get("created"))],
            ],
        ),
        "",
        "## Hallucination detection",
        "",
        f"Positive = the default (greedy) answer is wrong ({_f(hall['positive_rate'], '.1%')} "
        f"of test prompts, so a random scorer has AUPRC {_f(hall['auprc_random'])}). Higher "
        "score = riskier. Intervals: 95% bootstrap.",
        "",
    ]
    rows = []
    for key in ("pre_generation", "post_generation"):
        for name, r in hall[key].items():
            rows.append(
                [
                    f"**{name}**",
                    _WHEN[r["kind"]],
                    _ci(r["auroc"]),
                    _ci(r["auprc"]),
                    _ci(r["aurc"]),
                    _DESCRIPTION.get(name, ""),
                ]
            )
    lines += _table(["scorer", "when", "AUROC", "AUPRC", "AURC ↓", "what"], rows)
    lines += ["", "![ROC curves](roc.png)", ""]
    lines += _comparison(results)

    fid = results.get("fidelity", {}).get("spearman_ssd_entropy_vs", {})
    if fid:
        lines += [
            "## Distillation fidelity",
            "",
            "Spearman ρ between the student's Rényi-2 entropy and the teacher's dispersion "
            "on the test prompts (the student never saw them).",
            "",
            *_table(
                ["teacher dispersion", "Spearman ρ [95% CI]"], [[k, _ci(v)] for k, v in fid.items()]
            ),
            "",
        ]
    mm = results.get("mismatch")
    if mm:
        lo, hi = results["reference"]["mismatch_auroc"]
        lines += [
            "## Mismatch (out-of-domain answer) detection",
            "",
            mm["description"] + ".",
            "",
            *_table(
                ["", "value"],
                [
                    ["AUROC [95% CI]", _ci(mm["auroc"])],
                    [
                        "own answer more likely than the foreign one",
                        _f(mm["pairwise_accuracy"], ".1%"),
                    ],
                    ["paper", f"{lo:.2f}–{hi:.2f}"],
                ],
            ),
            "",
        ]
    sel = results.get("selective", {})
    ranked = sorted(
        [(n, r) for k in ("pre_generation", "post_generation") for n, r in hall[k].items()],
        key=lambda t: t[1]["aurc"]["value"],
    )
    lines += [
        "## Selective prediction",
        "",
        "Answer only the prompts a scorer finds least risky; selective risk = share of wrong "
        "answers among those kept. AURC = mean selective risk over all coverages (lower is "
        f"better; random = {_f(sel.get('aurc_random'))}, oracle = {_f(sel.get('aurc_oracle'))}).",
        "",
        *_table(["scorer", "AURC [95% CI]"], [[n, _ci(r["aurc"])] for n, r in ranked]),
        "",
        "![Risk–coverage curves](risk_coverage.png)",
        "",
    ]
    mc = results.get("multiple_choice")
    if mc:
        acc = mc["accuracy"]
        if "workdir" in mc:
            where = (
                f"Test split of `{mc['workdir']}` ({mc['n_test']} questions). The student was "
                "trained on the base model's own open-ended answers to the ARC questions; it "
                "ranks the choices by the log-likelihood of their embeddings."
            )
        else:
            lo, hi = mc["rows"]
            where = (
                f"Rows {lo}–{hi} of `{mc['data']}` ({mc['n_test']} questions), which no "
                f"student saw; the main student ranks the choices by its `{mc['signal']}` "
                "answer signal (rows by signal below)."
            )
        ssd_rows = [
            [f"SSD student ({k[4:]})", _ci(v)] for k, v in acc.items() if k.startswith("SSD-")
        ] or [["SSD student (embedding log-likelihood)", _ci(acc["SSD"])]]
        lines += [
            "## Multiple-choice selection (ARC-Easy)",
            "",
            where + " The base model ranks them by the sequence log-probability of the "
            "choice's tokens after the prompt.",
            "",
            *_table(
                ["method", "top-1 accuracy [95% CI]"],
                [
                    ["random", _f(mc["random_baseline"])],
                    *ssd_rows,
                    ["base model, sum of token log-probs", _ci(acc["base-logprob-sum"])],
                    ["base model, mean token log-prob", _ci(acc["base-logprob-mean"])],
                ],
            ),
            "",
            f"SSD and the base model (sum) pick the same choice on "
            f"{_f(mc['agreement_ssd_vs_base_sum'], '.1%')} of questions"
            + (
                "; the base model's own greedy open answer matches the gold choice on "
                f"{_f(mc['greedy_open_accuracy'], '.1%')}."
                if "greedy_open_accuracy" in mc
                else "."
            ),
            "",
        ]
    cost = results.get("cost")
    if cost:
        rows = [
            [
                name,
                _f(v["mean"], ".1f"),
                _f(v["median"], ".1f"),
                _f(v["ratio_to_ssd"], ".1f") + "×",
            ]
            for name, v in sorted(cost["per_prompt_ms"].items(), key=lambda t: t[1]["mean"])
        ]
        d = cost["device"]
        lines += [
            "## Cost at inference",
            "",
            f"Wall time per prompt from raw text, batch size 1, {cost['n_prompts']} test prompts, "
            "interleaved in one run on one machine "
            f"({d.get('processor')}, {d.get('torch_threads')} torch threads, "
            f"GPU: {d.get('cuda') or 'none'}). "
            f"SE and TD include their K={cost['n_samples']} sampled answers (+1 default, up to "
            f"{cost['max_new_tokens']} new tokens, one shared prefill) and their embeddings; SSD, "
            "SEP and PCP stop the prefill at their layer; SSD-loglik embeds one given answer.",
            "",
            *_table(["scorer", "mean ms", "median ms", "× SSD"], rows),
            "",
        ]
    probes = results.get("probes", {})
    if probes:
        lines += ["## Probes", ""]
        for name, p in probes.items():
            extra = (
                f", SE threshold {p['se_threshold']:.3f} on {p['target']}"
                if "se_threshold" in p
                else ""
            )
            lines.append(
                f"- **{name}**: layer {p['layer']} (chosen by validation AUROC), "
                f"training positive rate {p['train_positive_rate']:.3f}{extra}."
            )
        lines.append("")
    lines += [
        "All numbers, curves and settings are in `results.json` beside this file.",
        "",
    ]
    return "\n".join(lines)
