"""The deploy files agree with each other and with fedpipe: ports, volumes the image's user
owns, health checks the CLI runs, configs that load, no secret on a command line."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from fedpipe.cli import build_parser, cmd_health
from fedpipe.common.config import ClientConfig, ServerConfig, load_config
from fedpipe.common.outcome import NO_RESTART, ExitCode
from tests.deploy_files import (
    CLIENT_FILES,
    DEPLOY,
    K8S,
    ROOT,
    SECRETS_DIR,
    SERVER_FILES,
    command_lines,
    compose,
    dockerfile_stage,
    dockerfile_value,
    dockerignore_patterns,
    dockerignored,
    image_uid,
    image_volumes,
    k8s_kind,
    k8s_objects,
    option,
    pod_containers,
    systemd_unit,
    yaml,
)

SERVER = load_config(ServerConfig, DEPLOY / "server.toml")
CLIENT = load_config(ClientConfig, DEPLOY / "client.toml")


def k8s_client_config() -> ClientConfig:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "client.toml"
        (obj,) = [o for o in k8s_kind("ConfigMap") if o["metadata"]["name"] == "fedpipe-client"]
        path.write_text(obj["data"]["client.toml"])
        return load_config(ClientConfig, path)


def job(name: str) -> dict[str, Any]:
    (found,) = [j for j in k8s_kind("Job") if j["metadata"]["name"] == name]
    return found


def test_the_build_context_leaves_out_venvs_runs_git_caches_tests_and_secrets() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
        "runs/fedpipe-run/metrics.csv",
        ".git/HEAD",
        "tests/test_cli.py",
        "deploy/k8s/secrets/server/server.key",
        "fedpipe/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/cache.db",
        "benchmarks/run_all.py",
    ):
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    # Everything the image's COPY lines and `pip install .` read is still there.
    copied = [args.split()[0] for word, args in _build_stage() if word == "COPY"]
    assert copied == ["pyproject.toml", "fedpipe"]
    # compose's `certs` runs `fedpipe certs` in the image: the extra that it needs is there.
    installs = [args for word, args in _build_stage() if word == "RUN" and "pip install" in args]
    assert len(installs) == 1 and installs[0].endswith('pip install --no-cache-dir ".[certs]"')
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "fedpipe").rglob("*")]
    needed = ["pyproject.toml", "README.md", *(p for p in package if "__pycache__" not in p)]
    assert "fedpipe/datasets/digits.npz" in needed
    assert [p for p in needed if dockerignored(p, patterns)] == []


def _build_stage() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    first = text.split("\nFROM ", 2)[1]  # the build stage, up to the next FROM
    return [
        (line.split()[0], " ".join(line.split()[1:])) for line in first.splitlines()[1:] if line
    ]


def test_the_image_runs_as_a_non_root_user_that_owns_its_volume() -> None:
    uid = image_uid()
    assert uid != 0 and dockerfile_value("USER") == f"{uid}:{uid}"
    run = " ".join(args for word, args in dockerfile_stage() if word == "RUN")
    assert f"--uid {uid}" in run and f"--gid {uid}" in run
    assert image_volumes() == ["/var/lib/fedpipe"]
    assert dockerfile_value("WORKDIR") == "/var/lib/fedpipe"
    # The directory exists in the image, owned by that user: a named volume starts so.
    assert "install -d -o fedpipe -g fedpipe -m 0750 /var/lib/fedpipe" in run
    assert "ENTRYPOINT" in dict(dockerfile_stage())


def test_every_health_check_is_a_fedpipe_health_command_on_the_server_port() -> None:
    checks = [(w, argv) for w, argv in command_lines() if "health" in w.lower() or "Probe" in w]
    assert {w.split(".")[0].split(" ")[0] for w, _ in checks} >= {"Dockerfile", "compose", "k8s"}
    for where, argv in checks:
        assert argv[0] == "fedpipe", where
        args = build_parser().parse_args(argv[1:])
        assert args.func is cmd_health, where
        assert args.server.rsplit(":", 1)[1] == str(SERVER.port), where
        if where != "Dockerfile HEALTHCHECK":  # the image's default: a server without TLS
            files = {args.tls_ca, args.tls_cert, args.tls_key}
            assert {f.name for f in files} == {"ca.crt", "health.crt", "health.key"}, where
            assert {PurePosixPath(f).parent for f in files} == {SECRETS_DIR}, where
    shown = subprocess.run(
        [sys.executable, "-m", "fedpipe", "health", "--help"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "--tls-cert" in shown.stdout


def test_the_server_port_is_the_same_everywhere() -> None:
    port = SERVER.port
    assert port == 50051 and SERVER.host == "0.0.0.0"
    assert dockerfile_value("EXPOSE") == str(port)
    assert compose()["services"]["server"]["ports"] == [f"{port}:{port}"]
    (server_container,) = pod_containers(job("fedpipe-server"))
    assert server_container["ports"] == [{"name": "grpc", "containerPort": port}]
    (service,) = k8s_kind("Service")
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    labels = job("fedpipe-server")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # Clients dial the compose service and the Kubernetes Service by name, on that port.
    assert CLIENT.server == f"server:{port}" and "server" in compose()["services"]
    assert k8s_client_config().server == f"{service['metadata']['name']}:{port}"


def test_configs_use_mutual_tls_and_token_files_and_hold_no_secret() -> None:
    assert SERVER.tls_client_ca and SERVER.tls_cert and SERVER.tls_key and not SERVER.insecure
    assert SERVER.tokens == {}  # make-secrets.sh adds their hashes to the server's copy
    paths = {SERVER.tls_client_ca, SERVER.tls_cert, SERVER.tls_key}
    assert {PurePosixPath(p) for p in paths} == {
        SECRETS_DIR / f for f in ("ca.crt", "server.crt", "server.key")
    }
    for client in (CLIENT, k8s_client_config()):
        assert client.token == "" and not client.insecure and client.use_tls
        files = {client.tls_ca, client.tls_cert, client.tls_key, client.token_file}
        assert {PurePosixPath(str(f)) for f in files} == {SECRETS_DIR / f for f in CLIENT_FILES}
    assert k8s_client_config().model_dump(exclude={"server"}) == CLIENT.model_dump(
        exclude={"server"}
    )


def test_every_path_a_compose_container_writes_is_a_volume_its_user_owns() -> None:
    services = compose()["services"]
    writes = {
        "server": [str(SERVER.output_dir)],
        "client-0": [str(CLIENT.state_dir)],
        "client-1": [str(CLIENT.state_dir)],
        "demo-data": [option(services["demo-data"]["command"], "--out")],
    }
    for name, paths in writes.items():
        assert "user" not in services[name], f"{name} must run as the image's user"
        for path in paths:
            source, target, mode = _mount(services[name]["volumes"], path)
            assert mode == "rw", f"{name}: {path} is on a read-only mount"
            assert source in compose()["volumes"], f"{name}: {path} is not on a named volume"
            # A named volume on a directory the image's user owns starts owned by that user.
            assert target in image_volumes(), f"{name}: {target} is not the image's VOLUME"
    # The one-shot `certs` runs as root to fill the other services' volumes, then gives
    # every file to the image's user.
    certs = services["certs"]
    assert (
        certs["user"] == "0:0" and certs["environment"]["OWNER"] == f"{image_uid()}:{image_uid()}"
    )
    out = certs["command"][0]  # make-secrets.sh OUT_DIR SERVER_NAMES CLIENT_NAMES
    for target in ("server", "client-0", "client-1"):
        assert f"{target}-secrets:{out}/{target}" in certs["volumes"]


def _mount(volumes: list[str], path: str) -> tuple[str, str, str]:
    """The mount holding ``path``: (source, target, 'ro' or 'rw')."""
    mounts = [[*v.split(":"), "rw"][:3] for v in volumes]
    holding = [m for m in mounts if PurePosixPath(path).is_relative_to(m[1])]
    assert holding, f"{path} is on no volume of {volumes}"
    source, target, mode = max(holding, key=lambda m: len(m[1]))
    return source, target, mode


def test_compose_gives_each_service_only_its_own_secrets_and_waits_for_a_healthy_server() -> None:
    services = compose()["services"]
    assert f"server-secrets:{SECRETS_DIR}:ro" in services["server"]["volumes"]
    assert services["server"]["depends_on"] == {
        "certs": {"condition": "service_completed_successfully"}
    }
    for name in ("client-0", "client-1"):
        client = services[name]
        assert option(client["command"], "--name") == name  # the name in its certificate
        assert f"{name}-secrets:{SECRETS_DIR}:ro" in client["volumes"]
        assert "./client.toml:/etc/fedpipe/client.toml:ro" in client["volumes"]
        assert client["depends_on"]["server"] == {"condition": "service_healthy"}
        assert client["healthcheck"] == {"disable": True}
    command = services["certs"]["command"]
    assert command[1] == "server" and command[2].split(",") == ["client-0", "client-1"]


def test_kubernetes_pods_run_as_the_image_user_and_write_only_to_their_volumes() -> None:
    writes = {
        "server": [str(SERVER.output_dir), "/tmp"],
        "client": [str(k8s_client_config().state_dir), "/tmp"],
        "demo-data": ["/data"],
    }
    uid = image_uid()
    for obj in k8s_kind("Job"):
        spec = obj["spec"]["template"]["spec"]
        assert spec["securityContext"] | {"seccompProfile": None} == {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,  # PersistentVolumeClaims become writable by that group
            "seccompProfile": None,
        }
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in pod_containers(obj):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["requests"] and container["resources"]["limits"]
            mounts = container["volumeMounts"]
            for path in writes[container["name"]]:
                holding = [m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"])]
                assert holding, f"{obj['metadata']['name']}: {path} is on no volume"
                mount = max(holding, key=lambda m: len(m["mountPath"]))
                assert not mount.get("readOnly"), f"{path} is on a read-only mount"
                volume = volumes[mount["name"]]
                assert "persistentVolumeClaim" in volume or "emptyDir" in volume


def test_kubernetes_secrets_are_made_from_what_make_secrets_writes() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / name).is_file() for name in kustomization["resources"])
    generated = {g["name"]: g["files"] for g in kustomization["secretGenerator"]}
    assert {Path(f).name for f in generated["fedpipe-server"]} == SERVER_FILES
    assert {Path(f).parent for f in generated["fedpipe-server"]} == {Path("secrets/server")}
    defined = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    defined |= {("Secret", name) for name in generated}
    for obj in k8s_kind("Job"):
        for volume in obj["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in defined
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in defined
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in defined
    for name in ("client-0", "client-1"):
        (client,) = [
            c for c in pod_containers(job(f"fedpipe-client-{name[-1]}")) if c["name"] == "client"
        ]
        assert option(client["args"], "--name") == name
        files = generated[f"fedpipe-{name}"]
        assert {Path(f).name for f in files} == CLIENT_FILES
        assert {Path(f).parent for f in files} == {Path("secrets") / name}
        secrets = job(f"fedpipe-{name}")["spec"]["template"]["spec"]["volumes"]
        assert {
            "name": "secrets",
            "secret": {"secretName": f"fedpipe-{name}", "defaultMode": 0o440},
        } in secrets


def test_no_secret_is_on_a_command_line() -> None:
    seen = 0
    for where, argv in command_lines():
        seen += 1
        for arg in argv:
            assert arg != "--token" and not arg.startswith("--token="), where
            assert not arg.startswith(("tokens.", "token=")), where
    assert seen >= 12
    for service in compose()["services"].values():
        assert set(service.get("environment", {})) <= {"OWNER"}
    for obj in k8s_kind("Job"):
        assert all("env" not in c for c in pod_containers(obj))


def test_jobs_and_units_do_not_restart_what_a_restart_cannot_fix() -> None:
    client = systemd_unit("fedpipe-client.service")["Service"]
    server = systemd_unit("fedpipe-server.service")["Service"]
    assert {int(c) for c in client["RestartPreventExitStatus"].split()} == set(NO_RESTART)
    assert server["RestartPreventExitStatus"] == str(int(ExitCode.USAGE))
    assert server["SuccessExitStatus"] == str(int(ExitCode.INTERRUPTED))
    for unit in (client, server):
        assert unit["User"] == "fedpipe" and unit["Restart"] == "on-failure"
        assert unit["StateDirectory"] == "fedpipe" and unit["ProtectSystem"] == "strict"
        assert unit["WorkingDirectory"] == "/var/lib/fedpipe"
    # ProtectSystem=strict: the server and client write only under their StateDirectory.
    assert SERVER.output_dir.is_relative_to("/var/lib/fedpipe")
    assert CLIENT.state_dir is not None and CLIENT.state_dir.is_relative_to("/var/lib/fedpipe")
    assert "--config /etc/fedpipe/secrets/server.toml" in server["ExecStart"]
    rules = {
        obj["metadata"]["name"]: obj["spec"]["podFailurePolicy"]["rules"] for obj in k8s_kind("Job")
    }
    for name, codes in (("fedpipe-server", [ExitCode.USAGE]), ("fedpipe-client-0", NO_RESTART)):
        fail = [r for r in rules[name] if r["action"] == "FailJob"]
        assert [r["onExitCodes"]["values"] for r in fail] == [[int(c) for c in codes]]


def test_the_images_are_this_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {s["image"] for s in compose()["services"].values()}
    images |= {c["image"] for j in k8s_kind("Job") for c in pod_containers(j)}
    assert images == {f"fedpipe:{version}"}
