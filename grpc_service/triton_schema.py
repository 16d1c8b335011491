"""The Triton model configurations of the TensorRT-LLM backend's four models, as `ModelConfig` protos.

What it is for: the tensor names, dtypes and dims of `ensemble`,
`tensorrt_llm`, `preprocessing` and `postprocessing` exactly as the
tensorrtllm_backend's `inflight_batcher_llm` repository declares them
(REFERENCE.md section 2), restricted to the tensors this server implements,
plus `default_configs(...)`, which fills them in for one engine. The ensemble
of a vision-language engine also declares the multimodal ensemble's image
inputs (`ENSEMBLE_VISION_INPUTS`); a text engine's schema does not, so its
ensemble refuses them as unknown tensors. The server
serves these when started with `--engine`; `trtserve-repo` writes them as
`config.pbtxt`; a loaded repository's own config.pbtxt replaces them.
Not for: judging request values (triton_params.py) or decoding tensors
(triton_tensors.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

ENSEMBLE, TENSORRT_LLM, PREPROCESSING, POSTPROCESSING = "ensemble", "tensorrt_llm", "preprocessing", "postprocessing"
ROLES = (ENSEMBLE, TENSORRT_LLM, PREPROCESSING, POSTPROCESSING)
ROLE_PARAMETER = "trtserve_role"        # which of the four behaviours a model has
ENGINE_PARAMETER = "engine_dir"         # the engine directory it serves (relative: to the model's folder)

# (name, data type, dims after the batch dimension, optional)
TensorRow = tuple[str, str, tuple[int, ...], bool]

_SAMPLING_COMMON: tuple[TensorRow, ...] = (
    ("num_return_sequences", "TYPE_INT32", (1,), True),
    ("end_id", "TYPE_INT32", (1,), True),
    ("pad_id", "TYPE_INT32", (1,), True),
    ("temperature", "TYPE_FP32", (1,), True),
    ("repetition_penalty", "TYPE_FP32", (1,), True),
    ("min_tokens", "TYPE_INT32", (1,), True),
    ("min_length", "TYPE_INT32", (1,), True),           # older name of min_tokens
    ("presence_penalty", "TYPE_FP32", (1,), True),
    ("frequency_penalty", "TYPE_FP32", (1,), True),
    ("seed", "TYPE_UINT64", (1,), True),
    ("random_seed", "TYPE_UINT64", (1,), True),         # older name of seed
    ("return_log_probs", "TYPE_BOOL", (1,), True),
    ("return_context_logits", "TYPE_BOOL", (1,), True),
    ("return_generation_logits", "TYPE_BOOL", (1,), True),
    ("return_perf_metrics", "TYPE_BOOL", (1,), True),
    ("exclude_input_in_output", "TYPE_BOOL", (1,), True),
    ("beam_width", "TYPE_INT32", (1,), True),
    ("stop", "TYPE_BOOL", (1,), True),
    ("guided_decoding_guide_type", "TYPE_STRING", (1,), True),   # json | json_schema | regex | ebnf_grammar
    ("guided_decoding_guide", "TYPE_STRING", (1,), True),
)

ENSEMBLE_INPUTS: tuple[TensorRow, ...] = (
    ("text_input", "TYPE_STRING", (1,), False),
    ("max_tokens", "TYPE_INT32", (1,), False),
    ("bad_words", "TYPE_STRING", (-1,), True),
    ("stop_words", "TYPE_STRING", (-1,), True),
    ("top_k", "TYPE_INT32", (1,), True),
    ("top_p", "TYPE_FP32", (1,), True),
    ("length_penalty", "TYPE_FP32", (1,), True),
    ("stream", "TYPE_BOOL", (1,), True),
) + _SAMPLING_COMMON

# The backend's multimodal ensemble (all_models/multimodal/ensemble): raw uint8 pixels
# [num_images, H, W, C] or [num_images, C, H, W] per request, or URLs; a video as its frames.
ENSEMBLE_VISION_INPUTS: tuple[TensorRow, ...] = (
    ("image_bytes_input", "TYPE_UINT8", (-1, -1, -1, -1), True),
    ("image_url_input", "TYPE_STRING", (-1,), True),
    ("video_bytes_input", "TYPE_UINT8", (-1, -1, -1, -1), True),
)
VISION_INPUT_NAMES = frozenset(row[0] for row in ENSEMBLE_VISION_INPUTS)

TENSORRT_LLM_INPUTS: tuple[TensorRow, ...] = (
    ("input_ids", "TYPE_INT32", (-1,), False),
    ("input_lengths", "TYPE_INT32", (1,), False),
    ("request_output_len", "TYPE_INT32", (1,), False),
    ("stop_words_list", "TYPE_INT32", (2, -1), True),
    ("bad_words_list", "TYPE_INT32", (2, -1), True),
    ("runtime_top_k", "TYPE_INT32", (1,), True),
    ("runtime_top_p", "TYPE_FP32", (1,), True),
    ("len_penalty", "TYPE_FP32", (1,), True),
    ("streaming", "TYPE_BOOL", (1,), True),
) + _SAMPLING_COMMON

_PERF_OUTPUTS: tuple[TensorRow, ...] = (
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", (1,), False),
    ("kv_cache_reused_blocks", "TYPE_INT32", (1,), False),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", (1,), False),
    ("arrival_time_ns", "TYPE_INT64", (1,), False),
    ("first_scheduled_time_ns", "TYPE_INT64", (1,), False),
    ("first_token_time_ns", "TYPE_INT64", (1,), False),
    ("last_token_time_ns", "TYPE_INT64", (1,), False),
    ("acceptance_rate", "TYPE_FP32", (1,), False),              # speculative decoding: always 0 here
    ("total_accepted_draft_tokens", "TYPE_INT32", (1,), False),
    ("total_draft_tokens", "TYPE_INT32", (1,), False),
)
PERF_OUTPUT_NAMES = frozenset(row[0] for row in _PERF_OUTPUTS)
LOGITS_OUTPUT_NAMES = frozenset(("context_logits", "generation_logits"))
_COMMON_OUTPUTS: tuple[TensorRow, ...] = (
    ("cum_log_probs", "TYPE_FP32", (-1,), False),
    ("output_log_probs", "TYPE_FP32", (-1, -1), False),
    ("context_logits", "TYPE_FP32", (-1, -1), False),           # logits are not returned: always empty
    ("generation_logits", "TYPE_FP32", (-1, -1, -1), False),
    ("batch_index", "TYPE_INT32", (1,), False),
    ("sequence_index", "TYPE_INT32", (1,), False),
) + _PERF_OUTPUTS

ENSEMBLE_OUTPUTS = (("text_output", "TYPE_STRING", (-1,), False),) + _COMMON_OUTPUTS
TENSORRT_LLM_OUTPUTS = (("output_ids", "TYPE_INT32", (-1, -1), False),
                        ("sequence_length", "TYPE_INT32", (-1,), False)) + _COMMON_OUTPUTS

PREPROCESSING_INPUTS: tuple[TensorRow, ...] = (
    ("QUERY", "TYPE_STRING", (1,), False),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,), False),
    ("BAD_WORDS_DICT", "TYPE_STRING", (-1,), True),
    ("STOP_WORDS_DICT", "TYPE_STRING", (-1,), True),
    ("END_ID", "TYPE_INT32", (1,), True),
    ("PAD_ID", "TYPE_INT32", (1,), True),
)
PREPROCESSING_OUTPUTS: tuple[TensorRow, ...] = (
    ("INPUT_ID", "TYPE_INT32", (-1,), False),
    ("REQUEST_INPUT_LEN", "TYPE_INT32", (1,), False),
    ("BAD_WORDS_IDS", "TYPE_INT32", (2, -1), False),
    ("STOP_WORDS_IDS", "TYPE_INT32", (2, -1), False),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", (-1,), False),
    ("OUT_END_ID", "TYPE_INT32", (1,), False),
    ("OUT_PAD_ID", "TYPE_INT32", (1,), False),
)
POSTPROCESSING_INPUTS: tuple[TensorRow, ...] = (
    ("TOKENS_BATCH", "TYPE_INT32", (-1, -1), False),
    ("SEQUENCE_LENGTH", "TYPE_INT32", (-1,), False),
)
POSTPROCESSING_OUTPUTS: tuple[TensorRow, ...] = (("OUTPUT", "TYPE_STRING", (-1,), False),)

ROLE_TENSORS = {
    ENSEMBLE: (ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS),
    TENSORRT_LLM: (TENSORRT_LLM_INPUTS, TENSORRT_LLM_OUTPUTS),
    PREPROCESSING: (PREPROCESSING_INPUTS, PREPROCESSING_OUTPUTS),
    POSTPROCESSING: (POSTPROCESSING_INPUTS, POSTPROCESSING_OUTPUTS),
}


@dataclass(frozen=True, slots=True)
class RepositoryNames:
    """The model names of one engine's four models."""

    ensemble: str = ENSEMBLE
    tensorrt_llm: str = TENSORRT_LLM
    preprocessing: str = PREPROCESSING
    postprocessing: str = POSTPROCESSING

    @classmethod
    def prefixed(cls, prefix: str) -> RepositoryNames:
        return cls(*(f"{prefix}_{role}" for role in ROLES))

    def of(self, role: str) -> str:
        return {ENSEMBLE: self.ensemble, TENSORRT_LLM: self.tensorrt_llm,
                PREPROCESSING: self.preprocessing, POSTPROCESSING: self.postprocessing}[role]


def kserve_datatype(data_type: int) -> str:
    """model_config DataType -> the KServe v2 datatype string (TYPE_STRING is BYTES on the wire)."""
    name = mc.DataType.Name(data_type)
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def model_config(role: str, names: RepositoryNames, max_batch_size: int, engine_dir: str,
                 decoupled: bool = True, vision: bool = False) -> mc.ModelConfig:
    """The config of one of the four models. `decoupled` applies to ensemble and tensorrt_llm only;
    `vision` (a vision-language engine) adds the image inputs to the ensemble."""
    inputs, outputs = ROLE_TENSORS[role]
    if vision and role == ENSEMBLE:
        inputs = inputs + ENSEMBLE_VISION_INPUTS
    config = mc.ModelConfig(name=names.of(role), max_batch_size=max_batch_size)
    if role == ENSEMBLE:
        config.platform = "ensemble"
        _add_ensemble_steps(config, names)
    else:
        config.backend = "tensorrtllm" if role == TENSORRT_LLM else "python"
    if role in (ENSEMBLE, TENSORRT_LLM):
        config.model_transaction_policy.decoupled = decoupled
    for name, data_type, dims, optional in inputs:
        config.input.add(name=name, data_type=mc.DataType.Value(data_type), dims=dims, optional=optional)
    for name, data_type, dims, _ in outputs:
        config.output.add(name=name, data_type=mc.DataType.Value(data_type), dims=dims)
    if role != ENSEMBLE:
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.parameters[ROLE_PARAMETER].string_value = role
    config.parameters[ENGINE_PARAMETER].string_value = engine_dir
    return config


def default_configs(names: RepositoryNames, max_batch_size: int, engine_dir: str,
                    decoupled: bool = True, vision: bool = False) -> list[mc.ModelConfig]:
    return [model_config(role, names, max_batch_size, engine_dir, decoupled, vision) for role in ROLES]


def _add_ensemble_steps(config: mc.ModelConfig, names: RepositoryNames) -> None:
    """Preprocessing -> tensorrt_llm -> postprocessing, as the backend's ensemble wires them (documentation:
    this server runs the three steps as one fused request, so it reads these maps but does not execute them)."""
    pre = config.ensemble_scheduling.step.add(model_name=names.preprocessing, model_version=-1)
    pre.input_map.update({"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens",
                          "BAD_WORDS_DICT": "bad_words", "STOP_WORDS_DICT": "stop_words",
                          "END_ID": "end_id", "PAD_ID": "pad_id"})
    pre.output_map.update({"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
                           "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "BAD_WORDS_IDS": "_BAD_WORDS_IDS",
                           "STOP_WORDS_IDS": "_STOP_WORDS_IDS", "OUT_END_ID": "_PREPROCESSOR_END_ID",
                           "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID"})
    llm = config.ensemble_scheduling.step.add(model_name=names.tensorrt_llm, model_version=-1)
    llm.input_map.update({"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN",
                          "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_PREPROCESSOR_END_ID",
                          "pad_id": "_PREPROCESSOR_PAD_ID", "stop_words_list": "_STOP_WORDS_IDS",
                          "bad_words_list": "_BAD_WORDS_IDS", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
                          "len_penalty": "length_penalty", "streaming": "stream"})
    for name, *_ in _SAMPLING_COMMON:
        if name not in ("end_id", "pad_id"):
            llm.input_map[name] = name
    llm.output_map.update({"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"})
    for name, *_ in _COMMON_OUTPUTS:
        llm.output_map[name] = name
    post = config.ensemble_scheduling.step.add(model_name=names.postprocessing, model_version=-1)
    post.input_map.update({"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"})
    post.output_map.update({"OUTPUT": "text_output"})
