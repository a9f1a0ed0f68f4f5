"""Sizing one replica: NVIDIA's published footprints, refusals, pinned TP/PP and the memory model."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import INVENTORIES, MODEL_CONFIG, SHIPPED, run_main, write_inventory

from nemotron_deploy import catalog, inventory, planner
from nemotron_deploy.catalog import GIB, ModelSpec
from nemotron_deploy.planner import PlanError

NEMOTRON = catalog.model("nemotron-4-340b")

# A made-up 7B-class Megatron GPT (Llama-2-7B-like shapes), as a NeMo model_config.yaml.
SMALL_GPT = {
    "mcore_gpt": True,
    "encoder_seq_length": 4096,
    "num_layers": 32,
    "hidden_size": 4096,
    "ffn_hidden_size": 11008,
    "num_attention_heads": 32,
    "num_query_groups": None,
    "kv_channels": None,
    "activation": "fast-swiglu",
    "share_embeddings_and_output_weights": False,
    "precision": "bf16",
    "tokenizer": {"library": "sentencepiece", "model": "tokenizer.model", "vocab_size": 32000},
}


def _plan(gpu: str, nodes_available: int, gpus_per_node: int = 8, **kwargs) -> planner.Plan:
    return planner.plan(NEMOTRON, catalog.gpu_type(gpu), gpus_per_node, nodes_available, **kwargs)


# --- NVIDIA's table -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpu, nodes, tp, pp",
    [
        ("H200-141GB", 1, 8, 1),
        ("H100-80GB-SXM", 2, 8, 2),
        ("A100-80GB", 2, 8, 2),
        ("A100-40GB", 3, 8, 3),
    ],
)
def test_reproduces_nvidias_footprints(gpu, nodes, tp, pp):
    p = _plan(gpu, nodes_available=nodes)
    assert (p.nodes, p.gpus_per_node, p.tensor_parallel, p.pipeline_parallel) == (nodes, 8, tp, pp)
    assert p.total_gpus == tp * pp  # NeMo: trainer.devices x trainer.num_nodes == TP x PP
    assert p.replicas == 1
    assert p.headroom_gib > 0
    assert p.tp_crosses_nvlink is False


@pytest.mark.parametrize(
    "gpu, available, replicas",
    [
        ("H200-141GB", 1, 1),
        ("H200-141GB", 3, 3),
        ("H100-80GB-SXM", 2, 1),
        ("H100-80GB-SXM", 3, 1),
        ("H100-80GB-SXM", 5, 2),
        ("A100-80GB", 4, 2),
        ("A100-40GB", 5, 1),
        ("A100-40GB", 7, 2),
    ],
)
def test_replicas_are_whole_replicas_of_the_available_nodes(gpu, available, replicas):
    p = _plan(gpu, nodes_available=available)
    assert p.replicas == replicas == available // p.nodes
    assert p.nodes_available == available


def test_more_nodes_never_make_a_bigger_replica():
    assert _plan("H100-80GB-SXM", 6).nodes == 2


@pytest.mark.parametrize("gpu, available, needed", [("H100-80GB-SXM", 1, 2), ("A100-40GB", 2, 3)])
def test_too_few_nodes_is_refused_naming_needed_and_given(gpu, available, needed):
    with pytest.raises(PlanError) as info:
        _plan(gpu, nodes_available=available)
    msg = str(info.value)
    assert f"needs {needed} compute node(s)" in msg
    assert f"inventory has {available}" in msg
    assert f"add {needed - available} node(s)" in msg
    assert gpu in msg


def test_sixteen_gpu_a100_node_holds_a_whole_replica():
    p = _plan("A100-80GB", nodes_available=1, gpus_per_node=16)
    # TP stays 8: it must divide the 8 query groups, even on a 16-GPU node.
    assert (p.nodes, p.tensor_parallel, p.pipeline_parallel) == (1, 8, 2)


def test_tensor_parallel_that_crosses_nvlink_is_flagged():
    p = _plan("H100-NVL-94GB", nodes_available=1)  # NVLink bridges pairs only
    assert p.tensor_parallel > 2
    assert p.tp_crosses_nvlink is True


# --- TP and PP rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpus_per_node, expected", [(8, [8, 4, 2, 1]), (16, [8, 4, 2, 1]), (4, [4, 2, 1]), (10, [2, 1])]
)
def test_tensor_parallel_divides_heads_groups_and_node(gpus_per_node, expected):
    tps = planner.valid_tensor_parallel(NEMOTRON, gpus_per_node)
    assert tps == expected
    for tp in tps:
        assert NEMOTRON.num_attention_heads % tp == 0
        assert NEMOTRON.num_query_groups % tp == 0
        assert gpus_per_node % tp == 0


@pytest.mark.parametrize("gpu, available", [("H200-141GB", 1), ("H100-80GB-SXM", 2), ("A100-40GB", 3)])
def test_pipeline_parallel_divides_layers(gpu, available):
    p = _plan(gpu, available)
    assert NEMOTRON.num_layers % p.pipeline_parallel == 0


@pytest.mark.parametrize("tp", [3, 16, 5])
def test_pinned_tensor_parallel_that_does_not_divide_is_refused(tp):
    with pytest.raises(PlanError) as info:
        _plan("H100-80GB-SXM", 2, tensor_parallel=tp)
    msg = str(info.value)
    assert msg.startswith(f"tensor_parallel={tp} is impossible")
    assert "96 attention heads" in msg and "8 query groups" in msg
    assert "valid: 8, 4, 2, 1" in msg


@pytest.mark.parametrize("pp", [5, 7, 9])
def test_pinned_pipeline_parallel_that_does_not_divide_is_refused(pp):
    with pytest.raises(PlanError) as info:
        _plan("H100-80GB-SXM", 2, pipeline_parallel=pp)
    msg = str(info.value)
    assert msg.startswith(f"pipeline_parallel={pp} does not divide the model's 96 layers")
    assert "valid: 1, 2, 3, 4, 6, 8, 12" in msg


def test_pinned_tensor_parallel_is_honoured():
    p = _plan("H100-80GB-SXM", 2, tensor_parallel=4)
    assert (p.nodes, p.tensor_parallel, p.pipeline_parallel) == (2, 4, 4)


def test_pinned_pipeline_parallel_is_honoured():
    # PP 2 on 8-GPU nodes: one node still fits, so TP shrinks to 4 rather than using a second node.
    p = _plan("H200-141GB", 2, pipeline_parallel=2)
    assert (p.nodes, p.tensor_parallel, p.pipeline_parallel) == (1, 4, 2)
    assert p.replicas == 2


def test_pinned_plan_that_does_not_fit_is_refused_with_the_shortfall():
    with pytest.raises(PlanError) as info:
        _plan("H100-80GB-SXM", 4, pipeline_parallel=1)
    msg = str(info.value)
    assert "does not fit on H100-80GB-SXM" in msg
    assert "pipeline_parallel=1" in msg
    assert "short by" in msg


# --- the memory model ---------------------------------------------------------------------------------


def test_h200_tp8_pp1_weights_are_the_whole_model_over_eight():
    """PP 1: the only stage holds every layer and both untied tables, so weights = 635 GiB / 8."""
    p = _plan("H200-141GB", 1)
    assert p.weights_per_gpu_gib == pytest.approx(NEMOTRON.weights_gib / 8, abs=0.01)
    assert p.weights_per_gpu_gib == pytest.approx(79.4, abs=0.05)


def test_h100_tp8_pp2_weights_are_half_the_layers_plus_one_table_over_eight():
    p = _plan("H100-80GB-SXM", 2)
    table_gib = NEMOTRON.embedding_params * 2 / GIB
    layers_gib = NEMOTRON.num_layers * NEMOTRON.params_per_layer * 2 / GIB
    assert p.weights_per_gpu_gib == pytest.approx((layers_gib / 2 + table_gib) / 8, abs=0.01)
    assert p.weights_per_gpu_gib == pytest.approx(39.7, abs=0.05)


def test_kv_cache_per_gpu():
    # batch 8 x 4096 tokens x 96 layers x 6144 bytes, split over TP 8.
    p = _plan("H200-141GB", 1)
    assert p.kv_cache_per_gpu_gib == pytest.approx(8 * 4096 * 96 * 6144 / 8 / GIB, abs=0.005)
    assert p.kv_cache_per_gpu_gib == 2.25
    # PP 2 halves the layers per GPU.
    assert _plan("H100-80GB-SXM", 2).kv_cache_per_gpu_gib == pytest.approx(1.12, abs=0.01)


@pytest.mark.parametrize("gpu, available", [("H200-141GB", 1), ("H100-80GB-SXM", 2), ("A100-40GB", 3)])
def test_memory_adds_up(gpu, available):
    p = _plan(gpu, available)
    assert p.per_gpu_memory_gib == pytest.approx(
        p.weights_per_gpu_gib + p.kv_cache_per_gpu_gib + p.runtime_reserve_gib, abs=0.02
    )
    assert p.headroom_gib == pytest.approx(p.usable_memory_gib - p.per_gpu_memory_gib, abs=0.02)
    assert p.usable_memory_gib == pytest.approx(catalog.gpu_type(gpu).memory_mib / 1024, abs=0.01)
    assert p.per_gpu_memory_gib <= p.usable_memory_gib


def test_one_h100_node_does_not_fit():
    """79.4 GiB of weights per GPU leave no room on an 79.6 GiB H100 for the KV cache and runtime."""
    weights, kv = planner.memory_per_gpu(NEMOTRON, 8, 1, 8, 6.0)
    usable = catalog.gpu_type("H100-80GB-SXM").memory_gib
    assert weights < usable < weights + kv + 6.0


def test_bigger_batch_and_reserve_cost_memory():
    base = _plan("H200-141GB", 1)
    big = _plan("H200-141GB", 1, batch=32, runtime_reserve_gib=10.0)
    assert big.kv_cache_per_gpu_gib == pytest.approx(4 * base.kv_cache_per_gpu_gib, abs=0.01)
    assert big.per_gpu_memory_gib > base.per_gpu_memory_gib
    assert big.runtime_reserve_gib == 10.0


def test_a_big_reserve_pushes_h200_to_two_nodes():
    # 79.4 weights + 2.25 KV + 60 reserve > 140.4 GiB: one node no longer fits.
    p = _plan("H200-141GB", 2, runtime_reserve_gib=60.0)
    assert (p.nodes, p.tensor_parallel, p.pipeline_parallel) == (2, 8, 2)


def test_parameters_billion_in_plan():
    assert _plan("H200-141GB", 1).parameters_billion == 341.0


# --- other models ---------------------------------------------------------------------------------------


@pytest.fixture()
def small_config(tmp_path):
    path = tmp_path / "gpt-7b" / "model_config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(SMALL_GPT))
    return path


def test_small_gpt_fits_one_node(small_config):
    spec = ModelSpec.from_model_config(small_config)
    assert spec.num_query_groups == 32 and spec.kv_channels == 128
    assert 6.5 < spec.parameter_count / 1e9 < 7.0
    p = planner.plan(spec, catalog.gpu_type("H100-80GB-SXM"), 8, 2)
    assert (p.nodes, p.tensor_parallel, p.pipeline_parallel) == (1, 8, 1)
    assert p.replicas == 2
    assert p.model == "gpt-7b"


def test_cli_plan_with_small_model_config(small_config, capsys):
    assert (
        run_main(["plan", "--json", "--model-config", str(small_config), str(INVENTORIES / "h100.py")]) == 0
    )
    p = json.loads(capsys.readouterr().out)
    assert (p["nodes"], p["replicas"], p["gpu"]) == (1, 2, "H100-80GB-SXM")


@pytest.mark.parametrize("name", SHIPPED)
def test_cli_plan_with_the_fixture_model_config_matches_the_builtin(name, capsys, monkeypatch):
    monkeypatch.chdir(INVENTORIES.parent)
    assert run_main(["plan", "--json", f"inventories/{name}.py"]) == 0
    builtin = json.loads(capsys.readouterr().out)
    assert run_main(["plan", "--json", "--model-config", str(MODEL_CONFIG), f"inventories/{name}.py"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file.pop("model") == "fixtures"  # named after the checkpoint directory
    assert builtin.pop("model") == "nemotron-4-340b"
    assert from_file == builtin


def test_model_spec_passed_to_load_is_what_gets_sized(small_config):
    cluster = inventory.load(
        str(INVENTORIES / "h200.py"), model_spec=ModelSpec.from_model_config(small_config)
    )
    assert cluster.plan.model == "gpt-7b"
    assert cluster.plan.parameters_billion < 10


def test_plan_on_a_tmp_inventory_with_more_nodes(tmp_path):
    hosts = 'login = ["login01"]\ncompute = ["gpu01", "gpu02", "gpu03", "gpu04", "gpu05"]\n'
    cluster = inventory.load(str(write_inventory(tmp_path, "h100", hosts=hosts)))
    assert (cluster.plan.nodes, cluster.plan.replicas, cluster.plan.nodes_available) == (2, 2, 5)
