"""The GPU and model catalog, and reading a real checkpoint's model_config.yaml."""

from __future__ import annotations

import pytest
import yaml
from helpers import MODEL_CONFIG
from nemotron_rehearsal import NVIDIA_SMI_CAPTURES

from nemotron_deploy import catalog
from nemotron_deploy.catalog import GIB, CatalogError, ModelSpec

SIZING_KEYS = (
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "hidden_size",
    "ffn_hidden_size",
    "encoder_seq_length",
    "kv_channels",
    "vocab_size",
    "activation",
    "share_embeddings_and_output_weights",
    "bytes_per_param",
)


@pytest.fixture(scope="module")
def builtin() -> ModelSpec:
    return catalog.model("nemotron-4-340b")


@pytest.fixture(scope="module")
def from_checkpoint() -> ModelSpec:
    return ModelSpec.from_model_config(MODEL_CONFIG)


def test_fixture_carries_the_checkpoints_values():
    """The fixture is the real file's shape: kv_channels null, no vocab size stated anywhere."""
    raw = yaml.safe_load(MODEL_CONFIG.read_text())
    assert raw["mcore_gpt"] is True
    assert (raw["tensor_model_parallel_size"], raw["pipeline_model_parallel_size"]) == (8, 2)
    assert raw["kv_channels"] is None
    assert raw["tokenizer"]["library"] == "sentencepiece"
    assert raw["tokenizer"]["model"].endswith("nemotron_2_256k.model")
    assert "vocab_size" not in raw and "vocab_size" not in raw["tokenizer"]
    assert "padded_vocab_size" not in raw
    assert raw["position_embedding_type"] == "rope" and raw["rotary_percentage"] == 0.5
    assert raw["normalization"] == "layernorm1p" and raw["bias"] is False
    assert raw["precision"] == "bf16"


@pytest.mark.parametrize("key", SIZING_KEYS)
def test_model_config_agrees_with_builtin(key, builtin, from_checkpoint):
    assert getattr(from_checkpoint, key) == getattr(builtin, key)


def test_model_config_sizing_facts(from_checkpoint):
    m = from_checkpoint
    assert (m.num_layers, m.num_attention_heads, m.num_query_groups) == (96, 96, 8)
    assert (m.hidden_size, m.ffn_hidden_size, m.encoder_seq_length) == (18432, 73728, 4096)
    assert m.kv_channels == 192 == m.hidden_size // m.num_attention_heads
    assert m.vocab_size == 256000
    assert m.activation == "squared-relu"
    assert m.share_embeddings_and_output_weights is False
    assert m.bytes_per_param == 2


@pytest.mark.parametrize("spec", ["builtin", "from_checkpoint"])
def test_parameter_count_and_weights(spec, request):
    m: ModelSpec = request.getfixturevalue(spec)
    assert m.parameter_count == request.getfixturevalue("builtin").parameter_count
    assert round(m.parameter_count / 1e9, 1) == 341.0
    assert round(m.parameter_count * m.bytes_per_param / 1e9) == 682  # GB
    assert int(m.weights_gib) == 635  # GiB
    # Squared-ReLU: two MLP matrices per layer, no gate.
    assert m.mlp_params_per_layer == 2 * 18432 * 73728
    # Untied: the input embedding and the output layer are both counted.
    one_table = 256000 * 18432
    assert m.embedding_params == one_table
    assert m.parameter_count - m.num_layers * m.params_per_layer - 2 * m.hidden_size == 2 * one_table


def test_kv_cache_bytes_per_token_per_layer(builtin):
    # The protocol doc: 2 (K and V) x 8 groups x 192 x 2 bytes.
    assert builtin.kv_bytes_per_token_per_layer == 2 * 8 * 192 * 2


def test_tied_embeddings_count_one_table(builtin):
    tied = builtin.model_copy(update={"share_embeddings_and_output_weights": True})
    assert builtin.parameter_count - tied.parameter_count == builtin.embedding_params


def test_gated_activation_counts_three_matrices(builtin):
    gated = builtin.model_copy(update={"activation": "swiglu"})
    assert gated.mlp_params_per_layer == 3 * builtin.hidden_size * builtin.ffn_hidden_size


def test_reads_a_checkpoint_directory(tmp_path):
    ckpt = tmp_path / "Nemotron-4-340B-Base"
    ckpt.mkdir()
    (ckpt / "model_config.yaml").write_text(MODEL_CONFIG.read_text())
    m = ModelSpec.from_model_config(ckpt)
    assert m.key == "Nemotron-4-340B-Base"
    assert m.parameter_count == catalog.model("nemotron-4-340b").parameter_count


def test_nemo_prefixed_tokenizer_name_is_known(tmp_path):
    """NeMo stores the tokenizer as `nemo:<hash>_nemotron_2_256k.model` in a packed checkpoint."""
    raw = yaml.safe_load(MODEL_CONFIG.read_text())
    raw["tokenizer"]["model"] = "nemo:d6b0ba93e9734b138f5fc61f5652efbd_nemotron_2_256k.model"
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert ModelSpec.from_model_config(path).vocab_size == 256000


def test_stated_vocab_size_wins(tmp_path):
    raw = yaml.safe_load(MODEL_CONFIG.read_text())
    raw["tokenizer"]["vocab_size"] = 128000
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert ModelSpec.from_model_config(path).vocab_size == 128000


def test_unknown_tokenizer_without_vocab_size_says_what_to_add(tmp_path):
    raw = yaml.safe_load(MODEL_CONFIG.read_text())
    raw["tokenizer"]["model"] = "my_own_tokenizer.model"
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CatalogError) as info:
        ModelSpec.from_model_config(path)
    assert str(path) in str(info.value)
    assert "tokenizer.vocab_size" in str(info.value)


def test_missing_model_config(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        ModelSpec.from_model_config(tmp_path / "nope.yaml")


def test_model_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "model_config.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(CatalogError, match="expected a mapping"):
        ModelSpec.from_model_config(path)


def test_heads_must_split_into_groups(tmp_path):
    raw = yaml.safe_load(MODEL_CONFIG.read_text())
    raw["num_query_groups"] = 7
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CatalogError, match="num_query_groups"):
        ModelSpec.from_model_config(path)


def test_fp32_checkpoint_is_four_bytes_per_param(tmp_path):
    raw = yaml.safe_load(MODEL_CONFIG.read_text())
    raw["precision"] = 32
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert ModelSpec.from_model_config(path).bytes_per_param == 4


# --- GPUs -------------------------------------------------------------------------------------------


def test_h200_memory_matches_the_real_capture():
    # `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` on the real H200 host.
    lines = (NVIDIA_SMI_CAPTURES / "query-name-mem.csv").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        name, mib = (field.strip() for field in line.split(","))
        gpu = catalog.gpu_type_for_smi_name(name)
        assert gpu is not None and gpu.key == "H200-141GB"
        assert gpu.memory_mib == int(mib)
    assert gpu.memory_gib == pytest.approx(140.4, abs=0.01)


@pytest.mark.parametrize(
    "smi_name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100-80GB-SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA H200", "H200-141GB"),
    ],
)
def test_gpu_type_for_smi_name(smi_name, key):
    assert catalog.gpu_type_for_smi_name(smi_name).key == key


def test_unknown_smi_name():
    assert catalog.gpu_type_for_smi_name("NVIDIA GeForce RTX 4090") is None


def test_every_gpu_type_loads_with_a_sane_default():
    types = catalog.gpu_types()
    assert {"H100-80GB-SXM", "H200-141GB", "A100-80GB", "A100-40GB"} <= set(types)
    for gpu in types.values():
        assert gpu.default_gpus_per_node in gpu.gpus_per_node
        assert gpu.memory_mib > 0 and gpu.nvlink_domain >= 1


def test_unknown_gpu_type_suggests_the_close_one():
    with pytest.raises(CatalogError) as info:
        catalog.gpu_type("H100-80GB")
    msg = str(info.value)
    assert "unknown GPU type 'H100-80GB'" in msg
    assert "did you mean" in msg
    assert "H100-80GB-SXM" in msg  # listed among the known types


def test_unknown_model():
    with pytest.raises(CatalogError, match="unknown model 'nemotron-4-341b'.*did you mean 'nemotron-4-340b'"):
        catalog.model("nemotron-4-341b")


def test_weights_gib_is_in_gib(builtin):
    assert builtin.weights_gib == builtin.parameter_count * 2 / GIB
