"""The outcome benchmark's keys (benchmarks/outcome.py) on hand-made outcomes."""

import importlib.util
import sys

import pytest
from helpers.paths import ROOT

# benchmarks/outcome.py, loaded by path (a PyPI package is called `outcome` too).
_PATH = ROOT / "benchmarks" / "outcome.py"
_spec = importlib.util.spec_from_file_location("ssd_outcome_benchmark", _PATH)
assert _spec is not None and _spec.loader is not None
_mod = importlib.util.module_from_spec(_spec)
sys.modules["ssd_outcome_benchmark"] = _mod
_spec.loader.exec_module(_mod)
Item, outcome_keys = _mod.Item, _mod.outcome_keys


def test_outcome_keys_count_harm_and_catch() -> None:
    # 4 right unguarded, 6 wrong; the guard abstains on 1 right (harm) and 3 wrong
    # (caught), turns 1 right answer wrong (harm) and fixes 1 wrong one (caught).
    base = [True] * 4 + [False] * 6
    abst = [True, False, False, False, True, True, True, False, False, False]
    right = [False, False, True, True, False, False, False, True, False, False]
    k = outcome_keys(base, right, abst, retrieved=[False] * 9 + [True])
    assert k["unguarded_accuracy"] == pytest.approx(0.4)
    assert k["guarded_accuracy"] == pytest.approx(0.3)
    assert k["harm_rate"] == pytest.approx(2 / 4)
    assert k["catch_rate"] == pytest.approx(4 / 6)
    assert k["answered_error"] == pytest.approx(3 / 6)
    assert k["abstain_rate"] == pytest.approx(0.4) and k["retrieval_rate"] == pytest.approx(0.1)


def test_items_grade_open_and_multiple_choice_answers() -> None:
    open_q = Item("t:1", "triviaqa", "test", "Who wrote Hamlet?", ("William Shakespeare",))
    assert open_q.correct("Hamlet was written by William Shakespeare.")
    assert not open_q.correct("Christopher Marlowe")
    mc = Item("c:1", "commonsense_qa", "test", "Q?\nA. bank\nB. mall", (), ("bank", "mall"), 1)
    assert mc.correct("B. mall") and not mc.correct("A. bank")
    yn = Item("s:1", "strategy_qa", "test", "Is it?", (), ("Yes", "No"), 1)
    assert yn.correct("No, it is not.") and not yn.correct("Yes.")
