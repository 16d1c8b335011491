"""Triton-style model repositories (trtserve-repo writes, the server loads and serves them), one process serving
two engines, non-decoupled unary ModelInfer, and the trtserve-client CLI against both APIs."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from grpc_service.client import NativeClient, Sampling
from grpc_service.repository import RepositoryError, read_repository
from tests.helpers.grpc_fixtures import Reference, ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def llama_engine_dir(build_tiny: Callable[..., Path]) -> Path:
    return build_tiny("tiny-llama")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, tiny_engine_dir: Path, llama_engine_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("model_repo")
    qwen = run_cli("grpc_service.repository_cli", "--engine", str(tiny_engine_dir), "--output", str(root),
                   "--decoupled", "false")
    assert qwen.returncode == 0, qwen.stderr
    llama = run_cli("grpc_service.repository_cli", "--engine", str(llama_engine_dir), "--output", str(root),
                    "--prefix", "llama")
    assert llama.returncode == 0, llama.stderr
    return root


@pytest.fixture(scope="module")
def repo_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    server = ServerProcess.start(["--model-repository", str(repository)], tmp_path_factory.mktemp("grpc-repo"))
    yield server
    server.stop()


def test_repository_layout(repository: Path, tiny_engine_dir: Path) -> None:
    names = sorted(p.name for p in repository.iterdir())
    assert names == ["ensemble", "llama_ensemble", "llama_postprocessing", "llama_preprocessing",
                     "llama_tensorrt_llm", "postprocessing", "preprocessing", "tensorrt_llm"]
    for name in names:
        assert (repository / name / "1").is_dir()
        config = text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == name and config.max_batch_size == 16
    ensemble = text_format.Parse((repository / "ensemble" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert ensemble.platform == "ensemble" and not ensemble.model_transaction_policy.decoupled
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["preprocessing", "tensorrt_llm",
                                                                         "postprocessing"]
    engine = (repository / "ensemble" / ensemble.parameters["engine_dir"].string_value).resolve()
    assert engine == tiny_engine_dir.resolve()


def test_one_process_serves_both_engines(repo_server: ServerProcess, tiny_engine_dir: Path,
                                         llama_engine_dir: Path) -> None:
    with NativeClient(repo_server.target, timeout_s=60) as client:
        cards = {c.name for c in client.models()}
        assert cards == {Reference(tiny_engine_dir).core.engine.name, Reference(llama_engine_dir).core.engine.name}
        for name in cards:
            assert client.generate("both engines", Sampling(max_tokens=3, ignore_eos=True), model=name) \
                .completion_tokens == 3


def test_model_config_comes_from_the_repository(repo_server: ServerProcess, repository: Path) -> None:
    client = tc.InferenceServerClient(repo_server.target)
    served = client.get_model_config("tensorrt_llm").config
    on_disk = text_format.Parse((repository / "tensorrt_llm" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert served == on_disk
    assert client.get_model_config("llama_ensemble").config.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("../tensorrt_llm")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_unary_infer_on_a_non_decoupled_ensemble(repo_server: ServerProcess, tiny_engine_dir: Path) -> None:
    reference = Reference(tiny_engine_dir)
    expected, expected_ids = reference.greedy(reference.encode("unary please"), 10)
    client = tc.InferenceServerClient(repo_server.target)
    inputs = [tc.InferInput("text_input", [1, 1], "BYTES"), tc.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[b"unary please"]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[10]], dtype=np.int32))
    result = client.infer("ensemble", inputs, request_id="u1")
    assert result.get_response().id == "u1"
    assert result.as_numpy("text_output").reshape(-1)[0].decode() == "unary please" + expected
    stream = tc.InferInput("stream", [1, 1], "BOOL")
    stream.set_data_from_numpy(np.array([[True]]))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", inputs + [stream])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "stream" in info.value.message()
    ids = reference.encode("unary please")
    llm_inputs = [tc.InferInput("input_ids", [1, len(ids)], "INT32"), tc.InferInput("input_lengths", [1, 1], "INT32"),
                  tc.InferInput("request_output_len", [1, 1], "INT32"),
                  tc.InferInput("exclude_input_in_output", [1, 1], "BOOL")]
    for t, value in zip(llm_inputs, (np.array([ids], np.int32), np.array([[len(ids)]], np.int32),
                                     np.array([[10]], np.int32), np.array([[True]]))):
        t.set_data_from_numpy(value)
    assert list(client.infer("tensorrt_llm", llm_inputs).as_numpy("output_ids")[0, 0]) == expected_ids


def test_bad_repositories_are_refused_before_serving(tmp_path: Path, repository: Path) -> None:
    bad_name = tmp_path / "names"
    (bad_name / "bad name!").mkdir(parents=True)
    with pytest.raises(RepositoryError, match="not a valid model name"):
        read_repository(bad_name)
    broken = tmp_path / "broken"
    (broken / "ensemble" / "1").mkdir(parents=True)
    (broken / "ensemble" / "config.pbtxt").write_text("name: 'ensemble' max_batch_size: banana")
    with pytest.raises(RepositoryError, match="ensemble/config.pbtxt"):
        read_repository(broken)
    edited = tmp_path / "edited"
    (edited / "ensemble" / "1").mkdir(parents=True)
    text = (repository / "ensemble" / "config.pbtxt").read_text().replace("TYPE_INT32", "TYPE_INT64", 1)
    (edited / "ensemble" / "config.pbtxt").write_text(text)
    with pytest.raises(RepositoryError, match="must be TYPE_INT32"):
        read_repository(edited)
    result = run_cli("grpc_service.server_cli", "--model-repository", str(bad_name), "--port", "0",
                     "--no-metrics")
    assert result.returncode == 2 and "not a valid model name" in result.stderr


def test_client_cli_against_both_apis(repo_server: ServerProcess) -> None:
    url = ["--url", repo_server.target]
    health = run_cli("grpc_service.client_cli", *url, "health")
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    models = run_cli("grpc_service.client_cli", *url, "models")
    assert models.returncode == 0 and "tiny-qwen2" in models.stdout
    name = models.stdout.split()[0]
    for command in ("generate", "stream"):
        result = run_cli("grpc_service.client_cli", *url, "--model", name, command, "Hello", "--max-tokens", "5")
        assert result.returncode == 0, result.stderr
    chat = run_cli("grpc_service.client_cli", *url, "--model", name, "chat", "Hi", "--max-tokens", "5")
    assert chat.returncode == 0 and "generated tokens" in chat.stdout
    triton = run_cli("grpc_service.client_cli", *url, "--api", "triton", "--model", "llama_ensemble", "stream",
                     "Hello", "--max-tokens", "5")
    assert triton.returncode == 0, triton.stderr
    triton_models = run_cli("grpc_service.client_cli", *url, "--api", "triton", "models")
    assert "llama_tensorrt_llm\tREADY" in triton_models.stdout
    unknown = run_cli("grpc_service.client_cli", *url, "--model", "nope", "generate", "x")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_server_config_defaults_env_and_limits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from grpc_service.config import ServerConfig, ServerConfigError

    monkeypatch.setenv("TRTSERVE_SERVER_MAX_QUEUE_SIZE", "3")
    monkeypatch.setenv("TRTSERVE_SERVER_ENABLE_METRICS", "false")
    config = ServerConfig.from_env(engine_dirs=(tmp_path,), port=0)
    assert (config.max_queue_size, config.enable_metrics, config.port, config.host) == (3, False, 0, "127.0.0.1")
    for overrides, field in (({"port": 70000}, "port"), ({"max_queue_size": -1}, "max_queue_size"),
                             ({"grace_period_s": float("nan")}, "grace_period_s"),
                             ({"max_receive_message_bytes": 10}, "max_receive_message_bytes"),
                             ({"model_repository": tmp_path}, "engine_dirs")):
        with pytest.raises(ServerConfigError) as info:
            ServerConfig.from_env(engine_dirs=(tmp_path,), **overrides)
        assert info.value.field == field
    monkeypatch.setenv("TRTSERVE_SERVER_PORT", "eighty")
    with pytest.raises(ServerConfigError, match="TRTSERVE_SERVER_PORT"):
        ServerConfig.from_env(engine_dirs=(tmp_path,))
