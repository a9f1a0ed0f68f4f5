"""What nemotron-deploy knows about GPUs and models, in one place.

The data lives in `gpus.yaml` and `models.yaml` beside this file: adding a GPU type or a model size
is one entry there. A model can also be read from a NeMo checkpoint's own `model_config.yaml`
(`ModelSpec.from_model_config`), so any Megatron GPT checkpoint can be sized.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HERE = Path(__file__).resolve().parent
GIB = 1024**3

# Activations whose MLP has a gate (three matrices instead of two).
GATED_ACTIVATIONS = {"swiglu", "geglu", "reglu", "fast-swiglu", "fast-geglu", "fast-reglu"}

# Tokenizers whose vocabulary size a model_config.yaml does not state (NeMo reads it from the tokenizer
# file): the file name as `tokenizer.model` ends (NeMo may prefix it, `nemo:<hash>_...`) -> pieces.
KNOWN_TOKENIZER_VOCAB = {"nemotron_2_256k.model": 256000}


class CatalogError(ValueError):
    """A catalog lookup or a model_config.yaml that can't be used; the message says what to do."""


class GpuType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    description: str
    smi_names: list[str] = Field(min_length=1)
    memory_mib: int = Field(gt=0, description="usable memory as nvidia-smi reports memory.total")
    nvlink_domain: int = Field(ge=1)
    gpus_per_node: list[int] = Field(min_length=1)
    default_gpus_per_node: int

    @model_validator(mode="after")
    def _default_is_allowed(self) -> GpuType:
        if self.default_gpus_per_node not in self.gpus_per_node:
            raise ValueError(f"default_gpus_per_node {self.default_gpus_per_node} not in gpus_per_node")
        return self

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


class ModelSpec(BaseModel):
    """The architecture facts sizing needs, named as in NeMo's model_config.yaml."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    description: str = ""
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: int = Field(gt=0)
    kv_channels: int = Field(gt=0)
    encoder_seq_length: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    activation: str = "gelu"
    share_embeddings_and_output_weights: bool = False
    bytes_per_param: int = 2
    # The OpenAI front door: the model's id there (default: the key), the checkpoint's name (its
    # directory as published), its tokenizer file in the checkpoint directory, and for a chat model
    # the prompt template (system/user/assistant turns with {content}, the generation opening) and
    # the stop strings chat requests add.
    served_name: str | None = None
    checkpoint: str | None = None
    tokenizer_file: str | None = None
    chat_template: dict[str, str] | None = None
    chat_stop: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _chat_template_complete(self) -> ModelSpec:
        if self.chat_template is not None:
            missing = {"system", "user", "assistant", "generation"} - set(self.chat_template)
            if missing:
                raise ValueError(f"chat_template lacks {', '.join(sorted(missing))}")
        return self

    @property
    def openai_id(self) -> str:
        return self.served_name or self.key

    @model_validator(mode="after")
    def _heads_split_in_groups(self) -> ModelSpec:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        return self

    # --- parameter counts (bias-free linear layers, as Nemotron-4 and most Megatron GPTs) ---
    @property
    def attention_params_per_layer(self) -> int:
        q = self.num_attention_heads * self.kv_channels
        kv = 2 * self.num_query_groups * self.kv_channels
        return self.hidden_size * (q + kv) + q * self.hidden_size

    @property
    def mlp_params_per_layer(self) -> int:
        matrices = 3 if self.activation in GATED_ACTIVATIONS else 2
        return matrices * self.hidden_size * self.ffn_hidden_size

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * 2 * self.hidden_size  # two layernorms, weight and bias each

    @property
    def params_per_layer(self) -> int:
        return self.attention_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer

    @property
    def embedding_params(self) -> int:
        """One embedding table (the input one, or the output layer when untied)."""
        return self.vocab_size * self.hidden_size

    @property
    def parameter_count(self) -> int:
        tables = 1 if self.share_embeddings_and_output_weights else 2
        final_norm = 2 * self.hidden_size
        return self.num_layers * self.params_per_layer + tables * self.embedding_params + final_norm

    @property
    def weights_gib(self) -> float:
        return self.parameter_count * self.bytes_per_param / GIB

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V, one vector per query group, in the model's dtype."""
        return 2 * self.num_query_groups * self.kv_channels * self.bytes_per_param

    @classmethod
    def from_model_config(cls, path: str | Path) -> ModelSpec:
        """Read a NeMo checkpoint's `model_config.yaml` (a checkpoint dir or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "model_config.yaml"
        try:
            raw = load_yaml(path.read_text())
        except FileNotFoundError:
            raise CatalogError(
                f"{path}: no such file; point --model-config at a checkpoint's model_config.yaml"
            ) from None
        except yaml.YAMLError as exc:
            raise CatalogError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise CatalogError(f"{path}: expected a mapping of model settings, got {type(raw).__name__}")
        try:
            return cls.from_mapping(raw, key=path.parent.name or str(path), description=f"read from {path}")
        except CatalogError as exc:
            raise CatalogError(f"{path}: {exc}") from None

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], key: str, description: str = "") -> ModelSpec:
        """A ModelSpec from model_config.yaml's keys, filling what NeMo leaves implicit."""
        data: dict[str, Any] = dict(raw)
        if data.get("num_query_groups") is None:  # null in configs without GQA
            data["num_query_groups"] = data.get("num_attention_heads")
        if data.get("kv_channels") is None and data.get("hidden_size") and data.get("num_attention_heads"):
            data["kv_channels"] = data["hidden_size"] // data["num_attention_heads"]
        if data.get("vocab_size") is None:
            tokenizer = data.get("tokenizer") or {}
            tokenizer_file = str(tokenizer.get("model") or "")
            data["vocab_size"] = (
                tokenizer.get("vocab_size")
                or data.get("padded_vocab_size")
                or next((n for f, n in KNOWN_TOKENIZER_VOCAB.items() if tokenizer_file.endswith(f)), None)
            )
            if data["vocab_size"] is None:
                raise CatalogError(
                    "no vocabulary size: the file gives neither tokenizer.vocab_size nor "
                    f"padded_vocab_size, and tokenizer.model {tokenizer_file!r} is not a known tokenizer; "
                    "add tokenizer.vocab_size (the number of pieces in the tokenizer)"
                )
        data.setdefault("share_embeddings_and_output_weights", True)
        precision = str(data.get("precision", "bf16"))
        data["bytes_per_param"] = 4 if precision in {"32", "fp32", "32-true"} else 2
        data["key"] = key
        data["description"] = description
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise CatalogError(f"can't size this checkpoint: {problems}") from None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with libyaml's loader where PyYAML has it (its wheels do): 5-10x faster."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506


def _load(name: str) -> dict[str, dict[str, Any]]:
    return load_yaml((HERE / name).read_text())


@cache
def gpu_types() -> dict[str, GpuType]:
    return {key: GpuType(key=key, **entry) for key, entry in _load("gpus.yaml").items()}


@cache
def models() -> dict[str, ModelSpec]:
    return {key: ModelSpec(key=key, **entry) for key, entry in _load("models.yaml").items()}


def _lookup(table: dict[str, Any], key: str, what: str) -> Any:
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, table, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CatalogError(f"unknown {what} {key!r}{hint}; known: {', '.join(table)}")


def gpu_type(key: str) -> GpuType:
    return _lookup(gpu_types(), key, "GPU type")


def model(key: str) -> ModelSpec:
    return _lookup(models(), key, "model")


def gpu_type_for_smi_name(name: str) -> GpuType | None:
    """The catalog entry whose nvidia-smi name this is, if any."""
    for gpu in gpu_types().values():
        if name in gpu.smi_names:
            return gpu
    return None


def smi_expectations(key: str, path: Path | None = None) -> tuple[list[str], int]:
    """``(smi_names, memory_mib)`` of GPU type `key`, for ``nemotron-deploy preflight --expect-gpu``.

    `path` reads another file in gpus.yaml's form (only those two keys are needed there).
    """
    if path is None:
        gpu = gpu_type(key)
        return list(gpu.smi_names), gpu.memory_mib
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read the GPU catalog {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"the GPU catalog {path} is not valid YAML: {exc}") from None
    table = data if isinstance(data, dict) else {}
    entry = table.get(key)
    if not isinstance(entry, dict):
        raise CatalogError(
            f"unknown GPU type {key!r} (known: {', '.join(sorted(table)) or 'none'}); add it to {path}"
        )
    names, memory = entry.get("smi_names"), entry.get("memory_mib")
    if not isinstance(names, list) or not isinstance(memory, int):
        raise CatalogError(f"{path}: entry {key!r} needs smi_names (list) and memory_mib (int)")
    return [str(n) for n in names], memory
