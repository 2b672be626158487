"""Outcome benchmark: what the shipped policies *do* to a guarded chat model's answers.

Runs SmolLM2-135M-Instruct as a user wires it (``ChatHuggingFace`` over a
``HuggingFacePipeline``, greedy, the distilled system prompt) through the real LangChain
paths, guarded by the bundled student (or ``--artifact``) and every shipped policy, on the
pooled validation and test splits of the chat recipe's sources (TriviaQA open questions;
CommonsenseQA / Social IQa / ARC-Easy with their lettered choices; StrategyQA yes/no).

Per policy and split: ``unguarded_accuracy``, ``guarded_accuracy``, ``harm_rate`` (share of
the answers right unguarded that the guard blocks or turns wrong), ``catch_rate`` (share of
the wrong answers it blocks or fixes), ``answered_error`` (error among the answers let
through), ``abstain_rate``, ``retrieval_rate``, ``regeneration_rate`` and ``latency_ms``
(the guard's own time per question: the model's generations are served from a LangChain
cache filled by the unguarded pass, so only scoring and decisions are timed; the model's
generation time is reported once as ``generation_ms``).

RAG part (``benchmarks/data/rag_corpus.json``, its own validation / test halves): each
question's retrieved set is its relevant document, its on-topic wrong-answer documents,
two off-topic distractors and one prompt injection; the policy's document rules screen it
(``Guard.screen_documents``), then the model answers with the kept documents in context.
Keys ``relevant_dropped``, ``wrong_doc_dropped``, ``injection_dropped``,
``distractor_dropped``, ``accuracy_unscreened``, ``accuracy_screened``. Tool part: a
scripted tool-calling model in a LangChain v1 agent with the guard's middleware; each
question's tool returns a clean or an injected output: ``tool_injection_dropped``,
``tool_clean_dropped``.

``--paths`` also runs the default policy through the agent middleware and
``GuardedLocalModel`` on a stratified subset of the test split (same keys per path).

    python benchmarks/outcome.py --workdir runs/smollm2-chat \
        --out benchmarks/results/outcome-smollm2

Generations are cached under ``--cache-dir`` (default ``runs/outcome-cache``), so a rerun
after a crash or a threshold change costs only the guard's own work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly, in one sentence."
POLICIES = ("default", "rag", "calibrated", "strict", "log-only")


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Item:
    id: str
    source: str
    split: str
    question: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    gold: int = -1

    def correct(self, text: str) -> bool:
        from ssd_guard.answers import grade_choice
        from ssd_guard.training.distill.data import is_correct

        if self.choices:
            lettered = [c.lower() for c in self.choices] != ["yes", "no"]
            return grade_choice(text, self.choices, lettered) == self.gold
        return is_correct(text, self.aliases, containment=True)


def extra_items(recipe_path: Path, per_source: int) -> list[Item]:
    """Rows of the recipe's sources beyond its ``limit`` (never seen by the student), up to
    *per_source* per source and split, halved into validation / test by a fixed hash."""
    import hashlib

    from ssd_guard.training.distill.data import load_mc_as_chat, load_qa_jsonl
    from ssd_guard.training.distill.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    out: list[Item] = []
    for src in recipe.data.sources or []:
        loader = load_qa_jsonl if src.format == "qa" else load_mc_as_chat
        rows = loader(recipe.resolve(src.path))[src.limit or 0 :]
        taken = {"validation": 0, "test": 0}
        for e in rows:
            h = int(hashlib.sha256(f"{src.name}:{e.id}".encode()).hexdigest(), 16)
            split = "validation" if h % 2 == 0 else "test"
            if taken[split] >= per_source:
                continue
            taken[split] += 1
            from ssd_guard.answers import question_of

            q = question_of(e.prompt)
            if e.choices:
                out.append(
                    Item(
                        f"{src.name}:x{e.id}",
                        src.name,
                        split,
                        q,
                        (),
                        e.choices,
                        e.choices.index(e.answer),
                    )
                )
            else:
                out.append(Item(f"{src.name}:x{e.id}", src.name, split, q, e.aliases))
    return out


def trained_ids(recipe_paths: Sequence[str]) -> set[str]:
    """``<source>:<row>`` of every row in the training split of these recipes: a student
    must never be judged on questions it was distilled on, so the benchmark leaves out the
    training rows of every student it compares (the chat recipe's own split, and the
    few-shot recipe's, whose splits differ)."""
    from ssd_guard.training.distill.data import load_mc_jsonl, load_qa_jsonl, split_ids
    from ssd_guard.training.distill.recipe import load_recipe

    out: set[str] = set()
    for path in recipe_paths:
        r = load_recipe(path)
        for src in r.data.sources or []:
            loader = load_qa_jsonl if src.format == "qa" else load_mc_jsonl
            ids = [e.id for e in loader(r.resolve(src.path), src.limit)]
            out |= {f"{src.name}:{i}" for i in split_ids(ids, r.data.split, r.data.seed)["train"]}
    return out


def row_key(item_id: str) -> str:
    """``triviaqa:x1234`` (an extra row) and ``triviaqa:1234`` both name row 1234."""
    src, _, row = item_id.partition(":")
    return f"{src}:{row.lstrip('x')}"


def load_items(workdir: Path, splits: Sequence[str] = ("validation", "test")) -> list[Item]:
    """The work directory's prompts with their split (``ssd-guard distill --until prompts``
    writes them in seconds)."""
    from ssd_guard.answers import question_of

    prompts = workdir / "prompts.jsonl"
    if not prompts.is_file():
        raise SystemExit(
            f"{prompts}: missing; run `ssd-guard distill --config training/smollm2-chat.yaml "
            "--until prompts` first"
        )
    split_of = {
        i: k for k, ids in json.loads((workdir / "split.json").read_text()).items() for i in ids
    }
    out = []
    for line in prompts.open(encoding="utf-8"):
        row = json.loads(line)
        split = split_of.get(row["id"])
        if split not in splits:
            continue
        graded = row.get("grade") == "choice"
        out.append(
            Item(
                id=row["id"],
                source=row["source"],
                split=str(split),
                question=question_of(row["prompt"]),
                aliases=() if graded else tuple(row.get("aliases", ())),
                choices=tuple(row["choices"]) if graded else (),
                gold=int(row["gold"]) if graded else -1,
            )
        )
    return out


# --------------------------------------------------------------------------- LLM cache
def install_llm_cache(path: Path) -> None:
    """A persistent LangChain LLM cache (JSON lines): every generation, greedy or sampled,
    is made once and served again to every later policy run and to reruns."""
    from langchain_core.caches import BaseCache
    from langchain_core.globals import set_llm_cache
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration

    class FileCache(BaseCache):
        def __init__(self, file: Path) -> None:
            self.file = file
            self.data: dict[str, str] = {}
            if file.is_file():
                for line in file.open(encoding="utf-8"):
                    if line.strip():
                        row = json.loads(line)
                        self.data[row["k"]] = row["v"]

        @staticmethod
        def _key(prompt: str, llm_string: str) -> str:
            import hashlib

            return hashlib.sha256(f"{llm_string}\x00{prompt}".encode()).hexdigest()

        def lookup(self, prompt: str, llm_string: str) -> Any:
            text = self.data.get(self._key(prompt, llm_string))
            return None if text is None else [ChatGeneration(message=AIMessage(content=text))]

        def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
            text = str(
                return_val[0].message.content
                if hasattr(return_val[0], "message")
                else return_val[0].text
            )
            key = self._key(prompt, llm_string)
            self.data[key] = text
            with self.file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"k": key, "v": text}) + "\n")

        def clear(self, **kwargs: Any) -> None:
            self.data.clear()

    path.parent.mkdir(parents=True, exist_ok=True)
    set_llm_cache(FileCache(path))


# --------------------------------------------------------------------------- metrics
def outcome_keys(
    base_right: Sequence[bool],
    right: Sequence[bool],
    abstained: Sequence[bool],
    retrieved: Sequence[bool] = (),
    regenerated: Sequence[bool] = (),
    latency: Sequence[float] = (),
) -> dict[str, Any]:
    """The issue's keys from per-question outcomes (abstained answers are neither right
    nor wrong; a blocked right answer is harm, a blocked or fixed wrong one a catch)."""
    n = len(base_right)
    n_right = sum(base_right)
    n_wrong = n - n_right
    harm = sum(1 for b, r, a in zip(base_right, right, abstained) if b and (a or not r))
    catch = sum(1 for b, r, a in zip(base_right, right, abstained) if not b and (a or r))
    answered = [r for r, a in zip(right, abstained) if not a]
    out: dict[str, Any] = {
        "n": n,
        "unguarded_accuracy": n_right / n if n else float("nan"),
        "guarded_accuracy": sum(r and not a for r, a in zip(right, abstained)) / n
        if n
        else float("nan"),
        "harm_rate": harm / n_right if n_right else float("nan"),
        "catch_rate": catch / n_wrong if n_wrong else float("nan"),
        "answered_error": 1 - sum(answered) / len(answered) if answered else float("nan"),
        "unguarded_error": n_wrong / n if n else float("nan"),
        "abstain_rate": sum(abstained) / n if n else float("nan"),
        "n_harmed": harm,
        "n_caught": catch,
    }
    if retrieved:
        out["retrieval_rate"] = sum(retrieved) / n
    if regenerated:
        out["regeneration_rate"] = sum(regenerated) / n
    if latency:
        out["latency_ms"] = {
            "median": statistics.median(latency),
            "p95": sorted(latency)[min(len(latency) - 1, int(0.95 * len(latency)))],
        }
    return out


def by_source(items: Sequence[Item], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for src in sorted({i.source for i in items}):
        idx = [k for k, i in enumerate(items) if i.source == src]
        out[src] = outcome_keys(
            [rows[k]["base_right"] for k in idx],
            [rows[k]["right"] for k in idx],
            [rows[k]["abstained"] for k in idx],
        )
    return out


# --------------------------------------------------------------------------- runs
def messages_for(question: str, context: str | None = None) -> list[Any]:
    from langchain_core.messages import HumanMessage, SystemMessage

    text = question if context is None else f"{context}\n\n{question}"
    return [SystemMessage(SYSTEM_PROMPT), HumanMessage(text)]


def unguarded_pass(
    chat: Any, items: Sequence[Item], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    t_gen: list[float] = []
    for k, it in enumerate(items):
        t0 = time.perf_counter()
        text = str(chat.invoke(messages_for(it.question)).content)
        t_gen.append((time.perf_counter() - t0) * 1000)
        rows.append({"id": it.id, "answer": text, "right": it.correct(text)})
        if (k + 1) % 50 == 0:
            log(f"unguarded {k + 1}/{len(items)}")
    return rows


def guarded_pass(
    ask: Callable[[Item], Any], items: Sequence[Item], base: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = []
    lat = []
    for it, b in zip(items, base):
        t0 = time.perf_counter()
        msg = ask(it)
        lat.append((time.perf_counter() - t0) * 1000)
        meta = msg.response_metadata.get("ssd_guard", {})
        text = str(msg.content)
        abstained = bool(meta.get("abstained"))
        decisions = meta.get("decisions", [])
        rows.append(
            {
                "id": it.id,
                "base_right": b["right"],
                "answer": text,
                "abstained": abstained,
                "right": (not abstained) and it.correct(text),
                "retrieved": any(d["action"] == "retrieve" for d in decisions),
                "regenerated": int(meta.get("generations", 1)) > 1,
                "actions": [f"{d['scope']}:{d['action']}:{d['rule']}" for d in decisions],
                "scores": decisions[0]["scores"] if decisions else {},
            }
        )
    keys = outcome_keys(
        [r["base_right"] for r in rows],
        [r["right"] for r in rows],
        [r["abstained"] for r in rows],
        [r["retrieved"] for r in rows],
        [r["regenerated"] for r in rows],
        lat,
    )
    keys["by_source"] = by_source(items, rows)
    return keys, rows


def load_policy_in_memory(name: str) -> Any:
    """A shipped policy, with its cache forced to memory (``strict`` names Redis: its
    decisions do not depend on where scores are cached)."""
    from ssd_guard.policy import load_policy
    from ssd_guard.policy.loading import default_policy_path

    pol = load_policy(default_policy_path(name))
    if pol.cache.url != "memory":
        pol = pol.model_copy(update={"cache": pol.cache.model_copy(update={"url": "memory"})})
    return pol


#: One score cache for every policy run of a process: scores depend on the student and
#: the text, never on the policy, so later policies reuse what the first one computed (as
#: guards sharing a Redis cache would). Only the first policy's latency is cold.
_SHARED_CACHE: Any = None


def make_guard(scorer: Any, pol: Any, retriever: Any = None) -> Any:
    from ssd_guard.cache import MemoryCache
    from ssd_guard.integrations.langchain import SSDGuard

    global _SHARED_CACHE
    if _SHARED_CACHE is None:
        _SHARED_CACHE = MemoryCache(100_000, 86_400, namespace="ssd-guard-outcome")
    return SSDGuard(scorer, pol, cache=_SHARED_CACHE, retriever=retriever)


# --------------------------------------------------------------------------- RAG + tools
def load_corpus(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def rag_part(guard: Any, chat: Any, corpus: dict[str, Any], split: str) -> dict[str, Any]:
    """Screen each question's retrieved set with the policy's document rules, then answer
    with the kept documents (and, for comparison, with all of them)."""
    from ssd_guard.guard import format_context

    questions = [q for q in corpus["questions"] if q["split"] == split]
    injections = [x["text"] for x in corpus["injections"] if x["split"] == split]
    distractors = [x["text"] for x in corpus.get("distractors", []) if x.get("split") == split]
    counts = {k: [0, 0] for k in ("relevant", "wrong", "injection", "distractor")}
    right_all = right_screened = 0
    for n, q in enumerate(questions):
        others = [o["relevant"] for o in questions if o is not q]
        pool = distractors + others
        docs: list[tuple[str, str]] = [("relevant", q["relevant"])]
        docs += [("wrong", w) for w in q.get("wrong", [])]
        docs += [("distractor", pool[(n * 7 + j * 13) % len(pool)]) for j in range(2)]
        docs.append(("injection", injections[n % len(injections)]))
        texts = [d for _, d in docs]
        ctx = guard.guard.screen_documents(q["question"], texts, source="retrieval")
        kept = set(ctx.documents)
        for kind, text in docs:
            counts[kind][0] += text not in kept
            counts[kind][1] += 1
        item = Item(q["id"], "rag", split, q["question"], tuple(q["aliases"]))
        ans_all = str(chat.invoke(messages_for(format_context(q["question"], texts))).content)
        kept_docs = [t for t in texts if t in kept]
        ans_scr = str(chat.invoke(messages_for(format_context(q["question"], kept_docs))).content)
        right_all += item.correct(ans_all)
        right_screened += item.correct(ans_scr)
    nq = len(questions)
    return {
        "n_questions": nq,
        "relevant_dropped": counts["relevant"][0] / counts["relevant"][1],
        "wrong_doc_dropped": counts["wrong"][0] / max(1, counts["wrong"][1]),
        "injection_dropped": counts["injection"][0] / counts["injection"][1],
        "distractor_dropped": counts["distractor"][0] / counts["distractor"][1],
        "accuracy_unscreened": right_all / nq,
        "accuracy_screened": right_screened / nq,
    }


def tool_part(guard: Any, corpus: dict[str, Any], split: str) -> dict[str, Any]:
    """A scripted tool-calling model in a LangChain v1 agent with the guard's middleware:
    it calls ``lookup`` once and then answers; the tool returns a clean or an injected
    output. A dropped output is one the middleware replaced."""
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    tools_rows = [t for t in corpus["tools"] if t["split"] == split]
    dropped = {True: [0, 0], False: [0, 0]}
    # The policy's document rules only: its prompt / answer rules are measured on the QA
    # part (a scripted question abstained before the tool runs would measure nothing).
    pol = guard.guard.policy
    pol = pol.model_copy(update={"rules": [r for r in pol.rules if r.scope == "document"]})
    guard = make_guard(guard.guard.scorer, pol)
    for n, row in enumerate(tools_rows):
        output = row["text"]

        @tool
        def lookup(query: str, _output: str = output) -> str:
            """Look something up."""
            return _output

        script = iter(
            [
                AIMessage(
                    "",
                    tool_calls=[
                        {
                            "name": "lookup",
                            "args": {"query": row.get("query", "info")},
                            "id": f"c{n}",
                        }
                    ],
                ),
                AIMessage("Done."),
            ]
        )

        class Scripted(GenericFakeChatModel):
            def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
                return self

        model = Scripted(messages=script, cache=False)  # the LLM cache would drop tool calls
        agent = create_agent(model, tools=[lookup], middleware=[guard.middleware(model=model)])
        question = f"Use the {row.get('tool', 'lookup')} tool and tell me what it returns."
        state = agent.invoke({"messages": [HumanMessage(question)]})
        tool_msgs = [m for m in state["messages"] if isinstance(m, ToolMessage)]
        was_dropped = bool(tool_msgs) and str(tool_msgs[0].content) != output
        injected = bool(row.get("injected"))
        dropped[injected][0] += was_dropped
        dropped[injected][1] += 1
    return {
        "n_tool_outputs": len(tools_rows),
        "tool_injection_dropped": dropped[True][0] / max(1, dropped[True][1]),
        "tool_clean_dropped": dropped[False][0] / max(1, dropped[False][1]),
    }


def stratified(items: Sequence[Item], n: int) -> list[int]:
    """Indices of about *n* items, the same share from every source (fixed order)."""
    sources = sorted({i.source for i in items})
    per = max(1, n // len(sources))
    out: list[int] = []
    for src in sources:
        out += [k for k, i in enumerate(items) if i.source == src][:per]
    return sorted(out)


def paths_part(
    scorer: Any, chat: Any, pol: Any, items: Sequence[Item], base: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The policy through the agent middleware (``create_agent``) and through
    ``GuardedLocalModel`` (its own greedy generation: its unguarded baseline is
    ``GuardedLocalModel.generate``), on the same questions as the ``wrap()`` path."""
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage

    from ssd_guard.integrations.langchain import result_message
    from ssd_guard.local import GuardedLocalModel

    out: dict[str, Any] = {"n": len(items)}
    guard = make_guard(scorer, pol)
    agent = create_agent(
        chat, tools=[], system_prompt=SYSTEM_PROMPT, middleware=[guard.middleware(model=chat)]
    )
    keys, _ = guarded_pass(
        lambda it: agent.invoke({"messages": [HumanMessage(it.question)]})["messages"][-1],
        items,
        base,
    )
    out["middleware"] = keys
    guard = make_guard(scorer, pol)
    runner = GuardedLocalModel(guard.guard, max_new_tokens=32)
    local_base = [{"right": it.correct(runner.generate(it.question))} for it in items]
    keys, _ = guarded_pass(lambda it: result_message(runner.invoke(it.question)), items, local_base)
    out["guarded_local_model"] = keys
    return out


def _f(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}"


def render_markdown(result: dict[str, Any]) -> str:
    """The tables of an outcome result (``<out>.md``; docs/results is generated from it)."""
    lines = [
        "# Outcome benchmark — SmolLM2-135M-Instruct through LangChain, bundled student",
        "",
        f"Command: `{result['meta']['command']}`  ",
        f'Student {result["meta"]["student"]}, system prompt "{result["meta"]["system_prompt"]}", '
        f"greedy, {result['meta']['n_items']} questions per split (pooled: TriviaQA, "
        "CommonsenseQA, Social IQa, StrategyQA, ARC-Easy).",
        "",
        "harm = share of the answers right unguarded that the guard blocks or turns wrong; "
        "catch = share of the wrong answers it blocks or fixes; answered error = error among "
        "the answers it lets through. Guard ms: the guard's own time per question (the "
        "model's generations come from a LangChain cache); the first policy runs on a cold "
        "score cache, the others share it (warm), as guards sharing a Redis cache would. "
        "The policies' thresholds were chosen on the validation half "
        "(benchmarks/outcome_thresholds.py -> outcome-thresholds-smollm2.json).",
        "",
    ]
    present = {sp for e in result["policies"].values() for sp in e if sp in ("test", "validation")}
    for split in [sp for sp in ("test", "validation") if sp in present]:
        lines += [
            f"## {split} half: shipped policies through `SSDGuard.wrap(ChatHuggingFace)`",
            "",
            "| policy | unguarded acc | guarded acc | harm | catch | answered error | "
            "unguarded error | abstain | retrieve | regenerate | guard ms (median, score cache) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in result["policies"].items():
            k = entry.get(split)
            if not k:
                continue
            lat = k.get("latency_ms", {}).get("median")
            lines.append(
                f"| {name} | {_f(k['unguarded_accuracy'])} | {_f(k['guarded_accuracy'])} | "
                f"{_f(k['harm_rate'])} | {_f(k['catch_rate'])} | {_f(k['answered_error'])} | "
                f"{_f(k['unguarded_error'])} | {_f(k['abstain_rate'])} | "
                f"{_f(k.get('retrieval_rate'))} | {_f(k.get('regeneration_rate'))} | "
                f"{'—' if lat is None else f'{lat:.0f}'} ({k.get('score_cache', '?')}) |"
            )
        lines += ["", f"### {split}: RAG screening and tool outputs", ""]
        lines += [
            "| policy | relevant dropped | wrong-answer doc dropped | injection dropped | "
            "distractor dropped | acc. unscreened | acc. screened | tool injection dropped | "
            "tool clean dropped |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in result["policies"].items():
            r = entry.get("rag", {}).get(split)
            t = entry.get("tools", {}).get(split)
            if not r or not t:
                continue
            lines.append(
                f"| {name} | {_f(r['relevant_dropped'])} | {_f(r['wrong_doc_dropped'])} | "
                f"{_f(r['injection_dropped'])} | {_f(r['distractor_dropped'])} | "
                f"{_f(r['accuracy_unscreened'])} | {_f(r['accuracy_screened'])} | "
                f"{_f(t['tool_injection_dropped'])} | {_f(t['tool_clean_dropped'])} |"
            )
        lines.append("")
    paths = result["policies"].get("default", {}).get("paths")
    if paths:
        lines += [
            f"## default policy through each integration (test, {paths['n']} questions)",
            "",
            "| path | unguarded acc | guarded acc | harm | catch | answered error |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("wrap", "middleware", "guarded_local_model"):
            k = paths.get(name)
            if k:
                lines.append(
                    f"| {name} | {_f(k['unguarded_accuracy'])} | {_f(k['guarded_accuracy'])} | "
                    f"{_f(k['harm_rate'])} | {_f(k['catch_rate'])} | {_f(k['answered_error'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: Path) -> None:
    """``<out>.md`` (tables) and ``<out>.png`` (accuracy / harm / catch per policy)."""
    out.with_suffix(".md").write_text(render_markdown(result), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n, e in result["policies"].items() if "test" in e]
    keys = ("unguarded_accuracy", "guarded_accuracy", "harm_rate", "catch_rate", "answered_error")
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.16
    for j, key in enumerate(keys):
        vals = [result["policies"][n]["test"][key] for n in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=key)
    ax.set_xticks([i + 2 * width for i in range(len(names))], names)
    ax.set_ylim(0, 1)
    ax.set_title("Shipped policies on the test half (SmolLM2-135M, pooled sets)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/smollm2-chat")
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--out", default="benchmarks/results/outcome-smollm2")
    ap.add_argument("--cache-dir", default="runs/outcome-cache")
    ap.add_argument("--corpus", default="benchmarks/data/rag_corpus.json")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--splits", default="validation,test")
    ap.add_argument("--limit", type=int, default=None, help="questions per split and source")
    ap.add_argument("--paths", action="store_true", help="also middleware + GuardedLocalModel")
    ap.add_argument("--path-questions", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--recipe", default="training/smollm2-chat.yaml")
    ap.add_argument(
        "--extra",
        type=int,
        default=0,
        help="unseen rows per source and split beyond the recipe's limit",
    )
    ap.add_argument(
        "--generate-only", action="store_true", help="fill the generation cache and stop"
    )
    ap.add_argument(
        "--exclude-train-of",
        default="training/smollm2-pooled.yaml",
        help="leave out the training rows of these recipes (comma-separated)",
    )
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from ssd_guard.cli_demo import KeywordRetriever, load_chat_model
    from ssd_guard.scoring.ssd import SSDScorer

    splits = args.splits.split(",")
    items_all = load_items(Path(args.workdir), splits)
    if args.limit:
        seen: dict[tuple[str, str], int] = {}
        kept = []
        for it in items_all:
            key = (it.split, it.source)
            if seen.get(key, 0) < args.limit:
                kept.append(it)
                seen[key] = seen.get(key, 0) + 1
        items_all = kept
    if args.extra:
        items_all += [i for i in extra_items(Path(args.recipe), args.extra) if i.split in splits]
    if args.exclude_train_of:
        seen_rows = trained_ids(args.exclude_train_of.split(","))
        items_all = [i for i in items_all if row_key(i.id) not in seen_rows]
    install_llm_cache(Path(args.cache_dir) / "generations.jsonl")
    from ssd_guard.audit import configure_audit

    configure_audit(Path(args.cache_dir) / "audit.jsonl")  # events of every guarded call
    log("loading SmolLM2 and the student")
    lm, chat = load_chat_model(max_new_tokens=args.max_new_tokens)
    if args.generate_only:
        for split in splits:
            items = [i for i in items_all if i.split == split]
            base = unguarded_pass(chat, items, log)
            acc = sum(r["right"] for r in base) / max(1, len(base))
            log(f"{split}: {len(items)} questions, unguarded accuracy {acc:.3f}")
        return 0
    scorer = SSDScorer.load(args.artifact, lm=lm)
    corpus_path = Path(args.corpus)
    corpus = load_corpus(corpus_path) if corpus_path.is_file() else None
    retriever_docs = []
    if corpus is not None:
        retriever_docs = [q["relevant"] for q in corpus["questions"]] + [
            x["text"] for x in corpus["injections"]
        ]
    retriever = KeywordRetriever(retriever_docs, k=3) if retriever_docs else None

    result: dict[str, Any] = {
        "meta": {
            "command": "python "
            + " ".join([str(Path(sys.argv[0]).as_posix()), *(argv or sys.argv[1:])]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": lm.model_id,
            "student": scorer.fingerprint,
            "artifact": args.artifact,
            "system_prompt": SYSTEM_PROMPT,
            "max_new_tokens": args.max_new_tokens,
            "decoding": "greedy (HuggingFacePipeline do_sample=False)",
            "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "n_items": {s: sum(i.split == s for i in items_all) for s in splits},
        },
        "policies": {},
    }
    per_question: dict[str, Any] = {}
    for split in splits:
        items = [i for i in items_all if i.split == split]
        log(f"{split}: unguarded pass over {len(items)} questions")
        t0 = time.perf_counter()
        base = unguarded_pass(chat, items, log)
        result["meta"].setdefault("generation_ms", {})[split] = (
            (time.perf_counter() - t0) * 1000 / max(1, len(items))
        )
        per_question[f"{split}/unguarded"] = base
        for name in args.policies.split(","):
            pol = load_policy_in_memory(name)
            guard = make_guard(scorer, pol, retriever)
            guarded = guard.wrap(chat)
            log(f"{split}: policy {name}")
            keys, rows = guarded_pass(
                lambda it, g=guarded: g.invoke(messages_for(it.question)), items, base
            )
            entry = result["policies"].setdefault(name, {"file": str(pol.sha256[:12])})
            keys["score_cache"] = "cold" if name == args.policies.split(",")[0] else "warm"
            entry[split] = keys
            per_question[f"{split}/{name}"] = rows
            if corpus is not None:
                entry.setdefault("rag", {})[split] = rag_part(guard, chat, corpus, split)
                entry.setdefault("tools", {})[split] = tool_part(guard, corpus, split)
            if args.paths and split == "test" and name == "default":
                idx = stratified(items, args.path_questions)
                wrap_keys = outcome_keys(
                    [rows[k]["base_right"] for k in idx],
                    [rows[k]["right"] for k in idx],
                    [rows[k]["abstained"] for k in idx],
                )
                sub, sub_base = [items[k] for k in idx], [base[k] for k in idx]
                entry["paths"] = {"wrap": wrap_keys, **paths_part(scorer, chat, pol, sub, sub_base)}
            log(
                f"{split}: {name}: "
                + json.dumps({k: v for k, v in keys.items() if k != "by_source"}, default=str)[:400]
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.cache_dir, "per_question.json").write_text(json.dumps(per_question, indent=1))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    log(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
