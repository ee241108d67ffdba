"""docker/Dockerfile, docker/compose.yaml and .dockerignore, checked without a Docker engine.

What a build or ``compose up`` would otherwise find out late: a COPY source that is missing or filtered out
by .dockerignore, a package the image forgets, a pipeline script or flag that does not exist, a root user,
a compose file without the GPU reservation, or an MLflow server the trainer cannot reach.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKER_README = REPO / "docker" / "README.md"
DOCKERIGNORE = REPO / ".dockerignore"
SCRIPT = re.compile(r"pipelines/(\w+)\.py")


# ------------------------------------------------------------------------------------------------ parsing


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with line continuations joined and comment lines dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (anchored at the context root; ``*``, ``?``, ``**``) as a regex."""
    rx, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            rx, i = rx + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            rx, i = rx + ".*", i + 2
        elif pattern[i] == "*":
            rx, i = rx + "[^/]*", i + 1
        elif pattern[i] == "?":
            rx, i = rx + "[^/]", i + 1
        else:
            rx, i = rx + re.escape(pattern[i]), i + 1
    return re.compile(rf"^{rx}$")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        rules.append((negate, _pattern_regex(pattern.strip("/").removeprefix("./"))))
    return rules


def is_excluded(path: str, rules) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches its files."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with the defaults (the environment is not consulted)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def resolved(node):
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [resolved(v) for v in node]
    if isinstance(node, dict):
        return {k: resolved(v) for k, v in node.items()}
    return node


def shell_commands(text: str) -> list[list[str]]:
    """Commands in fenced ``bash`` blocks of a README, continuation lines joined, split like a shell would."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line.replace("'", " ")))
    return commands


def script_flags(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``[(script, [--flags])]`` for every ``pipelines/X.py`` in a token list (flags up to ``&&`` / ``;``)."""
    found = []
    for i, tok in enumerate(tokens):
        m = SCRIPT.search(tok)
        if not m:
            continue
        flags = []
        for t in tokens[i + 1:]:
            if t in ("&&", ";", "||", "|") or t.endswith(";"):
                break
            if t.startswith("--"):
                flags.append(t.split("=")[0])
        found.append((m.group(1), flags))
    return found


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def rules():
    return dockerignore_rules(DOCKERIGNORE.read_text())


def _args(instructions) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out[name.strip()] = value.strip().strip('"')
    return out


def _copy_sources(instructions) -> list[str]:
    sources = []
    for word, rest in instructions:
        if word != "COPY":
            continue
        tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
        assert not any(t.startswith("--from") for t in shlex.split(rest)), "multi-stage COPY: extend this test"
        sources += tokens[:-1]
    return sources


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_base_image_is_a_cuda_pytorch_runtime_within_the_torch_range(instructions, compose):
    base = next(rest for word, rest in instructions if word == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: _args(instructions)[m.group(1)], base)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+(?:\.\d+)?)-cuda(\d+\.\d+)-cudnn\d+-(runtime|devel)", base)
    assert m, f"base image {base!r} is not a CUDA build of pytorch/pytorch"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_spec = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    assert Version(m.group(1)) in SpecifierSet(torch_spec[len("torch"):]), f"{base} outside {torch_spec}"
    assert compose["x-build"]["args"]["BASE_IMAGE"] == f"${{BASE_IMAGE:-{base}}}", "compose and Dockerfile agree"


def test_copy_sources_exist_and_are_not_ignored(instructions, rules):
    sources = _copy_sources(instructions)
    assert sources
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        assert not is_excluded(src, rules), f"COPY {src}: excluded by .dockerignore"
        files = [path] if path.is_file() else [p for p in path.rglob("*")
                                               if p.is_file() and "__pycache__" not in p.parts]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if f.suffix in (".py", ".yaml", ".yml", ".json", ".toml", ".md"):
                assert not is_excluded(rel, rules), f"{rel} would be missing from the image (.dockerignore)"


def test_image_gets_every_package_and_the_files_pip_needs(instructions):
    sources = {s.rstrip("/") for s in _copy_sources(instructions)}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        folder = package_dir.get(package, package.replace(".", "/")).split("/")[0]
        assert folder in sources, f"package {package} (folder {folder}/) is not copied into the image"
    assert {"pyproject.toml", pyproject["project"]["readme"], "configs"} <= sources
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install" in runs and "torch==" in runs, "pip must keep the base image's torch"


def test_runs_as_a_non_root_user_that_owns_the_volume_mount_points(instructions, compose):
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", runs), f"user {user} is never created"
    # Named volumes start with the image's content and ownership at the mount point: it must exist, chowned.
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith(("$", ".", "/")) and service.get("image", "").startswith("${PGVAE_IMAGE"):
                assert target in runs, f"mount point {target} of volume {source} is not created in the image"
    workdir = [rest for word, rest in instructions if word == "WORKDIR"][-1]
    assert workdir in runs and "chown" in runs, f"the working folder {workdir} must belong to {user}"


def test_ignore_file_keeps_the_context_small_but_the_code_in(rules):
    for path in (".git/config", "outputs/ct/checkpoints/last.pt", "mlflow.db", "mlruns/0/meta.yaml",
                 "mlartifacts/1/a.png", "data/ct/x.nii.gz", "pancreas_gvae/__pycache__/config.cpython-311.pyc",
                 "notebooks/.ipynb_checkpoints/review-checkpoint.ipynb", "runs/a/last.pt", "tests/conftest.py",
                 "pancreas_gvae.egg-info/PKG-INFO", ".pytest_cache/README.md", "docker/.env"):
        assert is_excluded(path, rules), f"{path} should stay out of the build context"
    for path in ("pyproject.toml", "README.md", "pancreas_gvae/data/__init__.py", "pancreas_gvae/data/ct/config.py",
                 "transforms/ct.py", "configs/data/default.yaml", "pipelines/train_ct.py"):
        assert not is_excluded(path, rules), f"{path} is needed in the image"


def test_dockerignore_matcher_follows_docker_semantics():
    rules = dockerignore_rules("data\n**/*.pyc\nkeep/*\n!keep/this.txt\n")
    assert is_excluded("data/a/b.nii", rules) and not is_excluded("pkg/data/x.py", rules)
    assert is_excluded("a/b/c.pyc", rules) and is_excluded("c.pyc", rules)
    assert is_excluded("keep/that.txt", rules) and not is_excluded("keep/this.txt", rules)


# ------------------------------------------------------------------------------------------------ compose


def test_compose_has_an_mlflow_server_with_persistent_store_and_artifacts(compose):
    services = compose["services"]
    assert {"mlflow", "trainer"} <= set(services)
    mlflow = resolved(services["mlflow"])
    cmd = mlflow["command"]
    assert cmd[:2] == ["mlflow", "server"]
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    store = opts["--backend-store-uri"]
    assert store.startswith("sqlite:////"), store
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    store_dir = str(Path(store[len("sqlite:///"):]).parent)
    for target in (store_dir, opts["--artifacts-destination"]):
        assert target in mounts, f"{target} is not on a volume: lost with the container"
        assert mounts[target] in compose["volumes"], f"volume {mounts[target]} is not declared"
    assert any(p.split(":")[-1] == "5000" for p in mlflow["ports"]), "port 5000 is not published"
    assert "healthcheck" in mlflow


def test_trainer_reserves_gpus_reaches_mlflow_and_mounts_data_read_only(compose):
    services = compose["services"]
    trainer = resolved(services["trainer"])
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices
    uri = trainer["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"
    cmd = trainer["command"]
    assert cmd[cmd.index("--tracking-uri") + 1] == uri, "the pipelines take the server from --tracking-uri"
    assert "mlflow" in trainer["depends_on"]
    # MLflow 3 answers 403 to Host headers it does not allow: the trainer's host must be on the list.
    mlflow_cmd = resolved(services["mlflow"])["command"]
    allowed = mlflow_cmd[mlflow_cmd.index("--allowed-hosts") + 1].split(",")
    assert "mlflow" in allowed and "mlflow:*" in allowed
    mounts = {v.split(":")[1]: v.split(":") for v in trainer["volumes"]}
    assert mounts["/data"][-1] == "ro", "data must be mounted read-only"
    outputs = [v for v in trainer["volumes"] if v.split(":")[0] in compose["volumes"]]
    assert outputs, "no named volume for the outputs"
    build = trainer["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKERFILE


# ------------------------------------------------------------------------------------------------ pipelines


def _referenced_commands(compose) -> list[list[str]]:
    commands = [resolved(s["command"]) for s in compose["services"].values()
                if isinstance(s.get("command"), list)]
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word in ("CMD", "ENTRYPOINT"):
            commands.append(yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest))
    return commands + shell_commands(DOCKER_README.read_text())


def test_every_referenced_pipeline_script_exists_and_accepts_its_flags(compose, capsys):
    texts = [DOCKERFILE.read_text(), COMPOSE.read_text(), DOCKER_README.read_text()]
    scripts = {name for text in texts for name in SCRIPT.findall(text)}
    assert "train_ct" in scripts
    for name in scripts:
        assert (REPO / "pipelines" / f"{name}.py").is_file(), f"pipelines/{name}.py is referenced but missing"
    used: dict[str, set[str]] = {}
    for tokens in _referenced_commands(compose):
        for name, flags in script_flags(tokens):
            used.setdefault(name, set()).update(flags)
    for name, flags in sorted(used.items()):
        module = importlib.import_module(f"pancreas_gvae.pipelines.{name}")
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = capsys.readouterr().out
        unknown = sorted(f for f in flags - {"--help"} if not re.search(rf"{re.escape(f)}\b", text))
        assert not unknown, f"pipelines/{name}.py has no {unknown}"


def test_referenced_config_files_exist():
    texts = [DOCKERFILE.read_text(), COMPOSE.read_text(), DOCKER_README.read_text()]
    configs = {c for text in texts for c in re.findall(r"configs/[\w/.-]+\.ya?ml", interpolate(text))}
    assert configs
    for rel in configs:
        assert (REPO / rel).is_file(), f"{rel} is referenced but missing"
