"""Load a pyinfra inventory the way pyinfra does, and validate every host's settings before deploying.

Two passes: the inventory *file* is read raw first, for the mistakes pyinfra forgives silently (an
empty group, a group that is not a list, a duplicate host); then pyinfra's own loader builds the
inventory (with `group_data/`), and every host's merged data is validated by `ClusterSettings`,
checked for consistency across hosts, and sized by the planner.
"""

from __future__ import annotations

import difflib
import os
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import api_keys, planner
from .catalog import CatalogError, ModelSpec
from .settings import API_KEY_LIKE, NGC_KEY_LIKE, SECRET_FIELD_NAMES, ClusterSettings, split_host_data

ROLES = ("login", "compute")

# What to change, for pydantic's generic messages (ours already say it).
FIXES = {
    "port": "use a port from 1024 to 65535 (the model card uses 1424)",
    "gpus_per_node": "set it to the GPUs each compute node really has",
    "gpu_type": "use a key of nemotron_deploy/catalog/gpus.yaml",
    "container_runtime": "use one of pyxis, docker, podman, apptainer, host",
    "mode": "use serve (keep serving) or smoke (one call, then end the job)",
    "gpu_request": "use gpus-per-node, or gres on clusters that reject --gpus-per-node",
    "replicas": "use 1 or more, or leave it unset for every replica the compute nodes hold (to stop "
    "serving, cancel each replica: scancel --name=<job_name>-r<i>)",
}


class InventoryError(Exception):
    """One or more problems; each names file, host, field, bad value and the fix."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    host: str | None = None
    field: str | None = None
    value: Any = None

    def __post_init__(self) -> None:
        # A problem's value is printed: never let a key in it (e.g. in a malformed group's host data).
        object.__setattr__(self, "value", _redacted(self.value, (self.field or "").rsplit(".", 1)[-1]))

    def __str__(self) -> str:
        where = self.file + (f": host {self.host}" if self.host else "")
        what = f": {self.field}" if self.field else ""
        value = f" = {self.value!r}" if self.value is not None else ""
        return f"{where}{what}{value}: {self.message}"

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "host": self.host,
            "field": self.field,
            "value": _jsonable(self.value),
            "message": self.message,
        }


@dataclass
class Cluster:
    """A validated inventory: who is who, the cluster's settings, and the sized plan."""

    path: str
    name: str
    login: list[str]
    compute: list[str]
    settings: ClusterSettings
    plan: planner.Plan
    host_settings: dict[str, ClusterSettings] = field(default_factory=dict)
    # The endpoint's API keys (names and hashes, from endpoint_api_keys_file); empty with auth none.
    api_keys: list[api_keys.ApiKey] = field(default_factory=list)
    # Names this validation for per-run caches (rendered files, wheels); never reused, unlike id().
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def login_host(self) -> str:
        return self.login[0]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _host_name(entry: Any) -> Any:
    return entry[0] if isinstance(entry, tuple) else entry


# Set while inventories are read for validation only (nothing connects): an inventory may then skip
# checks that only matter before connecting, such as the sandbox's "is the bridge up?".
OFFLINE_ENV = "NEMOTRON_DEPLOY_OFFLINE"


@contextmanager
def _pyinfra_state() -> Iterator[None]:
    """pyinfra's file loader needs a State in context; the CLI has one, `nemotron-deploy` doesn't."""
    from pyinfra.api.state import State
    from pyinfra.context import ctx_state

    previous = os.environ.get(OFFLINE_ENV)
    os.environ[OFFLINE_ENV] = "1"
    try:
        if ctx_state.isset():
            yield
        else:
            with ctx_state.use(State(check_for_changes=False)):
                yield
    finally:
        if previous is None:
            del os.environ[OFFLINE_ENV]
        else:
            os.environ[OFFLINE_ENV] = previous


def _user_code_error(exc: Exception) -> tuple[str | None, str]:
    """(file, "Type: message") for an exception from an inventory or group_data file.

    pyinfra wraps those in UnexpectedExternalError, whose str() itself raises; unwrap it.
    """
    inner = getattr(exc, "exception", exc)
    return getattr(exc, "filename", None), f"{type(inner).__name__}: {inner}"


def check_inventory_file(path: str) -> list[Problem]:
    """The structural mistakes pyinfra skips over without a word."""
    from pyinfra_cli.util import exec_file

    problems: list[Problem] = []
    try:
        with _pyinfra_state():
            attrs = exec_file(path, return_locals=True)
    except Exception as exc:  # the inventory is user code: report whatever it raised
        return [Problem(path, f"the inventory file fails to run: {_user_code_error(exc)[1]}")]

    groups: dict[str, list] = {}
    for name, value in attrs.items():
        if name.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        hosts = (
            value[0] if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict) else value
        )
        if not isinstance(hosts, (list, tuple)):
            problems.append(
                Problem(
                    path,
                    "pyinfra ignores a group that is not a list of hosts; make it a list, "
                    "or prefix the name with '_' if it is not a group",
                    field=name,
                    value=value,
                )
            )
            continue
        if not hosts:
            problems.append(
                Problem(path, "empty group: pyinfra skips it silently; list its hosts", field=name, value=[])
            )
            continue
        bad = [
            h
            for h in hosts
            if not isinstance(h, (str, tuple))
            or (
                isinstance(h, tuple)
                and (len(h) != 2 or not isinstance(h[0], str) or not isinstance(h[1], dict))
            )
        ]
        if bad:
            problems.append(
                Problem(
                    path,
                    "pyinfra ignores this whole group: hosts must be 'name' or ('name', {data})",
                    field=name,
                    value=bad[0],
                )
            )
            continue
        names = [_host_name(h) for h in hosts]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(
                Problem(
                    path,
                    "duplicate host: pyinfra would merge the entries; list it once",
                    host=dup,
                    field=name,
                )
            )
        groups[name] = names

    for role in ROLES:
        if role not in groups and not any(p.field == role for p in problems):
            problems.append(Problem(path, f'no `{role}` group: define {role} = ["host", ...]', field=role))
    for host in sorted(set(groups.get("login", [])) & set(groups.get("compute", []))):
        problems.append(
            Problem(
                path,
                "host is in both login and compute: jobs are submitted from the login "
                "node and run on compute nodes; keep them apart",
                host=host,
            )
        )
    if len(groups.get("login", [])) > 1:
        problems.append(
            Problem(
                path,
                "more than one login host: the sbatch file and the health timer go on exactly one; keep one",
                field="login",
                value=groups["login"],
            )
        )
    return problems


def _pydantic_problems(path: str, host: str, exc: ValidationError, data: dict) -> list[Problem]:
    known = list(ClusterSettings.model_fields)
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        name = ".".join(loc) if loc else None
        value = err.get("input") if loc else None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[0], known, n=1)
            msg = "unknown setting" + (
                f"; did you mean {close[0]!r}?" if close else "; `nemotron-deploy settings` lists them all"
            )
        elif err["type"] == "missing":
            # The description's first sentence says what it is; `nemotron-deploy settings` says more.
            what = (ClusterSettings.model_fields[loc[0]].description or "").split(". ", 1)[0].rstrip(".")
            msg = f"required setting is missing: set it in group_data ({what})"
            value = None
        elif loc and loc[0] in FIXES:
            msg = f"{msg}; {FIXES[loc[0]]}"
        if not loc:  # a model-level check: find the field it is about
            for candidate in (
                "submit",
                "endpoint_tls",
                "gpus_per_node",
                "container_image",
                "gpu_type",
                "model",
            ):
                if (
                    (candidate == "submit" and err["msg"].startswith("Value error, submit=true"))
                    or (candidate != "submit" and candidate in err["msg"])
                    or (candidate == "gpu_type" and "GPU type" in err["msg"])
                ):
                    name, value = candidate, data.get(candidate)
                    break
        problems.append(Problem(path, msg, host=host, field=name, value=value))
    return problems


def _secret_fields(name: str, value: Any) -> list[str]:
    """`name` and the dotted names inside it (job_env.X, list items) that hold a key in plain text."""
    if name.rsplit(".", 1)[-1].lower() in SECRET_FIELD_NAMES:
        return [name]
    if isinstance(value, str):
        return [name] if NGC_KEY_LIKE.match(value) or API_KEY_LIKE.match(value) else []
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _secret_fields(f"{name}.{k}", v)]
    if isinstance(value, (list, tuple)):
        return [f for i, v in enumerate(value) for f in _secret_fields(f"{name}.{i}", v)]
    return []


def _redacted(value: Any, name: str = "") -> Any:
    """`value` with everything `_secret_fields` would flag replaced by <redacted>."""
    if isinstance(value, dict):
        return {k: _redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v, name) for v in value)
    return "<redacted>" if _secret_fields(name, value) else value


def _holds_api_key(value: Any) -> bool:
    if isinstance(value, str):
        return bool(API_KEY_LIKE.match(value))
    if isinstance(value, dict):
        return any(_holds_api_key(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_api_key(v) for v in value)
    return False


def _secret_problems(path: str, host: str, data: dict) -> list[Problem]:
    return [
        Problem(
            path,
            "looks like an endpoint API key in plain text: the inventory holds only their hashes, in "
            "endpoint_api_keys_file (`nemotron-deploy api-key new NAME --file FILE`); remove it"
            if _holds_api_key(value)
            else "looks like an NGC key in plain text: secrets never go in inventory data; export it "
            "in the environment variable named by ngc_api_key_env, or put it in a 0600 file named by "
            "ngc_api_key_file",
            host=host,
            field=field_name,
            value="<redacted>",
        )
        for key, value in data.items()
        for field_name in _secret_fields(key, value)
    ]


def load(
    path: str,
    override_data: dict | None = None,
    model_spec: ModelSpec | None = None,
    inventory: Any = None,
) -> Cluster:
    """Load and validate one inventory; raise InventoryError listing every problem found.

    `inventory` is pyinfra's already-built Inventory when called from inside a deploy (so `--data`
    overrides count); otherwise it is built here with pyinfra's own loader.
    """
    from pyinfra_cli.inventory import make_inventory_from_files

    path = str(path)
    if not Path(path).is_file():
        raise InventoryError([Problem(path, "no such inventory file")])
    problems = check_inventory_file(path)
    if problems:
        raise InventoryError(problems)

    if inventory is None:
        try:
            with _pyinfra_state():
                inventory = make_inventory_from_files(path, override_data=override_data or {})
        except Exception as exc:  # group_data files are user code too
            file, error = _user_code_error(exc)
            where = f"group data file {file}" if file else "loading the group data"
            raise InventoryError([Problem(file or path, f"{where} fails to run: {error}")]) from None
    login = [h.name for h in inventory.get_group("login")]
    compute = [h.name for h in inventory.get_group("compute")]

    host_settings: dict[str, ClusterSettings] = {}
    for host in inventory:
        ours, _ = split_host_data(host.data.dict())
        found = _secret_problems(path, host.name, ours)
        if found:
            problems += found
            continue
        try:
            host_settings[host.name] = ClusterSettings.model_validate(ours)
        except ValidationError as exc:
            problems += _pydantic_problems(path, host.name, exc, ours)
        except CatalogError as exc:
            problems.append(Problem(path, str(exc), host=host.name))
    if problems:
        raise InventoryError(problems)

    reference_host = compute[0]
    settings = host_settings[reference_host]
    for name, other in host_settings.items():
        for key in ClusterSettings.model_fields:
            if getattr(other, key) != getattr(settings, key):
                problems.append(
                    Problem(
                        path,
                        f"differs from {reference_host}'s {getattr(settings, key)!r}: cluster settings must "
                        "be the same on every host; set it in group_data, not per host",
                        host=name,
                        field=key,
                        value=getattr(other, key),
                    )
                )
    if problems:
        raise InventoryError(problems)

    try:
        sized = planner.plan(
            model_spec or settings.model_spec,
            settings.gpu,
            settings.node_gpus,
            len(compute),
            batch=settings.inference_batch,
            runtime_reserve_gib=settings.runtime_reserve_gib,
            tensor_parallel=settings.tensor_parallel,
            pipeline_parallel=settings.pipeline_parallel,
            replicas=settings.replicas,
        )
    except planner.PlanError as exc:
        msg = str(exc)
        fld = next(
            (f for f in ("tensor_parallel", "pipeline_parallel", "replicas") if msg.startswith(f + "=")),
            "compute",
        )
        raise InventoryError([Problem(path, msg, field=fld)]) from None

    # The same machine in both groups under two names (one address): it runs a replica's server
    # and the endpoint. (One name in both groups is refused above.)
    address = {h.name: h.data.get("ssh_hostname") or h.name for h in inventory}
    both = sorted(
        f"{name} ({address[name]})"
        for name in login
        if any(address[name] == address[node] for node in compute)
    )
    if both and settings.endpoint is not False and settings.endpoint_port == settings.port:
        raise InventoryError(
            [
                Problem(
                    path,
                    f"the endpoint and the replicas' servers would both listen on port {settings.port} on "
                    f"{', '.join(both)}, which is also a compute node: set endpoint_port (or port) "
                    "to another port, or endpoint = false",
                    field="endpoint_port",
                    value=settings.endpoint_port,
                )
            ]
        )

    keys = _api_keys(path, settings)
    return Cluster(path, Path(path).stem, login, compute, settings, sized, host_settings, keys)


def keys_file_path(inventory_path: str, settings: ClusterSettings) -> Path | None:
    """endpoint_api_keys_file, a relative one from the inventory file's directory."""
    if not settings.endpoint_api_keys_file:
        return None
    return Path(inventory_path).parent / Path(settings.endpoint_api_keys_file).expanduser()


def _api_keys(path: str, settings: ClusterSettings) -> list[api_keys.ApiKey]:
    """The endpoint's keys: required with endpoint_auth = api-key (where the endpoint may run)."""
    if settings.endpoint is False or settings.endpoint_auth == "none":
        return []
    keys_file = keys_file_path(path, settings)
    if keys_file is None:
        raise InventoryError(
            [
                Problem(
                    path,
                    "endpoint_auth = api-key (the default) needs the file of API key hashes: make one "
                    "with `nemotron-deploy api-key new NAME --file FILE` and set endpoint_api_keys_file "
                    "= FILE in group_data (or endpoint_auth = 'none' to open the endpoint to anyone "
                    "who can reach its port)",
                    field="endpoint_api_keys_file",
                )
            ]
        )
    try:
        return api_keys.read(keys_file)
    except api_keys.KeysFileError as exc:
        raise InventoryError(
            [Problem(path, str(exc), field="endpoint_api_keys_file", value=settings.endpoint_api_keys_file)]
        ) from None
