"""Shared test helpers (moved from test_prefill_counts.py; used by several test modules)."""

from __future__ import annotations

from ssd_guard.policy import Policy


def _policy(answer_action: str = "log_only", max_regenerations: int = 2) -> Policy:
    """Every scope reads its score; answers always match (``loglik < 10^9``)."""
    extra = (
        f"\n    max_regenerations: {max_regenerations}" if answer_action == "reject_answer" else ""
    )
    return Policy.from_yaml_text(
        f"""
version: 1
name: count-passes
abstain_message: ABSTAIN
default_action: allow
rules:
  - name: watch-prompt
    scope: prompt
    when: {{entropy: {{gt: -1000000000}}}}
    action: log_only
  - name: every-answer
    scope: answer
    when: {{loglik: {{lt: 1000000000}}}}
    action: {answer_action}{extra}
  - name: watch-documents
    scope: document
    when: {{loglik: {{lt: 1000000000}}}}
    action: log_only
"""
    )
