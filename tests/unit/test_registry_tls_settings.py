"""The NGC key never goes to a registry whose TLS the deploy does not verify (issue 18).

`validate` refuses what the inventory alone shows (registry_login = true, or ngc_api_key_file, with
registry_tls_verify = false); the deploy refuses a key from the environment before reading any host;
the operations refuse the combination too, and hold the login itself to verified TLS where the runtime
lets them (podman's --tls-verify=true, enroot's ENROOT_ALLOW_HTTP=no).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import problems_of, write_inventory

from nemotron_deploy import inventory
from nemotron_deploy.deploy import steps
from nemotron_deploy.deploy.errors import DeployError
from nemotron_deploy.deploy.operations import containers

MIRROR = "registry.example.internal:5000"


def _refusal_says_what_and_how(message: str) -> None:
    for words in ("registry_tls_verify = false", "NGC key", "CA", "registry_login = false"):
        assert words in message, f"{words!r} missing from: {message}"


def test_validate_refuses_registry_login_without_tls_verification(tmp_path):
    path = write_inventory(
        tmp_path,
        settings={
            "container_image": f"{MIRROR}#nvidia/nemo:24.01.framework",
            "registry_login": True,
            "registry_tls_verify": False,
        },
    )
    problems = problems_of(path)
    assert problems, "validate accepted a login to an unverified registry"
    for p in problems:
        assert "registry_login = true" in p.message and MIRROR in p.message
        _refusal_says_what_and_how(p.message)


def test_validate_refuses_a_key_file_for_nvcr_without_tls_verification(tmp_path):
    """nvcr.io is logged in to by default: a key file there means the key would be sent."""
    path = write_inventory(
        tmp_path, settings={"ngc_api_key_file": "/home/me/.ngc-key", "registry_tls_verify": False}
    )
    problems = problems_of(path)
    assert all("ngc_api_key_file" in p.message and "nvcr.io" in p.message for p in problems), problems
    _refusal_says_what_and_how(problems[0].message)


@pytest.mark.parametrize(
    "settings",
    [
        # The sandbox's case: a plain-HTTP mirror, pulled without a key.
        {"container_image": f"{MIRROR}#nvidia/nemo:24.01.framework", "registry_tls_verify": False},
        # A key file, but no login to this mirror (registry_login defaults to nvcr.io only).
        {
            "container_image": f"{MIRROR}#nvidia/nemo:24.01.framework",
            "registry_tls_verify": False,
            "ngc_api_key_file": "/home/me/.ngc-key",
        },
        {"registry_login": False, "registry_tls_verify": False, "ngc_api_key_file": "/home/me/.ngc-key"},
        # Verified TLS: the login is fine.
        {"container_image": f"{MIRROR}#nvidia/nemo:24.01.framework", "registry_login": True},
    ],
)
def test_validate_accepts_what_sends_no_key_unverified(tmp_path, settings):
    inventory.load(str(write_inventory(tmp_path, settings=settings)))


def _cluster(tmp_path, **settings):
    return inventory.load(str(write_inventory(tmp_path, settings=settings)))


def test_the_deploy_refuses_a_key_from_the_environment_for_an_unverified_registry(tmp_path, monkeypatch):
    cluster = _cluster(tmp_path, registry_tls_verify=False)  # nvcr.io: logged in to with a key
    monkeypatch.setenv("NGC_API_KEY", "nvapi-secret")
    with pytest.raises(DeployError) as info:
        steps.refuse_key_to_unverified_registry(cluster)
    message = str(info.value)
    assert "$NGC_API_KEY" in message and "nvcr.io" in message and "nothing was changed" in message
    assert "nvapi-secret" not in message
    _refusal_says_what_and_how(message)
    with pytest.raises(DeployError):  # where the key is read, too
        steps.ngc_key(cluster)


def test_the_deploy_goes_on_without_a_key_or_with_tls_verified(tmp_path, monkeypatch):
    monkeypatch.delenv("NGC_API_KEY", raising=False)
    unverified = _cluster(tmp_path / "a", registry_tls_verify=False)
    steps.refuse_key_to_unverified_registry(unverified)  # no key: an anonymous pull
    assert steps.ngc_key(unverified) is None
    monkeypatch.setenv("NGC_API_KEY", "nvapi-secret")
    steps.refuse_key_to_unverified_registry(_cluster(tmp_path / "b"))
    no_login = _cluster(
        tmp_path / "c", container_image=f"{MIRROR}#nvidia/nemo:24.01.framework", registry_tls_verify=False
    )
    steps.refuse_key_to_unverified_registry(no_login)  # this mirror gets no login: the key stays here


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_pull_image_refuses_a_login_without_tls_verification(runtime):
    with pytest.raises(ValueError, match="tls_verify"):
        list(
            containers.pull_image._inner(
                runtime=runtime,
                image=f"{MIRROR}/n:1",
                present=False,
                ngc_key="k",
                login=True,
                tls_verify=False,
            )
        )


def test_podman_logs_in_and_pulls_with_tls_verification_forced(tmp_path, monkeypatch):
    """A registries.conf entry marking the registry insecure must not carry the key: explicit flag."""
    monkeypatch.setattr(
        containers, "host", SimpleNamespace(get_temp_filename=lambda hint: str(tmp_path / "k"))
    )
    steps_ = list(
        containers.pull_image._inner(
            runtime="podman", image=f"{MIRROR}/n:1", present=False, ngc_key="k", login=True
        )
    )
    login = steps_[2].get_raw_value()
    assert login.startswith("podman login --tls-verify=true "), login
    assert steps_[-1].args[0].command.startswith("podman pull --tls-verify=true "), steps_[-1].args[0].command
    (anonymous,) = containers.pull_image._inner(runtime="podman", image=f"{MIRROR}/n:1", present=False)
    assert "--tls-verify" not in anonymous.args[0].command  # registries.conf decides, as before


def test_enroot_is_held_to_https_when_it_has_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(
        containers, "host", SimpleNamespace(get_temp_filename=lambda hint: str(tmp_path / "k"))
    )
    *_, watch = containers.import_image_file._inner(
        runtime="pyxis", image=f"{MIRROR}#n:1", target="/x.sqsh", present=False, tmp_dir="/t", ngc_key="k"
    )
    assert " ENROOT_ALLOW_HTTP=no enroot import " in watch.args[0].command
    (anonymous,) = containers.import_image_file._inner(
        runtime="pyxis", image=f"{MIRROR}#n:1", target="/x.sqsh", present=False, tmp_dir="/t"
    )
    assert "ENROOT_ALLOW_HTTP" not in anonymous.args[0].command  # the node's enroot.conf decides


@pytest.mark.parametrize(("secure", "refused"), [("false", True), ("true", False), ("", False)])
def test_docker_logs_in_only_where_its_engine_verifies_the_registry(tmp_path, monkeypatch, secure, refused):
    """docker has no --tls-verify: before the key reaches the node, the engine is asked whether it
    treats the registry as insecure (daemon.json's insecure-registries); then the deploy stops."""
    import subprocess

    from pyinfra.api import FunctionCommand

    monkeypatch.setattr(
        containers, "host", SimpleNamespace(get_temp_filename=lambda hint: str(tmp_path / "k"))
    )
    check, *rest = containers.pull_image._inner(
        runtime="docker", image=f"{MIRROR}/n:1", present=False, ngc_key="k", login=True
    )
    assert isinstance(check, FunctionCommand) and rest[0].get_raw_value().startswith("rm -rf "), rest
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A stand-in engine client that answers the template's question as docker info would.
    (bindir / "docker").write_text(f'#!/bin/sh\ncase "$*" in *\'"{MIRROR}"\'*) echo "{secure}";; esac\n')
    (bindir / "docker").chmod(0o755)

    def run_shell_command(command):
        done = subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, env={"PATH": f"{bindir}:/usr/bin:/bin"}
        )
        return done.returncode == 0, SimpleNamespace(stdout=done.stdout, stderr=done.stderr)

    state = SimpleNamespace(config=SimpleNamespace(FAIL_PERCENT=None))
    fake_host = SimpleNamespace(name="gpu01", run_shell_command=run_shell_command)
    if refused:
        with pytest.raises(RuntimeError, match="insecure-registries") as info:
            check.function(state, fake_host, *check.args)
        assert "registry_login = false" in str(info.value) and f"certs.d/{MIRROR}/ca.crt" in str(info.value)
        assert state.config.FAIL_PERCENT == 0, "the refused login did not stop the deploy"
    else:
        check.function(state, fake_host, *check.args)
        assert state.config.FAIL_PERCENT is None
