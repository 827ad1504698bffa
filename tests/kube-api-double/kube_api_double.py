#!/usr/bin/env python3
"""A TEST DOUBLE of the Kubernetes API server, for stack's tests and bench.

No real API server can be installed on the machines the tests run on, so
this speaks the real HTTP protocol the kube crate uses, for the verbs stack
uses, and behaves like an API server where stack's correctness depends on it:

- GET one object, LIST a kind (all namespaces or one) with `labelSelector`
  (=, ==, !=, exists, !exists) and `fieldSelector` (metadata.name,
  metadata.namespace, involvedObject.name);
- server-side apply: PATCH `application/apply-patch+yaml` with `fieldManager`
  (required), `force` and `dryRun=All`; field ownership per manager in
  `managedFields` (fieldsV1), 409 Conflict when another manager owns a field
  with a different value and `force` is not set, ownership moving on force;
- merge patch (`application/merge-patch+json`) and POST as `Update` operations
  of another manager (how kubectl scale/edit/create look), taking over fields;
- DELETE (a Namespace is Terminating for a second, then goes with its
  objects; nothing new may be made in it meanwhile), `resourceVersion`,
  `generation`, `uid`, `creationTimestamp`;
- 404, 409, 400, 403 and 422 answers as `Status` objects (422 for a change
  to an immutable field such as a StatefulSet's serviceName);
- the defaults a real API server fills in on the kinds stack uses
  (imagePullPolicy, terminationMessagePath, dnsPolicy, restartPolicy,
  revisionHistoryLimit, podManagementPolicy, sessionAffinity,
  clusterIP/clusterIPs, ipFamilies, nodePort, ...), so tests prove that
  drift detection ignores what the server fills in;
- a stand-in for the controllers: workloads report their rollout complete,
  Jobs succeed and Ingresses get an address at once, except objects
  annotated `kube-api-double/never-ready: "true"`, which never converge and
  get a Warning event instead.

Run: kube_api_double.py --port PORT [--log FILE]
Every request is appended to --log as `METHOD PATH?QUERY`.
"""

import argparse
import copy
import datetime
import hashlib
import itertools
import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# (group, version, plural) -> (kind, namespaced)
RESOURCES = {
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True),
    ("", "v1", "secrets"): ("Secret", True),
    ("", "v1", "configmaps"): ("ConfigMap", True),
    ("", "v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True),
    ("", "v1", "services"): ("Service", True),
    ("", "v1", "events"): ("Event", True),
    ("rbac.authorization.k8s.io", "v1", "roles"): ("Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): ("RoleBinding", True),
    ("apps", "v1", "statefulsets"): ("StatefulSet", True),
    ("apps", "v1", "deployments"): ("Deployment", True),
    ("apps", "v1", "daemonsets"): ("DaemonSet", True),
    ("batch", "v1", "jobs"): ("Job", True),
    ("networking.k8s.io", "v1", "ingresses"): ("Ingress", True),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions"): ("CustomResourceDefinition", False),
    ("monitoring.coreos.com", "v1", "servicemonitors"): ("ServiceMonitor", True),
}
# Served only while their CustomResourceDefinition exists (POST one to
# /apis/apiextensions.k8s.io/v1/customresourcedefinitions to install it).
CRD_BACKED = {("monitoring.coreos.com", "v1", "servicemonitors"): "servicemonitors.monitoring.coreos.com"}
WORKLOADS = ("StatefulSet", "Deployment", "DaemonSet", "Job")
NEVER_READY = "kube-api-double/never-ready"
NAMESPACE_TERMINATION_SECONDS = 1.0
# Fields the API server refuses to change (422), by kind.
IMMUTABLE = {
    "StatefulSet": ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy"),
    "Deployment": ("selector",),
    "DaemonSet": ("selector",),
    "Job": ("selector", "template", "completionMode"),
}


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """Every object, by (group, version, plural, namespace, name)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.objects = {}
        self.version = itertools.count(1000)
        self.cluster_ips = itertools.count(10)
        self.node_ports = itertools.count(30100)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease", "ingress"):
            self.put_namespace(ns)

    def put_namespace(self, name):
        """A namespace the cluster comes with."""
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        meta_defaults(obj, None, self)
        self.objects[("", "v1", "namespaces", None, name)] = obj

    def served(self, res):
        if res not in RESOURCES:
            return False
        crd = CRD_BACKED.get(res)
        return crd is None or (("apiextensions.k8s.io", "v1", "customresourcedefinitions", None, crd) in self.objects)


# ---- field sets (managedFields fieldsV1) -------------------------------

def fieldset(value):
    """The fieldsV1 set of an applied configuration."""
    out = {}
    for key, child in value.items():
        out["f:" + key] = child_set(child)
    return out


def child_set(child):
    if isinstance(child, dict):
        return fieldset(child) if child else {}
    if isinstance(child, list) and child and all(isinstance(i, dict) and "name" in i for i in child):
        return {"k:" + json.dumps({"name": i["name"]}, separators=(",", ":")): {".": {}, **fieldset(i)} for i in child}
    return {}


def config_set(config):
    """What an applier owns: all it set, minus the object's identity."""
    body = {k: v for k, v in config.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    meta = {k: v for k, v in config.get("metadata", {}).items() if k in ("labels", "annotations")}
    fs = fieldset(body)
    if meta:
        fs["f:metadata"] = fieldset(meta)
    return fs


def leaves(fs, path=()):
    for key, child in fs.items():
        if key == ".":
            continue
        sub = [k for k in child if k != "."]
        if sub:
            yield from leaves(child, path + (key,))
        else:
            yield path + (key,)


def has_path(fs, path):
    node = fs
    for key in path:
        if key not in node:
            return False
        node = node[key]
    return True


def drop_path(fs, path):
    node = fs
    for key in path[:-1]:
        node = node.get(key)
        if node is None:
            return
    node.pop(path[-1], None)
    # prune empty parents
    def prune(n):
        for k in list(n):
            if isinstance(n[k], dict) and k.startswith(("f:", "k:")):
                had = bool(n[k])
                prune(n[k])
                if had and not [c for c in n[k] if c != "."]:
                    del n[k]
    prune(fs)


def value_at(obj, path):
    node = obj
    for key in path:
        if key.startswith("f:"):
            if not isinstance(node, dict) or key[2:] not in node:
                return None
            node = node[key[2:]]
        elif key.startswith("k:"):
            want = json.loads(key[2:])
            found = [i for i in node or [] if isinstance(i, dict) and all(i.get(k) == v for k, v in want.items())]
            if not found:
                return None
            node = found[0]
    return node


def remove_at(obj, path):
    parent = obj
    for key in path[:-1]:
        parent = value_at(parent, (key,))
        if parent is None:
            return
    last = path[-1]
    if last.startswith("f:") and isinstance(parent, dict):
        parent.pop(last[2:], None)
    elif last.startswith("k:") and isinstance(parent, list):
        want = json.loads(last[2:])
        parent[:] = [i for i in parent if not all(i.get(k) == v for k, v in want.items())]


def merge(live, config):
    """Structured merge: maps by key, lists of named maps by name, else replace."""
    if isinstance(live, dict) and isinstance(config, dict):
        out = dict(live)
        for key, value in config.items():
            out[key] = merge(live.get(key), value) if key in live else copy.deepcopy(value)
        return out
    if (isinstance(live, list) and isinstance(config, list) and config
            and all(isinstance(i, dict) and "name" in i for i in config + live)):
        by_name = {i["name"]: i for i in live}
        return [merge(by_name[i["name"]], i) if i["name"] in by_name else copy.deepcopy(i) for i in config] + \
            [i for i in live if i["name"] not in {c["name"] for c in config}]
    return copy.deepcopy(config)


# ---- defaults a real API server fills in --------------------------------

def meta_defaults(obj, ns, store):
    meta = obj.setdefault("metadata", {})
    if ns is not None:
        meta["namespace"] = ns
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", now())
    meta["resourceVersion"] = str(next(store.version))


def pod_defaults(spec, job=False):
    spec.setdefault("restartPolicy", "OnFailure" if job else "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1]
        c.setdefault("imagePullPolicy", "Always" if ":" not in tag or tag.endswith(":latest") else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for p in c.get("ports", []):
            p.setdefault("protocol", "TCP")


def kind_defaults(obj, store, previous):
    kind, spec = obj["kind"], obj.get("spec")
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "Job") and isinstance(spec, dict):
        pod_defaults(spec.setdefault("template", {}).setdefault("spec", {}), job=kind == "Job")
    if kind == "StatefulSet":
        spec.setdefault("replicas", 1)
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        spec.setdefault("persistentVolumeClaimRetentionPolicy", {"whenDeleted": "Retain", "whenScaled": "Retain"})
    elif kind == "Deployment":
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    elif kind == "DaemonSet":
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
    elif kind == "Job":
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
    elif kind == "Service":
        old = (previous or {}).get("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec.get("clusterIP") != "None":
            spec.setdefault("clusterIP", old.get("clusterIP") or f"10.152.183.{next(store.cluster_ips)}")
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        old_ports = {p.get("port"): p for p in old.get("ports", [])}
        for p in spec.get("ports", []):
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
            if spec["type"] == "NodePort":
                p.setdefault("nodePort", old_ports.get(p.get("port"), {}).get("nodePort") or next(store.node_ports))
        if spec["type"] == "NodePort":
            spec.setdefault("externalTrafficPolicy", "Cluster")
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")


def converge(obj):
    """The controllers' part: rollouts complete, Jobs succeed, Ingresses get an address."""
    kind, meta = obj["kind"], obj["metadata"]
    if meta.get("annotations", {}).get(NEVER_READY) == "true":
        obj["status"] = {"observedGeneration": meta.get("generation", 1), "replicas": 0,
                         "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                                         "message": "pods are crash looping"}]}
        return
    spec = obj.get("spec", {})
    revision = meta["name"] + "-" + hashlib.sha256(json.dumps(spec.get("template", {}), sort_keys=True).encode()).hexdigest()[:10]
    n = spec.get("replicas", 1)
    if kind == "StatefulSet":
        obj["status"] = {"observedGeneration": meta["generation"], "replicas": n, "readyReplicas": n,
                         "currentReplicas": n, "updatedReplicas": n, "availableReplicas": n,
                         "currentRevision": revision, "updateRevision": revision}
    elif kind == "Deployment":
        obj["status"] = {"observedGeneration": meta["generation"], "replicas": n, "readyReplicas": n,
                         "updatedReplicas": n, "availableReplicas": n,
                         "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}
    elif kind == "DaemonSet":
        obj["status"] = {"observedGeneration": meta["generation"], "desiredNumberScheduled": 1,
                         "updatedNumberScheduled": 1, "numberAvailable": 1, "numberReady": 1}
    elif kind == "Job":
        obj["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    elif kind == "Ingress":
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}


# ---- the server ----------------------------------------------------------

def parse_path(path):
    """-> (resource, namespace, name) of an API path."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    return (group, version, rest[0]), ns, rest[1] if len(rest) == 2 else None


def label_match(labels, selector):
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(obj, selector):
    for term in filter(None, (t.strip() for t in selector.split(","))):
        k, v = term.split("=", 1)
        node = obj
        for part in k.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if node != v:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store = None
    log = None

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self, method):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{method} {self.path}\n")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            with self.store.lock:
                code, out = self.dispatch(method, url.path, query, body)
            self.reply(code, out)
        except ApiError as e:
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": e.message, "reason": e.reason, "code": e.code}
            if e.details:
                status["details"] = e.details
            self.reply(e.code, status)

    def do_GET(self):
        self.handle_any("GET")

    def do_PATCH(self):
        self.handle_any("PATCH")

    def do_POST(self):
        self.handle_any("POST")

    def do_DELETE(self):
        self.handle_any("DELETE")

    def dispatch(self, method, path, query, body):
        store = self.store
        res, ns, name = parse_path(path)
        if not store.served(res):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({res[2]})")
        kind, namespaced = RESOURCES[res]
        if namespaced != (ns is not None) and name is not None:
            raise ApiError(404, "NotFound", f"{res[2]} is {'namespaced' if namespaced else 'cluster-scoped'}")
        key = res + (ns, name)
        if method == "GET" and name is None:
            items = [copy.deepcopy(o) for k, o in sorted(store.objects.items(), key=lambda kv: str(kv[0]))
                     if k[:3] == res and (ns is None or k[3] == ns)
                     and label_match(o["metadata"].get("labels", {}), query.get("labelSelector", ""))
                     and field_match(o, query.get("fieldSelector", ""))]
            for item in items:
                item.pop("apiVersion", None)
                item.pop("kind", None)
            return 200, {"apiVersion": "v1", "kind": kind + "List",
                         "metadata": {"resourceVersion": str(next(store.version))}, "items": items}
        if method == "GET":
            return 200, self.existing(key, res, name)
        if method == "DELETE":
            obj = self.existing(key, res, name)
            if kind != "Namespace":
                del store.objects[key]
                return 200, obj
            # Like the namespace controller: Terminating first, gone (with
            # everything in it) a moment later.
            if "deletionTimestamp" not in obj["metadata"]:
                store.objects[key]["metadata"]["deletionTimestamp"] = now()
                store.objects[key]["status"] = {"phase": "Terminating"}

                def finish():
                    with store.lock:
                        store.objects.pop(key, None)
                        for k in [k for k in store.objects if k[3] == name]:
                            del store.objects[k]
                threading.Timer(NAMESPACE_TERMINATION_SECONDS, finish).start()
            return 200, copy.deepcopy(store.objects[key])
        if method == "POST":
            config = json.loads(body)
            name = config.get("metadata", {}).get("name")
            key = res + (ns, name)
            if key in store.objects:
                raise ApiError(409, "AlreadyExists", f'{res[2]} "{name}" already exists',
                               {"name": name, "kind": res[2]})
            manager = query.get("fieldManager", "kubectl-create")
            return 201, self.write(key, res, ns, None, config, manager, "Update", force=True, dry=False)
        if method == "PATCH":
            ctype = self.headers.get("Content-Type", "")
            manager = query.get("fieldManager")
            dry = query.get("dryRun") == "All"
            previous = store.objects.get(key)
            if ctype.startswith("application/apply-patch"):
                if not manager:
                    raise ApiError(400, "BadRequest", "PATCH of type application/apply-patch+yaml requires fieldManager")
                config = json.loads(body)
                if config.get("metadata", {}).get("name") != name:
                    raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
                force = query.get("force") == "true"
                return 200 if previous else 201, self.write(key, res, ns, previous, config, manager, "Apply", force, dry)
            if ctype.startswith("application/merge-patch+json"):
                if previous is None:
                    raise ApiError(404, "NotFound", f'{res[2]} "{name}" not found', {"name": name, "kind": res[2]})
                return 200, self.write(key, res, ns, previous, json.loads(body), manager or "kubectl-patch",
                                       "Update", True, dry)
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}")
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def existing(self, key, res, name):
        obj = self.store.objects.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'{res[2]} "{name}" not found', {"name": name, "kind": res[2]})
        return copy.deepcopy(obj)

    def write(self, key, res, ns, previous, config, manager, operation, force, dry):
        store = self.store
        group, version, plural = res
        kind = RESOURCES[res][0]
        if ns is not None and ("", "v1", "namespaces", None, ns) not in store.objects:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        managed = copy.deepcopy((previous or {}).get("metadata", {}).get("managedFields", []))
        applied = config_set(config)
        obj = copy.deepcopy(previous) if previous else {"apiVersion": f"{group}/{version}" if group else version,
                                                        "kind": kind, "metadata": {"name": key[4]}}
        # Conflicts: fields another manager owns, set here to another value.
        conflicts = []
        for entry in managed:
            if entry["manager"] == manager and entry["operation"] == operation:
                continue
            for path in leaves(applied):
                if has_path(entry["fieldsV1"], path) and value_at(obj, path) != value_at(config, path):
                    conflicts.append((entry["manager"], path))
        if conflicts and operation == "Apply" and not force:
            causes = [{"type": "FieldManagerConflict",
                       "message": f'conflict with "{m}": ' + ".".join(p[2:] for p in path), "field": ".".join(p[2:] for p in path)}
                      for m, path in conflicts]
            raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s)", {"causes": causes,
                           "name": key[4], "kind": plural})
        # Fields this applier set before and no longer sets (and nobody else owns) are removed.
        if operation == "Apply":
            mine = next((e for e in managed if e["manager"] == manager and e["operation"] == "Apply"), None)
            if mine:
                for path in leaves(mine["fieldsV1"]):
                    others = any(has_path(e["fieldsV1"], path) for e in managed if e is not mine)
                    if not has_path(applied, path) and not others:
                        remove_at(obj, path)
        # Ownership moves to the writer.
        for entry in managed:
            if entry["manager"] == manager and entry["operation"] == operation:
                continue
            for path in leaves(applied):
                if has_path(entry["fieldsV1"], path):
                    drop_path(entry["fieldsV1"], path)
        managed = [e for e in managed if e["manager"] != manager or e["operation"] != operation]
        managed = [e for e in managed if [k for k in e["fieldsV1"] if k != "."]]
        old_spec = json.dumps((previous or {}).get("spec"), sort_keys=True)
        merged = merge(obj, {k: v for k, v in config.items() if k != "status"})
        merged["metadata"]["name"] = key[4]
        managed.append({"manager": manager, "operation": operation,
                        "apiVersion": merged["apiVersion"], "time": now(),
                        "fieldsType": "FieldsV1", "fieldsV1": applied})
        kind_defaults(merged, store, previous)
        for field in IMMUTABLE.get(kind, ()) if previous else ():
            if merged.get("spec", {}).get(field) != previous.get("spec", {}).get(field):
                raise ApiError(422, "Invalid",
                               f'{kind} "{key[4]}" is invalid: spec.{field}: Forbidden: field is immutable',
                               {"name": key[4], "kind": plural,
                                "causes": [{"type": "FieldValueForbidden", "field": f"spec.{field}"}]})
        if ns is not None and "deletionTimestamp" in store.objects.get(("", "v1", "namespaces", None, ns), {}).get("metadata", {}):
            raise ApiError(403, "Forbidden", f'{plural} "{key[4]}" is forbidden: unable to create new content in namespace {ns} because it is being terminated')
        meta_defaults(merged, ns, store)
        merged["metadata"]["managedFields"] = managed
        generation = (previous or {}).get("metadata", {}).get("generation", 0)
        if previous is None or json.dumps(merged.get("spec"), sort_keys=True) != old_spec:
            generation += 1
        merged["metadata"]["generation"] = max(generation, 1)
        if kind in WORKLOADS + ("Ingress",):
            converge(merged)
        if dry:
            return merged
        store.objects[key] = merged
        if merged["metadata"].get("annotations", {}).get(NEVER_READY) == "true":
            self.event(ns, merged, "Warning", "BackOff", "Back-off restarting failed container (kube-api-double never-ready)")
        return copy.deepcopy(merged)

    def event(self, ns, obj, type_, reason, message):
        store = self.store
        name = f"{obj['metadata']['name']}.{next(store.version)}"
        store.objects[("", "v1", "events", ns, name)] = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": str(next(store.version))},
            "involvedObject": {"kind": obj["kind"], "name": obj["metadata"]["name"], "namespace": ns},
            "type": type_, "reason": reason, "message": message, "lastTimestamp": now(), "count": 1,
        }


def main():
    parser = argparse.ArgumentParser(description="A test double of the Kubernetes API server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log")
    args = parser.parse_args()
    Handler.store = Store()
    Handler.log = args.log
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"kube-api-double listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
