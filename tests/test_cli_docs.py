"""The README and the docs agree with the code: op schemas, the examples and docs they list, the fresh-machine
commands (the ones a user copies first).

Each of these disagreed once: the op schemas lacked ``chunk_means``, the README left out ``docs/training.md`` and three
examples, and its "CPU build" command installs the CUDA build from PyPI.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import moba_compile  # noqa: F401 - registers the moba:: ops

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
INDEX = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
CI = (REPO / ".ci" / "run").read_text(encoding="utf-8")


def _documented_schemas() -> dict[str, str]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"## The ops\n\n```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no op schema block under '## The ops'"
    schemas: dict[str, str] = {}
    for entry in re.split(r"\n(?=moba::)", block[1].strip()):
        flat = " ".join(entry.split())
        schemas[flat.split("(")[0]] = flat.replace("( ", "(")
    return schemas


# Every module that defines moba:: ops (found by their torch.library.custom_op calls). Imported here because not all
# of them load with ``import moba_compile`` (flash_merge loads with context parallelism): without this, what the test
# saw depended on which test files ran before it in the same worker, and CI's worker saw cp_dense_flash, undocumented.
_OP_MODULES = sorted(
    p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
    for p in (REPO / "moba_compile").rglob("*.py")
    if "torch.library.custom_op(" in p.read_text(encoding="utf-8")
)


for _module in _OP_MODULES:
    importlib.import_module(_module)


@pytest.mark.parametrize("op", sorted(_documented_schemas()))
def test_architecture_op_schemas_are_the_registered_ones(op: str) -> None:
    registered = str(getattr(torch.ops.moba, op.removeprefix("moba::")).default._schema)
    assert _documented_schemas()[op] == registered


def test_every_registered_op_is_documented() -> None:
    assert "moba_compile.flash_merge" in _OP_MODULES and "moba_compile.ops" in _OP_MODULES
    registered = {f"moba::{name}" for name in dir(torch.ops.moba) if not name.startswith("_")}
    registered = {name for name in registered if hasattr(getattr(torch.ops.moba, name[6:]), "default")}
    assert registered == set(_documented_schemas())


# Modules whose names start with "_" are the examples' shared code (examples/_training.py), not examples to run.
@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("[!_]*.py")))
def test_readme_and_index_list_every_example(example: str) -> None:
    assert example in README
    assert example in INDEX


@pytest.mark.parametrize("doc", sorted(p.name for p in (REPO / "docs").glob("*.md")))
def test_readme_and_index_link_every_doc(doc: str) -> None:
    assert f"(docs/{doc})" in README
    if doc != "index.md":
        assert f"({doc})" in INDEX


def test_readme_fresh_machine_commands_are_what_ci_runs() -> None:
    setup, tests = re.findall(r"```bash\n(.*?)\n```", README, re.S)[:2]
    # The install command pins the torch CI installs, and the CPU index for an ordinary machine is given beside it.
    pin = re.search(r"pip install -q (torch==[\d.]+)\n", CI)
    assert pin and f'pip install {pin[1]} && pip install -e ".[test]"' in setup
    assert f"pip install {pin[1]} --index-url https://download.pytorch.org/whl/cpu" in README
    # The tests command is the first pytest CI runs (less the cache option, which keeps CI's checkout clean).
    first_pytest = next(line.strip() for line in CI.splitlines() if "python -m pytest" in line)
    assert first_pytest.replace(" -p no:cacheprovider", "") == tests.split("&&")[-1].strip()
