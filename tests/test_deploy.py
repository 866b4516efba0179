"""Deployment files: the image's exact command line runs, becomes ready and drains; the
Dockerfile, the systemd unit and the Kubernetes manifests agree with the code.

This machine has no container engine, so the image is approximated as closely as a
process can be: the project is built as a wheel and installed into a virtual environment
of its own (as the Dockerfile's build stage does), and the Dockerfile's final
``ENTRYPOINT`` + ``CMD`` run there with the image's ``ENV``, the data directory moved
to a temporary one. Linting and schema checks are in ``.ci/deploy-checks``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from valmi_sidecar.config import PLAIN_FIELDS, Settings, env_var, load_settings
from valmi_sidecar.service import CLOSE_TIMEOUT_S

from .conftest import ACTION, json_log_lines, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "systemd" / "valmi-sidecar.service"
ENV_EXAMPLE = ROOT / "systemd" / "valmi-sidecar.env.example"
MANIFESTS = sorted((ROOT / "examples" / "kubernetes").glob("*.yaml"))
COMPOSE = ROOT / "examples" / "docker-compose.yml"
IMAGE_DATA_DIR = "/var/lib/valmi-sidecar"
#: Docker's and Kubernetes' default grace between SIGTERM and SIGKILL.
DEFAULT_GRACE_S = 30.0


# --- the Dockerfile, read as Docker reads it --------------------------------------------


@dataclass
class Stage:
    """The final build stage: what a container of the image starts with."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    return out


def final_stage(text: str) -> Stage:
    instructions = dockerfile_instructions(text)
    last_from = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    stage = Stage(instructions=instructions[last_from:])
    for instr, args in stage.instructions:
        if instr == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                stage.env[key] = value
        elif instr == "ENTRYPOINT":
            stage.entrypoint = json.loads(args)
        elif instr == "CMD":
            stage.cmd = json.loads(args)
        elif instr == "HEALTHCHECK":
            _, sep, command = args.partition("CMD ")
            assert sep, "HEALTHCHECK without CMD"
            stage.healthcheck = json.loads(command)
    return stage


@pytest.fixture(scope="module")
def image() -> Stage:
    return final_stage(DOCKERFILE.read_text())


# --- the project as an installed wheel --------------------------------------------------


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the project's wheel; its ``bin`` is returned.

    Like the image's build stage: ``pip wheel``, a venv made without pip, and pip run
    from outside to install into it. The dependencies are taken from this test run's
    environment through a ``.pth`` line (no network for them); the project itself is
    only the installed wheel, never the source tree.
    """
    base = tmp_path_factory.mktemp("wheel")
    wheels, venv = base / "wheels", base / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("valmi_sidecar-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line: the directory is appended to sys.path, and its own .pth files
    # (the editable install of the source tree) are not processed.
    Path(site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    where = subprocess.run(
        [str(python), "-c", "import valmi_sidecar; print(valmi_sidecar.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), f"valmi_sidecar imported from {where}"
    return venv / "bin"


def container_env(image: Stage, bin_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """The image's ENV with the data directory moved, on a PATH that finds the wheel's
    console script first. Nothing is inherited from the test run but the locale."""
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for key, value in image.env.items():
        if key == "PATH":
            continue
        env[key] = value.replace(IMAGE_DATA_DIR, str(data_dir))
    env.update(extra)
    return env


def resolve(argv: list[str], bin_dir: Path) -> list[str]:
    """``argv`` with its program looked up in the wheel's environment, as PATH would."""
    program = shutil.which(argv[0], path=str(bin_dir))
    assert program is not None, f"{argv[0]} is not installed in {bin_dir}"
    return [program, *argv[1:]]


class Container:
    """The image's command line as a child process, its log lines in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=self._log)

    def events(self) -> list[dict[str, Any]]:
        return json_log_lines(self.log_path)

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    async def wait_ready(self) -> str:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            return self.event("sidecar_ready") is not None

        await wait_until(ready, 20.0, "sidecar_ready")
        ev = self.event("sidecar_ready")
        assert ev is not None
        return str(ev["listen"])

    def ops_listen(self) -> str:
        """Where the ops listener listens, once ready."""
        ev = self.event("sidecar_ready")
        assert ev is not None
        assert ev["ops_listen"], "the ops listener is off"
        return str(ev["ops_listen"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def container(
    image: Stage, wheel_env: Path, tmp_path: Path
) -> Iterator[tuple[Container, dict[str, str], Path]]:
    """The image's ENTRYPOINT + CMD, run in an empty working directory and home."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)  # the image creates it (install -d -m 0700)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    # Port 0 instead of the image's 127.0.0.1:8787 and 0.0.0.0:9787, so that tests never
    # collide; the ops listener stays on every interface, as in the image.
    env = container_env(
        image,
        wheel_env,
        data_dir,
        HOME=str(home),
        TMPDIR=str(tmp),
        VALMI_SIDECAR_LISTEN="127.0.0.1:0",
        VALMI_SIDECAR_OPS_LISTEN="0.0.0.0:0",
    )
    argv = resolve([*image.entrypoint, *image.cmd], wheel_env)
    workdir = image.values("WORKDIR")[-1].replace(IMAGE_DATA_DIR, str(data_dir))
    c = Container(argv, env, Path(workdir), tmp_path / "container.log")
    try:
        yield c, env, tmp_path
    finally:
        c.close()


def run_healthcheck(image: Stage, bin_dir: Path, env: dict[str, str]) -> int:
    return subprocess.run(
        resolve(image.healthcheck, bin_dir), check=False, env=env, capture_output=True, timeout=30
    ).returncode


async def test_image_command_becomes_ready_and_drains_on_sigterm(
    image: Stage,
    wheel_env: Path,
    container: tuple[Container, dict[str, str], Path],
    client: httpx.AsyncClient,
) -> None:
    """ENTRYPOINT + CMD with the image's ENV: ready, accepts, exits 0 within 30 s of
    SIGTERM, keeps the event, and writes nothing outside its data directory."""
    c, _, base = container
    started = time.time()
    url = "http://" + await c.wait_ready()
    assert 200 == (await client.get(url + "/readyz")).status_code
    r = await client.post(url + "/v1/actions", json=ACTION)
    assert 202 == r.status_code, r.text

    c.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    await wait_until(lambda: c.proc.poll() is not None, DEFAULT_GRACE_S, "exit after SIGTERM")
    assert 0 == c.proc.returncode, c.log_path.read_text()
    assert time.monotonic() - sent < DEFAULT_GRACE_S
    done = c.event("shutdown_complete")
    assert done is not None
    assert 1 == done["queued"], "no API key: the event is kept for later"

    # A read-only root filesystem would refuse any other write: none was made.
    assert [] == list((base / "home").iterdir())
    assert [] == list((base / "tmp").iterdir())
    venv = wheel_env.parent
    written = [p for p in venv.rglob("*") if p.stat().st_mtime > started]
    assert [] == written, "nothing (no bytecode) is written next to the code"


async def test_image_healthcheck_passes_against_the_running_sidecar(
    image: Stage,
    wheel_env: Path,
    container: tuple[Container, dict[str, str], Path],
) -> None:
    """The HEALTHCHECK command exits 0 while the sidecar runs, 1 once it is gone. It asks
    the ops listener: the local API's address it is given is wrong on purpose."""
    c, env, _ = container
    await c.wait_ready()
    port = c.ops_listen().rpartition(":")[2]
    env = {
        **env,
        "VALMI_SIDECAR_LISTEN": "127.0.0.1:9",
        "VALMI_SIDECAR_OPS_LISTEN": f"0.0.0.0:{port}",
    }
    assert 0 == run_healthcheck(image, wheel_env, env)

    c.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: c.proc.poll() is not None, DEFAULT_GRACE_S, "exit after SIGTERM")
    assert 0 == c.proc.returncode
    assert 1 == run_healthcheck(image, wheel_env, env)


async def test_image_healthcheck_follows_a_listen_address_on_all_interfaces(
    image: Stage, wheel_env: Path, tmp_path: Path
) -> None:
    """With VALMI_SIDECAR_OPS_LISTEN (or, without it, VALMI_SIDECAR_LISTEN) at
    0.0.0.0:PORT the check asks 127.0.0.1:PORT; nothing listens there, so it must fail
    rather than pass by accident."""
    for ops in ("0.0.0.0:9", ""):
        env = container_env(
            image,
            wheel_env,
            tmp_path,
            VALMI_SIDECAR_LISTEN="0.0.0.0:9",
            VALMI_SIDECAR_OPS_LISTEN=ops,
            HOME=str(tmp_path),
        )
        assert 1 == run_healthcheck(image, wheel_env, env)


def test_image_healthcheck_is_the_light_subcommand(image: Stage) -> None:
    """No Python one-liner: the subcommand, liveness only (a full queue is no reason to
    restart a container)."""
    assert ["valmi-sidecar", "healthcheck", "--live"] == image.healthcheck


async def test_image_ops_listener_answers_probes_from_outside(
    container: tuple[Container, dict[str, str], Path], client: httpx.AsyncClient
) -> None:
    """Every probe of the Kubernetes examples, sent as the kubelet sends it (the pod IP in
    Host) to the image's ops listener, answers 200; it serves no event route."""
    c, _, _ = container
    await c.wait_ready()
    port = int(c.ops_listen().rpartition(":")[2])
    probes = [probe for sc in sidecar_containers() for probe in http_probes(sc)]
    assert len(probes) >= 6
    for path, _ in probes:
        r = await client.get(
            f"http://127.0.0.1:{port}{path}", headers={"Host": f"10.244.1.17:{port}"}
        )
        assert 200 == r.status_code, (path, r.text)
    assert (
        404 == (await client.post(f"http://127.0.0.1:{port}/v1/actions", json=ACTION)).status_code
    )


# --- the files agree with the code and with each other ----------------------------------


def test_image_runs_as_fixed_non_root_user_with_data_volume(image: Stage) -> None:
    uid, _, gid = image.values("USER")[-1].partition(":")
    assert uid.isdigit(), "a numeric UID lets runAsNonRoot check it"
    assert int(uid) > 0
    assert gid.isdigit()
    assert int(gid) > 0
    assert IMAGE_DATA_DIR == image.env["VALMI_SIDECAR_DATA_DIR"]
    assert [IMAGE_DATA_DIR] == json.loads(image.values("VOLUME")[-1])
    assert ["SIGTERM"] == image.values("STOPSIGNAL")
    ops_port = image.env["VALMI_SIDECAR_OPS_LISTEN"].rpartition(":")[2]
    assert [f"{Settings().port} {ops_port}"] == image.values("EXPOSE")
    assert "1" == image.env["PYTHONDONTWRITEBYTECODE"]
    assert "VALMI_SIDECAR_LISTEN" not in image.env, "the default stays loopback"
    for manifest in MANIFESTS:
        for found in re.findall(r"runAs(?:User|Group): (\d+)", manifest.read_text()):
            assert uid == found, f"{manifest.name}: runAsUser/Group differs from the image"


def manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (m.name, doc)
        for m in MANIFESTS
        for doc in yaml.safe_load_all(m.read_text())
        if isinstance(doc, dict)
    ]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(n, d) for n, d in manifest_docs() if d["kind"] in ("Deployment", "StatefulSet")]


def sidecar_containers() -> list[dict[str, Any]]:
    return [
        c
        for _, d in workloads()
        for c in d["spec"]["template"]["spec"]["initContainers"]
        if c["name"] == "valmi-sidecar"
    ]


def http_probes(container: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, port) of each probe; every probe must be an httpGet."""
    out = []
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[name]
        assert "exec" not in probe, f"{name}: an exec probe starts a process per probe"
        out.append((probe["httpGet"]["path"], probe["httpGet"]["port"]))
    return out


def test_manifests_probe_and_scrape_the_ops_listener() -> None:
    """Probes, prometheus.io annotations and the PodMonitor all name the container port
    the ops listener is told to listen on; the local API stays on loopback."""
    for name, doc in workloads():
        pod = doc["spec"]["template"]
        (sc,) = (c for c in pod["spec"]["initContainers"] if c["name"] == "valmi-sidecar")
        env = {e["name"]: e.get("value") for e in sc["env"]}
        settings = load_settings(
            env={
                "HOME": "/nonexistent",
                **{k: v for k, v in env.items() if v and k != "VALMI_API_KEY_FILE"},
            }
        )
        assert "127.0.0.1:8787" == settings.listen, name
        ops_port = int(settings.ops_listen.rpartition(":")[2])
        (port,) = (p for p in sc["ports"] if p["name"] == "ops")
        assert ops_port == port["containerPort"], name
        assert [("/readyz", "ops"), ("/readyz", "ops"), ("/healthz", "ops")] == http_probes(sc)
        notes = pod["metadata"]["annotations"]
        assert {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(ops_port),
            "prometheus.io/path": "/metrics",
        } == notes
    monitors = [d for _, d in manifest_docs() if d["kind"] == "PodMonitor"]
    assert 1 == len(monitors)
    (pm,) = monitors
    assert [{"port": "ops", "path": "/metrics", "interval": "30s"}] == pm["spec"][
        "podMetricsEndpoints"
    ]
    for _, doc in workloads():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_compose_example_uses_the_ops_listener_and_the_healthcheck(image: Stage) -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    sidecar = compose["services"]["valmi-sidecar"]
    assert (
        image.env["VALMI_SIDECAR_OPS_LISTEN"] == sidecar["environment"]["VALMI_SIDECAR_OPS_LISTEN"]
    )
    assert ["CMD", "valmi-sidecar", "healthcheck"] == sidecar["healthcheck"]["test"]
    ops_port = image.env["VALMI_SIDECAR_OPS_LISTEN"].rpartition(":")[2]
    assert [f"127.0.0.1:{ops_port}:{ops_port}"] == sidecar["ports"], "published on loopback only"
    agent = compose["services"]["agent"]
    assert "service_healthy" == agent["depends_on"]["valmi-sidecar"]["condition"]


def unit_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"unexpected time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_unit_gives_the_drain_more_time_than_the_sidecar_takes() -> None:
    """TimeoutStopSec is above service.stop's own bound (grace + final flush + closing),
    so systemd never kills a drain that the sidecar would finish by itself."""
    d = unit_directives(UNIT.read_text())
    s = Settings()
    bound = s.shutdown_grace_s + s.final_flush_s + 3 * CLOSE_TIMEOUT_S
    assert seconds(d["TimeoutStopSec"][-1]) > bound
    for manifest in MANIFESTS:
        for found in re.findall(r"terminationGracePeriodSeconds: (\d+)", manifest.read_text()):
            assert int(found) > bound, f"{manifest.name}: grace below the drain bound"
    compose = (ROOT / "examples" / "docker-compose.yml").read_text()
    (grace,) = re.findall(r"stop_grace_period: (\d+)s", compose)
    assert int(grace) > bound, "compose: stop_grace_period below the drain bound"


def test_unit_is_notify_with_watchdog_credentials_and_state_directory() -> None:
    d = unit_directives(UNIT.read_text())
    assert ["notify"] == d["Type"]
    assert ["main"] == d["NotifyAccess"]
    assert seconds(d["WatchdogSec"][-1]) > 0
    assert ["yes"] == d["DynamicUser"]
    assert ["valmi-sidecar"] == d["StateDirectory"]
    assert ["on-failure"] == d["Restart"]
    # A configuration error exits 2 (tests/test_cli.py): systemd must not restart it forever.
    assert "2" in d["RestartPreventExitStatus"][-1].split()
    credential, _, source = d["LoadCredential"][-1].partition(":")
    assert source.startswith("/etc/")
    assert f"VALMI_API_KEY_FILE=%d/{credential}" in d["Environment"]
    # The sidecar finds its queue through $STATE_DIRECTORY; nothing overrides it.
    assert not any(v.startswith("VALMI_SIDECAR_DATA_DIR") for v in d.get("Environment", []))


def test_env_example_names_only_settings_the_sidecar_accepts(tmp_path: Path) -> None:
    """Every variable in the example, uncommented, loads without a ConfigError."""
    env: dict[str, str] = {"HOME": str(tmp_path)}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"#?((?:VALMI)_[A-Z_]+)=(\S+)", line)
        if m:
            env[m.group(1)] = m.group(2)
    known = {env_var(n) for n in PLAIN_FIELDS} | {"VALMI_API_URL"}
    assert set() == set(env) - known - {"HOME"}
    assert len(env) > 5, "the example should show the common settings"
    settings = load_settings(env=env)
    assert "127.0.0.1:8787" == settings.listen


def test_docs_commands_name_real_files() -> None:
    """Paths the README's Deploy section tells people to use exist in the repository."""
    docs = (ROOT / "README.md").read_text()
    for rel in re.findall(r"\b((?:systemd|examples)/[\w./-]+\.(?:service|example|ya?ml))", docs):
        assert (ROOT / rel).is_file(), f"README.md names {rel}, which does not exist"
    assert os.access(ROOT / ".ci" / "deploy-checks", os.R_OK)


def test_unit_reloads_with_sighup_rather_than_stopping() -> None:
    """`systemctl reload` sends SIGHUP to the main process, which the sidecar takes as a
    reload (tests/test_reload.py); without ExecReload= it would refuse to reload."""
    d = unit_directives(UNIT.read_text())
    assert ["/bin/kill -HUP $MAINPID"] == d["ExecReload"]


def test_image_base_is_pinned_by_digest_in_every_stage() -> None:
    """A rebuild gets the same base bytes; the README says how to take the next one."""
    froms = re.findall(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert len(froms) >= 2
    for image in froms:
        assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    assert len(set(froms)) == 1, "both stages on the same base"
