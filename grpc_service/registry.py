"""Which models this server serves, by name, for both APIs; and whether they are ready.

What it is for: `ModelRegistry`, the lookup every RPC goes through: served
engines by engine name (native API), Triton models by model name (KServe API),
with one validation of client-given names (`check_model_name`, also used
before any file-system access when a repository is loaded) and the errors for
unknown (NOT_FOUND), loading or draining (UNAVAILABLE) models.
Not for: loading (server.py) or what a model does (engine_host / triton_models).
"""
from __future__ import annotations

import re

from grpc_service.engine_host import ServedModel
from grpc_service.errors import InvalidArgument, ModelNotFound, Unavailable
from grpc_service.triton_models import TritonModel
from grpc_service.triton_schema import ENSEMBLE
from grpc_service.triton_stats import MODEL_VERSION

MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
SERVED_VERSION = MODEL_VERSION


def check_model_name(name: str, field: str = "model") -> str:
    """Letters, digits, '_', '.', '-'; 1-128 characters; not starting with '.' or '-' (so never '..')."""
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(field, f"{name[:64]!r} is not a valid model name "
                                     "(1-128 of [A-Za-z0-9_.-], starting with a letter, digit or '_')")
    return name


class ModelRegistry:
    def __init__(self) -> None:
        self._served: dict[str, ServedModel] = {}
        self._triton: dict[str, TritonModel] = {}
        self.loading = True

    def add_served(self, model: ServedModel) -> None:
        if model.name in self._served:
            raise ValueError(f"two engines are named {model.name!r}; rename one (engine.json name)")
        self._served[model.name] = model

    def add_triton(self, model: TritonModel) -> None:
        if model.name in self._triton:
            raise ValueError(f"two Triton models are named {model.name!r}")
        self._triton[model.name] = model
        self._link_ensembles()

    def _link_ensembles(self) -> None:
        """Give each ensemble the statistics of the composing models its steps name (those served here on
        the same engine), so that an ensemble request counts on them too (whatever order they load in)."""
        for model in self._triton.values():
            if model.role != ENSEMBLE:
                continue
            steps = [self._triton.get(step.model_name) for step in model.config.ensemble_scheduling.step]
            model.composing = {m.role: m.stats for m in steps if m is not None and m.served is model.served}

    @property
    def served_models(self) -> list[ServedModel]:
        return list(self._served.values())

    @property
    def triton_models(self) -> list[TritonModel]:
        return list(self._triton.values())

    @property
    def ready(self) -> bool:
        return not self.loading and all(m.ready for m in self._served.values())

    def served_model(self, name: str, field: str = "model") -> ServedModel:
        """The engine for a native request; an empty name means the only one served."""
        self._check_loaded()
        if not name:
            if len(self._served) == 1:
                return next(iter(self._served.values()))
            raise InvalidArgument(field, f"required: this server serves {sorted(self._served)}")
        model = self._served.get(check_model_name(name, field))
        if model is None:
            raise ModelNotFound(name)
        return self._ensure_ready(model)

    def triton_model(self, name: str, version: str = "", must_be_ready: bool = True) -> TritonModel:
        self._check_loaded()
        model = self._triton.get(check_model_name(name, "model_name"))
        if model is None:
            raise ModelNotFound(name)
        if version not in ("", SERVED_VERSION):
            raise ModelNotFound(name, version)
        if must_be_ready:
            self._ensure_ready(model.served)
        return model

    def _check_loaded(self) -> None:
        if self.loading:
            raise Unavailable("the server is loading models; retry when health reports SERVING")

    @staticmethod
    def _ensure_ready(model: ServedModel) -> ServedModel:
        if not model.ready:
            raise Unavailable(f"model {model.name!r} is not ready")
        return model
