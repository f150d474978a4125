#!/usr/bin/env bash
# Checks every file under deploy/ (and the Dockerfile) without a Docker daemon or a
# Kubernetes cluster; exits non-zero on any problem.
#
#   scripts/check-deploy.sh
#
# - every YAML and JSON file under deploy/ parses; no DSN or URL holds a password;
# - every flag the deploy files give `flotilla coordinator`/`agent` and every
#   FLOTILLA_* variable they set is one the CLI's source (src/) defines;
# - systemd units: `systemd-analyze verify` (no warning allowed) and
#   `systemd-analyze security --offline` below an exposure of 2.0;
# - compose: the compose-spec JSON schema (check-jsonschema's vendored copy), files
#   and services it names exist, `docker compose config` where docker has compose;
# - Prometheus: `promtool check config` (with the alert rules when they exist) and
#   `promtool check rules`;
# - Kubernetes: every manifest against the Kubernetes schemas (kubernetes-validate,
#   offline, strict: unknown fields fail) for 1.27 and the newest it knows; the
#   ServiceMonitor (a CRD) against the prometheus-operator schema from the npm
#   package @kubernetes-models/prometheus-operator when node and npm are here;
#   kustomization.yaml lists every manifest.
#
# The Python and npm tools are installed on first use, pinned, under
# ${FLOTILLA_DEPLOY_TOOLS:-~/.cache/flotilla-deploy} (a venv and an npm prefix).
# Files that other parts of the repository provide (deploy/prometheus/alerts.yml,
# deploy/grafana/...) are checked when present; their absence is reported, not failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT="$(pwd)"

TOOLS="${FLOTILLA_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla-deploy}"
VENV="$TOOLS/venv"
NPM_DIR="$TOOLS/npm"
CHECK_JSONSCHEMA_VERSION=0.39.0
KUBERNETES_VALIDATE_VERSION=1.37.0
PROM_OPERATOR_MODELS_VERSION=6.0.0

problems=0
problem() {
    printf 'PROBLEM: %s\n' "$*"
    problems=$((problems + 1))
}
note() {
    printf 'note: %s\n' "$*"
}
section() {
    printf '\n== %s\n' "$*"
}

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/flotilla-check-deploy.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

# --- Tools -------------------------------------------------------------------

ensure_venv() {
    if [[ -x "$VENV/bin/check-jsonschema" && -x "$VENV/bin/kubernetes-validate" ]] &&
        "$VENV/bin/python" - "$CHECK_JSONSCHEMA_VERSION" "$KUBERNETES_VALIDATE_VERSION" <<'PY'
import sys
from importlib.metadata import version
sys.exit(0 if (version("check-jsonschema"), version("kubernetes-validate")) == tuple(sys.argv[1:3]) else 1)
PY
    then
        return 0
    fi
    echo "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" &&
        "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
}

# The ServiceMonitor schema: the npm package's validators are generated from the
# prometheus-operator CRDs. Needs node and npm (checked by the caller).
ensure_npm() {
    local pkg="$NPM_DIR/node_modules/@kubernetes-models/prometheus-operator/package.json"
    if [[ -f "$pkg" ]] && grep -q "\"version\": \"$PROM_OPERATOR_MODELS_VERSION\"" "$pkg"; then
        return 0
    fi
    echo "installing @kubernetes-models/prometheus-operator@$PROM_OPERATOR_MODELS_VERSION into $NPM_DIR"
    mkdir -p "$NPM_DIR" &&
        npm install --prefix "$NPM_DIR" --no-audit --no-fund --silent \
            "@kubernetes-models/prometheus-operator@$PROM_OPERATOR_MODELS_VERSION"
}

section "Tools"
if ! ensure_venv; then
    problem "could not install the Python checkers into $VENV (python3 -m venv, pip)"
    echo "FAILED: deploy checks could not run"
    exit 1
fi
PY="$VENV/bin/python"
"$VENV/bin/check-jsonschema" --version
"$VENV/bin/kubernetes-validate" --version

# --- Every YAML and JSON file parses; no password in a DSN ---------------------

section "YAML and JSON under deploy/ parse; no password in a URL"
if ! "$PY" - <<'PY'; then
import json, pathlib, re, sys
import yaml

bad = 0
# postgres://user:secret@host, or a password= parameter with a value.
password_in_url = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s@:'\"]+:[^@\s/'\"]+@|[?&]password=[^&\s'\"]")
files = sorted(p for p in pathlib.Path("deploy").rglob("*") if p.is_file())
for path in files:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix in (".yml", ".yaml"):
            list(yaml.safe_load_all(text))
        elif path.suffix == ".json":
            json.loads(text)
        else:
            continue
        print(f"ok {path}")
    except Exception as e:
        print(f"PROBLEM: {path} does not parse: {e}")
        bad += 1
for path in files + [pathlib.Path("Dockerfile")]:
    if not path.exists():
        continue
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if password_in_url.search(line):
            print(f"PROBLEM: {path}:{n}: a URL holds a password (use a password file)")
            bad += 1
sys.exit(1 if bad else 0)
PY
    problem "deploy/ files that do not parse, or a password in a URL (above)"
fi

# --- Flags and environment variables ------------------------------------------

section "Flags and FLOTILLA_* variables in deploy/ exist in src/"
# Read from the CLI's source (no build needed): every flag the deploy files give
# `flotilla coordinator` or `flotilla agent` must be one of that command's (or a
# global one), and every FLOTILLA_* variable one the binary reads.
if ! "$PY" - <<'PY'; then
import pathlib, re, shlex, sys
import yaml

# Added in parallel with these files; a note, not a failure, until it lands.
PENDING_ENV = {"FLOTILLA_LOG_FORMAT"}
SUBCOMMANDS = {"coordinator": "CoordinatorArgs", "agent": "AgentArgs"}

flags_of = {}     # struct name -> set of long flags
global_flags = set()
all_flags = set()
envs = set()
field_re = re.compile(
    r'#\[arg\((.*?)\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:', re.S)
for path in pathlib.Path("src").rglob("*.rs"):
    text = path.read_text()
    envs |= set(re.findall(r'"(FLOTILLA_[A-Z0-9_]+)"', text))
    for struct in re.finditer(r'(?:struct|enum)\s+(\w+)[^{;]*\{(.*?)\n\}', text, re.S):
        for m in field_re.finditer(struct.group(2)):
            attr, field = m.group(1), m.group(2)
            named = re.search(r'\blong\s*=\s*"([^"]+)"', attr)
            if named:
                flag = named.group(1)
            elif re.search(r'\blong\b', attr):
                flag = field.replace("_", "-")
            else:
                continue
            flags_of.setdefault(struct.group(1), set()).add(flag)
            all_flags.add(flag)
            if re.search(r'\bglobal\s*=\s*true', attr):
                global_flags.add(flag)

bad = 0
def problem(msg):
    global bad
    print(f"PROBLEM: {msg}")
    bad += 1

def check_invocation(where, tokens):
    tokens = [t for t in tokens if not t.startswith("$")]
    sub = next((t for t in tokens if t in SUBCOMMANDS), None)
    allowed = (flags_of.get(SUBCOMMANDS[sub], set()) | global_flags) if sub else all_flags
    for t in tokens:
        if t.startswith("--"):
            flag = t[2:].split("=", 1)[0]
            if flag not in allowed:
                problem(f"{where}: `flotilla {sub or ''}` has no flag --{flag}")

def from_script(script):
    # `exec flotilla ...` in an sh -c script.
    for line in script.splitlines():
        words = shlex.split(line, comments=True) if line.strip() else []
        if words[:2] == ["exec", "flotilla"]:
            return words[2:]
    return None

def check_env(where, names):
    for name in names:
        if not name.startswith("FLOTILLA_") or name in envs:
            continue
        if name in PENDING_ENV:
            print(f"note: {where}: {name} is not read by src/ yet")
        else:
            problem(f"{where}: flotilla reads no variable {name}")

# systemd: ExecStart, Environment= and the env files documented in comments.
for unit in sorted(pathlib.Path("deploy/systemd").glob("*.service")):
    text = unit.read_text()
    own = set(re.findall(r'\$\{?(FLOTILLA_\w+)', text))  # the unit's own, spliced into ExecStart
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            check_invocation(unit, shlex.split(line.split("=", 1)[1].replace("%%", "%"))[1:])
    names = re.findall(r'^Environment=(FLOTILLA_\w+)=', text, re.M)
    names += re.findall(r'^#\s+(FLOTILLA_\w+)=', text, re.M)
    check_env(unit, [n for n in names if n not in own])

# compose: services running the flotilla image.
compose = yaml.safe_load(pathlib.Path("deploy/compose/compose.yaml").read_text())
for name, svc in compose["services"].items():
    if not str(svc.get("image", "")).startswith("flotilla"):
        continue
    where = f"compose service {name}"
    command = svc.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    entry = svc.get("entrypoint") or []
    if entry and entry[0].endswith("sh"):
        tokens = from_script(command[0])
        if tokens is None:
            problem(f"{where}: its script does not `exec flotilla`")
            continue
    else:
        tokens = command
    check_invocation(where, tokens)
    env = svc.get("environment") or {}
    check_env(where, env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env])

# Kubernetes: containers running the flotilla image, and the ConfigMaps they read.
for path in sorted(pathlib.Path("deploy/kubernetes").glob("*.yaml")):
    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
        if doc.get("kind") == "ConfigMap":
            check_env(f"{path}: ConfigMap {doc['metadata']['name']}", doc.get("data", {}))
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if not str(c.get("image", "")).startswith("flotilla"):
                continue
            where = f"{path}: {doc['metadata']['name']}/{c['name']}"
            command, args = c.get("command") or [], c.get("args") or []
            if command and command[0].endswith("sh"):
                tokens = from_script(args[0])
                if tokens is None:
                    problem(f"{where}: its script does not `exec flotilla`")
                    continue
            else:
                tokens = args
            check_invocation(where, tokens)
            check_env(where, [e["name"] for e in c.get("env", [])])
print(f"flags known: {len(all_flags)}, FLOTILLA_* variables known: {len(envs)}")
sys.exit(1 if bad else 0)
PY
    problem "deploy files give flotilla flags or variables it does not take (above)"
fi

# --- systemd -----------------------------------------------------------------

section "systemd units"
if command -v systemd-analyze >/dev/null 2>&1; then
    # verify checks that ExecStart's binary exists: point the copies at a stub.
    unitdir="$SCRATCH/systemd"
    mkdir -p "$unitdir"
    printf '#!/bin/sh\n' >"$unitdir/flotilla"
    chmod 755 "$unitdir/flotilla"
    units=()
    for unit in deploy/systemd/*.service; do
        name="$(basename "$unit")"
        sed "s#/usr/local/bin/flotilla#$unitdir/flotilla#g" "$unit" >"$unitdir/$name"
        # A template is verified through an instance of it.
        units+=("$unitdir/${name/@./@shard-0.}")
    done
    for unit in "${units[@]}"; do
        # verify exits 0 on unknown keys and bad values: any output is a problem.
        if out="$(systemd-analyze verify --man=no "$unit" 2>&1)" && [[ -z "$out" ]]; then
            echo "ok verify $(basename "$unit")"
        else
            printf '%s\n' "$out"
            problem "systemd-analyze verify $(basename "$unit")"
        fi
        exposure="$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1 | grep 'Overall exposure level')"
        echo "${exposure:-no exposure figure for $(basename "$unit")}"
        if ! systemd-analyze security --offline=true --threshold=20 "$unit" >/dev/null 2>&1; then
            problem "$(basename "$unit"): exposure above 2.0 (systemd-analyze security --offline=true)"
        fi
    done
else
    note "systemd-analyze not found: systemd units not verified"
fi

# --- Prometheus -----------------------------------------------------------------

section "Prometheus configuration and rules"
ALERTS=deploy/prometheus/alerts.yml
if command -v promtool >/dev/null 2>&1; then
    # The standalone scrape configuration (it moves to deploy/prometheus/ with the rules).
    for config in deploy/prometheus.yml deploy/prometheus/prometheus.yml; do
        if [[ -f "$config" ]]; then
            promtool check config "$config" || problem "promtool check config $config"
        fi
    done
    # The compose config names the rules where compose mounts them; check it with
    # the repository's file in their place.
    if [[ -f "$ALERTS" ]]; then
        sed "s#/etc/prometheus/alerts.yml#$ROOT/$ALERTS#" deploy/compose/prometheus.yml >"$SCRATCH/prometheus.yml"
        promtool check config "$SCRATCH/prometheus.yml" ||
            problem "promtool check config deploy/compose/prometheus.yml"
        promtool check rules "$ALERTS" || problem "promtool check rules $ALERTS"
    else
        note "$ALERTS not in this tree yet: compose's Prometheus config checked for syntax only"
        promtool check config --syntax-only deploy/compose/prometheus.yml ||
            problem "promtool check config --syntax-only deploy/compose/prometheus.yml"
    fi
else
    note "promtool not found (Debian package prometheus): Prometheus files not checked"
fi

# --- Compose -------------------------------------------------------------------

section "Docker Compose"
COMPOSE=deploy/compose/compose.yaml
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE" ||
    problem "$COMPOSE does not match the compose-spec schema"
if ! "$PY" - "$COMPOSE" <<'PY'; then
import pathlib, re, sys
import yaml

compose_file = pathlib.Path(sys.argv[1])
base = compose_file.parent
doc = yaml.safe_load(compose_file.read_text())
services = doc.get("services", {})
bad = 0

def problem(msg):
    global bad
    print(f"PROBLEM: {compose_file}: {msg}")
    bad += 1

# Provided by other parts of the repository; mounted here.
elsewhere = {"deploy/prometheus/alerts.yml", "deploy/grafana/provisioning", "deploy/grafana/dashboards"}
for name, svc in services.items():
    for dep in svc.get("depends_on", {}) or {}:
        if dep not in services:
            problem(f"service {name} depends on unknown service {dep}")
    for secret in svc.get("secrets", []) or []:
        sname = secret if isinstance(secret, str) else secret.get("source")
        if sname not in (doc.get("secrets") or {}):
            problem(f"service {name} uses undeclared secret {sname}")
    for vol in svc.get("volumes", []) or []:
        source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
        if not source.startswith("."):
            if source not in (doc.get("volumes") or {}):
                problem(f"service {name} mounts undeclared volume {source}")
            continue
        path = (base / source).resolve()
        rel = path.relative_to(pathlib.Path.cwd()).as_posix()
        if path.exists():
            continue
        if rel in elsewhere:
            print(f"note: {rel} (mounted by {name}) is not in this tree yet")
        else:
            problem(f"service {name} mounts {source}, which does not exist")
    build = svc.get("build")
    if build:
        ctx = base / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        if not dockerfile.is_file():
            problem(f"service {name} builds from {dockerfile}, which does not exist")
    env = svc.get("environment", {}) or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    for key, value in env.items():
        if "PASSWORD" in key.upper() and not key.upper().endswith("_FILE"):
            problem(f"service {name} sets {key} in its environment (use a secret file)")
    command = svc.get("command") or []
    if isinstance(command, list) and "agent" in command and "--password-file" not in command:
        problem(f"agent service {name} has no --password-file")
# Compose interpolates $NAME and $(...) from the host's environment: a script
# meant to see them in the container must write $$.
for n, line in enumerate(compose_file.read_text().splitlines(), 1):
    if line.lstrip().startswith("#"):
        continue
    if re.search(r"\$[A-Za-z_(]", line.replace("$$", "")):
        problem(f"line {n}: a single $ that compose would interpolate on the host (write $$): {line.strip()}")
for sname, secret in (doc.get("secrets") or {}).items():
    if "file" in secret and not (base / secret["file"]).is_file():
        problem(f"secret {sname}: {secret['file']} does not exist")
print(f"{len(services)} services checked")
sys.exit(1 if bad else 0)
PY
    problem "$COMPOSE (above)"
fi
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    if [[ -f "$ALERTS" && -d deploy/grafana/provisioning && -d deploy/grafana/dashboards ]]; then
        docker compose -f "$COMPOSE" config --quiet || problem "docker compose config"
    else
        note "docker compose config skipped: the Prometheus/Grafana files it mounts are not all here"
    fi
else
    note "docker has no compose plugin here: checked against the compose-spec schema only"
fi
# Grafana's provisioning must point where compose mounts the dashboards.
PROVIDER=deploy/grafana/provisioning/dashboards/flotilla.yml
if [[ -f "$PROVIDER" ]]; then
    grep -q '/var/lib/grafana/dashboards' "$PROVIDER" ||
        problem "$PROVIDER does not load /var/lib/grafana/dashboards (where compose mounts the dashboards)"
else
    note "$PROVIDER not in this tree yet"
fi
DATASOURCE=deploy/grafana/provisioning/datasources/prometheus.yml
if [[ -f "$DATASOURCE" ]] && ! grep -q 'prometheus:9090' "$DATASOURCE"; then
    note "$DATASOURCE does not name http://prometheus:9090, compose's Prometheus"
fi

# --- Dockerfile ----------------------------------------------------------------

section "Dockerfile"
if ! "$PY" - <<'PY'; then
import re, sys
text = open("Dockerfile").read()
stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
users = re.findall(r"^USER\s+(\S+)", text, re.M)
bad = []
if len(stages) < 2:
    bad.append("not multi-stage")
if not users or users[-1].split(":")[0] in ("root", "0"):
    bad.append("the runtime stage does not switch to a non-root USER")
elif not users[-1].split(":")[0].isdigit():
    bad.append("USER is not numeric (Kubernetes' runAsNonRoot cannot check a name)")
ignore = open(".dockerignore").read().split()
if "deploy/" not in ignore:
    bad.append(".dockerignore lets deploy/ (compose secrets) into the build context")
for b in bad:
    print(f"PROBLEM: Dockerfile: {b}")
if not bad:
    print(f"ok Dockerfile: stages {[s[1] or s[0] for s in stages]}, USER {users[-1]}")
sys.exit(1 if bad else 0)
PY
    problem "Dockerfile (above)"
fi

# --- Kubernetes ------------------------------------------------------------------

section "Kubernetes manifests"
K8S=deploy/kubernetes
SM_SCRIPT=""
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    note "node/npm not found: ServiceMonitor not validated against its CRD schema"
elif ! ensure_npm; then
    problem "could not install @kubernetes-models/prometheus-operator into $NPM_DIR"
else
    # Lives beside node_modules so that the import resolves there.
    SM_SCRIPT="$NPM_DIR/check-servicemonitor.mjs"
    cat >"$SM_SCRIPT" <<'JS'
// Validates the ServiceMonitor JSON documents on stdin (an array).
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
let failed = 0;
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  try {
    new ServiceMonitor(doc).validate();
    console.log(`ok servicemonitor/${doc.metadata.name} against the prometheus-operator schema`);
  } catch (e) {
    console.log(`PROBLEM: servicemonitor/${doc.metadata.name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
JS
fi
if ! SM_SCRIPT="$SM_SCRIPT" "$PY" - "$K8S" <<'PY'; then
import json, os, pathlib, subprocess, sys
import yaml
from kubernetes_validate import utils as kv

k8s = pathlib.Path(sys.argv[1])
# The oldest Kubernetes whose native gRPC probe is GA, and the newest schemas bundled.
versions = ["1.27.0", kv.latest_version()]
bad = 0
service_monitors = []
for path in sorted(k8s.glob("*.yaml")):
    if path.name == "kustomization.yaml":
        continue
    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
        name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "ServiceMonitor" and doc.get("apiVersion") == "monitoring.coreos.com/v1":
            service_monitors.append(doc)
            continue
        before = bad
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                print(f"PROBLEM: {name} (Kubernetes {version}): {where}: {e.message}")
                bad += 1
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                print(f"PROBLEM: {name}: no schema to check it against ({e})")
                bad += 1
        if bad == before:
            print(f"ok {name} (Kubernetes {', '.join(versions)})")
if service_monitors:
    script = os.environ.get("SM_SCRIPT")
    if script:
        r = subprocess.run(["node", script], input=json.dumps(service_monitors), text=True)
        bad += r.returncode != 0
    else:
        print(f"note: {len(service_monitors)} ServiceMonitor(s) not validated (no node/npm)")

# kustomization.yaml lists every manifest, and only existing ones.
kust = yaml.safe_load((k8s / "kustomization.yaml").read_text())
listed = set(kust.get("resources", []))
present = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml"}
for missing in sorted(listed - present):
    print(f"PROBLEM: kustomization.yaml lists {missing}, which does not exist")
    bad += 1
for unlisted in sorted(present - listed):
    print(f"PROBLEM: {unlisted} is not in kustomization.yaml")
    bad += 1
sys.exit(1 if bad else 0)
PY
    problem "Kubernetes manifests (above)"
fi

section "Summary"
if ((problems > 0)); then
    echo "FAILED: $problems deploy check(s) found problems"
    exit 1
fi
echo "deploy checks passed"
