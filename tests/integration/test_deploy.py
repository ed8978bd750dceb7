"""
Issue 9 ("Operations"), items 4 and 5: the systemd unit, the Kubernetes manifests, and the
sd_notify readiness protocol.

No Kubernetes schema validator (kubeconform, kubeval) is a Debian 12 package, so the manifests
are checked here without a cluster: every YAML document is parsed (Debian's python3-yaml), and
the documents are checked against each other and against the daemon itself: one image tag,
the `listen` port everywhere a port is named, grpc probes, `domiciled --check-config` on the
ConfigMap's configuration (its files and placeholder secrets laid out as the pod sees them),
the keys of src/config/config.c, selectors, and the CloudNativePG clusters' durability and
placement. The init container's script runs here too, on a directory laid out like a Secret
volume. The systemd unit is parsed and, where systemd-analyze exists, verified.

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
# the manifests


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
def deployment(objects):
    return one(objects, "Deployment", "domicile-gateway")


@pytest.fixture(scope="module")
def pod(deployment):
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def gateway_container(pod):
    (c,) = [c for c in pod["containers"] if c["name"] == "domiciled"]
    return c


@pytest.fixture(scope="module")
def configmap(objects):
    return one(objects, "ConfigMap", "domicile-gateway-config")


@pytest.fixture(scope="module")
def gw_conf(configmap):
    return parse_libconfig(configmap["data"]["domiciled.conf"])


@pytest.fixture(scope="module")
def listen_port(gw_conf):
    host, _, port = gw_conf["listen"].rpartition(":")
    assert host and port.isdigit() and int(port) > 0, f"listen must be host:port with a fixed port: {gw_conf['listen']}"
    return int(port)


@pytest.fixture(scope="module")
def clusters(objects):
    cs = [d for _, d in objects if d["kind"] == "Cluster"]
    assert cs, "no CloudNativePG Cluster"
    return cs


def test_every_file_is_yaml_and_every_object_is_named(manifests, objects):
    kinds = {d["kind"] for _, d in objects}
    for want in ("Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                 "NetworkPolicy", "Cluster"):
        assert want in kinds, f"no {want} in deploy/kubernetes"
    namespaces = {d["metadata"].get("namespace") for _, d in objects if d["kind"] != "Namespace"}
    assert namespaces == {one(objects, "Namespace")["metadata"]["name"]}, f"objects outside the namespace: {namespaces}"


def test_kustomization_lists_everything_but_the_secret_templates(manifests):
    (k,) = manifests["kustomization.yaml"]
    listed = set(k["resources"])
    want = set(manifests) - {"kustomization.yaml", "secrets.template.yaml"}
    assert listed == want, f"kustomization.yaml resources {sorted(listed)} != files {sorted(want)}"


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


def test_container_port_probes_and_service_use_the_listen_port(objects, pod, gateway_container, gw_conf, listen_port):
    ports = {p["name"]: p["containerPort"] for p in gateway_container["ports"]}
    assert ports.get("grpc") == listen_port, f"container port grpc {ports.get('grpc')} != listen port {listen_port}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = gateway_container.get(probe)
        assert p, f"the gateway container has no {probe}"
        assert set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe} must be a native grpc probe"
        assert p["grpc"]["port"] == listen_port, f"{probe} port {p['grpc']['port']} != listen port {listen_port}"
        assert p["grpc"].get("service") == "", f"{probe} must check service \"\" (the gateway itself)"
    # The kubelet dials grpc probes without TLS: a TLS-only port would fail every probe.
    assert gw_conf["transport"] == "plaintext", (
        "grpc probes need transport = \"plaintext\" on the probed port (the kubelet's grpc prober has no TLS); "
        "with transport = \"tls\" use exec probes (deploy/kubernetes/README.md, Transport)"
    )
    svc = one(objects, "Service", "domicile-gateway")
    (sp,) = svc["spec"]["ports"]
    target = sp["targetPort"]
    assert (ports.get(target) if isinstance(target, str) else target) == listen_port, f"Service targetPort {target!r} is not port {listen_port}"
    assert sp["port"] == listen_port
    tmpl = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= tmpl.items(), "the Service does not select the gateway pods"


def test_deployment_shape(deployment, pod, gateway_container):
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"].items() <= labels.items()
               for t in anti), "no required anti-affinity of the replicas across nodes"
    res = gateway_container["resources"]
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
    grace_ms = parse_libconfig_default_shutdown_grace()
    assert pod["terminationGracePeriodSeconds"] * 1000 > grace_ms + 5000


def parse_libconfig_default_shutdown_grace():
    return int(daemon_keys("gateway_keys")["shutdown_grace_ms"])


def test_pdb_selects_the_gateway_pods(objects, deployment):
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a PDB as large as replicas blocks every drain"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items() and sel == deployment["spec"]["selector"]["matchLabels"], (
        f"PDB selector {sel} does not match the Deployment's pods {labels}"
    )


def test_network_policy(objects, deployment, clusters, listen_port):
    np = one(objects, "NetworkPolicy")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (ing,) = np["spec"]["ingress"]
    assert [p["port"] for p in ing["ports"]] == [listen_port]
    assert ing["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "platform"}}}]
    egress_ports = {}
    for rule in np["spec"]["egress"]:
        for p in rule["ports"]:
            egress_ports.setdefault(p["port"], []).append(rule["to"])
    assert set(egress_ports) == {5432, 53}, f"egress must be PostgreSQL and DNS only: {sorted(egress_ports)}"
    (pg_to,) = egress_ports[5432]
    (expr,) = pg_to[0]["podSelector"]["matchExpressions"]
    assert expr["key"] == "cnpg.io/cluster" and expr["operator"] == "In"
    assert set(expr["values"]) == {c["metadata"]["name"] for c in clusters}


def test_cloudnativepg_clusters_are_synchronous_and_pinned(clusters, gw_conf, pod):
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
    assert codes == {"us", "eu", "in"}, f"region labels {codes}"
    assert len(node_regions) == 3, f"the three clusters must be pinned to three regions: {node_regions}"
    assert set(gw_conf["regions"]) == codes
    # The gateways run where gateway_region says.
    (home,) = [c for c in clusters if c["metadata"]["labels"][REGION_LABEL] == gw_conf["gateway_region"]]
    assert pod["nodeSelector"][NODE_REGION_LABEL] == home["spec"]["affinity"]["nodeSelector"][NODE_REGION_LABEL]


def test_one_region_file_per_region(manifests):
    for code in ("us", "eu", "in"):
        docs = manifests[f"region-{code}.yaml"]
        assert [d["kind"] for d in docs] == ["Cluster"]
        assert docs[0]["metadata"]["labels"][REGION_LABEL] == code


def test_configmap_keys_are_known_to_the_daemon(configmap, gw_conf, clusters):
    gw_keys = daemon_keys("gateway_keys")
    unknown = set(gw_conf) - set(gw_keys)
    assert not unknown, f"domiciled.conf in the ConfigMap has keys the daemon does not know: {sorted(unknown)}"
    missing = {k for k, d in gw_keys.items() if d is None} - set(gw_conf)
    assert not missing, f"domiciled.conf lacks required keys {sorted(missing)}"
    rg_keys = daemon_keys("region_keys")
    data = configmap["data"]
    for code in gw_conf["regions"]:
        r = parse_libconfig(data[f"{code}.conf"])
        assert not set(r) - set(rg_keys), f"{code}.conf: unknown keys {sorted(set(r) - set(rg_keys))}"
        assert not {k for k, d in rg_keys.items() if d is None} - set(r), f"{code}.conf lacks required keys"
        repo = parse_libconfig(open(os.path.join(SOURCE_DIR, "regions", f"{code}.conf")).read())
        for k in ("code", "name", "jurisdiction", "database", "user", "ssl_mode"):
            assert r[k] == repo[k], f"{code}.conf: {k} {r[k]!r} != regions/{code}.conf {repo[k]!r}"
        (cluster,) = [c for c in clusters if c["metadata"]["labels"][REGION_LABEL] == code]
        ns = cluster["metadata"]["namespace"]
        assert r["hosts"] == [f"{cluster['metadata']['name']}-rw.{ns}.svc:5432"], (
            f"{code}.conf must connect to the cluster's read-write service: {r['hosts']}"
        )
        assert r["ssl_mode"] == "verify-full"
    # The transfer policy is the repository's, verbatim.
    for f in ("bases.conf", "routes.conf"):
        with open(os.path.join(SOURCE_DIR, "regions", f)) as fh:
            assert data[f] == fh.read(), f"the ConfigMap's {f} differs from regions/{f}: copy it again"


def mounted_files(pod, container):
    """{absolute path in `container`: (volume, source)} of the ConfigMap files and the secret
    files (through the init container's copy) the pod provides."""
    vols = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in container["volumeMounts"]:
        v = vols[m["name"]]
        if "configMap" in v:
            for it in v["configMap"]["items"]:
                out[os.path.join(m["mountPath"], it["path"])] = ("configMap", v["configMap"]["name"], it["key"])
    # The secrets volume (emptyDir) is filled by the init container from the projected volume.
    (init,) = [c for c in pod["initContainers"] if c["name"] == "install-secrets"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    main_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    src = vols["secrets-in"]["projected"]["sources"]
    for s in src:
        sec = s["secret"]
        for it in sec["items"]:
            out[os.path.join(main_mounts["secrets"], it["path"])] = ("secret", sec["name"], it["key"], sec.get("optional", False))
    assert "secrets" in init_mounts and "secrets-in" in init_mounts
    return out


SECRET_KEYS = ("subject_pepper_file", "password_file", "kek_file", "ledger_key_file", "ssl_root_cert",
               "tls_cert_file", "tls_key_file", "tls_client_ca_file", "webhook_secret_file")


def config_paths(configmap, gw_conf):
    """[(file, key, path)] of every path the configuration names."""
    out = []
    for k, v in gw_conf.items():
        if (k.endswith("_file") or k.endswith("_dir")) and v:
            out.append(("domiciled.conf", k, v))
    for code in gw_conf["regions"]:
        r = parse_libconfig(configmap["data"][f"{code}.conf"])
        for k, v in r.items():
            if k.endswith("_file") or k == "ssl_root_cert":
                out.append((f"{code}.conf", k, v))
    return out


def test_every_path_the_configuration_names_is_mounted(objects, pod, gateway_container, configmap, gw_conf, clusters):
    files = mounted_files(pod, gateway_container)
    conf_path = gateway_container["args"][gateway_container["args"].index("--config") + 1]
    assert files.get(conf_path, (None, None, None))[2] == "domiciled.conf", f"--config {conf_path} is not the ConfigMap's domiciled.conf"
    for code in gw_conf["regions"]:
        assert files.get(os.path.join(gw_conf["regions_dir"], f"{code}.conf"), (0, 0, 0))[2] == f"{code}.conf"
    secrets = {d["metadata"]["name"]: d for d in all_of(objects, "Secret")}
    cluster_names = {c["metadata"]["name"]: c for c in clusters}
    for f, k, path in config_paths(configmap, gw_conf):
        if k == "regions_dir":
            continue
        assert path in files, f"{f}: {k} = {path!r} is not mounted in the gateway container"
        src = files[path]
        if k in SECRET_KEYS and k != "ssl_root_cert":
            assert src[0] == "secret", f"{f}: {k} must come from a Secret, not a {src[0]}"
        if src[0] == "secret":
            _, name, key, optional = src
            assert not optional, f"{f}: {k} comes from the optional Secret {name}"
            if name in secrets:
                assert key in (secrets[name].get("stringData") or secrets[name].get("data") or {}), f"Secret {name} has no key {key}"
            else:
                # The CA Secret CloudNativePG makes for a cluster: <cluster>-ca, key ca.crt.
                assert name.endswith("-ca") and name[:-3] in cluster_names and key == "ca.crt", (
                    f"{f}: {k} comes from Secret {name}, which is neither a template nor a cluster's CA"
                )
        if f != "domiciled.conf" and k == "password_file":
            code = f.split(".")[0]
            cluster = cluster_names[f"domicile-{code}"]
            (gw,) = [r for r in cluster["spec"]["managed"]["roles"] if r["name"] == "domicile_gateway"]
            assert src[1] == gw["passwordSecret"]["name"], (
                f"{f}: the gateway's password ({src[1]}) is not the one the cluster sets ({gw['passwordSecret']['name']})"
            )
            assert secrets[src[1]]["type"] == "kubernetes.io/basic-auth"
            assert secrets[src[1]]["stringData"]["username"] == "domicile_gateway"
        if k == "ssl_root_cert":
            code = f.split(".")[0]
            assert src[1] == f"domicile-{code}-ca" and src[2] == "ca.crt", f"{f}: ssl_root_cert must be the cluster's CA"


def test_secret_templates_hold_only_placeholders(objects):
    secrets = all_of(objects, "Secret")
    assert {s["metadata"]["name"] for s in secrets} >= {
        "domicile-gateway-keys", "domicile-us-gateway", "domicile-eu-gateway", "domicile-in-gateway", "domicile-gateway-tls"}
    for s in secrets:
        assert "data" not in s, f"Secret {s['metadata']['name']}: templates use stringData placeholders only"
        for k, v in s["stringData"].items():
            if k == "username":
                continue
            assert PLACEHOLDER in v, f"Secret {s['metadata']['name']} key {k}: not a placeholder"
            # A placeholder must never be usable as a key: domiciled takes keys of 32 bytes.
            assert len(v.encode()) != 32, f"Secret {s['metadata']['name']} key {k}: a 32-byte placeholder could pass as a key"
    keys = one(objects, "Secret", "domicile-gateway-keys")["stringData"]
    for code in ("us", "eu", "in"):
        assert f"{code}.kek" in keys and f"{code}.ledger.key" in keys
    assert "subject_pepper" in keys


# --------------------------------------------------------------------------------------------
# the ConfigMap's configuration, checked by the daemon itself


def lay_out_pod_files(root, configmap, pod, container, placeholder_secrets):
    """Writes the files the gateway container sees under `root` (ConfigMap items, and the
    secrets the init container installs, as 0600 files with test values or, with
    placeholder_secrets, the templates' placeholder strings); returns the path of
    domiciled.conf and the re-rooting function."""
    files = mounted_files(pod, container)
    mounts = sorted({m["mountPath"] for m in container["volumeMounts"]}, key=len, reverse=True)

    moved = re.compile('"(' + "|".join(re.escape(mp) for mp in mounts) + ')/')

    def reroot(text):  # one pass: a moved path is never moved again
        return moved.sub(lambda m: f'"{root}{m.group(1)}/', text)

    for path, src in files.items():
        dst = root + path
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if src[0] == "configMap":
            text = reroot(configmap["data"][src[2]])
            if src[2] == "principals.conf" and not placeholder_secrets:
                # Token hashes are placeholders in the ConfigMap: the digests of test tokens.
                text = re.sub(PLACEHOLDER + r"[^\"]*",
                              lambda m: hashlib.sha256(os.urandom(32)).hexdigest(), text)
            with open(dst, "w") as f:
                f.write(text)
            continue
        key = src[2]
        if placeholder_secrets:
            data = f"{PLACEHOLDER}: {key}".encode() * 4
        elif key.endswith("kek") or key.endswith("ledger.key") or key == "subject_pepper":
            data = os.urandom(32)
        elif key == "password":
            data = (os.urandom(24).hex() + "\n").encode()
        else:
            data = b"-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n"
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    conf_path = container["args"][container["args"].index("--config") + 1]
    return root + conf_path


def check_config(conf):
    return subprocess.run([DOMICILED, "--config", conf, "--check-config"], capture_output=True, text=True, timeout=60)


def test_daemon_accepts_the_configmap_configuration(configmap, pod, gateway_container, tmp_path):
    root = str(tmp_path / "pod")
    conf = lay_out_pod_files(root, configmap, pod, gateway_container, placeholder_secrets=False)
    p = check_config(conf)
    assert p.returncode == 0, f"domiciled --check-config refused the ConfigMap's configuration:\n{p.stderr}\n{p.stdout}"
    n = len(parse_libconfig(configmap["data"]["principals.conf"])["principals"])
    assert f"# {n} principals" in p.stdout, p.stdout


def test_daemon_refuses_the_configmap_as_shipped(configmap, pod, gateway_container, tmp_path):
    """Placeholders fail closed: token hashes and keys that are templates do not start."""
    root = str(tmp_path / "pod")
    conf = lay_out_pod_files(root, configmap, pod, gateway_container, placeholder_secrets=True)
    p = check_config(conf)
    assert p.returncode == 2, p.stdout
    assert "kek_file" in p.stderr or "token_sha256" in p.stderr, p.stderr
    # With real secrets but the shipped principals, the token placeholders are refused.
    root2 = str(tmp_path / "pod2")
    conf2 = lay_out_pod_files(root2, configmap, pod, gateway_container, placeholder_secrets=False)
    principals = os.path.join(os.path.dirname(conf2), "principals.conf")
    with open(principals, "w") as f:
        f.write(configmap["data"]["principals.conf"])
    p = check_config(conf2)
    assert p.returncode == 2 and "token_sha256" in p.stderr, p.stderr


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


def test_init_container_installs_secrets_the_daemon_accepts(configmap, pod, gateway_container, tmp_path):
    files = mounted_files(pod, gateway_container)
    secrets_mount = {m["name"]: m["mountPath"] for m in gateway_container["volumeMounts"]}["secrets"]
    want = {}
    for path, src in files.items():
        if src[0] == "secret" and not src[3]:
            rel = os.path.relpath(path, secrets_mount)
            want[rel] = os.urandom(32) if not rel.endswith(("password", "ca.crt")) else b"x" * 20 + b"\n"
    src_dir, dst_dir = str(tmp_path / "in"), str(tmp_path / "out")
    os.makedirs(src_dir)
    os.makedirs(dst_dir)
    fake_secret_volume(src_dir, want)
    p = run_install_secrets(pod, src_dir, dst_dir)
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
    fake_secret_volume(src2, dict(want, **{"eu/kek": b"REPLACE_ME: 32 random bytes (openssl rand 32)"}))
    p = run_install_secrets(pod, src2, dst2)
    assert p.returncode != 0 and "eu/kek" in p.stderr and "placeholder" in p.stderr, (p.returncode, p.stderr)


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
