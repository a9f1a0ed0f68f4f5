"""Settings of the local sandbox cluster (inventories/sandbox.py; `nemotron-deploy sandbox up`).

Its fake GPUs answer nvidia-smi from a real H200 capture. It runs the model card's 2-node layout
(TP 8 x PP 2 on 2 x 8 GPUs) instead of the 1-node H200 plan, so multi-node jobs are exercised.

The container runtime is the shipped inventories' default, pyxis, for real: the deploy imports the
sandbox registry's NeMo-shaped stand-in image once with enroot, and the job's `srun --container-image`
runs every rank in it. NEMOTRON_SANDBOX_RUNTIME selects another path to rehearse:
  podman  every compute node pulls the image with podman and each rank runs in a podman container;
  docker  the same with each compute node's own Docker engine, which the sandbox starts only for it
          (`nemotron-deploy sandbox up` with this variable set, or `--docker`);
  apptainer  the first compute node pulls the image once into a SIF on shared storage (`apptainer pull
          --no-https`, from registry_tls_verify below) and `srun apptainer exec` runs every rank in it
          (Apptainer 1.4.5, built by scripts/setup from rehearsal/vendor/);
  host    NeMo "installed on the nodes" (the stand-in at /opt/NeMo), and podman still pulls the image.

The image comes from the sandbox registry's plain-HTTP port (5000), unverified. NEMOTRON_SANDBOX_REGISTRY=tls
takes it from the same registry over HTTPS (5443) instead, verified with the sandbox CA the nodes trust:
what a login with the NGC key needs (the deploy refuses to send a key to a registry it does not verify).
"""

import os

_runtime = os.environ.get("NEMOTRON_SANDBOX_RUNTIME", "pyxis")
_tls = os.environ.get("NEMOTRON_SANDBOX_REGISTRY") == "tls"
_registry = "10.213.0.2:5443" if _tls else "10.213.0.2:5000"

gpu_type = "H200-141GB"
gpus_per_node = 8
tensor_parallel = 8
pipeline_parallel = 2
slurm_partition = "gpu"
slurm_exclusive = False
slurm_time_limit = "01:00:00"
model_dir = "/var/lib/nemotron-sandbox/shared/models/Nemotron-4-340B-Base"
shared_dir = "/var/lib/nemotron-sandbox/shared"
container_runtime = _runtime
# pyxis/enroot write `registry#path`; the others `registry/path` (validation refuses the wrong form).
container_image = f"{_registry}{'#' if _runtime == 'pyxis' else '/'}nvidia/nemo:24.01.framework"
if _runtime == "host":
    pull_runtime = "podman"
    # NeMo from a source tree: the stand-in's `nemo` package is under /opt/NeMo on every node.
    job_env = {
        "NCCL_DEBUG": "WARN",
        "NCCL_ASYNC_ERROR_HANDLING": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTHONPATH": "/opt/NeMo",
    }
if not _tls:
    registry_tls_verify = False  # plain HTTP: pulls without a key only
min_free_gib = 1
health_startup_budget_seconds = 300

# The endpoint's API keys: `nemotron-deploy sandbox up` makes /var/lib/nemotron-sandbox/endpoint/api-keys
# with one key, "rehearsal" (its key beside it in rehearsal.key, root 0600), with the same code as
# `nemotron-deploy api-key new`; scripts/rehearse and the tests call the endpoint with it. Read for
# validation only (validate, plan, render: NEMOTRON_DEPLOY_OFFLINE, set by nemotron-deploy), the
# inventory names the committed sandbox.api-keys, which has no key: what those print (and the goldens)
# does not depend on this machine's sandbox.
if os.environ.get("NEMOTRON_DEPLOY_OFFLINE"):
    endpoint_api_keys_file = "sandbox.api-keys"
else:
    from nemotron_rehearsal.sandbox import layout as _layout

    # layout.API_KEYS_FILE, spelled from STATE_DIR: a venv whose rehearsal package predates the keys
    # (installed from another checkout) still loads this inventory, and `sandbox up` makes the file.
    endpoint_api_keys_file = str(_layout.STATE_DIR / "endpoint" / "api-keys")
