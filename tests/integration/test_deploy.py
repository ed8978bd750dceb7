"""
Issue 9 ("Operations"), items 4 and 5: the systemd unit, the Kubernetes manifests, and the
sd_notify readiness protocol.

No Kubernetes schema validator (kubeconform, kubeval) is a Debian 12 package, so the manifests
are checked here without a cluster: every YAML document is parsed (Debian's python3-yaml), and
the documents are checked against each other and against the daemon itself. The shape is one
gateway Deployment per region (issue 15, sovereign regions): each region's pods mount that
region's Secrets and the shared pepper only, load other regions' files that say only where
their gateways are, reach only their own CloudNativePG cluster, and find the other regions'
gateways by Service DNS, verified by a certificate naming the region. Checked: one image tag,
the `listen`, `peer_listen`, `probe_listen` and `metrics_listen` ports everywhere a port is
named, native grpc probes on the probe listener (also with the TLS variant of the public port), selectors,
NetworkPolicies, `domiciled --check-config` on each region's configuration (its files and
placeholder secrets laid out as the pod sees them) and its refusal of another region's
secret, the keys of src/config/config.c, the certificates, and the CloudNativePG clusters'
durability and placement. The init container's script runs here too, on a directory laid out
like a Secret volume. The systemd unit is parsed and, where systemd-analyze exists, verified.

The last tests start domiciled with NOTIFY_SOCKET pointing at a datagram socket bound here and
read READY=1 after start, RELOADING=1 and READY=1 around SIGHUP, and STOPPING=1 after SIGTERM.
"""

import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile

import pytest

from conftest import DOMICILED, SOURCE_DIR

try:
    import yaml
except ImportError:  # pragma: no cover - deploy/deps.sh test installs it
    pytest.fail("python3-yaml is missing: run deploy/deps.sh test", pytrace=False)

K8S_DIR = os.path.join(SOURCE_DIR, "deploy", "kubernetes")
UNIT = os.path.join(SOURCE_DIR, "deploy", "systemd", "domiciled.service")
SYSUSERS = os.path.join(SOURCE_DIR, "deploy", "systemd", "domicile.sysusers")
CONFIG_C = os.path.join(SOURCE_DIR, "src", "config", "config.c")
MAIN_C = os.path.join(SOURCE_DIR, "src", "daemon", "main.c")
IMAGE_REPO = "domicile/domiciled"
CNPG_API = "postgresql.cnpg.io/v1"
REGION_LABEL = "domicile.io/region"
NODE_REGION_LABEL = "topology.kubernetes.io/region"
PLACEHOLDER = "REPLACE_ME"


# --------------------------------------------------------------------------------------------
# a small libconfig reader (the subset the configuration files use)


class LibconfigError(ValueError):
    pass


def parse_libconfig(text):
    """Parses libconfig text into a dict (groups: dict, lists/arrays: list, strings, ints,
    floats, bools). Comments: #, //, /* */. Adjacent strings are concatenated."""
    toks = _lc_tokens(text)
    pos = [0]

    def peek():
        return toks[pos[0]] if pos[0] < len(toks) else (None, None)

    def take(kind=None, value=None):
        t = peek()
        if t[0] is None or (kind and t[0] != kind) or (value is not None and t[1] != value):
            raise LibconfigError(f"expected {value or kind}, got {t[1]!r}")
        pos[0] += 1
        return t

    def settings(end):
        out = {}
        while peek()[0] is not None and peek()[1] != end:
            name = take("name")[1]
            if peek()[1] not in ("=", ":"):
                raise LibconfigError(f"expected = after {name}")
            pos[0] += 1
            out[name] = value()
            if peek()[1] in (";", ","):
                pos[0] += 1
        return out

    def value():
        kind, v = peek()
        if kind == "str":
            s = ""
            while peek()[0] == "str":
                s += take()[1]
            return s
        if kind in ("int", "float", "bool"):
            pos[0] += 1
            return v
        if v in ("[", "("):
            end = "]" if v == "[" else ")"
            pos[0] += 1
            items = []
            while peek()[1] != end:
                items.append(value())
                if peek()[1] == ",":
                    pos[0] += 1
            take(value=end)
            return items
        if v == "{":
            pos[0] += 1
            g = settings("}")
            take(value="}")
            return g
        raise LibconfigError(f"unexpected {v!r}")

    result = settings(None)
    if peek()[0] is not None:
        raise LibconfigError(f"trailing {peek()[1]!r}")
    return result


_LC_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/
      |(?P<str>"(?:[^"\\]|\\.)*")
      |(?P<float>[-+]?\d+\.\d*(?:[eE][-+]?\d+)?)
      |(?P<int>[-+]?(?:0[xX][0-9a-fA-F]+|\d+)L{0,2})
      |(?P<bool>\b(?:true|false)\b)
      |(?P<name>[A-Za-z*][-A-Za-z0-9_*]*)
      |(?P<punct>[=:;,\[\](){}])""",
    re.S | re.X | re.I,
)


def _lc_tokens(text):
    toks, i = [], 0
    while i < len(text):
        m = _LC_TOKEN.match(text, i)
        if not m:
            raise LibconfigError(f"cannot read {text[i:i + 20]!r}")
        i = m.end()
        kind = m.lastgroup
        if kind is None:
            continue
        v = m.group(kind)
        if kind == "str":
            v = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), v[1:-1])
        elif kind == "int":
            v = int(v.rstrip("Ll"), 0)
        elif kind == "float":
            v = float(v)
        elif kind == "bool":
            v = v.lower() == "true"
        toks.append((kind, v))
    return toks


def test_libconfig_reader_reads_the_repository_files():
    """The reader above is what the manifest checks stand on: it must read the real files."""
    us = parse_libconfig(open(os.path.join(SOURCE_DIR, "regions", "us.conf")).read())
    assert us["code"] == "us" and us["pool_size"] == 3 and isinstance(us["hosts"], list)
    routes = parse_libconfig(open(os.path.join(SOURCE_DIR, "regions", "routes.conf")).read())
    assert routes["forbidden_purposes"] and routes["routes"][0]["from"] == "eu"
    bases = parse_libconfig(open(os.path.join(SOURCE_DIR, "regions", "bases.conf")).read())
    assert all("id" in b for b in bases["bases"])


# --------------------------------------------------------------------------------------------
# what the daemon knows


def daemon_keys(table):
    """{name: default} of a key table in src/config/config.c (default None: required)."""
    src = open(CONFIG_C).read()
    m = re.search(r"static const key_desc_t " + table + r"\[\] = \{(.*?)\n\};", src, re.S)
    assert m, f"{table} not found in {CONFIG_C}"
    keys = {}
    for k in re.finditer(r'\{"(\w+)",\s*KT_\w+,\s*\w+\(\w+\),\s*(?:NOCOUNT|\w+\(\w+\)),\s*(NULL|"[^"]*")', m.group(1)):
        keys[k.group(1)] = None if k.group(2) == "NULL" else k.group(2)[1:-1]
    assert len(keys) >= 10, f"could not read {table} from {CONFIG_C}"
    return keys


def project_version():
    m = re.search(r"project\(domicile VERSION ([0-9.]+)", open(os.path.join(SOURCE_DIR, "CMakeLists.txt")).read())
    assert m
    return m.group(1)


# --------------------------------------------------------------------------------------------
# the manifests: one gateway Deployment per region, each with only its own region's secrets

CODES = ("us", "eu", "in")
# What a gateway may know of a region it does not serve (src/config/config.c,
# check_foreign_region refuses every other region key there).
PUBLIC_REGION_KEYS = {"code", "name", "jurisdiction", "gateways", "gateway_identity"}
# Not in kustomization.yaml: placeholders, and one optional way of issuing certificates.
NOT_APPLIED = {"secrets.template.yaml", "cert-manager.yaml"}
PEPPER_SECRET = "domicile-subject-pepper"
FEDERATION_CA = "domicile-federation-ca"  # ConfigMap: the CA certificate only


def load_manifests():
    """{file name: [documents]} of every YAML file in deploy/kubernetes."""
    files = sorted(glob.glob(os.path.join(K8S_DIR, "*.yaml")))
    assert files, f"no manifests in {K8S_DIR}"
    out = {}
    for f in files:
        with open(f) as fh:
            try:
                docs = [d for d in yaml.safe_load_all(fh) if d is not None]
            except yaml.YAMLError as e:
                pytest.fail(f"{f}: not valid YAML: {e}")
        out[os.path.basename(f)] = docs
    return out


@pytest.fixture(scope="module")
def manifests():
    return load_manifests()


@pytest.fixture(scope="module")
def objects(manifests):
    """Every Kubernetes object (not the kustomization), with its file."""
    objs = []
    for name, docs in manifests.items():
        for d in docs:
            assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, f"{name}: not an object: {d!r:.200}"
            if d["kind"] == "Kustomization":
                continue
            assert d.get("metadata", {}).get("name"), f"{name}: {d['kind']} without metadata.name"
            objs.append((name, d))
    return objs


def one(objects, kind, name=None):
    found = [d for _, d in objects if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(objects, kind):
    return [d for _, d in objects if d["kind"] == kind]


def region_of(d):
    return d["metadata"].get("labels", {}).get(REGION_LABEL)


def walk(node, key):
    """Every value stored under `key`, anywhere in node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


@pytest.fixture(scope="module")
def configmaps(objects):
    """{name: data} of every ConfigMap, the ones made at install (templates) included."""
    return {d["metadata"]["name"]: d["data"] for d in all_of(objects, "ConfigMap")}


@pytest.fixture(scope="module")
def secrets(objects):
    """{name: Secret} of the templates."""
    return {d["metadata"]["name"]: d for d in all_of(objects, "Secret")}


@pytest.fixture(scope="module")
def clusters(objects):
    cs = [d for _, d in objects if d["kind"] == "Cluster"]
    assert cs, "no CloudNativePG Cluster"
    return cs


class RegionGateway:
    """The gateways of one region as the manifests define them."""

    def __init__(self, objects, configmaps, code):
        self.code = code
        self.name = f"domicile-gateway-{code}"
        self.deployment = one(objects, "Deployment", self.name)
        self.pod = self.deployment["spec"]["template"]["spec"]
        (self.container,) = [c for c in self.pod["containers"] if c["name"] == "domiciled"]
        self.files = mounted_files(self.pod, self.container)
        self.conf_path = self.container["args"][self.container["args"].index("--config") + 1]
        assert self.files.get(self.conf_path, ("",))[0] == "configMap", f"{self.name}: --config {self.conf_path} is not a ConfigMap file"
        _, cm, key = self.files[self.conf_path]
        self.configmap = cm
        self.conf = parse_libconfig(configmaps[cm][key])
        self.labels = self.deployment["spec"]["template"]["metadata"]["labels"]

    def port(self, key):
        host, _, port = self.conf[key].rpartition(":")
        assert host and port.isdigit() and int(port) > 0, f"{self.name}: {key} must be host:port with a fixed port: {self.conf[key]}"
        return int(port)

    def region_file(self, configmaps, code):
        """(ConfigMap, key, parsed) of the file this gateway loads as regions/<code>.conf."""
        path = os.path.join(self.conf["regions_dir"], f"{code}.conf")
        assert path in self.files, f"{self.name}: {path} is not mounted"
        kind, cm, key = self.files[path][:3]
        assert kind == "configMap", f"{self.name}: {path} comes from a {kind}"
        return cm, key, parse_libconfig(configmaps[cm][key])


@pytest.fixture(scope="module")
def region_gateways(objects, configmaps):
    return {code: RegionGateway(objects, configmaps, code) for code in CODES}


def selects(selector, labels):
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) selects labels."""
    if not set(selector) <= {"matchLabels", "matchExpressions"}:
        raise AssertionError(f"unexpected selector {selector}")
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        ok = {"In": lambda: labels.get(k) in vals, "NotIn": lambda: labels.get(k) not in vals,
              "Exists": lambda: k in labels, "DoesNotExist": lambda: k not in labels}[op]()
        if not ok:
            return False
    return True


def test_every_file_is_yaml_and_every_object_is_named(manifests, objects):
    kinds = {d["kind"] for _, d in objects}
    for want in ("Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                 "NetworkPolicy", "Cluster", "ServiceAccount", "Certificate", "Issuer"):
        assert want in kinds, f"no {want} in deploy/kubernetes"
    namespaces = {d["metadata"].get("namespace") for _, d in objects if d["kind"] != "Namespace"}
    assert namespaces == {one(objects, "Namespace")["metadata"]["name"]}, f"objects outside the namespace: {namespaces}"


def test_kustomization_lists_everything_but_the_templates(manifests):
    (k,) = manifests["kustomization.yaml"]
    listed = set(k["resources"])
    want = set(manifests) - {"kustomization.yaml"} - NOT_APPLIED
    assert listed == want, f"kustomization.yaml resources {sorted(listed)} != files {sorted(want)}"


def test_kustomize_renders_the_listed_objects(manifests):
    """Where kubectl is installed (not a Debian 12 package), `kubectl kustomize` renders exactly
    the objects of the listed files, unchanged."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: kustomization.yaml was only parsed")
    p = subprocess.run([kubectl, "kustomize", K8S_DIR], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rendered = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(p.stdout) if d)
    (k,) = manifests["kustomization.yaml"]
    want = sorted((d["kind"], d["metadata"]["name"]) for f in k["resources"] for d in manifests[f])
    assert rendered == want


def test_one_image_everywhere_pinned_to_the_project_version(objects):
    images = [(f, d["kind"], img) for f, d in objects for img in walk(d, "image")]
    assert images, "no container image in the manifests"
    tags = set()
    for f, kind, img in images:
        repo, _, tag = img.rpartition(":")
        assert repo == IMAGE_REPO, f"{f}: {kind} image {img!r} is not {IMAGE_REPO}:<tag>"
        assert tag and tag != "latest" and "/" not in tag, f"{f}: {kind} image {img!r} must have a fixed tag, not latest"
        tags.add(tag)
    assert tags == {project_version()}, f"image tags {tags} != project version {project_version()} (CMakeLists.txt)"
    for f, d in objects:
        for img in walk(d, "imageName"):
            assert ":" in img and not img.endswith(":latest"), f"{f}: imageName {img!r} must be pinned"


def test_one_gateway_deployment_per_region(objects, region_gateways):
    deployments = all_of(objects, "Deployment")
    assert sorted(d["metadata"]["name"] for d in deployments) == sorted(f"domicile-gateway-{c}" for c in CODES)
    for code, g in region_gateways.items():
        assert g.conf["gateway_region"] == code, f"{g.name}: gateway_region {g.conf['gateway_region']!r}"
        assert set(g.conf["regions"]) == set(CODES), f"{g.name}: regions {g.conf['regions']}"
        assert region_of(g.deployment) == code and g.labels.get(REGION_LABEL) == code, f"{g.name}: pods not labelled {code}"
        assert g.deployment["spec"]["selector"]["matchLabels"].get(REGION_LABEL) == code, (
            f"{g.name}: the selector must name the region, or it adopts the other regions' pods")
        assert region_of(one(objects, "ConfigMap", g.configmap)) == code
        assert region_of(one(objects, "ServiceAccount", g.pod["serviceAccountName"])) == code
        for other in region_gateways.values():
            if other is not g:
                assert not selects(g.deployment["spec"]["selector"], other.labels), f"{g.name} selects {other.name}'s pods"


def ready_service_name():
    """The readiness service name of the daemon's health service (include/domicile/api.h)."""
    with open(os.path.join(SOURCE_DIR, "include", "domicile", "api.h")) as f:
        (name,) = re.findall(r'#define DM_HEALTH_READY_SERVICE "([^"]+)"', f.read())
    return name


# What each probe asks (deploy/kubernetes/README.md, "Probes"): startup and liveness, that the
# gateway serves; readiness, that its region has answered once since it started.
PROBE_SERVICES = {"startupProbe": "", "livenessProbe": "", "readinessProbe": ready_service_name()}


@pytest.mark.parametrize("code", CODES)
def test_container_ports_probes_and_service(objects, region_gateways, code):
    g = region_gateways[code]
    ports = {p["name"]: p["containerPort"] for p in g.container["ports"]}
    assert ports == {"grpc": g.port("listen"), "peer": g.port("peer_listen"), "probe": g.port("probe_listen"),
                     "metrics": g.port("metrics_listen")}, (
        f"{g.name}: container ports {ports} are not listen ({g.conf['listen']}), peer_listen "
        f"({g.conf['peer_listen']}), probe_listen ({g.conf.get('probe_listen')}) and metrics_listen "
        f"({g.conf.get('metrics_listen')}: monitoring/podmonitor.yaml scrapes the port named metrics)")
    assert len(set(ports.values())) == 4, ports
    # The kubelet dials grpc probes without TLS and without credentials: they go to the probe
    # listener, which is plaintext and serves the health check only, whatever the public
    # port's transport (a grpc probe on a TLS port would fail every time).
    for probe, service in PROBE_SERVICES.items():
        p = g.container.get(probe)
        assert p, f"{g.name}: the gateway container has no {probe}"
        assert set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe} must be a native grpc probe"
        assert p["grpc"]["port"] == ports["probe"], (
            f"{g.name}: {probe} port {p['grpc']['port']} is not the probe listener's ({ports['probe']})")
        assert p["grpc"].get("service", "") == service, f"{g.name}: {probe} must check service {service!r}"
    assert g.conf["transport"] in ("plaintext", "tls")
    svc = one(objects, "Service", g.name)
    assert region_of(svc) == code
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    # No Service publishes the probe port: the kubelet probes the pod itself.
    assert set(sports) == {"grpc", "peer"}, f"Service {g.name}: ports {sorted(sports)}"
    for name, sp in sports.items():
        target = sp["targetPort"]
        assert (ports.get(target) if isinstance(target, str) else target) == ports[name], f"Service {g.name} {name}: targetPort {target!r}"
        assert sp["port"] == ports[name], f"Service {g.name} {name}: port {sp['port']} != {ports[name]}"
    # h2c on the public port only: the peer port is TLS end to end.
    assert sports["grpc"].get("appProtocol") == "kubernetes.io/h2c" and "appProtocol" not in sports["peer"]
    assert selects({"matchLabels": svc["spec"]["selector"]}, g.labels), f"Service {g.name} does not select its gateways"
    for other in region_gateways.values():
        if other is not g:
            assert not selects({"matchLabels": svc["spec"]["selector"]}, other.labels), f"Service {g.name} selects {other.name}'s pods"


@pytest.mark.parametrize("code", CODES)
def test_deployment_shape(region_gateways, code):
    g = region_gateways[code]
    spec, pod = g.deployment["spec"], g.pod
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = g.labels
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"].items() <= labels.items()
               for t in anti), "no required anti-affinity of the replicas across nodes"
    res = g.container["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    # Secure by default: every container, the init container included.
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, f"{c['name']}: root file system must be read-only"
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], f"{c['name']}: must drop all capabilities"
        assert not sc.get("privileged"), c["name"]
    assert pod["automountServiceAccountToken"] is False
    # SIGTERM's grace: preStop pause + shutdown_grace_ms must fit the pod's grace period.
    grace_ms = int(g.conf.get("shutdown_grace_ms", daemon_keys("gateway_keys")["shutdown_grace_ms"]))
    assert pod["terminationGracePeriodSeconds"] * 1000 > grace_ms + 5000


@pytest.mark.parametrize("code", CODES)
def test_pdb_selects_the_regions_gateway_pods(objects, region_gateways, code):
    g = region_gateways[code]
    pdb = one(objects, "PodDisruptionBudget", g.name)
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["minAvailable"] < g.deployment["spec"]["replicas"], "a PDB as large as replicas blocks every drain"
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert sel == g.deployment["spec"]["selector"]["matchLabels"], f"PDB selector {sel} is not the Deployment's"
    assert len(all_of(objects, "PodDisruptionBudget")) == len(CODES)


def peer_selector_regions(peer):
    """The regions of gateway pods a NetworkPolicy peer selects (same namespace, gateway labels,
    domicile.io/region In [...])."""
    assert set(peer) == {"podSelector"}, f"a gateway peer is selected by pod labels in this namespace: {peer}"
    sel = peer["podSelector"]
    assert sel["matchLabels"] == {"app.kubernetes.io/name": "domicile-gateway", "app.kubernetes.io/component": "gateway"}, sel
    (expr,) = sel["matchExpressions"]
    assert expr["key"] == REGION_LABEL and expr["operator"] == "In", expr
    return set(expr["values"])


@pytest.mark.parametrize("code", CODES)
def test_network_policy_reaches_only_its_own_cluster_and_the_peers(objects, region_gateways, clusters, code):
    g = region_gateways[code]
    others = set(CODES) - {code}
    nps = [d for d in all_of(objects, "NetworkPolicy") if selects(d["spec"]["podSelector"], g.labels)]
    assert [d["metadata"]["name"] for d in nps] == [g.name], f"the {code} gateways must be governed by exactly one policy: {nps}"
    (np,) = nps
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    listen, peer_port, metrics = g.port("listen"), g.port("peer_listen"), g.port("metrics_listen")

    # In: the public port from the platform namespace; the peer port from the other regions'
    # gateways only; the metrics port from the monitoring namespace (Prometheus).
    ingress = {}
    for rule in np["spec"]["ingress"]:
        (p,) = rule["ports"]
        assert p.get("protocol", "TCP") == "TCP" and p["port"] not in ingress, rule
        ingress[p["port"]] = rule["from"]
    assert set(ingress) == {listen, peer_port, metrics}, (
        f"ingress ports {sorted(ingress)} != listen {listen}, peer {peer_port}, metrics {metrics}")
    # The probe port is in no rule: no pod may reach it. The kubelet probes from the pod's own
    # node, which a NetworkPolicy cannot block.
    assert g.port("probe_listen") not in ingress
    assert ingress[listen] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "platform"}}}]
    assert ingress[metrics] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    (peer_from,) = ingress[peer_port]
    assert peer_selector_regions(peer_from) == others, f"peer port open to {peer_selector_regions(peer_from)}, not {others}"

    # Out: its own cluster's 5432, the other regions' gateways' peer port, DNS.
    egress = {}
    for rule in np["spec"]["egress"]:
        for p in rule["ports"]:
            egress.setdefault(p["port"], []).append(rule["to"])
    assert set(egress) == {5432, peer_port, 53}, f"egress must be PostgreSQL, the peers and DNS only: {sorted(egress)}"
    (pg_to,) = egress[5432]
    (own,) = [c for c in clusters if c["metadata"]["labels"][REGION_LABEL] == code]
    assert pg_to == [{"podSelector": {"matchLabels": {"cnpg.io/cluster": own["metadata"]["name"]}}}], (
        f"5432 must be open to {own['metadata']['name']} only: {pg_to}")
    (peers_to,) = egress[peer_port]
    (peer_to,) = peers_to
    assert peer_selector_regions(peer_to) == others
    for other in others:  # what the selector admits are the other regions' gateway pods
        assert selects(peer_to["podSelector"], region_gateways[other].labels)
        assert region_gateways[other].port("peer_listen") == peer_port, f"{other}: another peer port"
    dns = egress[53]
    assert all(t == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                      "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}] for t in dns), dns


def test_cloudnativepg_clusters_are_synchronous_and_pinned(clusters, region_gateways):
    assert len(clusters) == 3
    codes, node_regions = set(), set()
    for c in clusters:
        name, spec = c["metadata"]["name"], c["spec"]
        assert c["apiVersion"] == CNPG_API, name
        assert spec["instances"] >= 2, f"{name}: instances {spec['instances']} < 2"
        assert spec["instances"] == 3, name
        assert spec["minSyncReplicas"] >= 1, f"{name}: minSyncReplicas must be >= 1 (no write without a standby)"
        assert spec["minSyncReplicas"] <= spec["maxSyncReplicas"] < spec["instances"], name
        assert str(spec["postgresql"]["parameters"]["synchronous_commit"]) == "on", f"{name}: synchronous_commit must be on"
        assert "hostnossl all all all reject" in spec["postgresql"]["pg_hba"], f"{name}: plain TCP must be refused"
        init = spec["bootstrap"]["initdb"]
        assert (init["database"], init["owner"]) == ("domicile", "domicile_owner"), name
        roles = {r["name"]: r for r in spec["managed"]["roles"]}
        gw = roles["domicile_gateway"]
        assert gw["login"] is True and gw["passwordSecret"]["name"], name
        assert not gw.get("superuser") and not gw.get("createdb") and not gw.get("createrole"), name
        assert "pg_monitor" in gw.get("inRoles", []), f"{name}: migration 005 grants pg_monitor; the operator must keep it"
        assert roles["domicile_owner"]["login"] is False, name
        sel = spec["affinity"]["nodeSelector"]
        assert NODE_REGION_LABEL in sel, f"{name}: not pinned with {NODE_REGION_LABEL}"
        node_regions.add(sel[NODE_REGION_LABEL])
        code = c["metadata"]["labels"][REGION_LABEL]
        assert name == f"domicile-{code}", name
        codes.add(code)
        # Each region's gateways run on that region's nodes, where its cluster runs.
        g = region_gateways[code]
        assert g.pod["nodeSelector"] == {NODE_REGION_LABEL: sel[NODE_REGION_LABEL]}, f"{g.name} is not pinned to {code}'s nodes"
    assert codes == set(CODES), f"region labels {codes}"
    assert len(node_regions) == 3, f"the three clusters must be pinned to three regions: {node_regions}"


def test_one_region_file_per_region(manifests):
    for code in CODES:
        docs = manifests[f"region-{code}.yaml"]
        assert [d["kind"] for d in docs] == ["Cluster", "ScheduledBackup"]
        assert all(d["metadata"]["labels"][REGION_LABEL] == code for d in docs)


def test_each_region_is_backed_up_into_a_store_of_its_own_region(manifests):
    """Issue 16: the backup section of each cluster, an object store named for its region and
    credentials of its own, and a ScheduledBackup of that cluster."""
    stores = set()
    for code in CODES:
        cluster, scheduled = manifests[f"region-{code}.yaml"]
        store = cluster["spec"]["backup"]["barmanObjectStore"]
        node_region = cluster["spec"]["affinity"]["nodeSelector"][NODE_REGION_LABEL]
        assert code in store["destinationPath"] and node_region in store["endpointURL"], store
        for k in ("accessKeyId", "secretAccessKey"):
            assert store["s3Credentials"][k]["name"] == f"domicile-{code}-backup-store", store
        assert cluster["spec"]["backup"]["retentionPolicy"], code
        assert scheduled["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
        stores.add(store["destinationPath"])
    assert len(stores) == len(CODES), f"regions share a backup store: {stores}"


@pytest.mark.parametrize("code", CODES)
def test_configuration_keys_are_known_to_the_daemon(configmaps, region_gateways, clusters, code):
    g = region_gateways[code]
    gw_keys = daemon_keys("gateway_keys")
    unknown = set(g.conf) - set(gw_keys)
    assert not unknown, f"{g.name}: domiciled.conf has keys the daemon does not know: {sorted(unknown)}"
    missing = {k for k, d in gw_keys.items() if d is None} - set(g.conf)
    assert not missing, f"{g.name}: domiciled.conf lacks required keys {sorted(missing)}"
    for k in ("peer_listen", "peer_cert_file", "peer_key_file", "peer_ca_file"):
        assert g.conf.get(k), f"{g.name}: {k} is required with more than one region"
    rg_keys = daemon_keys("region_keys")
    for c in g.conf["regions"]:
        cm, key, r = g.region_file(configmaps, c)
        assert not set(r) - set(rg_keys), f"{cm}/{key}: unknown keys {sorted(set(r) - set(rg_keys))}"
        assert not {k for k, d in rg_keys.items() if d is None} - set(r), f"{cm}/{key} lacks required keys"
        assert r["code"] == c, f"{cm}/{key} mounted as regions/{c}.conf says code {r['code']!r}"
        repo = parse_libconfig(open(os.path.join(SOURCE_DIR, "regions", f"{c}.conf")).read())
        for k in ("name", "jurisdiction"):
            assert r[k] == repo[k], f"{cm}/{key}: {k} {r[k]!r} != regions/{c}.conf {repo[k]!r}"
        if c != code:
            continue
        for k in ("database", "user", "ssl_mode"):
            assert r[k] == repo[k], f"{cm}/{key}: {k} {r[k]!r} != regions/{c}.conf {repo[k]!r}"
        (cluster,) = [cl for cl in clusters if cl["metadata"]["labels"][REGION_LABEL] == c]
        ns = cluster["metadata"]["namespace"]
        assert r["hosts"] == [f"{cluster['metadata']['name']}-rw.{ns}.svc:5432"], (
            f"{c}.conf must connect to the cluster's read-write service: {r['hosts']}")
        assert r["ssl_mode"] == "verify-full"
    # The transfer policy is the repository's, verbatim.
    for f in ("bases.conf", "routes.conf"):
        path = os.path.join(os.path.dirname(g.conf_path), f)
        _, cm, key = g.files[path]
        with open(os.path.join(SOURCE_DIR, "regions", f)) as fh:
            assert configmaps[cm][key] == fh.read(), f"ConfigMap {cm} {key} differs from regions/{f}: copy it again"


@pytest.mark.parametrize("code", CODES)
def test_other_regions_files_hold_no_secret_and_no_database(configmaps, region_gateways, code):
    """A gateway sees another region only as where its gateways are and what they are called;
    and no ConfigMap but the region's own carries a region file with a secret or a database."""
    g = region_gateways[code]
    for c in CODES:
        cm, key, r = g.region_file(configmaps, c)
        if c == code:
            assert cm == g.configmap, f"{g.name}: its own region file comes from {cm}, not its own ConfigMap"
            continue
        extra = set(r) - PUBLIC_REGION_KEYS
        assert not extra, f"{g.name} mounts {cm}/{key} as regions/{c}.conf with {sorted(extra)}: only {c}'s gateways may"
    for name, data in configmaps.items():
        for key, text in data.items():
            if not key.endswith(".conf"):
                continue
            r = parse_libconfig(text)
            if r.get("code") == code and set(r) - PUBLIC_REGION_KEYS:
                assert name == g.configmap, f"ConfigMap {name} holds {code}'s full region file ({key})"


@pytest.mark.parametrize("code", CODES)
def test_peers_are_reached_by_service_dns(objects, configmaps, region_gateways, code):
    g = region_gateways[code]
    identities = set()
    for c in CODES:
        if c == code:
            continue
        cm, key, r = g.region_file(configmaps, c)
        peer = region_gateways[c]
        svc = one(objects, "Service", peer.name)
        (sp,) = [p for p in svc["spec"]["ports"] if p["name"] == "peer"]
        ns = svc["metadata"]["namespace"]
        assert r["gateways"] == [f"{svc['metadata']['name']}.{ns}.svc:{sp['port']}"], (
            f"{cm}/{key}: gateways {r['gateways']} is not the peer port of Service {svc['metadata']['name']}")
        assert sp["port"] == peer.port("peer_listen")
        # The name the peer's certificate carries: the default, stated.
        assert r.get("gateway_identity") == f"{c}.gateway.domicile", f"{cm}/{key}: gateway_identity"
        identities.add(r["gateway_identity"])
    assert len(identities) == len(CODES) - 1


def secret_sources(pod):
    """[(Secret name, [keys], optional)] of every Secret a pod spec refers to, anywhere."""
    out = []
    for v in pod.get("volumes", []):
        if "secret" in v:
            s = v["secret"]
            out.append((s["secretName"], [i["key"] for i in s.get("items", [])] or None, s.get("optional", False)))
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                s = src["secret"]
                out.append((s["name"], [i["key"] for i in s.get("items", [])] or None, s.get("optional", False)))
    for c in pod.get("initContainers", []) + pod["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                out.append((ref["name"], [ref["key"]], ref.get("optional", False)))
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                out.append((e["secretRef"]["name"], None, e["secretRef"].get("optional", False)))
    return out


@pytest.mark.parametrize("code", CODES)
def test_deployment_mounts_only_its_own_regions_secrets(secrets, clusters, region_gateways, code):
    g = region_gateways[code]
    own_cluster_ca = f"domicile-{code}-ca"  # made by CloudNativePG, not a template
    mounted = {}
    for name, keys, optional in secret_sources(g.pod):
        assert keys is not None, f"{g.name} mounts every key of Secret {name}: name the items"
        if name == PEPPER_SECRET:
            assert region_of(secrets[name]) is None, f"{name} is the federation's, not a region's"
        elif name == own_cluster_ca:
            assert keys == ["ca.crt"], f"{g.name}: only ca.crt of {name}, never the CA's key"
        else:
            assert name in secrets, f"{g.name} mounts Secret {name}, which no template describes"
            assert region_of(secrets[name]) == code, (
                f"{g.name} mounts Secret {name} of region {region_of(secrets[name])!r}: only {code}'s own Secrets")
        mounted.setdefault(name, set()).update(keys)
        if not optional and name in secrets:
            assert set(keys) <= set(secrets[name]["stringData"]), f"Secret {name} has no keys {set(keys) - set(secrets[name]['stringData'])}"
    # ...and all of them: the region's keys, password, cluster CA, peer certificate.
    assert mounted.get(PEPPER_SECRET) == {"subject_pepper"}
    assert mounted.get(f"domicile-{code}-gateway-keys") == {"token.pin", "ledger.key"}
    assert mounted.get(f"domicile-{code}-gateway") == {"password"}
    assert mounted.get(own_cluster_ca) == {"ca.crt"}
    assert mounted.get(f"domicile-{code}-gateway-peer") == {"tls.crt", "tls.key"}
    # Every region-labelled Secret is named for its region; no other region's path is mounted.
    for name, s in secrets.items():
        if region_of(s):
            assert name.startswith(f"domicile-{region_of(s)}-"), f"Secret {name} is labelled {region_of(s)}"
    for path in g.files:
        for other in set(CODES) - {code}:
            assert f"/{other}/" not in path, f"{g.name} mounts {path}"
    names = {c["metadata"]["name"] for c in clusters}
    for name in mounted:
        assert not (name.endswith("-ca") and name[:-3] in names and name != own_cluster_ca), f"{g.name} mounts {name}"


def test_the_region_gateways_differ_only_in_the_region(manifests, clusters):
    """gateway-<code>.yaml are one shape three times: compared document by document, value by
    value, a difference must be the region (its code in names and paths, its node region, its
    name and jurisdiction)."""
    node = {c["metadata"]["labels"][REGION_LABEL]: c["spec"]["affinity"]["nodeSelector"][NODE_REGION_LABEL] for c in clusters}
    literal = {}
    for code in CODES:
        repo = parse_libconfig(open(os.path.join(SOURCE_DIR, "regions", f"{code}.conf")).read())
        literal[code] = [(node[code], "@NODE@"), (repo["jurisdiction"], "@JURISDICTION@"), (repo["name"], "@NAME@")]

    def norm(s, code):
        for lit, ph in literal[code]:
            s = s.replace(lit, ph)
        for c in CODES:
            s = re.sub(r"(?:(?<=[-/])|^)" + c + r"(?=[-./:]|$)", "@CODE@" if c == code else "@OTHER@", s)
        return s

    def compare(a, b, ca, cb, where):
        if isinstance(a, str) and isinstance(b, str):
            if a != b and norm(a, ca) != norm(b, cb):
                if where.endswith(".conf") and "\n" in a:  # a configuration file: by value
                    return compare(parse_libconfig(a), parse_libconfig(b), ca, cb, where)
                return f"{where}: {a!r} vs {b!r}"
            return None
        if type(a) is not type(b):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, dict):
            ka = {norm(k, ca): k for k in a}
            kb = {norm(k, cb): k for k in b}
            if set(ka) != set(kb):
                return f"{where}: keys {sorted(ka)} vs {sorted(kb)}"
            for k in ka:
                d = compare(a[ka[k]], b[kb[k]], ca, cb, f"{where}.{ka[k]}")
                if d:
                    return d
            return None
        if isinstance(a, list):
            if len(a) != len(b):
                return f"{where}: {len(a)} items vs {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                d = compare(x, y, ca, cb, f"{where}[{i}]")
                if d:
                    return d
            return None
        return None if a == b else f"{where}: {a!r} vs {b!r}"

    base = manifests["gateway-us.yaml"]
    for code in CODES[1:]:
        docs = manifests[f"gateway-{code}.yaml"]
        assert [d["kind"] for d in docs] == [d["kind"] for d in base], f"gateway-{code}.yaml: other objects than gateway-us.yaml"
        for a, b in zip(base, docs):
            diff = compare(a, b, "us", code, a["kind"])
            assert diff is None, f"gateway-{code}.yaml differs from gateway-us.yaml beyond the region: {diff}"


def test_federation_certificates(objects, configmaps, secrets, region_gateways):
    """Each region's peer certificate names that region's gateway_identity, for server and
    client, from the federation CA; the gateways trust that CA's certificate and hold none of
    its key."""
    certs = {c["metadata"]["name"]: c for c in all_of(objects, "Certificate")}
    (issuer,) = all_of(objects, "Issuer")
    ca_key_secret = issuer["spec"]["ca"]["secretName"]
    assert ca_key_secret in secrets and secrets[ca_key_secret]["type"] == "kubernetes.io/tls"
    assert region_of(secrets[ca_key_secret]) is None
    for code, g in region_gateways.items():
        _, cert_secret, _, _ = g.files[g.conf["peer_cert_file"]]
        _, key_secret, _, _ = g.files[g.conf["peer_key_file"]]
        assert cert_secret == key_secret == f"domicile-{code}-gateway-peer", (cert_secret, key_secret)
        assert secrets[cert_secret]["type"] == "kubernetes.io/tls" and region_of(secrets[cert_secret]) == code
        (cert,) = [c for c in certs.values() if c["spec"]["secretName"] == cert_secret]
        spec = cert["spec"]
        assert spec["secretTemplate"]["labels"][REGION_LABEL] == code, "the issued Secret must carry its region's label"
        # The identity the other regions' gateways expect of this one.
        for other in set(CODES) - {code}:
            _, _, r = region_gateways[other].region_file(configmaps, code)
            assert spec["dnsNames"] == [r["gateway_identity"]], f"{cert['metadata']['name']}: dnsNames {spec['dnsNames']}"
        assert {"server auth", "client auth"} <= set(spec["usages"]), f"{cert['metadata']['name']}: usages {spec['usages']}"
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": issuer["metadata"]["name"]}
        # Trust: the federation CA's certificate from a ConfigMap, never the Secret with its key.
        assert g.files[g.conf["peer_ca_file"]] == ("configMap", FEDERATION_CA, "ca.crt")
        assert ca_key_secret not in {n for n, _, _ in secret_sources(g.pod)}, f"{g.name} mounts the federation CA's key"
    assert len(certs) == len(CODES)


def mounted_files(pod, container):
    """{absolute path in `container`: source} of the ConfigMap files and the secret files
    (through the init container's copy) the pod provides; source is ("configMap", name, key)
    or ("secret", name, key, optional)."""
    vols = {v["name"]: v for v in pod["volumes"]}
    out = {}

    def config_items(base, cm):
        for it in cm["items"]:
            out[os.path.join(base, it["path"])] = ("configMap", cm["name"], it["key"])

    for m in container["volumeMounts"]:
        v = vols[m["name"]]
        if "configMap" in v:
            config_items(m["mountPath"], v["configMap"])
        for src in v.get("projected", {}).get("sources", []):
            if "configMap" in src:
                config_items(m["mountPath"], src["configMap"])
            assert "secret" not in src, f"{m['name']}: Secrets reach domiciled only through the init container's copy"
    # The secrets volume (emptyDir) is filled by the init container from the projected volume.
    (init,) = [c for c in pod["initContainers"] if c["name"] == "install-secrets"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    main_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for s in vols["secrets-in"]["projected"]["sources"]:
        sec = s["secret"]
        for it in sec["items"]:
            out[os.path.join(main_mounts["secrets"], it["path"])] = ("secret", sec["name"], it["key"], sec.get("optional", False))
    assert "secrets" in init_mounts and "secrets-in" in init_mounts
    return out


SECRET_KEYS = ("subject_pepper_file", "password_file", "pkcs11_pin_file", "ledger_key_file", "peer_key_file",
               "tls_cert_file", "tls_key_file", "tls_client_ca_file", "webhook_secret_file")


def config_paths(configmaps, g):
    """[(file, key, path)] of every path the configuration of region gateway g names."""
    out = []
    for k, v in g.conf.items():
        if (k.endswith("_file") or k.endswith("_dir")) and v:
            out.append(("domiciled.conf", k, v))
    for code in g.conf["regions"]:
        _, _, r = g.region_file(configmaps, code)
        for k, v in r.items():
            if k.endswith("_file") or k == "ssl_root_cert":
                out.append((f"{code}.conf", k, v))
    return out


@pytest.mark.parametrize("code", CODES)
def test_every_path_the_configuration_names_is_mounted(configmaps, secrets, clusters, region_gateways, code):
    g = region_gateways[code]
    cluster_names = {c["metadata"]["name"]: c for c in clusters}
    for f, k, path in config_paths(configmaps, g):
        if k == "regions_dir":
            continue
        assert path in g.files, f"{g.name}: {f}: {k} = {path!r} is not mounted in the gateway container"
        src = g.files[path]
        if k in SECRET_KEYS:
            assert src[0] == "secret", f"{g.name}: {f}: {k} must come from a Secret, not a {src[0]}"
        if src[0] == "configMap":
            assert src[1] in configmaps and src[2] in configmaps[src[1]], f"{g.name}: {f}: {k}: no ConfigMap {src[1]} key {src[2]}"
            continue
        _, name, key, optional = src
        assert not optional, f"{g.name}: {f}: {k} comes from the optional Secret {name}"
        if name in secrets:
            assert key in secrets[name]["stringData"], f"Secret {name} has no key {key}"
        else:
            # The CA Secret CloudNativePG makes for a cluster: <cluster>-ca, key ca.crt.
            assert name.endswith("-ca") and name[:-3] in cluster_names and key == "ca.crt", (
                f"{g.name}: {f}: {k} comes from Secret {name}, which is neither a template nor a cluster's CA")
        if f == f"{code}.conf" and k == "password_file":
            (gw,) = [r for r in cluster_names[f"domicile-{code}"]["spec"]["managed"]["roles"] if r["name"] == "domicile_gateway"]
            assert name == gw["passwordSecret"]["name"], (
                f"{f}: the gateway's password ({name}) is not the one the cluster sets ({gw['passwordSecret']['name']})")
            assert secrets[name]["type"] == "kubernetes.io/basic-auth"
            assert secrets[name]["stringData"]["username"] == "domicile_gateway"
        if k == "ssl_root_cert":
            assert name == f"domicile-{code}-ca" and key == "ca.crt", f"{f}: ssl_root_cert must be the cluster's CA"


def test_templates_hold_only_placeholders(manifests, objects):
    templates = manifests["secrets.template.yaml"]
    assert {d["kind"] for d in templates} == {"Secret", "ConfigMap"}
    assert all_of(objects, "Secret") == [d for d in templates if d["kind"] == "Secret"], "a Secret outside the templates"
    names = {d["metadata"]["name"] for d in templates}
    assert names >= {PEPPER_SECRET, FEDERATION_CA} | {
        f"domicile-{c}-{s}" for c in CODES for s in ("gateway-keys", "gateway", "gateway-peer", "gateway-tls")}
    for s in templates:
        values = s.get("stringData") if s["kind"] == "Secret" else s["data"]
        assert s["kind"] == "ConfigMap" or "data" not in s, f"Secret {s['metadata']['name']}: templates use stringData placeholders only"
        for k, v in values.items():
            if k == "username":
                continue
            assert PLACEHOLDER in v, f"{s['kind']} {s['metadata']['name']} key {k}: not a placeholder"
            # A placeholder must never be usable as a key: domiciled takes keys of 32 bytes.
            assert len(v.encode()) != 32, f"{s['metadata']['name']} key {k}: a 32-byte placeholder could pass as a key"


# --------------------------------------------------------------------------------------------
# each region's configuration, checked by the daemon itself


def lay_out_pod_files(root, configmaps, g, placeholder_secrets):
    """Writes the files region gateway g's container sees under `root` (ConfigMap items, and
    the secrets the init container installs, as 0600 files with test values or, with
    placeholder_secrets, the templates' placeholder strings); returns the path of
    domiciled.conf."""
    mounts = sorted({m["mountPath"] for m in g.container["volumeMounts"]}, key=len, reverse=True)
    moved = re.compile('"(' + "|".join(re.escape(mp) for mp in mounts) + ')/')

    def reroot(text):  # one pass: a moved path is never moved again
        return moved.sub(lambda m: f'"{root}{m.group(1)}/', text)

    for path, src in g.files.items():
        dst = root + path
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if src[0] == "configMap":
            text = reroot(configmaps[src[1]][src[2]])
            if src[2] == "principals.conf" and not placeholder_secrets:
                # Token hashes are placeholders in the ConfigMap: the digests of test tokens.
                text = re.sub(PLACEHOLDER + r"[^\"]*",
                              lambda m: hashlib.sha256(os.urandom(32)).hexdigest(), text)
            elif src[1] == FEDERATION_CA and not placeholder_secrets:
                text = "-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n"
            with open(dst, "w") as f:
                f.write(text)
            continue
        write_secret(dst, src[2], placeholder_secrets)
    return root + g.conf_path


def write_secret(dst, key, placeholder):
    if placeholder:
        data = f"{PLACEHOLDER}: {key}".encode() * 4
    elif key in ("kek", "ledger.key", "subject_pepper"):
        data = os.urandom(32)
    elif key in ("password", "token.pin"):
        data = (os.urandom(24).hex() + "\n").encode()
    else:  # certificates and the peer key: read, not parsed, by --check-config
        data = b"-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def check_config(conf):
    return subprocess.run([DOMICILED, "--config", conf, "--check-config"], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code", CODES)
def test_daemon_accepts_the_regions_configuration(configmaps, region_gateways, code, tmp_path):
    g = region_gateways[code]
    root = str(tmp_path / "pod")
    conf = lay_out_pod_files(root, configmaps, g, placeholder_secrets=False)
    p = check_config(conf)
    assert p.returncode == 0, f"domiciled --check-config refused the {code} gateways' configuration:\n{p.stderr}\n{p.stdout}"
    assert f'gateway_region = "{code}"' in p.stdout, p.stdout
    _, cm, key = g.files[g.conf["principals_file"]]
    n = len(parse_libconfig(configmaps[cm][key])["principals"])
    assert f"# {n} principals" in p.stdout, p.stdout


@pytest.mark.parametrize("code", CODES)
def test_the_tls_variant_keeps_the_same_probes(configmaps, region_gateways, code, tmp_path):
    """README "Transport", without a mesh: the commented lines of domiciled.conf switch the
    public port to TLS. The daemon accepts that configuration as the pod sees it, and the probes
    need no change: they go to probe_listen, plaintext either way."""
    g = region_gateways[code]
    _, cm, key = g.files[g.conf_path]
    text = configmaps[cm][key]
    tls = re.findall(r'^\s*#\s+((?:transport|tls_cert_file|tls_key_file) = "[^"]*";)\s*$', text, re.M)
    assert [line.split()[0] for line in tls] == ["transport", "tls_cert_file", "tls_key_file"], tls
    tls_text, n = re.subn(r'^(\s*)transport = "plaintext";\s*$', lambda m: "\n".join(m.group(1) + line for line in tls),
                          text, flags=re.M)
    assert n == 1, text
    for path in (parse_libconfig(tls_text)["tls_cert_file"], parse_libconfig(tls_text)["tls_key_file"]):
        assert g.files.get(path, ("",))[0] == "secret", f"{g.name}: {path} is not mounted from a Secret"
    variant = {**configmaps, cm: {**configmaps[cm], key: tls_text}}
    p = check_config(lay_out_pod_files(str(tmp_path / "pod"), variant, g, placeholder_secrets=False))
    assert p.returncode == 0, f"the TLS variant of the {code} configuration is refused:\n{p.stderr}"
    assert 'transport = "tls";' in p.stdout and f'probe_listen = "{g.conf["probe_listen"]}";' in p.stdout, p.stdout


@pytest.mark.parametrize("code", CODES)
def test_daemon_refuses_the_regions_configuration_as_shipped(configmaps, region_gateways, code, tmp_path):
    """Placeholders fail closed: token hashes and keys that are templates do not start."""
    g = region_gateways[code]
    root = str(tmp_path / "pod")
    conf = lay_out_pod_files(root, configmaps, g, placeholder_secrets=True)
    p = check_config(conf)
    assert p.returncode == 2, p.stdout
    assert "ledger_key_file" in p.stderr or "token_sha256" in p.stderr, p.stderr
    # With real secrets but the shipped principals, the token placeholders are refused.
    root2 = str(tmp_path / "pod2")
    conf2 = lay_out_pod_files(root2, configmaps, g, placeholder_secrets=False)
    _, cm, key = g.files[g.conf["principals_file"]]
    with open(root2 + g.conf["principals_file"], "w") as f:
        f.write(configmaps[cm][key])
    p = check_config(conf2)
    assert p.returncode == 2 and "token_sha256" in p.stderr, p.stderr


def line_of(text, key):
    (n,) = [i for i, l in enumerate(text.splitlines(), 1) if re.match(rf"\s*{key}\s*=", l)]
    return n


@pytest.mark.parametrize("code", CODES)
def test_daemon_refuses_another_regions_secret(configmaps, region_gateways, code, tmp_path):
    """The region's pod given another region's file as that region's own gateways have it (its
    database and secrets, the secrets mounted too), or just one of its secrets: domiciled
    refuses to start, naming the file, the line and the key."""
    g = region_gateways[code]
    other = CODES[(CODES.index(code) + 1) % len(CODES)]
    og = region_gateways[other]
    root = str(tmp_path / "pod")
    conf = lay_out_pod_files(root, configmaps, g, placeholder_secrets=False)
    target = os.path.join(root + g.conf["regions_dir"], f"{other}.conf")
    # 1. The other region's full file, and its secrets where that file says they are.
    cm, key, _ = og.region_file(configmaps, other)
    full = configmaps[cm][key]
    secrets_root = {m["name"]: m["mountPath"] for m in g.container["volumeMounts"]}["secrets"]
    full = full.replace(f'"{secrets_root}/', f'"{root}{secrets_root}/')
    for path, src in og.files.items():
        if src[0] == "secret" and f"/{other}/" in path:
            write_secret(root + path, src[2], False)
    with open(target, "w") as f:
        f.write(full)
    p = check_config(conf)
    # password_file: the first secret key the daemon looks for in another region's file.
    want = f'{target}:{line_of(full, "password_file")}: key "password_file": a secret of region "{other}"'
    assert p.returncode == 2 and want in p.stderr, f"want {want!r}\n{p.stderr}"
    assert f'this gateway serves "{code}"' in p.stderr, p.stderr
    # 2. The public file plus one secret key: still refused, at that line.
    cm, key, _ = g.region_file(configmaps, other)
    public = configmaps[cm][key] + f'kek_file = "{root}{secrets_root}/{other}/kek";\n'
    with open(target, "w") as f:
        f.write(public)
    p = check_config(conf)
    want = f'{target}:{line_of(public, "kek_file")}: key "kek_file": a secret of region "{other}"'
    assert p.returncode == 2 and want in p.stderr, f"want {want!r}\n{p.stderr}"
    # 3. A database key alone: refused too (a gateway opens no connection to another region).
    public = configmaps[cm][key] + f'hosts = [ "domicile-{other}-rw.domicile.svc:5432" ];\n'
    with open(target, "w") as f:
        f.write(public)
    p = check_config(conf)
    want = f'{target}:{line_of(public, "hosts")}: key "hosts": the database of region "{other}"'
    assert p.returncode == 2 and want in p.stderr, f"want {want!r}\n{p.stderr}"


def fake_secret_volume(root, files):
    """A directory laid out as the kubelet lays out a Secret/projected volume: the files in a
    timestamped directory, `..data` pointing at it, and top-level symlinks through ..data."""
    ts = os.path.join(root, "..2025_01_01_00_00_00.000000000")
    for rel, data in files.items():
        p = os.path.join(ts, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, 0o440)
    os.symlink(os.path.basename(ts), os.path.join(root, "..data"))
    for top in {rel.split("/")[0] for rel in files}:
        os.symlink(os.path.join("..data", top), os.path.join(root, top))


def run_install_secrets(pod, src_dir, dst_dir):
    (init,) = [c for c in pod["initContainers"] if c["name"] == "install-secrets"]
    assert init["command"] == ["/bin/sh", "-c"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    script = init["args"][0]
    assert mounts["secrets-in"] in script and mounts["secrets"] in script
    script = script.replace(mounts["secrets-in"], src_dir).replace(mounts["secrets"], dst_dir)
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code", CODES)
def test_init_container_installs_secrets_the_daemon_accepts(region_gateways, code, tmp_path):
    g = region_gateways[code]
    secrets_mount = {m["name"]: m["mountPath"] for m in g.container["volumeMounts"]}["secrets"]
    want = {}
    for path, src in g.files.items():
        if src[0] == "secret" and not src[3]:
            rel = os.path.relpath(path, secrets_mount)
            want[rel] = os.urandom(32) if not rel.endswith(("password", ".crt")) else b"x" * 20 + b"\n"
    src_dir, dst_dir = str(tmp_path / "in"), str(tmp_path / "out")
    os.makedirs(src_dir)
    os.makedirs(dst_dir)
    fake_secret_volume(src_dir, want)
    p = run_install_secrets(g.pod, src_dir, dst_dir)
    assert p.returncode == 0, p.stderr
    for rel, data in want.items():
        dst = os.path.join(dst_dir, rel)
        st = os.lstat(dst)
        assert stat.S_ISREG(st.st_mode), f"{rel}: not a regular file"
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{rel}: mode {stat.S_IMODE(st.st_mode):o}"
        with open(dst, "rb") as f:
            assert f.read() == data, rel
    installed = {os.path.relpath(os.path.join(d, n), dst_dir) for d, _, ns in os.walk(dst_dir) for n in ns}
    assert installed == set(want), f"copied the volume's bookkeeping too: {sorted(installed - set(want))}"

    # A placeholder left in any Secret stops the pod before domiciled starts.
    src2, dst2 = str(tmp_path / "in2"), str(tmp_path / "out2")
    os.makedirs(src2)
    os.makedirs(dst2)
    fake_secret_volume(src2, dict(want, **{f"{code}/token.pin": b"REPLACE_ME: the user PIN of the region's PKCS#11 token"}))
    p = run_install_secrets(g.pod, src2, dst2)
    assert p.returncode != 0 and f"{code}/token.pin" in p.stderr and "placeholder" in p.stderr, (p.returncode, p.stderr)


# --------------------------------------------------------------------------------------------
# systemd


def read_unit(path):
    """[(section, key, value)] of a unit file (repeated keys kept in order)."""
    out, section = [], None
    for raw in open(path).read().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.append((section, k.strip(), v.strip()))
    return out


def unit_values(unit, key, section="Service"):
    return [v for s, k, v in unit if s == section and k == key]


def test_systemd_unit_is_notify_and_hardened():
    unit = read_unit(UNIT)

    def value(key, section="Service"):
        vs = unit_values(unit, key, section)
        assert vs, f"{key}= missing from [{section}]"
        return vs[-1]

    assert value("Type") == "notify"
    assert value("ExecStart") == "/usr/local/bin/domiciled --config /etc/domicile/domiciled.conf"
    assert value("KillSignal") == "SIGTERM"
    assert value("Restart") == "on-failure"
    grace_s = int(daemon_keys("gateway_keys")["shutdown_grace_ms"]) / 1000
    assert int(value("TimeoutStopSec")) > grace_s, "TimeoutStopSec must exceed the default shutdown_grace_ms"
    assert value("User") == "domicile" and value("Group") == "domicile"
    assert value("StateDirectory") and value("ConfigurationDirectory") == "domicile"
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                      ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"),
                      ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"),
                      ("ProtectControlGroups", "yes"), ("RestrictNamespaces", "yes"),
                      ("LockPersonality", "yes"), ("MemoryDenyWriteExecute", "yes"),
                      ("ReadOnlyPaths", "/etc/domicile"), ("CapabilityBoundingSet", "")):
        assert value(key) == want, f"{key}={value(key)!r}, want {want!r}"
    assert set(value("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in unit_values(unit, "SystemCallFilter")
    assert int(value("LimitNOFILE")) >= 4096
    # Reload: ExecReload= exactly when domiciled handles SIGHUP.
    main = open(MAIN_C).read()
    if re.search(r"sigaddset\([^)]*SIGHUP\)", main):
        assert unit_values(unit, "ExecReload"), "domiciled reloads on SIGHUP now: add ExecReload=/bin/kill -HUP $MAINPID"
    else:
        assert not unit_values(unit, "ExecReload"), "ExecReload= but domiciled does not reload on SIGHUP (it would end)"
    assert value("WantedBy", "Install") == "multi-user.target"


def test_systemd_analyze_verify(tmp_path):
    sa = shutil.which("systemd-analyze")
    if not sa:
        pytest.skip("systemd-analyze is not installed (package systemd): the unit was only parsed")
    # verify checks that ExecStart= is executable: point it at a copy of the built daemon.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy2(DOMICILED, bindir / "domiciled")
    text = open(UNIT).read().replace("/usr/local/bin/domiciled", str(bindir / "domiciled"))
    unit = tmp_path / "domiciled.service"
    unit.write_text(text)
    p = subprocess.run([sa, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr.strip(), f"systemd-analyze verify:\n{p.stdout}{p.stderr}"
    # --threshold is in tenths of the printed exposure (0.0-10.0): fail above 3.0.
    sec = subprocess.run([sa, "security", "--offline=yes", "--threshold=30", str(unit)],
                         capture_output=True, text=True, timeout=120)
    assert sec.returncode == 0, f"systemd-analyze security: exposure above 3.0\n{sec.stdout[-3000:]}{sec.stderr}"
    su = shutil.which("systemd-sysusers")
    if su:
        root = tmp_path / "root"
        (root / "etc").mkdir(parents=True)
        p = subprocess.run([su, "--dry-run", f"--root={root}", SYSUSERS], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "domicile" in p.stdout + p.stderr, p.stdout + p.stderr


# --------------------------------------------------------------------------------------------
# sd_notify: a real gateway, a fake service manager


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_reloading_stopping(gateways, kind):
    d = tempfile.mkdtemp(prefix="dm-notify-", dir="/tmp")  # sun_path is 108 bytes: keep it short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if kind == "path":
            addr = os.path.join(d, "notify")
            sock.bind(addr)
        else:
            addr = f"@domicile-test-{os.getpid()}-{os.urandom(4).hex()}"
            sock.bind("\0" + addr[1:])
        sock.settimeout(15)
        # One gateway only: every gateway of a federation would notify this socket.
        g = gateways.start(name=f"notify-{kind}", env={"NOTIFY_SOCKET": addr}, only="us")
        # The harness returned after --ready-fd's line; READY=1 is sent right after it.
        ready = f"READY=1\nSTATUS=serving on 127.0.0.1:{g.port}"
        msg = sock.recv(4096).decode()
        assert msg == ready, repr(msg)
        # systemctl reload: RELOADING=1 (with the monotonic time notify-reload wants), then
        # READY=1 again once the reload is over.
        g.send_signal(signal.SIGHUP)
        msg = sock.recv(4096).decode()
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=[0-9]+", msg), repr(msg)
        msg = sock.recv(4096).decode()
        assert msg == ready, repr(msg)
        g.send_signal(signal.SIGTERM)
        msg = sock.recv(4096).decode()
        assert msg == "STOPPING=1", repr(msg)
        assert g.wait(timeout=30) == 0, g.log
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            extra = sock.recv(4096)
            pytest.fail(f"unexpected notification after STOPPING=1: {extra!r}")
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def test_no_notify_socket_is_a_noop(gateways):
    """Without NOTIFY_SOCKET (the ordinary case) nothing changes and nothing is logged."""
    g = gateways.start(name="notify-none", env={"NOTIFY_SOCKET": None}, only="us")
    g.stop()
    assert g.returncode == 0
    assert "NOTIFY_SOCKET" not in g.log
