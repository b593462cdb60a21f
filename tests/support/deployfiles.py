"""Readers for the files in deploy/: Dockerfile instructions, compose, kustomize, systemd units,
and the command lines they run. Used by tests/test_deploy.py; nothing here needs Docker,
kustomize or a cluster.
"""

from __future__ import annotations

import configparser
import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, in order, without comments."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a continuation"
    return out


def resolve_args(instructions: list[Instruction], text: str) -> str:
    """``text`` with ``${NAME}`` replaced by the default of a global ``ARG NAME=default``."""
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip()
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), text)


# --- kustomize --------------------------------------------------------------------------------

# What the renderer below implements; anything else in a kustomization.yaml must fail the test
# rather than be silently ignored.
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
}
_CLUSTER_SCOPED = {"Namespace"}


def kustomization(directory: Path) -> dict[str, Any]:
    """The parsed ``kustomization.yaml`` of ``directory``."""
    docs = load_yaml_docs(directory / "kustomization.yaml")
    assert len(docs) == 1, f"{directory}/kustomization.yaml: expected one document"
    return docs[0]


def key(resource: dict[str, Any]) -> tuple[str, str]:
    """A resource's identity within one namespace: kind and name."""
    return resource["kind"], resource["metadata"]["name"]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, which is what kustomize applies to maps without lists."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def _has_list(value: Any) -> bool:
    if isinstance(value, list):
        return True
    if isinstance(value, dict):
        return any(_has_list(v) for v in value.values())
    return False


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl kustomize directory`` would output, for the kustomize features
    in :data:`KUSTOMIZATION_FIELDS`. Patches must hold no lists: a list is where strategic
    merge and JSON merge patch differ.
    """
    k = kustomization(directory)
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields the test cannot render: {unknown}"
    resources: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else load_yaml_docs(path)
    by_key = {key(r): i for i, r in enumerate(resources)}
    for patch_entry in k.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: only file patches are rendered"
        (patch,) = load_yaml_docs(directory / patch_entry["path"])
        assert key(patch) in by_key, f"{directory}: patch for a missing resource {key(patch)}"
        assert not _has_list(patch), f"{patch_entry['path']}: a patch with a list"
        i = by_key[key(patch)]
        resources[i] = merge_patch(resources[i], patch)
    for rep in k.get("replicas", []):
        i = by_key[("Deployment", rep["name"])]
        resources[i]["spec"]["replicas"] = rep["count"]
    for image in k.get("images", []):
        for r in resources:
            for c in pod_containers(r):
                if c["image"].split(":")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    c["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    for label in k.get("labels", []):
        for r in resources:
            r["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in k:
        for r in resources:
            if r["kind"] not in _CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    return resources


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a workload (a Deployment or a CronJob); ``None`` for other
    kinds."""
    if resource["kind"] == "Deployment":
        spec: dict[str, Any] = resource["spec"]["template"]["spec"]
        return spec
    if resource["kind"] == "CronJob":
        spec = resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    return None


def pod_containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a workload's pod template (none for other kinds)."""
    spec = pod_spec(resource)
    if spec is None:
        return []
    containers: list[dict[str, Any]] = spec["containers"]
    return containers


# --- systemd ----------------------------------------------------------------------------------


def unit(path: Path) -> configparser.ConfigParser:
    """A systemd unit as sections of keys; a key given twice keeps its last value."""
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, comment_prefixes=("#", ";"), delimiters=("=",)
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text(), source=str(path))
    return parser


def env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an EnvironmentFile, commented-out examples (``#NAME=``) too."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


# --- command lines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandLine:
    """A command an rrb deployment runs: where it is written, the console script, its words."""

    where: str
    command: str
    words: tuple[str, ...]

    def options(self) -> set[str]:
        """The option names used (``--name`` of ``--name=value``, or ``-c``)."""
        return {w.split("=", 1)[0] for w in self.words if re.match(r"^--?[A-Za-z]", w)}


def compose_commands(compose: dict[str, Any]) -> list[CommandLine]:
    """The rrb command of every compose service that runs one."""
    out = []
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and str(cmd[0]).startswith("rrb"):
            out.append(CommandLine(f"compose service {name}", cmd[0], tuple(map(str, cmd[1:]))))
    return out


def kube_commands(resources: list[dict[str, Any]]) -> list[CommandLine]:
    """The command of every container of the Deployments and CronJobs in ``resources``."""
    out = []
    for r in resources:
        for c in pod_containers(r):
            words = [*c.get("command", []), *c.get("args", [])]
            where = f"{r['kind']} {r['metadata']['name']} container {c['name']}"
            out.append(CommandLine(where, words[0], tuple(words[1:])))
    return out


def systemd_commands(units: dict[str, configparser.ConfigParser]) -> list[CommandLine]:
    """The ``ExecStart`` command of every unit (its path reduced to the script's name)."""
    out = []
    for name, parser in units.items():
        words = shlex.split(parser["Service"]["ExecStart"])
        out.append(CommandLine(f"{name} ExecStart", Path(words[0]).name, tuple(words[1:])))
    return out


# Which command each *_OPTS variable of rrb.env.example is appended to.
ENV_OPTS = {
    "RRB_BRIDGE_OPTS": "rrb-bridge",
    "RRB_UPLOAD_OPTS": "rrb-upload",
    "RRB_OPTS": "rrb",
    "RRB_RESTORE_OPTS": "rrb-restore",
    "RRB_COMPACT_OPTS": "rrb-compact",
}


def env_opts_commands(path: Path) -> list[CommandLine]:
    """The options each ``*_OPTS`` line of an EnvironmentFile (commented-out ones too) adds."""
    text = path.read_text()
    return [
        CommandLine(f"{path.name} {var}", command, tuple(value.split()))
        for var, command in ENV_OPTS.items()
        for value in re.findall(rf"^#?{var}=(.*)$", text, re.M)
    ]
