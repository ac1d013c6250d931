"""Imports point downward only: every module of ``signround`` has a rank (the table below, longest dotted
prefix wins) and may import only modules of its own rank or below.

The check is static (``ast``): module-level and function-level imports, ``TYPE_CHECKING`` blocks included,
``import a.b`` and ``from a import b`` (``b`` counts as the submodule ``a.b`` when there is one), relative
imports resolved against the importing module's package. A package's ``__init__.py`` has its package's
rank; as importing ``signround.act.quant`` runs ``signround/act/__init__.py`` first, a subpackage's init
may not rank above the lowest module inside it (so it must stay light). The root ``signround/__init__.py``
ranks last (the public API) and loads the heavy parts lazily.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "signround"

# Lowest first; a module may import only from its own rank or below.
RANKS: dict[str, int] = {
    "signround.errors": 0,
    "signround._version": 0,
    "signround.primitives": 0,
    "signround.paths": 0,
    "signround.formats": 1,
    "signround.config": 2,
    "signround.act": 3,  # the package init; its low module is act.quant
    "signround.act.quant": 3,
    "signround.dist": 3,
    "signround.devices": 3,
    "signround.report": 3,
    "signround.pack": 4,
    "signround.model": 5,  # the package init; model.load ranks higher
    "signround.model.blocks": 5,
    "signround.model.experts": 5,
    "signround.model.files": 5,
    "signround.model.accounting": 5,
    "signround.model.lazy": 5,
    "signround.model.tokenizer": 5,
    "signround.calib": 5,
    "signround.tune": 6,
    "signround.act.calibrate": 7,
    "signround.act.smooth": 7,
    "signround.act.bitplane": 7,
    "signround.mixed": 7,
    "signround.runstate": 7,
    "signround.pipeline": 8,
    "signround.export": 9,
    "signround.eval": 9,
    "signround.model.load": 10,  # the user-facing loader reads every checkpoint format: above export
    "signround.plan": 10,  # decides schemes with the exporters' layer mixes and checks: above export
    "signround.api": 11,  # the orchestrator: plan, then the pipeline's block loop
    "signround": 11,
    "signround.cli_args": 11,
    "signround.cli": 11,
}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` under ``root / package`` (``__init__.py`` named as
    its package)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def rank_of(module: str, ranks: dict[str, int]) -> tuple[str, int] | None:
    """``(entry, rank)`` of the longest entry of ``ranks`` that is ``module`` or a dotted prefix of it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ranks:
            return prefix, ranks[prefix]
    return None


def imported_modules(name: str, path: Path, modules: dict[str, Path], package: str) -> list[tuple[int, str]]:
    """``[(line, module)]``: every module of ``package`` that the file imports, anywhere in it."""
    is_init = path.name == "__init__.py"
    here = name.split(".") if is_init else name.split(".")[:-1]  # the package relative imports start from
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here[: len(here) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else base))
    unique = dict.fromkeys((line, m) for line, m in found if m == package or m.startswith(package + "."))
    return list(unique)


def upward_imports(root: Path, package: str, ranks: dict[str, int]) -> list[str]:
    """One line per violation: an upward import, a module the table does not place, or a subpackage init
    ranked above a module inside it."""
    modules = module_files(root, package)
    problems = []
    for name, path in modules.items():
        own = rank_of(name, ranks)
        if own is None or (own[0] == package and name != package):
            problems.append(f"{name} has no entry in the rank table (only {package!r} matches); add one")
            continue
        for line, target in imported_modules(name, path, modules, package):
            theirs = rank_of(target, ranks)
            if theirs is not None and theirs[1] > own[1]:
                where = f"{path.relative_to(root)}:{line}"
                problems.append(f"{name} (rank {own[1]}) imports {target} (rank {theirs[1]} > {own[1]}) at {where}")
        if path.name == "__init__.py" and name != package:
            inside = [rank_of(m, ranks) for m in modules if m.startswith(name + ".")]
            lowest = min((r[1] for r in inside if r is not None), default=own[1])
            if own[1] > lowest:
                problems.append(
                    f"{name} (package init, rank {own[1]}) ranks above a module inside it (rank {lowest}); "
                    "importing that module runs the init first"
                )
    return problems


def test_imports_point_downward_only():
    problems = upward_imports(ROOT, PACKAGE, RANKS)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_check_catches_upward_relative_unplaced_and_heavy_init(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("")
    (pkg / "high.py").write_text("import pkg.base\n")
    (pkg / "low" / "__init__.py").write_text("from pkg.low import heavy\n")  # a heavy package init
    (pkg / "low" / "light.py").write_text("def f():\n    from ..high import x\n")  # relative, in a function
    (pkg / "low" / "heavy.py").write_text("from pkg import high\n")
    (pkg / "stray.py").write_text("")
    ranks = {"pkg": 9, "pkg.base": 0, "pkg.low": 1, "pkg.low.light": 1, "pkg.low.heavy": 5, "pkg.high": 3}
    problems = upward_imports(tmp_path, "pkg", ranks)
    assert problems == [
        "pkg.low (rank 1) imports pkg.low.heavy (rank 5 > 1) at pkg/low/__init__.py:1",
        "pkg.low.light (rank 1) imports pkg.high (rank 3 > 1) at pkg/low/light.py:2",
        "pkg.stray has no entry in the rank table (only 'pkg' matches); add one",
    ]
    ranks["pkg.low"] = 4  # an init ranked above the modules inside it
    assert "pkg.low (package init, rank 4) ranks above a module inside it (rank 1)" in "\n".join(
        upward_imports(tmp_path, "pkg", ranks)
    )


@pytest.mark.parametrize(("module", "rank"), [("signround.pack.packed", 4), ("signround.model.blocks", 5)])
def test_importing_a_low_module_loads_nothing_above_it(module, rank):
    """At run time too: the modules a fresh interpreter has loaded after importing ``module`` rank at most
    as high, apart from what ``import signround`` itself loads (the root init's config and errors)."""
    code = (
        "import json, sys\n"
        "import signround\n"
        "base = {m for m in sys.modules if m.startswith('signround')}\n"
        f"import {module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('signround') and m not in base)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    above = [m for m in loaded if rank_of(m, RANKS)[1] > rank]
    assert module in loaded and not above, f"importing {module} loads {above}"
