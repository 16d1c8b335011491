"""The packages' dependency arrows, checked on the source: every import (top-level, in a function, under
TYPE_CHECKING, relative, or a constant `importlib.import_module` / `__import__` string) of every module in
the six packages must follow an allowed arrow; a failure names the module, the line and the import.

Arrows (docs/architecture.md): grpc_service -> runtime, engine_format; runtime -> plugins, engine_format;
builder -> engine_format, plugins, and -> runtime only from the validation step and the vision-tower export
(BUILDER_MODULES_USING_RUNTIME); bench -> the client side of grpc_service only (client, proto, launcher),
and that client side imports nothing else of the project; engine_format and plugins import none of the
others. benchmarks/ (scripts) and tests/ sit on top of everything and are not checked. The last test
keeps docs/architecture.md true to the tree: every repository path it quotes exists.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine_format", "builder", "runtime", "plugins", "grpc_service", "bench")
ALLOWED: dict[str, frozenset[str]] = {
    "engine_format": frozenset(),
    "plugins": frozenset(),
    "runtime": frozenset({"plugins", "engine_format"}),
    "builder": frozenset({"engine_format", "plugins"}),
    "grpc_service": frozenset({"runtime", "engine_format"}),
    "bench": frozenset(),
}
# the validation step (parity with HF, the vision tower across backends, a quantized build against its float
# model, perplexity beside HF) runs the built engine; the ONNX export traces the runtime's one vision tower; a VL
# engine's calibration (LLM and int8 vision graph) runs the runtime's processor and vision encoder on its images
BUILDER_MODULES_USING_RUNTIME = frozenset({"builder.validate", "builder.validate_vision", "builder.quantize_validate",
                                           "builder.perplexity", "builder.vision_export", "builder.quantize_vl",
                                           "builder.quantize_validate_vl", "builder.vision_quant"})
GRPC_CLIENT_SIDE = ("grpc_service.client", "grpc_service.proto", "grpc_service.launcher")
IMPORT_FUNCTIONS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True, slots=True)
class Import:
    module: str     # the importing module, dotted
    target: str     # the imported module, dotted and absolute
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool, known_modules: frozenset[str]) -> list[Import]:
    """Every import in `source`; `from pkg import sub` resolves to `pkg.sub` where that is a known module."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(node, module, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(Import(module, sub if sub in known_modules else target, node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in IMPORT_FUNCTIONS:
                found.append(Import(module, node.args[0].value, node.lineno))
    return found


def violation(imp: Import) -> str | None:
    """Why `imp` points the wrong way, or None when the arrow is allowed."""
    source, target = imp.module.split(".")[0], imp.target.split(".")[0]
    if target not in PACKAGES:
        return None                                  # standard library or a third-party package
    if _within(imp.module, GRPC_CLIENT_SIDE) and not _within(imp.target, GRPC_CLIENT_SIDE):
        return f"the gRPC client side may import only {', '.join(GRPC_CLIENT_SIDE)}"
    if source == target:
        return None
    if source == "bench":
        if _within(imp.target, GRPC_CLIENT_SIDE):
            return None
        return f"bench may import only the gRPC client side ({', '.join(GRPC_CLIENT_SIDE)})"
    if source == "builder" and target == "runtime" and imp.module in BUILDER_MODULES_USING_RUNTIME:
        return None
    if target in ALLOWED[source]:
        return None
    allowed = ", ".join(sorted(ALLOWED[source])) or "no other project package"
    return f"{source} may import {allowed}"


def scan(root: Path) -> tuple[list[Import], list[str]]:
    """(every import of the six packages under `root`, one message per wrong-way arrow)."""
    files = sorted(f for pkg in PACKAGES if (root / pkg).is_dir() for f in (root / pkg).rglob("*.py"))
    known = frozenset(module_name(f, root) for f in files)
    imports = [imp for f in files
               for imp in imports_of(f.read_text(encoding="utf-8"), module_name(f, root), f.name == "__init__.py",
                                     known)]
    problems = list(dict.fromkeys(f"{imp.module} (line {imp.line}) imports {imp.target}: {why}"
                                  for imp in imports if (why := violation(imp)) is not None))
    return imports, problems


def test_every_import_follows_the_arrows() -> None:
    imports, problems = scan(ROOT)
    assert not problems, "imports pointing the wrong way:\n" + "\n".join(problems)
    # the scan really saw the tree: every package has modules, and the known arrows are among the imports
    modules = {imp.module.split(".")[0] for imp in imports}
    assert modules == set(PACKAGES), modules
    arrows = {(imp.module.split(".")[0], imp.target.split(".")[0]) for imp in imports}
    for arrow in [("grpc_service", "runtime"), ("runtime", "plugins"), ("runtime", "engine_format"),
                  ("builder", "engine_format"), ("builder", "runtime"), ("bench", "grpc_service")]:
        assert arrow in arrows, arrow


KNOWN = frozenset({"grpc_service.client", "grpc_service.engine_host", "grpc_service.proto",
                   "grpc_service.proto.trtserve_pb2", "runtime.config"})


def _problems(module: str, source: str, is_package: bool = False) -> list[str]:
    return [f"{imp.target}: {why}" for imp in imports_of(source, module, is_package, KNOWN)
            if (why := violation(imp)) is not None]


def test_checker_flags_wrong_arrows_wherever_the_import_sits() -> None:
    assert _problems("runtime.core.scheduler", "from grpc_service.engine_host import EngineHost") == [
        "grpc_service.engine_host: runtime may import engine_format, plugins"]
    assert _problems("plugins.registry", "def f():\n    import runtime.config\n") == [
        "runtime.config: plugins may import no other project package"]
    assert _problems("engine_format.engine_dir", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                 "    from builder.pipeline import BuildRequest\n") == [
        "builder.pipeline: engine_format may import no other project package"]
    assert _problems("engine_format.llm_config", "from ..runtime import config") == [
        "runtime.config: engine_format may import no other project package"]
    assert _problems("runtime.core", "from ..executor import model", is_package=True) == []
    assert _problems("runtime.executor.model", "import importlib\nimportlib.import_module('builder.convert')") == [
        "builder.convert: runtime may import engine_format, plugins"]


def test_checker_limits_builder_and_bench_to_their_exceptions() -> None:
    assert _problems("builder.pipeline", "from runtime.executor.model import DecoderModel") == [
        "runtime.executor.model: builder may import engine_format, plugins"]
    assert _problems("builder.validate", "from runtime.executor.model import DecoderModel") == []
    assert _problems("bench.runner", "from grpc_service import client\nfrom grpc_service.proto import trtserve_pb2") \
        == []
    assert _problems("bench.runner", "from grpc_service.engine_host import EngineHost") == [
        "grpc_service.engine_host: bench may import only the gRPC client side "
        "(grpc_service.client, grpc_service.proto, grpc_service.launcher)"]
    assert _problems("bench.cli", "from runtime.config import EngineConfig") == [
        "runtime.config: bench may import only the gRPC client side "
        "(grpc_service.client, grpc_service.proto, grpc_service.launcher)"]
    assert _problems("grpc_service.client", "from grpc_service import engine_host") == [
        "grpc_service.engine_host: the gRPC client side may import only "
        "grpc_service.client, grpc_service.proto, grpc_service.launcher"]
    assert _problems("grpc_service.native_service", "from runtime.config import EngineConfig\nimport numpy") == []


def test_scan_fails_on_a_tree_with_a_wrong_way_import(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "runtime" / "engine.py").write_text("from engine_format import manifest\n")
    (tmp_path / "engine_format" / "manifest.py").write_text("import os\n\n\ndef f():\n    from runtime import engine\n")
    imports, problems = scan(tmp_path)
    assert problems == ["engine_format.manifest (line 5) imports runtime.engine: "
                        "engine_format may import no other project package"]
    assert Import("runtime.engine", "engine_format.manifest", 1) in imports


def test_architecture_doc_names_only_existing_files() -> None:
    """docs/architecture.md stays true to the tree: every repository path it quotes exists."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    roots = PACKAGES + ("tests", "benchmarks", "docs")
    quoted = {q.split()[0] for q in re.findall(r"`([^`]+)`", text)}
    paths = sorted(q for q in quoted if "/" in q and q.split("/")[0] in roots and "{" not in q)
    assert len(paths) > 30, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"
