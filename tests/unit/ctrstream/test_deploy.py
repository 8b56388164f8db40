"""The deployment files under deploy/ against the code, with no network and no docker: every
`ctrstream` command they run parses with the CLI's own parser, every config they carry loads
with the config schema, no secret is written in them, and the pieces that must agree do
(config paths and mounts, volumes and state directories, addresses and replicas, images,
schedules, Kafka listeners)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import re
import shlex
import tomllib
from pathlib import Path
from typing import get_origin, get_type_hints

import pytest
import yaml

from ctrstream.cli import build_parser
from flows.config import Config, load_config

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CRON = DEPLOY / "cron" / "ctrstream-retrain"
IMAGE = "ctrstream"
# Programs in the image that run ctrstream for a container (deploy/Dockerfile installs them).
WRAPPERS = {"ctrstream-peer": "deploy/ctrstream_peer.py",
            "ctrstream-retrain-daily": "deploy/retrain-daily.sh"}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
K8S_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
K8S_OBJECTS = [(p.name, d) for p in K8S_FILES for d in _yaml_docs(p)]
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
APPLIED = [(f, o) for f, o in K8S_OBJECTS if f in KUSTOMIZATION["resources"]]


def _objects(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for _, o in APPLIED if o["kind"] == kind}


def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def _image_name(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def _ctrstream_containers() -> list[tuple[str, dict, dict]]:
    """(where, the object, the container) of every k8s container running our image."""
    out = []
    for f, obj in APPLIED:
        spec = _pod_spec(obj)
        for c in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            if _image_name(c["image"]) == IMAGE:
                out.append((f"k8s/{f} {obj['kind']}/{obj['metadata']['name']}", obj, c))
    return out


def _app_services() -> dict[str, dict]:
    """The compose services running our image."""
    return {n: s for n, s in SERVICES.items() if _image_name(s.get("image", "")) == IMAGE}


def _argv(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


# -- extracting `ctrstream` invocations ---------------------------------------------------------

def _shell_invocations(text: str) -> list[list[str]]:
    """The argument lists of every `ctrstream` (or .../bin/ctrstream) run in shell text,
    looking inside quoted strings too (sh -c '...')."""
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or "ctrstream" not in line:
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        for i, tok in enumerate(tokens):
            if re.search(r"\s", tok):
                found += _shell_invocations(tok)
            elif tok == "ctrstream" or tok.endswith("/ctrstream"):
                args = []
                for t in tokens[i + 1:]:
                    if re.fullmatch(r"[;&|<>()]+", t):
                        if args and args[-1].isdigit() and t.startswith(">"):
                            args.pop()  # the 2 of 2>&1
                        break
                    args.append(t)
                found.append(args)
    return found


def _cron_entries() -> list[tuple[list[str], str, str]]:
    """(the 5 time fields, user, command) of each line of the /etc/cron.d file."""
    entries = []
    for line in CRON.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or re.match(r"^\w+=", line):
            continue
        fields = line.split(None, 6)
        entries.append((fields[:5], fields[5], fields[6]))
    return entries


def _invocations_of(cmd: list[str], where: str) -> list[tuple[str, list[str]]]:
    if not cmd:
        return []
    if cmd[0] == "ctrstream":
        return [(where, cmd[1:])]
    if cmd[0] == "ctrstream-peer":  # adds --process-id N (N from the hostname)
        return [(f"{where} via ctrstream-peer", [*cmd[1:], "--process-id", "0"])]
    if cmd[0] in WRAPPERS:
        script = WRAPPERS[cmd[0]]
        return [(f"{where} via {script}", a) for a in _shell_invocations((ROOT / script)
                                                                         .read_text())]
    if cmd[0] in ("sh", "bash") and "-c" in cmd:
        return [(where, a) for a in _shell_invocations(cmd[cmd.index("-c") + 1])]
    return []


def _all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for name, svc in SERVICES.items():
        cmd = svc.get("command", [])
        cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
        found += _invocations_of(cmd, f"compose.yaml service {name}")
    for where, _, c in _ctrstream_containers():
        found += _invocations_of(_argv(c), f"{where} container {c['name']}")
    for _, _, command in _cron_entries():
        found += [("cron/ctrstream-retrain", a) for a in _shell_invocations(command)]
    return found


INVOCATIONS = _all_invocations()


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the ctrstream parser has no subcommands")


def _subcommand(argv: list[str]) -> str | None:
    it = iter(argv)
    for tok in it:
        if tok == "--config":
            next(it, None)
        elif not tok.startswith("-"):
            return tok
    return None


def _part(argv: list[str]) -> str | None:
    """`run FLOW` or the subcommand's name."""
    name = _subcommand(argv)
    if name == "run":
        return "run " + next(t for t in argv[argv.index("run") + 1:] if not t.startswith("-"))
    return name


def test_manifests_run_every_part():
    expected = {"topics", "run join", "run learn", "retrain", "serve"}
    for prefix in ("compose", "k8s"):
        assert {_part(a) for w, a in INVOCATIONS if w.startswith(prefix)} == expected, prefix
    assert [_part(a) for w, a in INVOCATIONS if w.startswith("cron")] == ["retrain"]


@pytest.mark.parametrize("where,argv", INVOCATIONS,
                         ids=[f"{w}: ctrstream {' '.join(a)}" for w, a in INVOCATIONS])
def test_command_is_a_valid_cli_invocation(where, argv):
    parser = build_parser()
    commands = _commands(parser)
    name = _subcommand(argv)
    if name not in commands:
        pytest.fail(f"{where} runs `ctrstream {shlex.join(argv)}`, but the CLI has no {name!r} "
                    f"command (registered: {', '.join(sorted(commands))}). Register it in "
                    "ctrstream/cli.py COMMANDS, or fix the manifest.")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where} runs `ctrstream {shlex.join(argv)}`, which the CLI rejects: "
                        f"{err.getvalue().strip().splitlines()[-1]}")


def test_shell_extraction_finds_commands():
    assert _shell_invocations("ctrstream retrain || echo failed") == [["retrain"]]
    assert _shell_invocations("x sh -c 'a; exec /v/bin/ctrstream --config f retrain' 2>&1") \
        == [["--config", "f", "retrain"]]
    assert _shell_invocations("ctrstream run join >> log 2>&1") == [["run", "join"]]
    assert _shell_invocations("echo 'ctrstream-retrain-daily: ok'  # ctrstream retrain") == []


# -- configs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def configmap_toml(tmp_path_factory) -> Path:
    """The ConfigMap's ctrstream.toml, as a file."""
    (cm,) = [o for o in _objects("ConfigMap").values() if "ctrstream.toml" in o.get("data", {})]
    path = tmp_path_factory.mktemp("configmap") / "ctrstream.toml"
    path.write_text(cm["data"]["ctrstream.toml"])
    return path


@pytest.fixture(scope="module")
def k8s_cfg(configmap_toml) -> Config:
    return load_config(configmap_toml, environ={})


def test_compose_config_loads():
    cfg = load_config(DEPLOY / "ctrstream.toml", environ={})
    assert cfg.redis.password == ""  # from the environment only


def test_configmap_config_loads(configmap_toml):
    cfg = load_config(configmap_toml, environ={})
    assert cfg.redis.password == ""


def _dummy(var: str) -> str:
    """A value of the right type for the config key that ``var`` names."""
    section, _, key = var.removeprefix("CTRSTREAM_").lower().partition("__")
    hints = get_type_hints(Config)
    typ = hints.get(section)
    if key:
        typ = get_type_hints(typ).get(key) if dataclasses.is_dataclass(typ) else None
    if get_origin(typ) is dict:
        return "{}"
    if get_origin(typ) is list:
        return "[]"
    return {bool: "true", int: "1", float: "1.0"}.get(typ, "x")


def _placeholder(value: str) -> bool:
    v = value.strip("\"'\\ ")
    return v == "" or "$" in v or "REPLACE_ME" in v or v in ("***", "...")


def _env_vars() -> list[tuple[str, str, str | None]]:
    """(where, name, literal value or None) of every CTRSTREAM_* variable set in a manifest."""
    out = []
    for name, svc in _app_services().items():
        for var, value in (svc.get("environment") or {}).items():
            out.append((f"compose service {name}", var, None if value is None else str(value)))
    for where, _, c in _ctrstream_containers():
        for e in c.get("env", []):
            out.append((where, e["name"], e.get("value")))
    return [o for o in out if o[1].startswith("CTRSTREAM_")]


@pytest.mark.parametrize("where,var,value", _env_vars(),
                         ids=[f"{w}:{v}" for w, v, _ in _env_vars()])
def test_env_var_names_a_config_key(where, var, value, configmap_toml):
    if var == "CTRSTREAM_CONFIG":
        return  # the file's path: test_config_file_is_mounted
    config = DEPLOY / "ctrstream.toml" if where.startswith("compose") else configmap_toml
    value = _dummy(var) if value is None or _placeholder(value) else value
    load_config(config, environ={var: value})  # raises ConfigError naming an unknown key


def test_config_file_is_mounted():
    dockerfile_default = re.search(r"CTRSTREAM_CONFIG=(\S+)",
                                   (DEPLOY / "Dockerfile").read_text()).group(1)
    for name, svc in _app_services().items():
        path = (svc.get("environment") or {}).get("CTRSTREAM_CONFIG", dockerfile_default)
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        assert mounts.get(path) == "./ctrstream.toml", f"compose {name}: {path} not mounted"
    configmaps = _objects("ConfigMap")
    for where, obj, c in _ctrstream_containers():
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        path = env.get("CTRSTREAM_CONFIG", dockerfile_default)
        volumes = {v["name"]: v for v in _pod_spec(obj).get("volumes", [])}
        found = False
        for m in c.get("volumeMounts", []):
            cm = volumes.get(m["name"], {}).get("configMap")
            if cm and path.startswith(m["mountPath"].rstrip("/") + "/"):
                key = path[len(m["mountPath"].rstrip("/")) + 1:]
                assert cm["name"] in configmaps, f"{where}: no ConfigMap {cm['name']}"
                assert key in configmaps[cm["name"]]["data"], f"{where}: no key {key}"
                found = True
        assert found, f"{where}: CTRSTREAM_CONFIG={path} is not on a ConfigMap mount"


# -- no secrets in the files -------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"""(?i)[\w.-]*(?:password|passwd|secret|token|auth)[\w.-]*["']?[ \t]*[:=]"""
               r"""[ \t]*(?P<value>[^\s,}#]*)"""),
    re.compile(r"(?i)requirepass[ \t]+(?P<value>\S+)"),
    re.compile(r"(?i)\w+://[^:/\s@'\"]*:(?P<value>[^@\s/'\"]+)@"),
]


def _secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)
            if not _placeholder(m.group("value"))]


def test_secret_detector_catches_literal_values():
    for leak in ["password: hunter2", "REDIS_PASSWORD=hunter2", "--requirepass hunter2",
                 '"sasl.password" = "hunter2"', "redis://:hunter2@redis:6379/0",
                 "CTRSTREAM_REDIS__PASSWORD: 'hunter2'"]:
        assert _secrets_in(leak), leak
    for fine in ["password: REPLACE_ME", "REDIS_PASSWORD=", "--requirepass \"$$REDIS_PASSWORD\"",
                 "CTRSTREAM_REDIS__PASSWORD: ${REDIS_PASSWORD:?set it}", "redis://redis:6379/0",
                 "secretKeyRef:", "redis-password: REPLACE_ME"]:
        assert not _secrets_in(fine), fine


def test_no_secret_values_in_deploy_files():
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != ".env"
             and "__pycache__" not in p.parts]
    leaks = {str(p.relative_to(ROOT)): s for p in files if (s := _secrets_in(p.read_text()))}
    assert not leaks, f"literal secrets (use an env reference or REPLACE_ME): {leaks}"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_compose_redis_password_comes_from_the_environment():
    required = "${REDIS_PASSWORD:?"
    assert SERVICES["redis"]["environment"]["REDIS_PASSWORD"].startswith(required)
    assert "--requirepass \"$$REDIS_PASSWORD\"" in " ".join(SERVICES["redis"]["command"])
    for name, svc in _app_services().items():
        assert svc["environment"]["CTRSTREAM_REDIS__PASSWORD"].startswith(required), name


def test_k8s_secret_references_match_the_template():
    (template,) = [o for f, o in K8S_OBJECTS if o["kind"] == "Secret"]
    assert "secret.example.yaml" not in KUSTOMIZATION["resources"], \
        "applying the template would overwrite the real Secret with placeholders"
    for where, _, c in _ctrstream_containers():
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == template["metadata"]["name"], where
                assert ref["key"] in template["stringData"], f"{where}: {ref['key']}"
        names = [e["name"] for e in c.get("env", [])]
        assert "CTRSTREAM_REDIS__PASSWORD" in names, where


# -- Kubernetes --------------------------------------------------------------------------------

def test_k8s_objects_are_complete_and_namespace_agnostic():
    assert K8S_OBJECTS
    for f, obj in K8S_OBJECTS:
        assert obj.get("apiVersion") and obj.get("kind"), f
        assert obj.get("metadata", {}).get("name"), f
        assert "namespace" not in obj["metadata"], f"{f}: manifests are namespace-agnostic"
    assert "namespace" not in KUSTOMIZATION


def test_kustomization_lists_every_manifest():
    for r in KUSTOMIZATION["resources"]:
        assert (K8S / r).is_file(), r
    listed = set(KUSTOMIZATION["resources"])
    assert listed == {p.name for p in K8S_FILES if not p.name.endswith(".example.yaml")}


def test_statefulsets_keep_recovery_state_on_claims(k8s_cfg):
    cfg = k8s_cfg
    services = _objects("Service")
    sets = _objects("StatefulSet")
    assert set(sets) == {"ctrstream-join", "ctrstream-learn"}
    for name, sts in sets.items():
        spec = sts["spec"]
        templates = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        assert templates, f"{name}: no volumeClaimTemplates"
        (c,) = spec["template"]["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert templates <= set(mounts), f"{name}: a claim template is not mounted"
        assert any(mounts[t] == cfg.recovery_dir for t in templates), \
            f"{name}: recovery_dir {cfg.recovery_dir} is not on a claim template"
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        svc = services[spec["serviceName"]]
        assert svc["spec"]["clusterIP"] == "None", f"{name}: its Service must be headless"
        assert svc["spec"]["selector"].items() <= labels.items(), name


def test_learn_and_retrain_share_the_archive_volume(k8s_cfg):
    cfg = k8s_cfg
    claims = {}
    for _, obj, c in _ctrstream_containers():
        volumes = {v["name"]: v for v in _pod_spec(obj).get("volumes", [])}
        for m in c.get("volumeMounts", []):
            pvc = volumes.get(m["name"], {}).get("persistentVolumeClaim")
            if pvc and m["mountPath"] == cfg.data_dir:
                claims[obj["metadata"]["name"]] = pvc["claimName"]
    assert claims.get("ctrstream-learn") == claims.get("ctrstream-retrain") is not None, claims
    pvc = _objects("PersistentVolumeClaim")[claims["ctrstream-learn"]]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], \
        "the retrain's pod may run on another node than the learn pod"


def _cron_ok(fields: list[str]) -> bool:
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, ranges, strict=True):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return False
            if base == "*":
                continue
            a, _, b = base.partition("-")
            if not all(x.isdigit() and lo <= int(x) <= hi for x in (a, b or a)):
                return False
    return True


def test_cron_field_check():
    assert _cron_ok("30 0 * * *".split()) and _cron_ok("*/5 1-3 1,15 * 0".split())
    assert not _cron_ok("30 0 * *".split()) and not _cron_ok("60 0 * * *".split())


def test_retrain_runs_daily_at_01_30_utc_without_overlap():
    """01:30: late clicks are reported up to late_click_horizon_ms (1 h) after the day ends."""
    (cron,) = _objects("CronJob").values()
    schedule = cron["spec"]["schedule"].split()
    assert _cron_ok(schedule), cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"].get("timeZone") in ("Etc/UTC", "UTC")
    assert schedule == ["30", "1", "*", "*", "*"]
    assert SERVICES["retrain"]["environment"]["RETRAIN_AT_UTC"] == "01:30"
    ((fields, user, command),) = _cron_entries()
    assert _cron_ok(fields) and fields == schedule
    assert "flock -n" in command  # no overlap on a plain host either


def test_topics_job_creates_the_topics():
    jobs = _objects("Job")
    assert [_argv(c) for j in jobs.values() for c in _pod_spec(j)["containers"]] == \
        [["ctrstream", "topics", "create"]]


def test_containers_have_resources_and_liveness():
    for where, obj, c in _ctrstream_containers():
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind}"
        if obj["kind"] == "StatefulSet":
            probe = c["livenessProbe"]["exec"]["command"]
            assert probe[:2] == ["pgrep", "-f"], where
            # the pattern matches the process before and after ctrstream-peer execs ctrstream
            argv = _argv(c)
            for cmdline in (argv, ["ctrstream", *argv[1:]]):
                line = "/usr/local/bin/python3 /usr/local/bin/" + " ".join(cmdline)
                assert re.search(probe[2], line), f"{where}: {probe[2]!r} misses {line!r}"


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _peer():
    spec = importlib.util.spec_from_file_location("ctrstream_peer", DEPLOY / "ctrstream_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_process_addresses_match_replicas():
    peer = _peer()
    services = _objects("Service")
    for name, sts in _objects("StatefulSet").items():
        spec = sts["spec"]
        replicas = spec.get("replicas", 1)
        (c,) = spec["template"]["spec"]["containers"]
        argv = _argv(c)
        if replicas == 1:
            assert "--addresses" not in argv and "--process-id" not in argv, name
            continue
        svc = services[spec["serviceName"]]
        (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "bytewax"]
        (cport,) = [p["containerPort"] for p in c["ports"] if p["name"] == "bytewax"]
        assert port == cport, name
        assert argv[0] == "ctrstream-peer", f"{name}: the process id comes from the hostname"
        assert "--process-id" not in argv, name
        expected = [f"{name}-{i}.{spec['serviceName']}:{port}" for i in range(replicas)]
        assert _flag(argv, "--addresses").split(";") == expected, name
        assert spec.get("podManagementPolicy") == "Parallel", name
        assert svc["spec"].get("publishNotReadyAddresses") is True, name
        # what ctrstream-peer makes of these arguments in each pod
        for i in range(replicas):
            full, _, n, addresses = peer.plan(argv[1:], f"{name}-{i}")
            assert n == i and full[-2:] == ["--process-id", str(i)] and addresses == expected
        with pytest.raises(peer.PeerError, match="replicas and its address list disagree"):
            peer.plan(argv[1:], f"{name}-{replicas}")
    for name in ("join", "learn"):  # compose: one process each
        argv = SERVICES[name]["command"]
        assert "--addresses" not in argv and "--process-id" not in argv, name


def test_images_are_consistent():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = f"{IMAGE}:{version}"
    for name, svc in _app_services().items():
        assert svc["image"] == image, name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
    for where, _, c in _ctrstream_containers():
        assert c["image"] == image, where
    assert any(i["name"] == IMAGE and i.get("newTag") == version
               for i in KUSTOMIZATION["images"]), "kustomization.yaml images: the same tag"
    assert _ctrstream_containers() and _app_services()


def test_dockerfile_builds_what_the_manifests_run():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in deps if d.startswith("torch==")]
    assert re.search(r"pip install --index-url https://download\.pytorch\.org/whl/cpu "
                     + re.escape(torch), text), f"the image must install {torch} from the CPU index"
    for program, source in WRAPPERS.items():
        assert re.search(rf"COPY .*{re.escape(source)} /usr/local/bin/{program}$", text, re.M), \
            program
    assert '"/usr/bin/tini", "--"' in text


# -- ctrstream-peer ----------------------------------------------------------------------------

def test_peer_ordinal_from_hostname():
    peer = _peer()
    assert peer.ordinal("ctrstream-join-12") == 12
    assert peer.ordinal("ctrstream-join-1.ctrstream-join.ns.svc.cluster.local") == 1
    for bad in ("localhost", "join-", "-3"):
        with pytest.raises(peer.PeerError, match="does not end in -N"):
            peer.ordinal(bad)


def test_peer_refuses_arguments_that_do_not_fit():
    peer = _peer()
    two = "--addresses", "j-0.s:2101;j-1.s:2101"
    with pytest.raises(peer.PeerError, match="--addresses is required"):
        peer.plan(["run", "join"], "j-0")
    with pytest.raises(peer.PeerError, match="derived from the pod's hostname"):
        peer.plan(["run", "join", *two, "--process-id", "1"], "j-0")
    with pytest.raises(peer.PeerError, match="does not name this pod"):
        peer.plan(["run", "join", *two], "other-1")
    with pytest.raises(peer.PeerError, match="expected `run FLOW"):
        peer.plan(["topics", "create"], "j-0")
    full, args, n, _ = peer.plan(["run", "join", *two, "--no-recovery"], "j-1")
    assert (n, args.flow, args.recovery) == (1, "join", False)


def test_peer_gives_each_pod_its_own_recovery_partition(tmp_path):
    peer = _peer()
    made = peer.own_partition(tmp_path / "recovery", "join", 1, 3)
    assert made == tmp_path / "recovery" / "join"
    assert sorted(p.name for p in made.iterdir()) == ["part-1.sqlite3"]
    assert peer.own_partition(tmp_path / "recovery", "join", 1, 3) is None  # kept as it is
    assert [p.name for p in (tmp_path / "recovery").iterdir()] == ["join"]  # no leftovers


def test_peer_waits_for_its_name():
    assert _peer().wait_resolvable("localhost", timeout_s=1)


# -- compose -----------------------------------------------------------------------------------

def _listeners(value: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in value.split(","):
        name, _, rest = item.partition("://")
        host, _, port = rest.rpartition(":")
        out[name] = (host, int(port))
    return out


def test_compose_kafka_is_one_kraft_node_whose_listeners_agree():
    kafka = SERVICES["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["CLUSTER_ID"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller not in advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    for name, (_, port) in advertised.items():
        assert listeners[name][1] == port, name
    node, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == env["KAFKA_NODE_ID"]
    assert voter == f"{kafka['hostname']}:{listeners[controller][1]}"
    # ctrstream reaches the broker through an advertised listener
    cfg = load_config(DEPLOY / "ctrstream.toml", environ={})
    assert cfg.kafka.bootstrap_servers in {f"{h}:{p}" for h, p in advertised.values()}
    assert cfg.kafka.bootstrap_servers.split(":")[0] == kafka["hostname"]
    # the host's listener is published, on loopback only
    for name, (host, port) in advertised.items():
        if host == "localhost":
            assert f"127.0.0.1:{port}:{port}" in kafka["ports"], name
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_services_fit_together():
    cfg = load_config(DEPLOY / "ctrstream.toml", environ={})
    assert cfg.redis.url == "redis://redis:6379/0"  # the redis service, default port, no password
    declared = set(COMPOSE["volumes"])
    recovery = {}
    data = {}
    for name in ("join", "learn", "retrain"):
        svc = SERVICES[name]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        for source in mounts.values():
            assert source.startswith("./") or source in declared, f"{name}: {source}"
        if name != "retrain":
            recovery[name] = mounts[cfg.recovery_dir]
            assert svc["restart"] == "unless-stopped", name
            assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        data[name] = mounts.get(cfg.data_dir)
    assert recovery["join"] != recovery["learn"], "each flow needs its own recovery state"
    assert data["learn"] == data["retrain"] is not None, "the retrain reads learn's archive"
    assert SERVICES["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert SERVICES["topics"]["restart"] == "no"
    for name in ("kafka", "redis"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_serve_is_ready_on_healthz_behind_its_service():
    (dep,) = _objects("Deployment").values()
    (c,) = _pod_spec(dep)["containers"]
    argv = _argv(c)
    port = int(_flag(argv, "--port"))
    assert _flag(argv, "--host") == "0.0.0.0", "a pod must listen beyond loopback"
    names = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and names[probe["port"]] == port
    svc = _objects("Service")[dep["metadata"]["name"]]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert [names[p["targetPort"]] for p in svc["spec"]["ports"]] == [port]
    serve = SERVICES["serve"]
    cport = int(_flag(serve["command"], "--port"))
    assert f":{cport}/healthz" in " ".join(serve["healthcheck"]["test"])
    assert any(p.endswith(f":{cport}") for p in serve["ports"])
