"""The shape of the Rust code, as ARCHITECTURE.md describes it: crates by concern, modules of a readable size, no
import circle. Read from the sources (no build): each rule names the file or the modules that break it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from kvablocal.sidecar import REPO

# The tools and the server (the filter's core and the fuzz crate are out of these rules: the core is a tower of
# pure modules kept whole on purpose, and the fuzz models follow the code they test).
CRATES = {"contract": "contract/src", "ledger": "ledger/src", "serve": "serve/src", "judge": "judge/src",
          "kvab": "sidecar/src", "filter-glue": "filter/wasm/src"}
MAX_CODE_LINES = 600
MAX_INLINE_TEST_LINES = 300
# Crates that must build without an async runtime, an HTTP stack or a Kubernetes client.
PURE = {"contract": "contract/Cargo.toml", "ledger": "ledger/Cargo.toml", "judge": "judge/Cargo.toml"}
HEAVY = {"tokio", "hyper", "hyper-util", "kube", "k8s-openapi", "warp", "reqwest"}


def sources(root: str) -> list[Path]:
    return sorted((REPO / root).rglob("*.rs"))


def is_test_file(path: Path) -> bool:
    return path.name == "tests.rs" or path.parent.name == "tests"


def split_code_and_tests(text: str) -> tuple[list[str], list[str]]:
    """The lines before the first column-0 `#[cfg(test)]` (the code) and from there on (the inline tests)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line == "#[cfg(test)]":
            return lines[:i], lines[i:]
    return lines, []


def test_no_module_is_over_600_lines_of_code_or_holds_over_300_lines_of_tests():
    too_big = []
    for root in CRATES.values():
        for path in sources(root):
            if is_test_file(path):
                continue
            code, tests = split_code_and_tests(path.read_text())
            if len(code) > MAX_CODE_LINES:
                too_big.append(f"{path.relative_to(REPO)}: {len(code)} lines of code")
            if len(tests) > MAX_INLINE_TEST_LINES:
                too_big.append(f"{path.relative_to(REPO)}: {len(tests)} lines of inline tests (move them to a file)")
    assert not too_big, "\n".join(too_big)


def module_of(path: Path, root: Path) -> str:
    """`check::options` for sidecar/src/check/options.rs, `check` for check/mod.rs, `` for main.rs / lib.rs."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] in ("mod", "main", "lib"):
        parts = parts[:-1]
    return "::".join(parts)


USE_CRATE = re.compile(r"\bcrate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)")
USE_SUPER = re.compile(r"\bsuper::([a-z_][a-z0-9_]*)")


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the sibling-level modules its non-test code names (`crate::x::…`, `super::x`), at the
    depth where the two paths part (a module's use of its own children is no edge)."""
    modules = {module_of(p, root) for p in sorted(root.rglob("*.rs")) if not is_test_file(p)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in sorted(root.rglob("*.rs")):
        if is_test_file(path):
            continue
        me = module_of(path, root)
        code, _ = split_code_and_tests(path.read_text())
        text = "\n".join(line for line in code if not line.lstrip().startswith("//"))
        named = set()
        for m in USE_CRATE.finditer(text):
            parts = m[1].split("::")
            # the longest prefix that is a module
            for n in range(len(parts), 0, -1):
                if "::".join(parts[:n]) in modules:
                    named.add("::".join(parts[:n]))
                    break
        # `super` is the parent of the module the file is, whether the file is `x.rs` or `x/mod.rs`.
        parent = me.rsplit("::", 1)[0] if "::" in me else ""
        for m in USE_SUPER.finditer(text):
            target = f"{parent}::{m[1]}" if parent else m[1]
            if target in modules:
                named.add(target)
        for other in named:
            if other == me or other.startswith(me + "::") or me.startswith(other + "::"):
                continue
            graph[me].add(other)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_the_modules_of_a_crate():
    circles = {name: cycles(imports(REPO / root)) for name, root in CRATES.items()}
    assert not any(circles.values()), {name: c for name, c in circles.items() if c}


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_judge_the_ledger_and_the_contract_build_without_a_runtime_http_or_kubernetes():
    for name, manifest in PURE.items():
        dependencies = tomllib.loads((REPO / manifest).read_text()).get("dependencies", {})
        heavy = HEAVY & set(dependencies)
        assert not heavy, f"{name} depends on {sorted(heavy)}"
        # Their own workspace crates must be pure too.
        for dep, spec in dependencies.items():
            if isinstance(spec, dict) and "path" in spec:
                assert dep in {"kvab-contract", "kvab-ledger", "kvab-judge"}, f"{name} depends on {dep}"
    fuzz = tomllib.loads((REPO / "fuzz" / "Cargo.toml").read_text())["dependencies"]
    assert "kvab-ledger" in fuzz and not HEAVY & set(fuzz), sorted(fuzz)
    assert "#[path" not in (REPO / "fuzz" / "src" / "lib.rs").read_text()
