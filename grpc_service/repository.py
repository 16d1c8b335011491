"""Triton-style model repositories: write one for an engine, and read one back for the server.

What it is for: `write_repository` lays out `OUT/<model>/config.pbtxt` plus the
version folder `1/` for the four models of an engine (`trtserve-repo`);
`read_repository` parses each `config.pbtxt` with the model_config protobuf's
text format into a `RepositoryModel` (name, role, config, engine directory).
A repository may declare the image inputs only for an engine with a vision
tower (the server checks once the engine is loaded). Every directory name is
checked as a model name before any file inside it is touched; config files are size-capped; each config must declare only tensors
this server implements, and every tensor its role requires, with the same
dtype (so a hand-edited config cannot make a request reach a missing tensor).
Not for: loading engines (server.py) or serving (triton_*).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from grpc_service.errors import InvalidArgument
from grpc_service.registry import check_model_name
from grpc_service.triton_schema import (
    ENGINE_PARAMETER,
    ENSEMBLE,
    ENSEMBLE_VISION_INPUTS,
    ROLE_PARAMETER,
    ROLE_TENSORS,
    ROLES,
    TENSORRT_LLM,
    RepositoryNames,
    default_configs,
)
from runtime.errors import FieldError

CONFIG_FILE = "config.pbtxt"
VERSION_DIR = "1"
MAX_CONFIG_BYTES = 1 << 20


class RepositoryError(FieldError):
    """A model repository cannot be served; `field` names the file (and what in it)."""


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    name: str
    role: str
    config: mc.ModelConfig
    engine_dir: Path


def write_repository(output: Path, engine_dir: Path, names: RepositoryNames, max_batch_size: int,
                     decoupled: bool = True, vision: bool = False) -> list[Path]:
    """Write the four models' folders; `engine_dir` is recorded relative to each model folder when possible.
    `vision`: the engine is a vision-language one (its ensemble declares the image inputs)."""
    written = []
    for config in default_configs(names, max_batch_size, "", decoupled, vision):
        model_dir = output / check_model_name(config.name)
        (model_dir / VERSION_DIR).mkdir(parents=True, exist_ok=True)
        config.parameters[ENGINE_PARAMETER].string_value = os.path.relpath(engine_dir.resolve(), model_dir.resolve())
        path = model_dir / CONFIG_FILE
        path.write_text(text_format.MessageToString(config))
        written.append(path)
    return written


def read_repository(root: Path) -> list[RepositoryModel]:
    if not root.is_dir():
        raise RepositoryError("model_repository", f"{root} is not a directory")
    models = []
    for entry in sorted(os.listdir(root)):
        if entry.startswith("."):
            continue
        try:
            check_model_name(entry)
        except InvalidArgument:
            raise RepositoryError(entry[:64], "not a valid model name (1-128 of [A-Za-z0-9_.-]); "
                                              "rename or remove it") from None
        model_dir = root / entry
        if model_dir.is_dir():
            models.append(_read_model(root, model_dir))
    if not models:
        raise RepositoryError("model_repository", f"{root} holds no model folders")
    return models


def _read_model(root: Path, model_dir: Path) -> RepositoryModel:
    name = model_dir.name
    path = model_dir / CONFIG_FILE
    where = f"{name}/{CONFIG_FILE}"
    if not path.is_file() or not path.resolve().is_relative_to(root.resolve()):
        raise RepositoryError(where, "missing (or not a file inside the repository)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise RepositoryError(where, f"larger than {MAX_CONFIG_BYTES} bytes")
    config = mc.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise RepositoryError(where, f"not a valid ModelConfig in text format ({exc})") from None
    if config.name and config.name != name:
        raise RepositoryError(where, f"name {config.name!r} differs from its folder name {name!r}")
    config.name = name
    if not any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()):
        raise RepositoryError(name, "has no version folder (e.g. 1/)")
    role = _role(config, where)
    _check_tensors(config, role, where)
    return RepositoryModel(name, role, config, _engine_dir(config, model_dir, where))


def _role(config: mc.ModelConfig, where: str) -> str:
    role = config.parameters[ROLE_PARAMETER].string_value if ROLE_PARAMETER in config.parameters else ""
    if not role:
        role = ENSEMBLE if config.platform == "ensemble" else TENSORRT_LLM if config.backend == "tensorrtllm" else ""
    if role not in ROLES:
        raise RepositoryError(where, f"parameters.{ROLE_PARAMETER} must be one of {ROLES}, got {role!r}")
    return role


def _check_tensors(config: mc.ModelConfig, role: str, where: str) -> None:
    inputs, outputs = ROLE_TENSORS[role]
    if role == ENSEMBLE:
        inputs = inputs + ENSEMBLE_VISION_INPUTS      # the server checks the engine has a vision tower
    for kind, declared, table in (("input", config.input, inputs), ("output", config.output, outputs)):
        known = {row[0]: row for row in table}
        for spec in declared:
            row = known.get(spec.name)
            if row is None:
                raise RepositoryError(where, f"{kind} {spec.name!r} is not implemented for role {role!r}")
            if mc.DataType.Name(spec.data_type) != row[1]:
                raise RepositoryError(where, f"{kind} {spec.name!r} must be {row[1]}, "
                                             f"not {mc.DataType.Name(spec.data_type)}")
    required = {row[0] for row in inputs if not row[3]}
    missing = required - {spec.name for spec in config.input if not spec.optional}
    if missing:
        raise RepositoryError(where, f"required input(s) {sorted(missing)} must be declared, not optional")


def _engine_dir(config: mc.ModelConfig, model_dir: Path, where: str) -> Path:
    value = config.parameters[ENGINE_PARAMETER].string_value if ENGINE_PARAMETER in config.parameters else ""
    if not value:
        raise RepositoryError(where, f"parameters.{ENGINE_PARAMETER} must name the engine directory")
    path = Path(value) if Path(value).is_absolute() else (model_dir / value)
    path = path.resolve()
    if not (path / "engine.json").is_file():
        raise RepositoryError(where, f"parameters.{ENGINE_PARAMETER}: {value!r} is not an engine directory")
    return path
