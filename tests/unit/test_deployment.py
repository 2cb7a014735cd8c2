"""compose.yaml and the Dockerfile cannot be run here (no Docker engine); check what we can."""

import shlex
from pathlib import Path

import yaml

from tasklease.engine.cli import parser

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_services_and_order() -> None:
    services = compose()["services"]
    assert set(services) == {"db", "migrate", "api", "worker"}
    assert services["db"]["image"] == "postgres:16"
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}
        }
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["migrate"]["restart"] == "no"


def test_every_command_is_a_valid_tasklease_invocation() -> None:
    services = compose()["services"]
    for name in ("migrate", "api", "worker"):
        args = parser().parse_args(services[name]["command"])
        assert args.command == name
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
    api = parser().parse_args(services["api"]["command"])
    assert (api.host, api.port) == ("0.0.0.0", 8080)
    assert services["api"]["ports"] == ["127.0.0.1:8080:8080"]


def test_worker_stop_grace_outlasts_its_own_grace_period() -> None:
    worker = compose()["services"]["worker"]
    grace = parser().parse_args(worker["command"]).grace_seconds
    assert int(worker["stop_grace_period"].removesuffix("s")) > grace


def test_dockerfile_installs_the_package_and_runs_tasklease() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert any(line.startswith("FROM python:3.11") for line in lines)
    copied = {shlex.split(line)[1] for line in lines if line.startswith("COPY ")}
    assert {"tasklease", "engine", "api", "handlers", "schema"} <= copied
    assert 'ENTRYPOINT ["tasklease"]' in lines
    assert any("--constraint requirements.lock ." in line for line in lines)
