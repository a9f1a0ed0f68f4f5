"""Size one inference replica: how many nodes, which tensor (TP) and pipeline (PP) parallelism.

The memory model, per GPU, for a candidate (nodes, TP, PP):

    weights   = params of the heaviest pipeline stage x bytes per param / TP
                where a stage holds num_layers / PP transformer layers, plus one embedding table
                (the first stage holds the input embedding, the last the untied output layer; both
                are vocab x hidden, so the heaviest stage is layers/PP + one table; with PP 1 the
                only stage holds both tables when they are untied)
    kv_cache  = batch x seq_length x layers/PP x (2 x query_groups x kv_channels x bytes) / TP
    reserve   = a fixed runtime allowance (CUDA context, NCCL buffers, activations, allocator
                fragmentation), `runtime_reserve_gib`, stated in every plan
    needed    = weights + kv_cache + reserve  <=  usable memory (nvidia-smi's memory.total)

A replica fills whole nodes because NeMo asserts trainer.devices x trainer.num_nodes == TP x PP.
TP must divide the attention heads and the query groups and stay inside one node (it is the
latency-critical, all-reduce-heavy dimension); PP must divide the layers (it need not be a power of
two: 96 layers split in 3). Among the fitting candidates we take the fewest nodes, then the largest
TP (NVLink bandwidth), then the smallest PP (fewer pipeline bubbles).

This reproduces NVIDIA's published footprints for Nemotron-4-340B-Base: H200 1 node TP8 PP1,
H100 80GB and A100 80GB 2 nodes TP8 PP2, and A100 40GB 3 nodes TP8 PP3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .catalog import GIB, GpuType, ModelSpec

DEFAULT_BATCH = 8
DEFAULT_RUNTIME_RESERVE_GIB = 6.0


class PlanError(ValueError):
    """No replica fits, or a requested TP/PP is impossible; the message says needed vs. given."""


@dataclass(frozen=True)
class Plan:
    model: str
    gpu: str
    nodes: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    nodes_available: int
    replicas: int  # the replicas to run: the `replicas` setting, else every whole one the nodes hold
    replica_capacity: int  # whole replicas the compute nodes hold
    usable_memory_gib: float
    weights_per_gpu_gib: float
    kv_cache_per_gpu_gib: float
    runtime_reserve_gib: float
    per_gpu_memory_gib: float
    headroom_gib: float
    batch: int
    seq_length: int
    parameters_billion: float
    tp_crosses_nvlink: bool

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def as_dict(self) -> dict:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def memory_per_gpu(model: ModelSpec, tp: int, pp: int, batch: int, reserve_gib: float) -> tuple[float, float]:
    """(weights GiB, KV-cache GiB) on the most loaded GPU; see the module docstring."""
    layers_per_stage = model.num_layers // pp
    # PP 1: the one stage is both first (input embedding) and last (output layer, if untied).
    tables = 2 if pp == 1 and not model.share_embeddings_and_output_weights else 1
    stage_params = layers_per_stage * model.params_per_layer + tables * model.embedding_params
    weights = stage_params * model.bytes_per_param / tp / GIB
    kv = batch * model.encoder_seq_length * layers_per_stage * model.kv_bytes_per_token_per_layer / tp / GIB
    return weights, kv


def valid_tensor_parallel(model: ModelSpec, gpus_per_node: int) -> list[int]:
    """TP sizes that split heads and query groups evenly and stay inside one node, largest first."""
    return sorted(
        (
            tp
            for tp in _divisors(gpus_per_node)
            if model.num_attention_heads % tp == 0 and model.num_query_groups % tp == 0
        ),
        reverse=True,
    )


def plan(
    model: ModelSpec,
    gpu: GpuType,
    gpus_per_node: int,
    nodes_available: int,
    *,
    batch: int = DEFAULT_BATCH,
    runtime_reserve_gib: float = DEFAULT_RUNTIME_RESERVE_GIB,
    tensor_parallel: int | None = None,
    pipeline_parallel: int | None = None,
    replicas: int | None = None,
) -> Plan:
    """The smallest replica that fits; raise PlanError saying what is needed when none does.

    `tensor_parallel`/`pipeline_parallel` pin a dimension (an operator's override); the rest is
    still chosen by the rules above and checked against memory. `replicas` caps how many replicas
    run (default: every whole replica the nodes hold); more than they hold is refused.
    """
    tps = valid_tensor_parallel(model, gpus_per_node)
    if tensor_parallel is not None and tensor_parallel not in tps:
        raise PlanError(
            f"tensor_parallel={tensor_parallel} is impossible with {gpus_per_node} GPUs per node: it must "
            f"divide the GPUs per node, the {model.num_attention_heads} attention heads and the "
            f"{model.num_query_groups} query groups; valid: {', '.join(map(str, tps))}"
        )
    if pipeline_parallel is not None and model.num_layers % pipeline_parallel:
        raise PlanError(
            f"pipeline_parallel={pipeline_parallel} does not divide the model's {model.num_layers} layers; "
            f"valid: {', '.join(map(str, _divisors(model.num_layers)))}"
        )

    best_miss: tuple[float, int, int, int] | None = None  # (shortfall GiB, nodes, tp, pp)
    max_nodes = max(nodes_available, 1)
    # Look past the available nodes too, so a refusal can say how many would be needed.
    for nodes in range(1, max(max_nodes, model.num_layers) + 1):
        total = nodes * gpus_per_node
        for tp in [tensor_parallel] if tensor_parallel else tps:
            if total % tp:
                continue
            pp = total // tp
            if model.num_layers % pp or (pipeline_parallel is not None and pp != pipeline_parallel):
                continue
            weights, kv = memory_per_gpu(model, tp, pp, batch, runtime_reserve_gib)
            needed = weights + kv + runtime_reserve_gib
            if needed > gpu.memory_gib:
                shortfall = needed - gpu.memory_gib
                if best_miss is None or (nodes, shortfall) < (best_miss[1], best_miss[0]):
                    best_miss = (shortfall, nodes, tp, pp)
                continue
            if nodes > nodes_available:
                raise PlanError(
                    f"{model.key} on {gpu.key} needs {nodes} compute node(s) of {gpus_per_node} GPUs "
                    f"(TP {tp} x PP {pp}, {needed:.1f} of {gpu.memory_gib:.1f} GiB per GPU) but the "
                    f"inventory has {nodes_available}: add {nodes - nodes_available} node(s) to the "
                    f"`compute` group, or use GPUs with more memory"
                )
            capacity = nodes_available // nodes
            if replicas is not None and replicas > capacity:
                raise PlanError(
                    f"replicas={replicas} needs {replicas * nodes} compute node(s) ({nodes} per replica: "
                    f"TP {tp} x PP {pp} on {gpus_per_node} GPUs per node) but the inventory has "
                    f"{nodes_available}, which hold {capacity}: add "
                    f"{replicas * nodes - nodes_available} node(s) to the `compute` group, or set "
                    f"replicas to {capacity} or less (unset: every replica the nodes hold)"
                )
            return Plan(
                model=model.key,
                gpu=gpu.key,
                nodes=nodes,
                gpus_per_node=gpus_per_node,
                tensor_parallel=tp,
                pipeline_parallel=pp,
                nodes_available=nodes_available,
                replicas=replicas or capacity,
                replica_capacity=capacity,
                usable_memory_gib=round(gpu.memory_gib, 2),
                weights_per_gpu_gib=round(weights, 2),
                kv_cache_per_gpu_gib=round(kv, 2),
                runtime_reserve_gib=runtime_reserve_gib,
                per_gpu_memory_gib=round(needed, 2),
                headroom_gib=round(gpu.memory_gib - needed, 2),
                batch=batch,
                seq_length=model.encoder_seq_length,
                parameters_billion=round(model.parameter_count / 1e9, 1),
                tp_crosses_nvlink=tp > gpu.nvlink_domain,
            )
    pinned = ""
    if tensor_parallel or pipeline_parallel:
        pinned = f" with tensor_parallel={tensor_parallel} pipeline_parallel={pipeline_parallel}"
    detail = ""
    if best_miss:
        short, nodes, tp, pp = best_miss
        detail = f" (closest: {nodes} node(s), TP {tp} x PP {pp}, short by {short:.1f} GiB per GPU)"
    raise PlanError(f"{model.key} does not fit on {gpu.key} x {gpus_per_node} per node{pinned}{detail}")
