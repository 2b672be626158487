"""A guarded agent loop, offline: what ``ssd-guard demo`` runs.

SmolLM2-135M-Instruct answers a few TriviaQA questions through LangChain
(``ChatHuggingFace`` over a local ``HuggingFacePipeline``). The bundled SSD student is
loaded on the *same* model object, so the guard reads the guarded model's own hidden
states (``hidden_state_source = "guarded-model"``). Before each answer the policy may
abstain (the model is not called) or retrieve context from a tiny in-memory corpus;
after it, an unlikely answer is rejected and regenerated. Every decision is printed and
written as one ``guard.decision`` JSON line to the audit log.

    python examples/agent_loop.py [--policy policies/default.yaml] [--questions 6]
                                  [--audit-log runs/agent_loop.jsonl] [--agent]

``--agent`` runs a ``langchain.agents.create_agent`` agent with ``SSDGuardMiddleware``
instead of the ``SSDGuard.wrap`` Runnable.
"""

from __future__ import annotations

import argparse
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from ssd_guard.audit import close_audit, configure_audit
from ssd_guard.cache import MemoryCache
from ssd_guard.cli_demo import (
    DEMO_QUESTIONS,
    SYSTEM_PROMPT,
    KeywordRetriever,
    format_result,
    load_chat_model,
)
from ssd_guard.integrations.langchain import SSDGuard
from ssd_guard.policy import load_default_policy, load_policy


def build(policy: Any, scorer: Any = None, chat_model: Any = None) -> tuple[SSDGuard, Any]:
    """The guard and the chat model; the bundled ones unless given."""
    if chat_model is None or scorer is None:
        lm, chat = load_chat_model("smollm2", max_new_tokens=24)
        chat_model = chat_model or chat
        if scorer is None:
            from ssd_guard.scoring.ssd import SSDScorer

            scorer = SSDScorer.load(policy.student, lm=lm)  # shares SmolLM2's weights
    guard = SSDGuard(scorer, policy, cache=MemoryCache(), retriever=KeywordRetriever())
    return guard, chat_model


def main(argv: list[str] | None = None, *, scorer: Any = None, chat_model: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", help="policy YAML (default: the shipped one)")
    parser.add_argument("--questions", type=int, default=len(DEMO_QUESTIONS))
    parser.add_argument("--audit-log", default="runs/agent_loop.jsonl")
    parser.add_argument("--agent", action="store_true", help="create_agent + middleware")
    args = parser.parse_args(argv)

    policy = load_policy(args.policy) if args.policy else load_default_policy()
    configure_audit(args.audit_log)
    guard, chat_model = build(policy, scorer, chat_model)
    if args.agent:
        from langchain.agents import create_agent

        agent = create_agent(
            chat_model,
            tools=[],
            system_prompt=SYSTEM_PROMPT,
            middleware=[guard.middleware(model=chat_model)],
        )

        def ask(question: str) -> Any:
            return agent.invoke({"messages": [HumanMessage(question)]})["messages"][-1]

    else:
        guarded = guard.wrap(chat_model)  # abstain / retrieve / reject+regenerate / flag

        def ask(question: str) -> Any:
            return guarded.invoke([SystemMessage(SYSTEM_PROMPT), HumanMessage(question)])

    try:
        for i, item in enumerate(DEMO_QUESTIONS[: args.questions], 1):
            print(format_result(i, item.question, ask(item.question), item.answer))
    finally:
        close_audit()
    print(f"audit log: {args.audit_log}  (try: ssd-guard audit {args.audit_log})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
