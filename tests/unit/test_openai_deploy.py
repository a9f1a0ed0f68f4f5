"""What the deploy renders for the OpenAI API: the replicas' fronts translate (a job file says how),
HAProxy answers /v1/models and routes the POSTs to the replicas; and what its preflight refuses."""

from __future__ import annotations

import json

from helpers import write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import desired, host_checks, openai_config, render

OC = openai_config


def cluster(tmp_path, **settings):
    return inventory.load(str(write_inventory(tmp_path, "h100", settings=settings)))


def job_files(c) -> dict[str, render.RenderedFile]:
    return {f.name: f for f in render.render(c)}


def test_the_job_carries_the_fronts_translation_config_and_passes_it_to_the_front(tmp_path):
    c = cluster(
        tmp_path, model="nemotron-4-340b-instruct", model_dir="/lustre/models/Nemotron-4-340B-Instruct"
    )
    files = job_files(c)
    config = json.loads(files[OC.CONFIG_FILE].content)
    assert config["model"] == "nemotron-4-340b-instruct"
    assert config["tokenizer"] == "/lustre/models/Nemotron-4-340B-Instruct/nemotron_2_256k.model"
    assert config["chat_template"]["generation"] == "<extra_id_1>Assistant\n"
    assert config["chat_stop"] == ["<extra_id_1>", "\x11", "<extra_id_1>User"]
    assert config["max_prompts"] == c.settings.inference_batch
    assert f'--openai "${{SCRIPTS_DIR}}/{OC.CONFIG_FILE}"' in files["nemo_inference.sh"].content
    # the tokenizer is in model_dir, which the container mounts: no mount of its own
    assert "nemotron_2_256k.model" not in files["nemotron.sbatch"].content


def test_a_tokenizer_outside_model_dir_is_mounted_read_only(tmp_path):
    c = cluster(tmp_path, tokenizer_file="/srv/tok/nemotron_2_256k.model")
    assert OC.tokenizer_path(c) == "/srv/tok/nemotron_2_256k.model"
    sbatch = job_files(c)["nemotron.sbatch"].content
    assert "/srv/tok/nemotron_2_256k.model:/srv/tok/nemotron_2_256k.model:ro" in sbatch


def test_haproxy_answers_models_and_sends_the_posts_to_the_replicas(tmp_path):
    cfg, lua = (f.content for f in render.render_endpoint(cluster(tmp_path), 2)[:2])
    assert "acl openai_route path /v1/models /v1/completions /v1/chat/completions" in cfg
    assert '"id":"nemotron-4-340b-base"' in cfg and '"created":%[date]' in cfg
    # no other backend: the POSTs reach the replicas' backend like PUT /generate
    assert cfg.count("\nbackend ") == 2 and "use_backend" not in cfg
    # the fronts' token counts are read, then removed before the client sees the answer
    assert (
        "http-response lua.nemotron_openai_answer" in cfg
        and "http-response del-header X-Nemotron-Usage" in cfg
    )
    assert 'core.register_service("nemotron_openai_metrics"' in lua
    assert "nemotron_openai_prompt_tokens_total" in lua


def test_endpoint_openai_false_installs_nothing_of_it(tmp_path):
    c = cluster(tmp_path, endpoint_openai=False)
    files = job_files(c)
    assert OC.CONFIG_FILE not in files and "--openai" not in files["nemo_inference.sh"].content
    cfg, lua = (f.content for f in render.render_endpoint(c, 2)[:2])
    assert "/v1/" not in cfg and "nemotron_openai" not in cfg and "nemotron_openai" not in lua


def test_preflight_wants_the_tokenizer_on_the_compute_nodes(tmp_path):
    c = cluster(tmp_path)
    node = c.compute[0]
    _, unhashed = host_checks.paths_to_read(c, node)
    assert OC.tokenizer_path(c) in unhashed
    (problem,) = host_checks.tokenizer_problems(c, {"paths": {}})
    assert "/lustre/models/Nemotron-4-340B-Base/nemotron_2_256k.model" in problem
    assert "tokenizer_file" in problem and "endpoint_openai = false" in problem
    assert host_checks.tokenizer_problems(c, {"paths": {OC.tokenizer_path(c): object()}}) == []
    assert (
        host_checks.tokenizer_problems(cluster(tmp_path / "off", endpoint_openai=False), {"paths": {}}) == []
    )


def test_the_login_node_gets_no_translator_of_its_own(tmp_path):
    """No service, account or socket on the login node for the OpenAI API (the fronts translate)."""
    c = cluster(tmp_path)
    want = desired.for_host(c, c.login_host, desired.Login(init="systemd"))
    assert not [p for p in want.paths if "gateway" in p or "openai" in p]
