"""The layout's rules, checked on the source: imports go downward only, nobody edits sys.path, the C++ codes header
is generated from lora_kernels/codes.py, and every doc reference in the code resolves to a heading."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "pandas", "tqdm", "datasets", "transformers", "peft", "weightwatcher", "powerlaw")


def _modules(package: str) -> dict[str, pathlib.Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import of a file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for n in tree.body:   # imports guarded by `if TYPE_CHECKING` or try at module level still count as module level
        for sub in ast.walk(n):
            top_level.add(id(sub)) if isinstance(n, (ast.If, ast.Try)) else None
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((name, id(node) in top_level))
            out += [(f"{name}.{a.name}", id(node) in top_level) for a in node.names]
    return out


def _violations(package: str, forbidden: tuple[str, ...], exclude: tuple[str, ...] = (),
                module_level_only: bool = False) -> list[str]:
    bad = []
    for mod, path in _modules(package).items():
        if mod.startswith(exclude):
            continue
        for name, top in _imports(mod, path):
            if (top or not module_level_only) and (name in forbidden or name.startswith(tuple(f + "." for f in
                                                                                                 forbidden))):
                bad.append(f"{mod} imports {name}")
    return sorted(set(bad))


def test_kernels_never_import_upward():
    assert _violations("lora_kernels", ("python_api", "bench", "tests")) == []


def test_library_never_imports_app_or_benchmarks():
    assert _violations("python_api", ("python_api.app", "bench", "tests"), exclude=("python_api.app",)) == []


def test_heavy_packages_only_lazily():
    """The library imports no heavy package at module level (the app may, but only inside functions)."""
    assert _violations("lora_kernels", HEAVY + ("triton",), exclude=("lora_kernels.gated_lora.triton",
                                                                     "lora_kernels.sensitivity.triton"),
                       module_level_only=True) == []
    assert _violations("python_api", HEAVY, module_level_only=True) == []


def test_no_sys_path_edits():
    offenders = [str(p.relative_to(ROOT)) for d in ("lora_kernels", "python_api", "bench", "tests")
                 for p in (ROOT / d).rglob("*.py") if re.search(r"sys\.path\.(insert|append)", p.read_text())
                 and p.name != "test_architecture.py"]
    assert offenders == []


def test_codes_header_is_generated_from_codes_py():
    from lora_kernels import codes
    assert (ROOT / "csrc" / "codes.h").read_text() == codes.c_header(), \
        "csrc/codes.h is stale: run `python -m lora_kernels.codes > csrc/codes.h`"


def test_compiled_modules_use_the_generated_codes():
    """No second hand-typed list: the C++ enums take their values from codes.h."""
    text = (ROOT / "csrc" / "common_types.h").read_text()
    assert '#include "codes.h"' in text
    for enum in ("kF32 = codes::kDTypeF32", "kGateRank = codes::kGateRank", "kKindB = codes::kKindB"):
        assert enum in text


def _headings(doc: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^#+ (§[\d.]+)", (ROOT / "docs" / doc).read_text(), re.M)}


@pytest.mark.parametrize("doc", ["ALGORITHMS.md", "PERFORMANCE.md"])
def test_doc_references_resolve(doc):
    have = _headings(doc)
    missing = []
    for d in ("lora_kernels", "python_api", "bench", "csrc", "tests"):
        for p in (ROOT / d).rglob("*"):
            if p.suffix not in (".py", ".h", ".cu", ".cpp", ".cuh", ".md") or not p.is_file():
                continue
            for m in re.finditer(re.escape(doc) + r"\s*(§[\d.]+)", p.read_text(errors="replace")):
                if m.group(1).rstrip(".") not in have:
                    missing.append(f"{p.relative_to(ROOT)}: {m.group(0)}")
    assert (ROOT / "docs" / doc).is_file()
    assert missing == []


def test_architecture_doc_names_every_folder():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    folders = ["lora_kernels/gated_lora", "lora_kernels/sensitivity", "lora_kernels/spectra", "python_api/allocators",
               "python_api/app", "csrc", "bench", "tests"]
    assert [f for f in folders if f"`{f}/`" not in text] == []
