#!/usr/bin/env python3
"""A TEST DOUBLE of the Kubernetes API server, for stack's tests and bench.

No real API server can be installed on the machines the tests run on, so
this speaks the real HTTP protocol the kube crate uses, for the verbs stack
uses, and behaves like an API server where stack's correctness depends on it,
inconvenient parts included:

- GET one object, LIST a kind (all namespaces or one) with `labelSelector`
  (=, ==, !=, exists, !exists) and `fieldSelector` (metadata.name,
  metadata.namespace, involvedObject.name);
- server-side apply: PATCH `application/apply-patch+yaml` with `fieldManager`
  (required), `force` and `dryRun=All`; field ownership per manager in
  `managedFields` (fieldsV1), 409 Conflict when another manager owns a field
  with a different value and `force` is not set, ownership moving on force;
- the real list merge keys, for merging and in `managedFields` (`k:{...}`):
  containers, initContainers, ephemeralContainers, env, volumes and
  imagePullSecrets by name, volumeMounts by mountPath, a container's ports by
  containerPort+protocol, a Service's ports by port+protocol (protocol taken
  as TCP when not given); every other list is atomic;
- merge patch (`application/merge-patch+json`, RFC 7386: lists replaced, null
  deletes) and POST as `Update` operations of another manager (how kubectl
  scale/edit/create look), taking over fields;
- objects stored the way Go's JSON encoding writes them back: omitempty
  fields holding false, 0, "" or [] and empty maps are dropped (pointer
  fields and map entries keep their values; status is left alone), so the
  stored object can lack fields the applier sent and still owns;
- a Secret's `stringData` stored as base64 `data`, never returned;
- DELETE (a Namespace is Terminating for a second, or for the seconds in its
  `kube-api-double/terminating-seconds` annotation, then goes with its
  objects; nothing new may be created in it meanwhile), `resourceVersion`,
  `generation`, `uid`, `creationTimestamp`;
- 404, 409, 400, 403 and 422 answers as `Status` objects, 422 with the real
  messages for changes the API server refuses in place: a StatefulSet's spec
  other than replicas, ordinals, template, updateStrategy,
  persistentVolumeClaimRetentionPolicy and minReadySeconds; a Deployment's or
  DaemonSet's selector; a Job's selector, template, completionMode; a
  Secret's type; data, binaryData and immutable of an immutable Secret or
  ConfigMap;
- the defaults a real API server fills in on the kinds stack uses
  (imagePullPolicy, terminationMessagePath, dnsPolicy, restartPolicy,
  revisionHistoryLimit, podManagementPolicy, sessionAffinity,
  clusterIP/clusterIPs, ipFamilies, nodePort, ...), so tests prove that
  drift detection ignores what the server fills in;
- a stand-in for the controllers: workloads report their rollout complete,
  Jobs succeed and Ingresses get an address at once, except objects
  annotated `kube-api-double/never-ready: "true"`, which never converge and
  get a Warning event instead, and Deployments annotated
  `kube-api-double/rollout-seconds: "N"`, which after a change to their pod
  template replace one pod every N seconds (maxSurge 1, maxUnavailable 0),
  their status computed whenever they are read.

With a database flag (--couchdb, --immudb, --agraph; only then) it also
stands in for the StatefulSet controller, the garbage collector, the
disruption controller and the kubelet, and proxies like the API server:

- every StatefulSet gets its pods NAME-0..N-1 (Parallel: all at once;
  OrderedReady: each after the previous is Ready), their claims from
  volumeClaimTemplates (deleted with the pod on scale-down when
  persistentVolumeClaimRetentionPolicy.whenScaled is Delete, with the set
  when whenDeleted is Delete), rolling updates one pod at a time from the
  highest ordinal, each Ready before the next (partition honoured), and a
  status worked out from the pods (readyReplicas, currentRevision, ...),
  in the order of the real controller's updateStatefulSet (see
  Kubelet.statefulset): under OrderedReady a pod that is Terminating or not
  Running and Ready stops the controller there, so no higher ordinal is
  created, nothing scaled down and nothing rolled, a rollback of the
  template included (kubernetes#67250: the broken pod has to be deleted);
  a template put back gets its old revision name as updateRevision, and
  currentRevision becomes updateRevision only once all pods are on it and
  Ready (never with OnDelete);
- a deleted pod (DELETE, or POST .../eviction, refused with 429 while a
  PodDisruptionBudget allows no disruption) comes back with its claims, so
  its database node restarts with its data;
- the kubelet builds each container's environment (value with $(VAR)
  expansion, secretKeyRef, configMapKeyRef, fieldRef, envFrom; a missing
  Secret or key: CreateContainerConfigError) and mounts ConfigMap and Secret
  volumes (missing: stuck in ContainerCreating). A container whose image
  matches a database double's registry runs as a node of it, its
  readinessProbe and livenessProbe ask that node; each of the registry's
  data paths keeps its data while the same claim is mounted there (a new
  pod of the name with its claims: kept; a claim deleted: lost; a
  container restarting in its pod keeps what is on the pod's volumes and
  loses the rest, its own file system); other containers are ready at
  once. The registries: couchdb (couchdb_double.py, ini files from
  /opt/couchdb/etc/default.d and local.d, data /opt/couchdb/data),
  codenotary/immudb (immudb_double.py, data /var/lib/immudb) and, with
  --agraph, agraph_double.AgraphRegistry (franzinc/agraph; data
  /agraph/data and /agraph/etc, kept or lost separately; `shm_bytes` from
  the container's /dev/shm mount: a `medium: Memory` emptyDir's sizeLimit
  (Ki/Mi/Gi/K/M/G...), unbounded without one or for another volume there,
  None with nothing mounted at /dev/shm, which the image refuses). The
  interface is in Kubelet's docstring;
- containers whose image matches `(^|/)curlimages/curl(:|@|$)` (sidecars
  running stack's in-pod scripts, such as manifests/allegrograph-member.sh)
  run for real as host subprocesses (container_runner.py): command + args
  ($(VAR) expanded; no command: the image's `curl ARGS`), the env the
  kubelet builds plus HOSTNAME, http_proxy (below) and every
  --container-env NAME=VALUE (over the pod's own), their ConfigMap/Secret
  files in a temporary dir with absolute paths under a mount path in the
  command and env rewritten into it. They start when the pod's containers
  start, are restarted with back-off (1s doubling to 30s) when they exit,
  show in containerStatuses (running and ready while running, as they have
  no probes; else waiting, CrashLoopBackOff after a first exit;
  restartCount), and on deletion, eviction, scale-down or rolling update
  get SIGTERM at once, SIGKILL after terminationGracePeriodSeconds, while
  the pod is Terminating (a database container without preStop stops at
  the same moment); the pod goes once they have exited. Their output goes
  to --container-log. They die with this process (SIGTERM or not);
- lifecycle hooks `exec` run for real, as subprocesses of this machine: the
  container's ConfigMap/Secret files written into a fresh temporary dir
  mirroring their mount paths (defaultMode/mode honoured, 0644 by default),
  absolute paths under a mount path in the command rewritten into it, the
  environment the container's own plus http_proxy=http://NS:POD@127.0.0.1:PORT
  (this double, the pod named as proxy credentials) and HOSTNAME=POD,
  nothing from the host but PATH.
  postStart runs once the node started; the container stays Waiting
  (ContainerCreating) until it exits 0; a failing one is a Warning event
  FailedPostStartHook, the container killed and restarted with back-off
  (1s doubling to 30s: Kubernetes' 10s..5m, scaled down). preStop runs when
  the pod is deleted, evicted, scaled or rolled away, bounded by
  terminationGracePeriodSeconds (default 30): meanwhile the pod is
  Terminating (deletionTimestamp), out of the endpoints unless the Service
  publishes not-ready addresses, its node still running; then it goes;
- the pod network: an absolute-form request (`GET http://HOST:PORT/path`,
  what curl sends with http_proxy) goes to the node HOST resolves to as
  from the pod its Proxy-Authorization names (Basic NS:POD, what curl sends
  for the credentials in the pods' http_proxy): short names complete in
  that pod's namespace, localhost is that pod. Without one, the namespace
  of the pods running hooks right now completes short names when they
  share one, else default; localhost is the hook's pod when only one pod
  runs hooks. Pod IPs work too. Every header but hop-by-hop and Proxy-* ones forwarded,
  Authorization included; 502 text `dial tcp: lookup HOST ...: no such
  host` for a name that does not resolve and `dial tcp IP:PORT: connect:
  connection refused` when nothing listens. Not logged to --log, never
  failed by --faults; logged to --hook-log;
- DNS for the nodes and the replicators: Service names and, for headless
  Services, POD.SERVICE.NS.svc.cluster.local (not-ready pods only with
  publishNotReadyAddresses);
- GET/LIST/DELETE pods, PodDisruptionBudgets with their status;
- /api/v1/namespaces/NS/pods/POD[:PORT]/proxy/PATH and
  /api/v1/namespaces/NS/services/SVC[:PORT]/proxy/PATH, any method, body
  and query passed through, every header but Authorization (the API server
  consumed it) forwarded, the answer returned as the pod gave it; 503
  `error trying to reach service: dial tcp IP:PORT: connect: connection
  refused` when nothing listens, 503 `no endpoints available for service`
  without a ready endpoint, 404 for a missing pod or Service. They are
  logged and may fail with --faults like any other request;
- GET (or POST) /api/v1/namespaces/NS/pods/POD/portforward?ports=P[,P...]
  with a WebSocket upgrade: portforward.py (v4.channel.k8s.io, channels
  2i/2i+1 per port, raw HTTP/1.1 to the pod's database node, every header
  Authorization included). Before the upgrade, as the API server and the
  kubelet answer: a missing pod is the API server's 404 Status; a pod
  without spec.nodeName its 400 Status `pod NAME does not have a host
  assigned`; then the kubelet's answers, passed on as they are (text/plain,
  not a Status): `ports` missing or invalid a 400, a pod without a running
  sandbox (no pod IP) a 500 `pod not found ("NAME_NS")`. A pod that has
  one but does not listen (Pending, booting, crashed, Terminating: not
  Running) upgrades, and the port's error channel carries containerd's
  `... connect: connection refused` (kube-client reports it as an error on
  that port's stream); there is no 4xx for "not Running" in the real API
  server. Logged and failed by --faults (before the upgrade) like any other
  request; the store lock is not held while the forward runs.

Run: kube_api_double.py --port PORT [--log FILE] [--faults SEED:PERCENT]
     [--couchdb [--couchdb-settle-seconds S] [--couchdb-fill-seconds S]
      [--couchdb-setup-wait-seconds S] [--couchdb-boot-seconds S] [--couchdb-log FILE]
      [--couchdb-fault POD@IMAGE=KIND ...]]
     [--immudb [--immudb-log FILE] [--immudb-boot-seconds S (0.5)]
      [--immudb-replication-seconds S (0.05)] [--immudb-lag POD=SECONDS ...]
      [--immudb-sync-wait-seconds S (5)]]
     [--agraph [--agraph-log FILE] [--agraph-boot-seconds S]]
     [--hook-log FILE] [--controller-log FILE] [--container-log FILE]
     [--container-env NAME=VALUE ...]
--hook-log gets one JSON line per hook run {"time", "pod", "container",
"hook", "command", "argv", "exit_code", "output_tail"} and per pod-network
request {"time", "proxy": METHOD, "url" (password query values as ***),
"pod" (where it went), "from" (the pod it came from, or null), "status"}.
--controller-log gets one JSON line per pod the StatefulSet controller
creates or deletes (scale-down, rolling update; not a pod deleted through
the API, whose replacement is a create): {"time" (RFC 3339, milliseconds),
"statefulset": "NS/NAME", "pod", "action": "create" | "delete",
"revision" (its controller-revision-hash), "images": {container: image}}.
--couchdb-fault POD@IMAGE=KIND (repeatable): the CouchDB node of pod POD
(a name, or NS/NAME) started from a container whose image contains IMAGE
has fault KIND: isolated (its own Erlang cookie: seeding for good, never
Ready), partitioned (reaches a seed, so Ready, then connected to no other
node) or unready (exits at every start: CrashLoopBackOff); see
couchdb_double.py. The same pod started from another image is healthy.
--container-log gets the curlimages/curl containers' output, each line
`NS/POD/CONTAINER: TEXT`, and `exited with code N` when one exits.
--container-env NAME=VALUE (repeatable) is added to every such container's
env, over the pod's own: tests make in-pod scripts faster with it
(STACK_CHECK_SECONDS=1 for allegrograph-member.sh) without changing the
objects stack renders.
Every request is appended to --log as one line,
`METHOD PATH?QUERY user-agent=VALUE` (`-` when no User-Agent was sent).

With --faults, about PERCENT of stack's requests (picked from the request's
number and SEED, so a run can be repeated) fail the way an overloaded API
server or the proxy before it fails: 429 with Retry-After: 1 and a plain
text body (as the API server's max-in-flight filter answers), a 500, 503 or
504 Status, a 502 from a proxy, or a connection reset before any answer.
Such a request changes nothing and is logged as `FAULT KIND METHOD PATH?QUERY`.
"""

import argparse
import base64
import collections
import copy
import datetime
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import random
import posixpath
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from couchdb_double import IMAGE_DEFAULT_D, NODE_FAULTS, CouchRegistry, NotListening  # noqa: E402

# (group, version, plural) -> (kind, namespaced)
RESOURCES = {
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True),
    ("", "v1", "secrets"): ("Secret", True),
    ("", "v1", "configmaps"): ("ConfigMap", True),
    ("", "v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True),
    ("", "v1", "services"): ("Service", True),
    ("", "v1", "events"): ("Event", True),
    ("", "v1", "pods"): ("Pod", True),
    ("policy", "v1", "poddisruptionbudgets"): ("PodDisruptionBudget", True),
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
ROLLOUT_SECONDS = "kube-api-double/rollout-seconds"
TERMINATING_SECONDS = "kube-api-double/terminating-seconds"
NAMESPACE_TERMINATION_SECONDS = 1.0
# Fields the API server refuses to change (422), by kind. A StatefulSet is
# the other way round: only STATEFULSET_MUTABLE may change (see validate_update).
IMMUTABLE = {
    "Deployment": ("selector",),
    "DaemonSet": ("selector",),
    "Job": ("selector", "template", "completionMode"),
}
STATEFULSET_MUTABLE = ("replicas", "ordinals", "template", "updateStrategy",
                       "persistentVolumeClaimRetentionPolicy", "minReadySeconds")
# Kinds without Go types behind them: stored as sent (no omitempty), every
# list atomic. A CustomResourceDefinition's schema is JSON all the way down
# (default, enum, example), so it is left alone too.
UNTYPED = ("CustomResourceDefinition", "ServiceMonitor")
# Map-typed fields (Go `map[string]...`): their entries keep zero values,
# only an empty map is dropped. A Service's spec.selector is one too, while
# a workload's spec.selector is a LabelSelector struct (see is_map_field).
MAP_FIELDS = {"labels", "annotations", "data", "stringData", "binaryData", "matchLabels",
              "nodeSelector", "limits", "requests", "capacity"}
# Pointer (or not omitempty) fields: a zero value is written back, only
# null (a nil pointer) is dropped. The first lines are the ones stack's
# manifests meet; the last are other pointers of the same Go types.
KEEP_ZERO = {
    "replicas", "partition", "maxUnavailable", "maxSurge", "backoffLimit", "completions",
    "parallelism", "activeDeadlineSeconds", "ttlSecondsAfterFinished",
    "terminationGracePeriodSeconds", "progressDeadlineSeconds", "revisionHistoryLimit",
    "automountServiceAccountToken", "immutable", "optional", "defaultMode", "mode",
    "runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "privileged", "readOnlyRootFilesystem",
    "allowPrivilegeEscalation", "port", "containerPort", "targetPort",
    "suspend", "storageClassName", "volumeMode", "ingressClassName", "pathType",
    "shareProcessNamespace", "enableServiceLinks", "hostUsers", "setHostnameAsFQDN",
    "manualSelector", "startingDeadlineSeconds", "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit", "allocateLoadBalancerNodePorts",
}
# Lists merged by key (+listType=map in the Go types), by field name; a
# container's and a Service's `ports` are told apart in list_keys.
LIST_KEYS = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "env": ("name",), "volumes": ("name",), "imagePullSecrets": ("name",),
    "volumeMounts": ("mountPath",),
}
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


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
        # When each rolling Deployment's pod template last changed (monotonic
        # seconds), by key: its status is worked out from this on every read.
        self.rollouts = {}
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

    def present(self, key, obj, started=None):
        """An object as a read sees it now: a copy, with a rollout's status as of this moment."""
        out = copy.deepcopy(obj)
        stored = started is None
        started = self.rollouts.get(key) if stored else started
        if started is not None and not rolling(out, started) and stored:
            # Finished for good: a later change of the annotation alone starts nothing.
            self.rollouts.pop(key, None)
        return out

    def forget(self, key):
        self.objects.pop(key, None)
        self.rollouts.pop(key, None)


# ---- list merge keys ----------------------------------------------------

def list_keys(kind, path):
    """The merge key fields of the list at `path` (field names from the root), or None: atomic."""
    if kind in UNTYPED or not path:
        return None
    if path[-1] == "ports":
        if kind == "Service" and path == ("spec", "ports"):
            return ("port", "protocol")
        if len(path) >= 2 and path[-2] in CONTAINER_LISTS:
            return ("containerPort", "protocol")
        return None
    return LIST_KEYS.get(path[-1])


def key_value(item, field):
    # The API server keys ports on the defaulted protocol.
    return item.get(field, "TCP" if field == "protocol" else None)


def item_key(keys, item):
    """The `k:{...}` member of a list item in fieldsV1: its key fields, as sorted compact JSON."""
    return "k:" + json.dumps({k: key_value(item, k) for k in keys}, sort_keys=True, separators=(",", ":"))


def item_matches(item, want):
    return isinstance(item, dict) and all(key_value(item, k) == v for k, v in want.items())


def keyed(keys, value):
    return keys is not None and isinstance(value, list) and all(isinstance(i, dict) for i in value)


# ---- field sets (managedFields fieldsV1) -------------------------------

def fieldset(kind, value, path=()):
    """The fieldsV1 set of an applied configuration."""
    out = {}
    for key, child in value.items():
        out["f:" + key] = child_set(kind, child, path + (key,))
    return out


def child_set(kind, child, path):
    if isinstance(child, dict):
        return fieldset(kind, child, path) if child else {}
    keys = list_keys(kind, path)
    if child and keyed(keys, child):
        # Items of a list item share its path: a container's ports are at (..., "containers", "ports").
        return {item_key(keys, i): {".": {}, **fieldset(kind, i, path)} for i in child}
    return {}


def config_set(config):
    """What an applier owns: all it set, minus the object's identity."""
    kind = config.get("kind")
    body = {k: v for k, v in config.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    meta = {k: v for k, v in config.get("metadata", {}).items() if k in ("labels", "annotations")}
    fs = fieldset(kind, body)
    if meta:
        fs["f:metadata"] = fieldset(kind, meta, ("metadata",))
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


def keyed_items(fs, path=()):
    """The paths of the keyed list items (`k:` members) in a field set."""
    for key, child in fs.items():
        if key == ".":
            continue
        if key.startswith("k:"):
            yield path + (key,)
        yield from keyed_items(child, path + (key,))


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
            found = [i for i in node or [] if item_matches(i, want)]
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
        parent[:] = [i for i in parent if not item_matches(i, want)]


def merge(kind, live, config, path=(), by_key=True):
    """Structured merge: maps by key, keyed lists item by item, anything else replaced.

    With by_key=False it is a JSON merge patch (RFC 7386) instead: every list
    is replaced whole, and null deletes (omit_empty drops it afterwards).
    """
    if isinstance(live, dict) and isinstance(config, dict):
        out = dict(live)
        for key, value in config.items():
            here = path + (key,)
            out[key] = merge(kind, live[key], value, here, by_key) if key in live else copy.deepcopy(value)
        return out
    keys = list_keys(kind, path) if by_key else None
    if keyed(keys, live) and keyed(keys, config):
        ident = lambda i: tuple(key_value(i, k) for k in keys)
        old = {ident(i): i for i in live}
        sent = {ident(i) for i in config}
        return [merge(kind, old[ident(i)], i, path, by_key) if ident(i) in old else copy.deepcopy(i)
                for i in config] + [copy.deepcopy(i) for i in live if ident(i) not in sent]
    return copy.deepcopy(config)


# ---- written back the way Go encodes it -------------------------------------

def is_map_field(kind, path):
    return path[-1] in MAP_FIELDS or (kind == "Service" and path == ("spec", "selector"))


def is_zero(value):
    if isinstance(value, bool):
        return value is False
    if isinstance(value, (int, float)):
        return value == 0
    return value == "" or value == []


def omit_empty(kind, value, path=()):
    """Drop what Go's omitempty drops when the API server writes an object back.

    false, 0, "" and [] in omitempty fields, and empty maps. An empty struct
    stays: Go writes a struct (or a non-nil pointer to one) even when it is
    empty, which is why a real server returns `emptyDir: {}`, `resources: {}`
    and `securityContext: {}`. Map entries and KEEP_ZERO fields keep zero
    values; null (a nil pointer, or a merge patch's delete) goes everywhere.
    """
    out = {}
    for key, child in value.items():
        here = path + (key,)
        if child is None:
            continue
        if here in (("status",), ("metadata", "managedFields")):
            out[key] = child
            continue
        if is_map_field(kind, here) and isinstance(child, dict):
            entries = {k: v for k, v in child.items() if v is not None}
            if entries:
                out[key] = entries
            continue
        if isinstance(child, dict):
            child = omit_empty(kind, child, here)
        elif isinstance(child, list):
            child = [omit_empty(kind, i, here) if isinstance(i, dict) else i for i in child]
        if key in KEEP_ZERO or not is_zero(child):
            out[key] = child
    return out


def string_data(obj):
    """A Secret's stringData, as the API server stores it: base64 in data, over what data had."""
    given = obj.pop("stringData", None)
    if isinstance(given, dict):
        data = obj.get("data") or {}
        for k, v in given.items():
            if v is not None:
                data[k] = base64.b64encode(str(v).encode()).decode()
        obj["data"] = data


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
        # Always for the tag latest, given or implied (no tag, no digest): ParseImageName's tag.
        name, _, digest = c.get("image", "").rsplit("/", 1)[-1].partition("@")
        tag = name.split(":", 1)[1] if ":" in name else ("" if digest else "latest")
        c.setdefault("imagePullPolicy", "Always" if tag == "latest" else "IfNotPresent")
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


def template_revision(obj):
    """The name of the revision (ReplicaSet, ControllerRevision) of an object's pod template."""
    template = obj.get("spec", {}).get("template", {})
    return obj["metadata"]["name"] + "-" + hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def converge(obj):
    """The controllers' part: rollouts complete, Jobs succeed, Ingresses get an address."""
    kind, meta = obj["kind"], obj["metadata"]
    if meta.get("annotations", {}).get(NEVER_READY) == "true":
        obj["status"] = {"observedGeneration": meta.get("generation", 1), "replicas": 0,
                         "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                                         "message": "pods are crash looping"}]}
        return
    spec = obj.get("spec", {})
    revision = template_revision(obj)
    n = spec.get("replicas", 1)
    if kind == "StatefulSet":
        obj["status"] = {"observedGeneration": meta["generation"], "replicas": n, "readyReplicas": n,
                         "currentReplicas": n, "updatedReplicas": n, "availableReplicas": n,
                         "currentRevision": revision, "updateRevision": revision}
    elif kind == "Deployment":
        obj["status"] = {"observedGeneration": meta["generation"], "replicas": n, "readyReplicas": n,
                         "updatedReplicas": n, "availableReplicas": n,
                         "conditions": [available_condition(),
                                        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                         "message": f'ReplicaSet "{revision}" has successfully progressed.'}]}
    elif kind == "DaemonSet":
        obj["status"] = {"observedGeneration": meta["generation"], "desiredNumberScheduled": 1,
                         "updatedNumberScheduled": 1, "numberAvailable": 1, "numberReady": 1}
    elif kind == "Job":
        obj["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    elif kind == "Ingress":
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}


def available_condition():
    return {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
            "message": "Deployment has minimum availability."}


def annotation_seconds(obj, name):
    """The seconds in one of the double's annotations, or None when absent or not a positive number."""
    try:
        seconds = float(obj["metadata"].get("annotations", {}).get(name))
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


def rolling(obj, started):
    """A Deployment's status while a new template rolls out, one pod per N seconds; False once done.

    Like the deployment controller with maxSurge 1 and maxUnavailable 0: one
    new pod comes up beside the old ones, then an old one goes, so for a
    while updatedReplicas and availableReplicas both reach spec.replicas while
    an old pod is still serving (status.replicas is one more). Only once all
    of them are replaced does the status become the converged one.
    """
    seconds = annotation_seconds(obj, ROLLOUT_SECONDS)
    if obj["kind"] != "Deployment" or seconds is None or \
            obj["metadata"].get("annotations", {}).get(NEVER_READY) == "true":
        return False
    want = obj.get("spec", {}).get("replicas", 1)
    done = math.floor((time.monotonic() - started) / seconds)
    if done >= want:
        return False
    revision = template_revision(obj)
    obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "replicas": want + 1,
                     "updatedReplicas": done + 1, "readyReplicas": want, "availableReplicas": want,
                     "unavailableReplicas": 1,
                     "conditions": [available_condition(),
                                    {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                                     "message": f'ReplicaSet "{revision}" is progressing.'}]}
    return True


# ---- what the API server refuses (422) -------------------------------------

def forbidden(field, detail):
    return (field, "FieldValueForbidden", f"Forbidden: {detail}")


def validate_update(kind, group, name, old, new):
    """Raise 422 Invalid for changes the API server refuses in place, worded like its validation."""
    errors = []
    old_spec, new_spec = old.get("spec", {}), new.get("spec", {})
    for field in IMMUTABLE.get(kind, ()):
        if new_spec.get(field) != old_spec.get(field):
            errors.append(forbidden(f"spec.{field}", "field is immutable"))
    if kind == "StatefulSet":
        fixed = lambda spec: {k: v for k, v in spec.items() if k not in STATEFULSET_MUTABLE}
        if fixed(new_spec) != fixed(old_spec):
            errors.append(forbidden("spec", "updates to statefulset spec for fields other than 'replicas', "
                                    "'ordinals', 'template', 'updateStrategy', "
                                    "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"))
    if kind == "Secret" and new.get("type") != old.get("type"):
        errors.append(("type", "FieldValueInvalid", f"Invalid value: {json.dumps(new.get('type'))}: field is immutable"))
    if kind in ("Secret", "ConfigMap") and old.get("immutable") is True:
        when = "field is immutable when `immutable` is set"
        if new.get("immutable") is not True:
            errors.append(forbidden("immutable", when))
        for field in ("data", "binaryData"):
            if new.get(field) != old.get(field):
                errors.append(forbidden(field, when))
    if errors:
        raise invalid(kind, group, name, errors)


def invalid(kind, group, name, errors):
    """422 as the API server puts it: `Kind.group "name" is invalid: field: detail` ([a, b] for several)."""
    qualified = f"{kind}.{group}" if group else kind
    said = [f"{field}: {detail}" for field, _, detail in errors]
    message = said[0] if len(said) == 1 else "[" + ", ".join(said) + "]"
    details = {"name": name, "kind": kind,
               "causes": [{"reason": reason, "message": detail, "field": field} for field, reason, detail in errors]}
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {message}', details)


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



# ---- with --couchdb: kubelet, StatefulSet controller, proxies ----------------

POD = ("", "v1", "pods")
PVC = ("", "v1", "persistentvolumeclaims")
STS = ("apps", "v1", "statefulsets")
PDB = ("policy", "v1", "poddisruptionbudgets")
COUCH_IMAGE = re.compile(r"(^|/)couchdb(:|@|$)")
COUCH_ETC = "/opt/couchdb/etc/"
COUCH_DATA = "/opt/couchdb/data"
PROXY_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/(pods|services)/([^/]+)/proxy(/.*)?$")
EVICTION_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/eviction$")
PORTFORWARD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}
NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization"}
NODE_NAME = "double-node"
HOST_IP = "10.0.0.10"
POSTSTART_TIMEOUT = 300.0       # the kubelet has none; a bound so a stuck hook cannot hang the double
RUNNER_IMAGE = re.compile(r"(^|/)curlimages/curl(:|@|$)")     # containers run for real (container_runner.py)


def expand(value, env):
    """Kubernetes' $(VAR) expansion: defined names replaced, $$ escapes, anything else left as is."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i + 2:]:
            end = value.index(")", i + 2)
            name = value[i + 2:end]
            if name in env:
                out.append(env[name])
            else:
                out.append(value[i:end + 1])
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def selector_match(labels, selector):
    """A LabelSelector (matchLabels, matchExpressions) against labels."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in values:
            return False
        if op == "NotIn" and labels.get(k) in values:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def scaled(value, total):
    """An intOrPercent, rounded up the way the disruption controller does."""
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(total * int(value[:-1]) / 100)
    return int(value or 0)


def redact_query(url):
    """The URL with every query value whose name holds `password` as `***` (for logs)."""
    if "?" not in url:
        return url
    base, query = url.split("?", 1)
    parts = []
    for part in query.split("&"):
        name = part.split("=", 1)[0]
        parts.append(name + "=***" if "password" in name.lower() else part)
    return base + "?" + "&".join(parts)


def status_error(code, reason, message, details=None):
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out


def couch_ini(files):
    """The ini files CouchDB reads from default.d and local.d, from a container's mounted files -> (default_d, local_d)."""
    dirs = {"default.d": None, "local.d": None}
    extra = {"default.d": {}, "local.d": {}}
    for path, content in files.items():
        path = path.rstrip("/")
        for d in dirs:
            full = COUCH_ETC + d
            if path == full:
                dirs[d] = {**(dirs[d] or {}), **content}
            elif path.startswith(full + "/"):
                # One file mounted by subPath: {its base name: text}.
                if list(content) == [posixpath.basename(path)]:
                    extra[d][path[len(full) + 1:]] = content[posixpath.basename(path)]
    default_d = dirs["default.d"] if dirs["default.d"] is not None else {"10-docker-default.ini": IMAGE_DEFAULT_D}
    default_d = {**default_d, **extra["default.d"]}
    local_d = {**(dirs["local.d"] or {}), **extra["local.d"]}
    # CouchDB reads *.ini files only, in order of their names.
    text = lambda fs: "\n".join(fs[k] for k in sorted(fs) if k.endswith(".ini"))
    return text(default_d), text(local_d)


class CouchAdapter:
    """The registry interface (see Kubelet) over the CouchDB double's CouchRegistry."""

    IMAGE = COUCH_IMAGE
    DATA_PATHS = (COUCH_DATA,)

    def __init__(self, couch):
        self.couch = couch

    @property
    def resolver(self):
        return self.couch.resolver

    @resolver.setter
    def resolver(self, value):
        self.couch.resolver = value

    def start_node(self, pod_key, env, image, files, fqdn):
        default_d, local_d = couch_ini(files)
        return self.couch.start_node(pod_key, env, default_d, image, local_ini_text=local_d, fqdn=fqdn)

    def stop_node(self, pod_key, keep_data):
        self.couch.stop_node(pod_key, keep_data=keep_data)

    def running(self, pod_key):
        return self.couch.running(pod_key)

    def probe(self, pod_key, path, port):
        return self.couch.probe(pod_key, path, port)

    def handle(self, pod_key, method, path, headers, body, port):
        return self.couch.handle(pod_key, method, path, headers, body, port=port)


class Kubelet:
    """The StatefulSet controller, the garbage collector, the disruption controller and the kubelet.

    Only with a database flag (--couchdb, --immudb, --agraph). Runs under the
    store lock, from a background thread and at the start of every request.
    A container whose image matches a registry's IMAGE runs as a node of that
    database double; any other container is running and ready at once.

    Containers of RUNNER_IMAGE run for real through a ContainerRunner.

    A registry (one per database double) provides:
      IMAGE       a compiled regex the container image is searched with;
      DATA_PATHS  mount paths whose PersistentVolumeClaims keep the node's data;
      resolver    set here: resolver(host, port, from_pod) -> (pod key, port) or None;
      start_node(pod_key, env, image, files, fqdn[, shm_bytes=]) -> bool (False: the container
        exits at once); files: {mount path: {file name: text}} of the ConfigMap/Secret volumes
        mounted in that container (a subPath mount of one file: {its path: {its base name: text}});
        shm_bytes (only when start_node has that parameter): see shm_bytes;
      stop_node(pod_key, keep_data): keep_data True (every data path kept), False (none), or,
        for a registry with several DATA_PATHS, the tuple of those kept;
      running(pod_key) -> bool,
      probe(pod_key, path, port) -> bool (an httpGet probe),
      handle(pod_key, method, path, headers, body, port) -> (status, headers, bytes),
        raising NotListening when nothing listens on that port.
    """

    def __init__(self, store, registries, proxy_port=0, hook_log=None, container_log=None, container_env=None,
                 controller_log=None):
        self.store = store
        self.controller_log_path = controller_log       # --controller-log
        self.registries = list(registries) if isinstance(registries, (list, tuple)) else [registries]
        self.pods = {}          # pod key "ns/name" -> kubelet state of the pod
        self.revisions = {}     # StatefulSet store key -> {revision: template}
        self.current = {}       # StatefulSet store key -> currentRevision
        self.volumes = {}       # pod key -> the claims' uids its node's data lives on
        self.ips = itertools.count(2)
        self.dns = {"pods": {}, "services": {}}
        self.proxy_port = proxy_port                    # the double's port: the pods' http_proxy
        self.hook_log_path = hook_log
        self.hook_log_lock = threading.Lock()
        self.hooks_running = collections.Counter()      # pod key -> hooks running now
        self.hooks_lock = threading.Lock()
        self.stopping = set()                           # pod keys whose old container runs its preStop
        self.stopped_registry = {}
        from container_runner import ContainerRunner
        # Containers of RUNNER_IMAGE, run for real; the kubelet's back-off scaled down (see backoff).
        self.runner = ContainerRunner(proxy_port, log_path=container_log, backoff_seconds=1.0,
                                      max_backoff_seconds=30.0)
        self.extra_env = dict(container_env or {})  # --container-env: added to every such container's env
        for registry in self.registries:
            registry.resolver = self.resolve

    # ---- DNS, as seen from a pod -------------------------------------------

    def resolve(self, host, port, from_pod=None):
        """A name -> (pod key, port on the pod) or None: pod FQDNs of headless Services, Service names."""
        dns = self.dns
        host = (host or "").lower().rstrip(".")
        ns = from_pod.split("/", 1)[0] if from_pod else "default"
        names = [host]
        if host.count(".") < 5:     # ndots:5 and the pod's search path
            names = [f"{host}.{ns}.svc.cluster.local", f"{host}.svc.cluster.local",
                     f"{host}.cluster.local", host]
        for name in names:
            if name in dns["pods"]:
                return dns["pods"][name], port
            svc = dns["services"].get(name)
            if svc is not None:
                if not svc["endpoints"]:
                    return None
                pod, ports = random.choice(svc["endpoints"])
                if port is None:
                    return pod, None
                for p in svc["ports"]:
                    if p.get("port") == port:
                        target = p.get("targetPort", port)
                        return pod, ports.get(target, target) if isinstance(target, str) else target
                return (pod, port) if svc["headless"] else None
        return None

    def pod_target(self, host, port, from_pod=None):
        """Where a pod's request to HOST:PORT goes -> ((pod key, port), pod IP) or (None, None).

        from_pod: the pod the request comes from, when its proxy credentials say (see proxy_url).
        Else the pods it may come from are those running a hook right now: when they are all in one
        namespace, it completes short names (else: default); localhost is the pod when there is one."""
        if from_pod is not None:
            running = [from_pod]
        else:
            with self.hooks_lock:
                running = sorted(k for k, n in self.hooks_running.items() if n > 0)
            from_pod = running[0] if len({k.split("/", 1)[0] for k in running}) == 1 else None
        ip_of = lambda key: (self.store.objects.get(POD + tuple(key.split("/", 1))) or {}).get(
            "status", {}).get("podIP", "")
        if host in ("localhost", "127.0.0.1", "::1"):
            return ((running[0], port), "127.0.0.1") if len(running) == 1 else (None, None)
        for key, pod in self.objects(POD):
            if pod.get("status", {}).get("podIP") == host:
                return (self.pod_key(pod), port), host
        got = self.resolve(host, port, from_pod)
        if got is None:
            return None, None
        return got, ip_of(got[0])

    # ---- helpers ----------------------------------------------------------

    def objects(self, res, ns=None):
        return [(k, o) for k, o in sorted(self.store.objects.items(), key=lambda kv: str(kv[0]))
                if k[:3] == res and (ns is None or k[3] == ns)]

    @staticmethod
    def pod_key(pod):
        return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"

    @staticmethod
    def owner_uid(obj, kind):
        for ref in obj["metadata"].get("ownerReferences", []):
            if ref.get("kind") == kind:
                return ref.get("uid")
        return None

    @staticmethod
    def ready(pod):
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in pod.get("status", {}).get("conditions", []))

    def healthy(self, pod):
        return pod.get("status", {}).get("phase") == "Running" and self.ready(pod) and \
            "deletionTimestamp" not in pod["metadata"]

    def put_status(self, key, obj, status):
        if obj.get("status") != status:
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = str(next(self.store.version))

    def delete(self, key):
        self.store.forget(key)

    # ---- the StatefulSet controller ------------------------------------

    def claims(self, sts, pod_name):
        return [f"{t['metadata']['name']}-{pod_name}" for t in sts.get("spec", {}).get("volumeClaimTemplates", [])]

    def ensure_claims(self, key, sts, pod_name):
        ns = key[3]
        spec = sts["spec"]
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        for t in spec.get("volumeClaimTemplates", []):
            name = f"{t['metadata']['name']}-{pod_name}"
            pkey = PVC + (ns, name)
            if pkey in self.store.objects:
                continue
            labels = dict(t.get("metadata", {}).get("labels") or {})
            labels.update(spec.get("selector", {}).get("matchLabels") or {})
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": name, "labels": labels,
                                "annotations": {"pv.kubernetes.io/bind-completed": "yes"},
                                "finalizers": ["kubernetes.io/pvc-protection"]},
                   "spec": copy.deepcopy(t.get("spec", {})),
                   "status": {"phase": "Bound", "accessModes": t.get("spec", {}).get("accessModes", []),
                              "capacity": t.get("spec", {}).get("resources", {}).get("requests", {})}}
            pvc["spec"].setdefault("volumeName", "pvc-" + str(uuid.uuid4()))
            pvc["spec"].setdefault("volumeMode", "Filesystem")
            if policy.get("whenDeleted") == "Delete":
                pvc["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                       "name": sts["metadata"]["name"],
                                                       "uid": sts["metadata"]["uid"],
                                                       "controller": True, "blockOwnerDeletion": True}]
            meta_defaults(pvc, ns, self.store)
            self.store.objects[pkey] = pvc

    def create_pod(self, key, sts, ordinal, revision):
        ns, set_name = key[3], key[4]
        template = copy.deepcopy(self.revisions[key][revision])
        name = f"{set_name}-{ordinal}"
        self.ensure_claims(key, sts, name)
        meta = template.get("metadata", {})
        labels = dict(meta.get("labels") or {})
        labels.update({"statefulset.kubernetes.io/pod-name": name, "controller-revision-hash": revision,
                       "apps.kubernetes.io/pod-index": str(ordinal)})
        spec = template.get("spec", {})
        spec["hostname"] = name
        if sts["spec"].get("serviceName"):
            spec["subdomain"] = sts["spec"]["serviceName"]
        spec["nodeName"] = NODE_NAME
        spec.setdefault("serviceAccountName", "default")
        volumes = spec.setdefault("volumes", [])
        for t in sts["spec"].get("volumeClaimTemplates", []):
            claim = t["metadata"]["name"]
            if not any(v.get("name") == claim for v in volumes):
                volumes.append({"name": claim, "persistentVolumeClaim": {"claimName": f"{claim}-{name}"}})
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "generateName": f"{set_name}-", "labels": labels,
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": set_name,
                                                 "uid": sts["metadata"]["uid"], "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": spec,
               "status": {"phase": "Pending", "qosClass": "BestEffort",
                          "conditions": [{"type": "PodScheduled", "status": "True",
                                          "lastTransitionTime": now()}]}}
        if meta.get("annotations"):
            pod["metadata"]["annotations"] = dict(meta["annotations"])
        meta_defaults(pod, ns, self.store)
        self.store.objects[POD + (ns, name)] = pod

    def controller_log(self, key, action, pod):
        """--controller-log: one JSON line per pod the StatefulSet controller creates or deletes."""
        if self.controller_log_path:
            line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"), "statefulset": f"{key[3]}/{key[4]}",
                    "pod": pod["metadata"]["name"], "action": action,
                    "revision": pod["metadata"]["labels"].get("controller-revision-hash"),
                    "images": {c["name"]: c.get("image", "") for c in pod["spec"].get("containers", [])}}
            with open(self.controller_log_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def condemn(self, key, pkey, pod):
        """A pod the controller deletes (scale-down, rolling update)."""
        self.controller_log(key, "delete", pod)
        self.delete_pod(pkey)

    def statefulset(self, key, sts):
        """One sync of the StatefulSet controller (stateful_set_control.go, updateStatefulSet).

        The revisions: the pod template's revision is updateRevision (an equal template, such as the
        previous one put back, gets the same name again, as the controller reuses the equal
        ControllerRevision); currentRevision stays until a rolling update completes (every one of
        spec.replicas pods on updateRevision and Running and Ready), OnDelete never completes one.
        Then, for the replicas 0..replicas-1 in ordinal order: a missing one is created (on
        currentRevision below a RollingUpdate's partition, else updateRevision) and, OrderedReady,
        nothing more happens this round; a Terminating one, or one not Running and Ready, ends an
        OrderedReady round there. Only when none did: the pods at or above replicas are deleted, the
        highest first (OrderedReady: one per round, waiting while that one is Terminating, or is not
        Running and Ready while a lower one is not either; Parallel: all). Then the rolling update,
        from the highest ordinal down to the partition: the first pod not on updateRevision and not
        Terminating is deleted, and the round ends there or at the first pod not Running and Ready,
        Parallel too. So under OrderedReady a broken pod stops everything, a rollback included
        (kubernetes/kubernetes#67250): it must be deleted for the controller to go on; under
        Parallel a rollback replaces it (it is not on updateRevision). currentReplicas and
        updatedReplicas count the pods not Terminating. Pods never fail here (restartPolicy
        Always), so the controller's deletion of Failed and Succeeded pods has nothing to do.
        """
        spec = sts.get("spec", {})
        ns = key[3]
        update = template_revision(sts)
        self.revisions.setdefault(key, {})[update] = copy.deepcopy(spec.get("template", {}))
        current = self.current.setdefault(key, update)
        want = spec.get("replicas", 1)
        monotonic = spec.get("podManagementPolicy") != "Parallel"
        strategy = spec.get("updateStrategy") or {}
        rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
        partition = (strategy.get("rollingUpdate") or {}).get("partition", 0) or 0
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        owned = {}
        for pkey, pod in self.objects(POD, ns):
            if self.owner_uid(pod, "StatefulSet") == sts["metadata"]["uid"]:
                try:
                    owned[int(pod["metadata"]["name"].rsplit("-", 1)[1])] = (pkey, pod)
                except ValueError:
                    pass
        terminating = lambda pod: "deletionTimestamp" in pod["metadata"]
        rev = lambda p: p["metadata"]["labels"].get("controller-revision-hash")

        def sync():
            for ordinal in range(want):
                if ordinal not in owned:
                    self.create_pod(key, sts, ordinal, current if rolling and ordinal < partition else update)
                    pkey = POD + (ns, f"{key[4]}-{ordinal}")
                    owned[ordinal] = (pkey, self.store.objects[pkey])
                    self.controller_log(key, "create", owned[ordinal][1])
                    if monotonic:
                        return
                elif monotonic and not self.healthy(owned[ordinal][1]):
                    return
            condemned = sorted((o for o in owned if o >= want), reverse=True)
            unhealthy = [o for o in reversed(condemned) if not self.healthy(owned[o][1])]
            for ordinal in condemned:
                pkey, pod = owned[ordinal]
                if terminating(pod):
                    if monotonic:
                        return
                    continue
                if monotonic and not self.healthy(pod) and ordinal != unhealthy[0]:
                    return
                if policy.get("whenScaled") == "Delete":
                    for claim in self.claims(sts, pod["metadata"]["name"]):
                        self.delete(PVC + (ns, claim))
                self.condemn(key, pkey, pod)
                if monotonic:
                    return
            if not rolling:
                return
            for ordinal in range(want - 1, partition - 1, -1):
                pkey, pod = owned[ordinal]
                if rev(pod) != update and not terminating(pod):
                    self.condemn(key, pkey, pod)
                    return
                if not self.healthy(pod):
                    return
        sync()
        # The status, from the pods as they are now (gone ones no longer listed).
        pods = [p for pkey, p in owned.values() if pkey in self.store.objects]
        live = [p for p in pods if not terminating(p)]
        ready = sum(1 for p in pods if self.healthy(p))
        updated = sum(1 for p in live if rev(p) == update)
        if rolling and updated == len(pods) == want and ready == want:
            current = self.current[key] = update
        status = {"observedGeneration": sts["metadata"].get("generation", 1), "replicas": len(pods),
                  "readyReplicas": ready, "currentReplicas": sum(1 for p in live if rev(p) == current),
                  "updatedReplicas": updated, "availableReplicas": ready, "currentRevision": current,
                  "updateRevision": update, "collisionCount": 0}
        for field in ("readyReplicas", "currentReplicas", "updatedReplicas", "collisionCount"):
            if not status[field]:
                del status[field]
        self.put_status(key, sts, status)

    # ---- the kubelet ------------------------------------------------------

    def secret_value(self, ns, ref, kind):
        res = ("", "v1", "secrets") if kind == "Secret" else ("", "v1", "configmaps")
        obj = self.store.objects.get(res + (ns, ref.get("name")))
        if obj is None:
            return None, f'{kind.lower()} "{ref.get("name")}" not found'
        data = obj.get("data") or {}
        if ref.get("key") not in data:
            return None, f"couldn't find key {ref.get('key')} in {kind} {ns}/{ref.get('name')}"
        value = data[ref["key"]]
        return (base64.b64decode(value).decode(errors="replace") if kind == "Secret" else value), None

    def field_value(self, pod, path):
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
                  "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                  "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", ""),
                  "status.podIPs": status.get("podIP", "")}
        if path in simple:
            return simple[path]
        m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        return ""

    def container_env(self, pod, container):
        """The container's environment as the kubelet builds it -> (env, error)."""
        ns = pod["metadata"]["namespace"]
        env = {}
        for source in container.get("envFrom", []):
            for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                ref = source.get(field)
                if ref is None:
                    continue
                res = ("", "v1", "secrets") if kind == "Secret" else ("", "v1", "configmaps")
                obj = self.store.objects.get(res + (ns, ref.get("name")))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    return None, f'{kind.lower()} "{ref.get("name")}" not found'
                for k, v in sorted((obj.get("data") or {}).items()):
                    env[source.get("prefix", "") + k] = base64.b64decode(v).decode(errors="replace") \
                        if kind == "Secret" else v
        for e in container.get("env", []):
            name = e.get("name")
            if "valueFrom" not in e:
                env[name] = expand(str(e.get("value", "")), env)
                continue
            source = e["valueFrom"]
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
                ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
                value, error = self.secret_value(ns, ref, kind)
                if error:
                    if ref.get("optional"):
                        continue
                    return None, error
                env[name] = value
            elif "fieldRef" in source:
                env[name] = self.field_value(pod, source["fieldRef"].get("fieldPath", ""))
            else:
                env[name] = "0"
        return env, None

    def volume_files(self, pod, volume_name):
        """{file name: text} of a ConfigMap or Secret volume -> (files, error)."""
        ns = pod["metadata"]["namespace"]
        for v in pod["spec"].get("volumes", []):
            if v.get("name") != volume_name:
                continue
            for kind, field, name_field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                src = v.get(field)
                if src is None:
                    continue
                res = ("", "v1", "configmaps") if kind == "ConfigMap" else ("", "v1", "secrets")
                obj = self.store.objects.get(res + (ns, src.get(name_field)))
                if obj is None:
                    if src.get("optional"):
                        return {}, None
                    return None, (f'MountVolume.SetUp failed for volume "{volume_name}" : '
                                  f'{kind.lower()} "{src.get(name_field)}" not found')
                data = dict(obj.get("data") or {})
                if kind == "Secret":
                    data = {k: base64.b64decode(x).decode(errors="replace") for k, x in data.items()}
                items = src.get("items")
                if items:
                    return {i.get("path", i["key"]): data.get(i["key"], "") for i in items}, None
                return data, None
            return {}, None
        return {}, None

    def container_mounts(self, pod, container):
        """The ConfigMap and Secret volumes mounted in a container -> (mounts, error).

        mounts: [(mount path, {file name: text}, {file name: mode}, single)], single when a
        subPath names one file of the volume (the mount path is then that file's path and
        the dict holds it under its base name)."""
        volumes = {v.get("name"): v for v in pod["spec"].get("volumes", [])}
        out = []
        for m in container.get("volumeMounts", []):
            vol = volumes.get(m.get("name"))
            if vol is None or not ("configMap" in vol or "secret" in vol):
                continue
            files, error = self.volume_files(pod, m.get("name"))
            if error:
                return None, error
            src = vol.get("configMap") or vol.get("secret") or {}
            default_mode = src.get("defaultMode", 0o644)
            modes = {i.get("path", i["key"]): i.get("mode", default_mode) for i in src.get("items") or [] if "key" in i}
            path = m.get("mountPath", "").rstrip("/") or "/"
            sub = m.get("subPath")
            if sub:
                if sub in files:
                    base = posixpath.basename(path)
                    out.append((path, {base: files[sub]}, {base: modes.get(sub, default_mode)}, True))
                else:
                    picked = {k[len(sub) + 1:]: x for k, x in files.items() if k.startswith(sub + "/")}
                    out.append((path, picked, {k: modes.get(sub + "/" + k, default_mode) for k in picked}, False))
            else:
                out.append((path, files, {k: modes.get(k, default_mode) for k in files}, False))
        return out, None

    @staticmethod
    def mount_files(mounts):
        """What a registry's start_node gets: {mount path: {file name: text}}."""
        files = {}
        for path, content, _, _ in mounts:
            files[path] = {**files.get(path, {}), **content}
        return files

    @staticmethod
    def data_paths(registry):
        return tuple(getattr(registry, "DATA_PATHS", ()))

    def claim_uids(self, pod, registry):
        """{data path: uid of the claim mounted there} for the registry's data paths on claims."""
        ns = pod["metadata"]["namespace"]
        paths = {p.rstrip("/"): p for p in self.data_paths(registry)}
        uids = {}
        for c in pod["spec"].get("containers", []):
            for m in c.get("volumeMounts", []):
                path = paths.get(m.get("mountPath", "").rstrip("/"))
                if path is None:
                    continue
                for v in pod["spec"].get("volumes", []):
                    if v.get("name") == m.get("name") and "persistentVolumeClaim" in v:
                        pvc = self.store.objects.get(PVC + (ns, v["persistentVolumeClaim"].get("claimName")))
                        uids[path] = pvc["metadata"]["uid"] if pvc else "missing"
        return uids

    def keep_arg(self, registry, kept):
        """stop_node's keep_data for the data paths kept: True (all), False (none) or the tuple of them."""
        paths = self.data_paths(registry)
        kept = tuple(p for p in paths if p in kept)
        if not paths or not kept:
            return False
        return True if len(kept) == len(paths) else kept

    def restart_keep(self, pod, container, registry):
        """keep_data for a container restarting in its pod: what is on the pod's volumes stays, the
        container's own file system is new."""
        mounted = {m.get("mountPath", "").rstrip("/") for m in container.get("volumeMounts", [])}
        return self.keep_arg(registry, {p for p in self.data_paths(registry) if p.rstrip("/") in mounted})

    @staticmethod
    def quantity(text):
        """A resource quantity (2Gi, 512Mi, 1G, 1.5Gi, 1000000) -> bytes."""
        m = re.match(r"^\s*([0-9.]+)\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?\s*$", str(text))
        if not m:
            raise ValueError(f"quantities must match the regular expression: {text!r}")
        factor = {None: 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
                  "k": 10 ** 3, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15,
                  "E": 10 ** 18}[m.group(2)]
        return int(float(m.group(1)) * factor)

    def shm_bytes(self, pod, container):
        """The size `df` shows for the container's /dev/shm: a Memory emptyDir's sizeLimit (none:
        unbounded, float('inf')); a disk emptyDir or another volume: the node's disk, taken as
        unbounded; nothing mounted there: None (the runtime's 64 MiB; the registry decides)."""
        for m in container.get("volumeMounts", []):
            if m.get("mountPath", "").rstrip("/") != "/dev/shm":
                continue
            vol = next((v for v in pod["spec"].get("volumes", []) if v.get("name") == m.get("name")), None)
            if vol is None:
                return None
            empty = vol.get("emptyDir")
            if empty is not None and empty.get("medium") == "Memory" and empty.get("sizeLimit") is not None:
                try:
                    return self.quantity(empty["sizeLimit"])
                except ValueError:
                    return None
            return float("inf")
        return None

    def start_node(self, registry, key, pod, container, env, files, fqdn):
        """registry.start_node, with shm_bytes when the registry takes it."""
        kwargs = {}
        try:
            params = inspect.signature(registry.start_node).parameters
        except (TypeError, ValueError):
            params = {}
        if "shm_bytes" in params:
            kwargs["shm_bytes"] = self.shm_bytes(pod, container)
        return registry.start_node(key, env, container.get("image", ""), files, fqdn, **kwargs)

    def missing_claim(self, pod):
        ns = pod["metadata"]["namespace"]
        for v in pod["spec"].get("volumes", []):
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and PVC + (ns, claim) not in self.store.objects:
                return claim
        return None

    def registry_for(self, container):
        for registry in self.registries:
            if registry.IMAGE.search(container.get("image", "")):
                return registry
        return None

    def db_container(self, containers):
        """The first container whose image one of the registries runs -> (container, registry)."""
        for c in containers:
            registry = self.registry_for(c)
            if registry is not None:
                return c, registry
        return None, None

    def node_registry(self, pod_key):
        st = self.pods.get(pod_key)
        return st.get("registry") if st else None

    def handle(self, pod_key, method, path, headers, body, port):
        """One request reaching a pod's port: its database node answers, else nothing listens."""
        registry = self.node_registry(pod_key)
        if registry is None:
            raise NotListening("connection refused")
        return registry.handle(pod_key, method, path, headers, body, port=port)

    def probe_ok(self, key, pod, container, probe, registry):
        if probe is None:
            return True
        if registry is None:
            return True
        get = probe.get("httpGet")
        if get is None:
            return registry.running(key)
        port = get.get("port")
        if isinstance(port, str):
            port = next((p.get("containerPort") for p in container.get("ports", []) if p.get("name") == port), None)
        return registry.probe(key, get.get("path", "/"), port)

    def proxy_url(self, key):
        """A pod's http_proxy: this double, the pod named as proxy credentials (NS:NAME), so that
        the pod network knows where a request comes from (Proxy-Authorization, never forwarded)."""
        ns, name = key.split("/", 1)
        return f"http://{ns}:{name}@127.0.0.1:{self.proxy_port}"

    # ---- containers run for real (RUNNER_IMAGE) --------------------------

    @staticmethod
    def is_runner(container):
        return bool(RUNNER_IMAGE.search(container.get("image", "")))

    @staticmethod
    def runner_command(container, env):
        """command + args, $(VAR) expanded; without a command, curlimages/curl's entrypoint
        (`curl ARGS`, unless the first arg is a command)."""
        command = [expand(str(a), env) for a in container.get("command") or []]
        args = [expand(str(a), env) for a in container.get("args") or []]
        if command:
            return command + args
        if args and not args[0].startswith("-") and shutil.which(args[0]):
            return args
        return ["curl"] + args

    @staticmethod
    def runner_files(mounts):
        """container_mounts -> ContainerRunner's files {mount path: {name: (text, mode)} | (text, mode)}."""
        files = {}
        for path, content, modes, single in mounts:
            if single:
                (fname, text), = content.items()
                files[path] = (text, modes.get(fname, 0o644) & 0o777)
            else:
                entry = files.setdefault(path, {})
                for fname, text in content.items():
                    entry[fname] = (text, modes.get(fname, 0o644) & 0o777)
        return files

    def start_runners(self, key, pod, containers, envs, mounts):
        for c in containers:
            if not self.is_runner(c):
                continue
            env = dict(envs[c["name"]])
            env.setdefault("HOSTNAME", pod["spec"].get("hostname") or pod["metadata"]["name"])
            env.update(self.extra_env)
            self.runner.start(key, c["name"], self.runner_command(c, env), env,
                              self.runner_files(mounts.get(c["name"], [])), proxy=self.proxy_url(key))

    def runner_status(self, key, st, pod, c, terminating):
        name = c["name"]
        counts = st.setdefault("runner_restarts", {})
        if self.runner.has(key):
            counts[name] = self.runner.restarts(key, name)
        restarts = counts.get(name, 0)
        running = self.runner.running(key, name)
        seen = st.setdefault("runner_started", {})
        cs = {"name": name, "image": c.get("image", ""), "imageID": "", "restartCount": restarts,
              "started": running}
        if running:
            if seen.get(name, (None,))[0] != restarts:
                seen[name] = (restarts, now())
            cs["state"] = {"running": {"startedAt": seen[name][1]}}
        elif terminating and name in seen:
            cs["state"] = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": seen[name][1],
                                          "finishedAt": now()}}
        elif restarts:
            cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                       f"back-off restarting failed container={name} pod={pod['metadata']['name']}_"
                                       f"{pod['metadata']['namespace']}({pod['metadata']['uid']})"}}
        else:
            cs["state"] = {"waiting": {"reason": "ContainerCreating", "message": ""}}
        cs["ready"] = running and not terminating     # no probes: ready while running
        cs["containerID"] = "containerd://" + hashlib.sha256(f"{key}/{name}/{restarts}".encode()).hexdigest()
        return cs

    def stop_runners(self, key, grace, then=None):
        """SIGTERM to the pod's runner containers, SIGKILL after grace seconds; on a thread, no lock held.
        -> the result dict, {"done": True} once they are gone; then() runs afterwards."""
        result = {"done": False}

        def work():
            try:
                self.runner.stop(key, grace_seconds=grace)
            except Exception as e:  # a double's bug must not wedge the pod
                print(f"kube-api-double: stopping containers of {key}: {e!r}", file=sys.stderr, flush=True)
            result["done"] = True
            if then is not None:
                then()
        threading.Thread(target=work, daemon=True, name=f"stop {key}").start()
        return result

    @staticmethod
    def hook_command(container, kind):
        """The exec command of a container's postStart/preStop hook, or None."""
        cmd = (((container.get("lifecycle") or {}).get(kind) or {}).get("exec") or {}).get("command")
        return [str(a) for a in cmd] if cmd else None

    def backoff(self, st):
        """Like the kubelet's crash back-off (10s doubling to 5m), scaled down: 1s doubling to 30s."""
        return min(30.0, 1.0 * 2 ** max(0, st["failures"] - 1))

    def sync_pod(self, pkey, pod):
        key = self.pod_key(pod)
        st = self.pods.get(key)
        if st is None or st["uid"] != pod["metadata"]["uid"]:
            if st is not None:
                self.stopped(key)
            st = self.pods[key] = {"uid": pod["metadata"]["uid"], "started": None, "restarts": 0,
                                   "next_try": 0.0, "waiting": None, "live_fail": None, "registry": None,
                                   "failures": 0, "hook": None, "ctx": None, "prestop": None}
        status = copy.deepcopy(pod.get("status", {}))
        if "podIP" not in status:
            n = next(self.ips)
            ip = f"10.1.{n // 250}.{n % 250}"
            status.update({"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": HOST_IP,
                           "hostIPs": [{"ip": HOST_IP}], "startTime": now()})
            pod["status"] = status
        containers = pod["spec"].get("containers", [])
        db, registry = self.db_container(containers)
        st["registry"] = registry
        terminating = "deletionTimestamp" in pod["metadata"]
        t = time.monotonic()
        if st["hook"] is not None and st["hook"].get("done"):
            # A postStart hook finished: Running when it exited 0, else killed and restarted.
            hook, st["hook"] = st["hook"], None
            if hook["code"] == 0:
                st["started"], st["waiting"], st["failures"] = now(), None, 0
            else:
                if registry is not None:
                    registry.stop_node(key, keep_data=self.restart_keep(pod, db, registry))
                st["restarts"] += 1
                st["failures"] += 1
                st["next_try"] = t + self.backoff(st)
                st["waiting"] = ("CrashLoopBackOff",
                                 f"back-off {int(self.backoff(st))}s restarting failed container={hook['container']} "
                                 f"pod={pod['metadata']['name']}_{pod['metadata']['namespace']}({pod['metadata']['uid']})")
                self.event(pod, "Warning", "FailedPostStartHook",
                           f"PostStartHook failed: command {' '.join(hook['command'])!r} exited with {hook['code']}: "
                           f"{hook['tail']}")
        if st["started"] is None and st["hook"] is None and t >= st["next_try"] and not terminating:
            claim = self.missing_claim(pod)
            waiting = None
            if claim:
                waiting = ("ContainerCreating", f'persistentvolumeclaim "{claim}" not found')
            if key in self.stopping:
                waiting = ("ContainerCreating", "")      # the old container of this name is still stopping
            envs, mounts = {}, {}
            if waiting is None:
                for c in containers:
                    env, error = self.container_env(pod, c)
                    if error:
                        waiting = ("CreateContainerConfigError", error)
                        break
                    envs[c["name"]] = env
            if waiting is None:
                for c in containers:
                    if c is db or self.is_runner(c) or self.hook_command(c, "postStart") or \
                            self.hook_command(c, "preStop"):
                        m, error = self.container_mounts(pod, c)
                        if error:
                            waiting = ("ContainerCreating", error)
                            break
                        mounts[c["name"]] = m
            if waiting is None:
                started = True
                st["ctx"] = {"envs": envs, "mounts": mounts, "containers": copy.deepcopy(containers),
                             "grace": pod["spec"].get("terminationGracePeriodSeconds", 30),
                             "name": pod["metadata"]["name"]}
                if db is not None:
                    # Each data path's data survives when the same claim is mounted there as before.
                    uids = self.claim_uids(pod, registry)
                    previous = self.volumes.get(key) or {}
                    keep = self.keep_arg(registry, {p for p, u in uids.items() if previous.get(p) == u})
                    if keep is not True:
                        registry.stop_node(key, keep_data=keep)
                    self.volumes[key] = uids
                    spec = pod["spec"]
                    fqdn = f"{spec['hostname']}.{spec['subdomain']}.{pod['metadata']['namespace']}.svc.cluster.local" \
                        if spec.get("subdomain") and spec.get("hostname") else None
                    started = self.start_node(registry, key, pod, db, envs[db["name"]],
                                              self.mount_files(mounts[db["name"]]), fqdn)
                # The other containers start with it, whatever becomes of it.
                self.start_runners(key, pod, containers, envs, mounts)
                hooks = [(c["name"], self.hook_command(c, "postStart")) for c in containers
                         if self.hook_command(c, "postStart")]
                if started and hooks:
                    # Not Running until every postStart hook has exited 0.
                    st["hook"] = {"done": False}
                    st["waiting"] = ("ContainerCreating", "")
                    self.run_hooks(key, st, "postStart", hooks, timeout=POSTSTART_TIMEOUT)
                elif started:
                    st["started"], st["waiting"], st["failures"] = now(), None, 0
                else:
                    st["restarts"] += 1
                    st["failures"] += 1
                    st["next_try"] = t + 1.0
                    st["waiting"] = ("CrashLoopBackOff",
                                     f"back-off restarting failed container {db['name']} in pod "
                                     f"{pod['metadata']['name']}_{pod['metadata']['namespace']}")
            else:
                st["waiting"] = waiting
                st["next_try"] = t + 0.5
        # Container statuses, readiness, liveness.
        statuses, all_ready = [], True
        for c in containers:
            if self.is_runner(c):
                cs = self.runner_status(key, st, pod, c, terminating)
                all_ready &= cs["ready"]
                statuses.append(cs)
                continue
            c_registry = registry if c is db else None
            cs = {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": st["restarts"],
                  "started": st["started"] is not None}
            if st["started"] is None:
                reason, message = st["waiting"] or ("ContainerCreating", "")
                cs["state"] = {"waiting": {"reason": reason, "message": message}}
                cs["ready"] = False
            else:
                if c_registry is not None and not c_registry.running(key) and not terminating:
                    # The node went away under a running pod: the container restarts.
                    st["started"], st["restarts"] = None, st["restarts"] + 1
                    cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": ""}}
                    cs["ready"] = False
                else:
                    live = c.get("livenessProbe")
                    if c_registry is not None and live and not terminating and \
                            not self.probe_ok(key, pod, c, live, c_registry):
                        allowed = (live.get("initialDelaySeconds", 0) + live.get("periodSeconds", 10) *
                                   live.get("failureThreshold", 3))
                        st["live_fail"] = st["live_fail"] or t
                        if t - st["live_fail"] >= allowed:
                            c_registry.stop_node(key, keep_data=self.restart_keep(pod, c, c_registry))
                            st["started"], st["restarts"], st["live_fail"] = None, st["restarts"] + 1, None
                    else:
                        st["live_fail"] = None
                    cs["state"] = {"running": {"startedAt": st["started"] or now()}}
                    cs["ready"] = st["started"] is not None and not terminating and \
                        self.probe_ok(key, pod, c, c.get("readinessProbe"), c_registry)
            cs["containerID"] = f"containerd://{hashlib.sha256((key + str(st['restarts'])).encode()).hexdigest()}"
            all_ready &= cs["ready"]
            statuses.append(cs)
        started = st["started"] is not None
        cond = lambda kind, ok: {"type": kind, "status": "True" if ok else "False"}
        conditions = [cond("PodReadyToStartContainers", True), cond("Initialized", True),
                      cond("Ready", all_ready and started), cond("ContainersReady", all_ready and started),
                      cond("PodScheduled", True)]
        old = {c["type"]: c for c in status.get("conditions", [])}
        for c in conditions:
            prev = old.get(c["type"])
            c["lastTransitionTime"] = prev["lastTransitionTime"] if prev and prev.get("status") == c["status"] \
                and prev.get("lastTransitionTime") else now()
            if c["type"] in ("Ready", "ContainersReady") and c["status"] == "False":
                c["reason"] = "ContainersNotReady"
                c["message"] = "containers with unready status: [" + " ".join(
                    s["name"] for s in statuses if not s["ready"]) + "]"
        status.update({"phase": "Running" if started else "Pending", "conditions": conditions,
                       "containerStatuses": statuses, "qosClass": "BestEffort"})
        self.put_status(pkey, pod, status)

    # ---- lifecycle hooks ----------------------------------------------

    def event(self, pod, type_, reason, message):
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        ename = f"{name}.{next(self.store.version)}"
        self.store.objects[("", "v1", "events", ns, ename)] = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": ename, "namespace": ns, "resourceVersion": str(next(self.store.version))},
            "involvedObject": {"kind": "Pod", "name": name, "namespace": ns, "uid": pod["metadata"].get("uid")},
            "type": type_, "reason": reason, "message": message, "lastTimestamp": now(), "count": 1,
            "source": {"component": "kubelet", "host": NODE_NAME},
        }

    def run_hooks(self, key, st, kind, hooks, timeout, then=None):
        """Runs the hooks [(container name, command)] one after the other on a background thread.

        The result lands in st["hook"] (postStart) or st["prestop"] (preStop) as
        {"done": True, "code", "container", "command", "tail"}; `then` runs afterwards (no lock held)."""
        ctx = st["ctx"]
        slot = "hook" if kind == "postStart" else "prestop"
        result = st[slot] = {"done": False}

        def work():
            with self.hooks_lock:
                self.hooks_running[key] += 1
            try:
                deadline = time.monotonic() + timeout
                outcome = {"code": 0, "container": "", "command": [], "tail": ""}
                for name, command in hooks:
                    left = max(0.1, deadline - time.monotonic())
                    code, tail = self.exec_hook(key, ctx, kind, name, command, left)
                    outcome = {"code": code, "container": name, "command": command, "tail": tail}
                    if code != 0:
                        break
            except Exception as e:  # a double's bug must not wedge the pod
                outcome = {"code": 1, "container": "", "command": [], "tail": f"kube-api-double: {e!r}"}
            finally:
                with self.hooks_lock:
                    self.hooks_running[key] -= 1
                    if self.hooks_running[key] <= 0:
                        self.hooks_running.pop(key, None)
            result.update(outcome)
            result["done"] = True
            if then is not None:
                then(result)
        threading.Thread(target=work, daemon=True).start()

    def exec_hook(self, key, ctx, kind, container_name, command, timeout):
        """Runs one exec hook for real on this machine -> (exit code, output tail)."""
        tmp = tempfile.mkdtemp(prefix="kube-hook-")
        try:
            mounts = ctx["mounts"].get(container_name, [])
            for path, content, modes, single in mounts:
                for fname, text in content.items():
                    target = tmp + (path if single else posixpath.join(path, fname))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "w") as f:
                        f.write(text)
                    os.chmod(target, modes.get(fname, 0o644) & 0o777)
            prefixes = sorted({p for p, _, _, _ in mounts}, key=len, reverse=True)

            def rewrite(arg):
                for p in prefixes:
                    arg = re.sub(r"(?<![\w.\-/])" + re.escape(p) + r"(?=/|$|[^\w.\-])", lambda _: tmp + p, arg)
                return arg
            argv = [rewrite(a) for a in command]
            env = dict(ctx["envs"].get(container_name, {}))
            env["http_proxy"] = self.proxy_url(key)
            env["HOSTNAME"] = ctx["name"]
            env["PATH"] = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
            try:
                proc = subprocess.Popen(argv, env=env, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                code, out = (126 if isinstance(e, PermissionError) else 127), str(e).encode()
            else:
                try:
                    out, _ = proc.communicate(timeout=timeout)
                    code = proc.returncode
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    out, _ = proc.communicate()
                    code = 137
                if code < 0:
                    code = 128 - code
            tail = out.decode(errors="replace")[-2000:]
            self.hook_log({"pod": key, "container": container_name, "hook": kind, "command": command,
                           "argv": argv, "exit_code": code, "output_tail": tail})
            return code, tail
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def hook_log(self, line):
        if self.hook_log_path:
            line = {"time": now(), **line}
            with self.hook_log_lock, open(self.hook_log_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def prestop_hooks(self, st):
        ctx = st.get("ctx") or {}
        return [(c["name"], self.hook_command(c, "preStop")) for c in ctx.get("containers", [])
                if self.hook_command(c, "preStop")]

    def delete_pod(self, pkey):
        """A pod deleted (DELETE, eviction, scale-down, rolling update): Terminating while preStop hooks
        run and runner containers stop, gone at once without either.

        As the kubelet does it, each container at once: one with a preStop hook gets SIGTERM after
        it (the database node stops then), one without gets SIGTERM now (the node stops now); all
        within terminationGracePeriodSeconds."""
        pod = self.store.objects.get(pkey)
        if pod is None:
            return None
        if "deletionTimestamp" in pod["metadata"]:
            return pod
        key = self.pod_key(pod)
        st = self.pods.get(key)
        mine = st is not None and st["uid"] == pod["metadata"]["uid"]
        hooks = self.prestop_hooks(st) if mine and st["started"] else []
        runners = mine and self.runner.has(key)
        if not hooks and not runners:
            self.store.forget(pkey)
            return pod
        grace = (st.get("ctx") or {}).get("grace", pod["spec"].get("terminationGracePeriodSeconds", 30))
        pod["metadata"]["deletionTimestamp"] = now()
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        pod["metadata"]["resourceVersion"] = str(next(self.store.version))
        registry = st.get("registry")

        def node_stops(_=None):
            with self.store.lock:
                if not st.get("node_stopped"):
                    st["node_stopped"] = True
                    self.stop(key, registry)
        if hooks:
            self.run_hooks(key, st, "preStop", hooks, timeout=grace, then=node_stops)
        else:
            st["node_stopped"] = True
            self.stop(key, registry)
        if runners:
            st["runner_stop"] = self.stop_runners(key, grace)
        return pod

    @staticmethod
    def terminated(st):
        """Has a pod that delete_pod made Terminating finished (preStop hooks, runner containers)?"""
        if st is None or (st.get("prestop") is None and st.get("runner_stop") is None):
            return False
        return all(x is None or x.get("done") for x in (st.get("prestop"), st.get("runner_stop")))

    def stopped(self, key):
        """A pod that went away: its node stops (after its preStop hooks, when it never got to run them),
        its data kept when its claims are still there; its runner containers stop. Meanwhile a new pod
        of that name waits."""
        st = self.pods.pop(key, None)
        hooks = self.prestop_hooks(st) if st and st["started"] and st.get("prestop") is None else []
        registry = (st or {}).get("registry") or self.stopped_registry.get(key)
        if st is not None and st.get("registry") is not None:
            self.stopped_registry[key] = st["registry"]
        runners = self.runner.has(key)
        if not hooks:
            if st is None or not st.get("node_stopped"):
                if st is not None:
                    st["node_stopped"] = True       # a late preStop callback must not stop a new node
                self.stop(key, registry)
            if not runners:
                return
        self.stopping.add(key)
        pending = [int(bool(hooks)) + int(runners)]
        grace = ((st or {}).get("ctx") or {}).get("grace", 30)

        def one_done(stop_node=False):
            with self.store.lock:
                if stop_node:
                    self.stop(key, registry)
                pending[0] -= 1
                if pending[0] <= 0:
                    self.stopping.discard(key)
        if hooks:
            self.run_hooks(key, st, "preStop", hooks, timeout=grace, then=lambda _: one_done(True))
        if runners:
            self.stop_runners(key, grace, then=one_done)

    def stop(self, key, registry):
        """The pod's node stops; each data path's data kept while the claim it is on still exists."""
        if registry is None:
            return
        ns, name = key.split("/", 1)
        uids = self.volumes.get(key) or {}
        current = {pvc["metadata"]["uid"] for _, pvc in self.objects(PVC, ns)}
        kept = {p for p, u in uids.items() if u in current}
        registry.stop_node(key, keep_data=self.keep_arg(registry, kept))
        kept_uids = {p: u for p, u in uids.items() if p in kept}
        if kept_uids:
            self.volumes[key] = kept_uids
        else:
            self.volumes.pop(key, None)

    # ---- one pass ---------------------------------------------------------

    def reconcile(self):
        store = self.store
        sets = {}
        for key, sts in self.objects(STS):
            sets[sts["metadata"]["uid"]] = key
            if sts["metadata"].get("annotations", {}).get(NEVER_READY) == "true":
                continue
            self.statefulset(key, sts)
        for key in list(self.revisions):
            if key not in store.objects:
                self.revisions.pop(key, None)
                self.current.pop(key, None)
        # The garbage collector: pods and claims whose owner is gone.
        uids = {o["metadata"].get("uid") for o in store.objects.values()}
        for res in (POD, PVC):
            for key, obj in self.objects(res):
                refs = obj["metadata"].get("ownerReferences", [])
                if refs and all(r.get("uid") not in uids for r in refs):
                    if res == POD:
                        self.delete_pod(key)
                    else:
                        store.forget(key)
        # The kubelet.
        present = set()
        for key, pod in self.objects(POD):
            st = self.pods.get(self.pod_key(pod))
            if "deletionTimestamp" in pod["metadata"] and self.terminated(st):
                store.forget(key)           # Terminating, and its preStop hooks and containers are through
                continue
            present.add(self.pod_key(pod))
            self.sync_pod(key, pod)
        for key in [k for k in self.pods if k not in present]:
            self.stopped(key)
        self.update_dns()
        # The disruption controller.
        for key, pdb in self.objects(PDB):
            spec = pdb.get("spec", {})
            pods = [p for _, p in self.objects(POD, key[3])
                    if selector_match(p["metadata"].get("labels", {}), spec.get("selector"))]
            healthy = sum(1 for p in pods if self.healthy(p))
            # Like the disruption controller: the controllers' scale, not the pods there now
            # (an integer minAvailable counts the pods).
            expected = len(pods)
            if not isinstance(spec.get("minAvailable"), int):
                scales, loose = {}, 0
                for p in pods:
                    owner = self.owner_uid(p, "StatefulSet")
                    sts = next((o for _, o in self.objects(STS, key[3]) if o["metadata"]["uid"] == owner), None)
                    if sts is None:
                        loose += 1
                    else:
                        scales[owner] = sts["spec"].get("replicas", 1)
                expected = sum(scales.values()) + loose
            if "minAvailable" in spec:
                desired = scaled(spec["minAvailable"], expected)
            else:
                desired = max(0, expected - scaled(spec.get("maxUnavailable", 0), expected))
            allowed = max(0, healthy - desired)
            status = {"observedGeneration": pdb["metadata"].get("generation", 1), "currentHealthy": healthy,
                      "desiredHealthy": desired, "expectedPods": expected, "disruptionsAllowed": allowed,
                      "conditions": [{"type": "DisruptionAllowed", "status": "True" if allowed else "False",
                                      "reason": "SufficientPods" if allowed else "InsufficientPods",
                                      "message": "", "observedGeneration": pdb["metadata"].get("generation", 1),
                                      "lastTransitionTime": (pdb.get("status", {}).get("conditions") or
                                                             [{}])[0].get("lastTransitionTime") or now()}]}
            if status["conditions"][0]["status"] != ((pdb.get("status", {}).get("conditions") or [{}])[0]).get("status"):
                status["conditions"][0]["lastTransitionTime"] = now()
            self.put_status(key, pdb, status)

    def update_dns(self):
        pods_by_ns = collections.defaultdict(list)
        for _, pod in self.objects(POD):
            # Endpoints are pods with an IP (a sandbox), Ready or not; readiness is checked below.
            if pod.get("status", {}).get("podIP"):
                pods_by_ns[pod["metadata"]["namespace"]].append(pod)
        pod_names, services = {}, {}
        for (_, _, _, ns, name), svc in self.objects(("", "v1", "services")):
            spec = svc.get("spec", {})
            selector = spec.get("selector")
            if not selector:
                continue
            publish = spec.get("publishNotReadyAddresses") is True
            headless = spec.get("clusterIP") == "None"
            endpoints = []
            for pod in pods_by_ns.get(ns, []):
                labels = pod["metadata"].get("labels", {})
                if not all(labels.get(k) == v for k, v in selector.items()):
                    continue
                if not (publish or self.ready(pod)):
                    continue
                if "deletionTimestamp" in pod["metadata"] and not publish:
                    continue                # terminating: out of the endpoints unless not-ready ones are published
                ports = {p.get("name"): p.get("containerPort") for c in pod["spec"].get("containers", [])
                         for p in c.get("ports", []) if p.get("name")}
                endpoints.append((self.pod_key(pod), ports))
                if headless and pod["spec"].get("subdomain") == name and pod["spec"].get("hostname"):
                    pod_names[f"{pod['spec']['hostname']}.{name}.{ns}.svc.cluster.local"] = self.pod_key(pod)
            entry = {"endpoints": endpoints, "ports": spec.get("ports", []), "headless": headless}
            for fqdn in (f"{name}.{ns}.svc.cluster.local",):
                services[fqdn] = entry
        self.dns = {"pods": pod_names, "services": services}

    # ---- the API server's proxy and eviction ---------------------------

    def target(self, ns, kind, spec):
        """-> (pod key, pod IP, port) for a proxy request; ApiError when there is nothing to reach."""
        parts = spec.split(":")
        if len(parts) == 3:
            parts = parts[1:]           # scheme:name:port
        name, port = parts[0], (parts[1] if len(parts) > 1 else "")
        if kind == "pods":
            pod = self.store.objects.get(POD + (ns, name))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
            ports = [p for c in pod["spec"].get("containers", []) for p in c.get("ports", [])]
            if port == "":
                number = ports[0].get("containerPort") if ports else 80
            elif port.isdigit():
                number = int(port)
            else:
                number = next((p.get("containerPort") for p in ports if p.get("name") == port), None)
                if number is None:
                    raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
            return self.pod_key(pod), pod.get("status", {}).get("podIP", ""), number
        svc = self.store.objects.get(("", "v1", "services", ns, name))
        if svc is None:
            raise ApiError(404, "NotFound", f'services "{name}" not found', {"name": name, "kind": "services"})
        sports = svc.get("spec", {}).get("ports", [])
        chosen = None
        for p in sports:
            if port == "" or p.get("name") == port or str(p.get("port")) == port:
                chosen = p
                break
        entry = self.dns["services"].get(f"{name}.{ns}.svc.cluster.local")
        if chosen is None or entry is None or not entry["endpoints"]:
            raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
        pod_key, named = random.choice(entry["endpoints"])
        target = chosen.get("targetPort", chosen.get("port"))
        if isinstance(target, str):
            target = named.get(target)
            if target is None:
                raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
        pod = self.store.objects.get(POD + tuple(pod_key.split("/", 1)))
        return pod_key, (pod or {}).get("status", {}).get("podIP", ""), target

    def evict(self, ns, name):
        pod = self.store.objects.get(POD + (ns, name))
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        for key, pdb in self.objects(PDB, ns):
            if selector_match(pod["metadata"].get("labels", {}), pdb.get("spec", {}).get("selector")):
                st = pdb.get("status", {})
                if st.get("disruptionsAllowed", 0) < 1 and self.healthy(pod):
                    raise ApiError(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                                   {"causes": [{"reason": "DisruptionBudget",
                                                "message": f"The disruption budget {key[4]} needs "
                                                           f"{st.get('desiredHealthy', 0)} healthy pods and has "
                                                           f"{st.get('currentHealthy', 0)} currently"}]})
                st["disruptionsAllowed"] = max(0, st.get("disruptionsAllowed", 0) - 1)
        self.delete_pod(POD + (ns, name))
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}


FAULT_KINDS = ["429", "500", "502", "503", "504", "reset"]


class Faults:
    """Which requests fail, and how: a seeded pick per request number."""

    def __init__(self, spec):
        seed, percent = spec.split(":")
        self.seed, self.percent = seed, int(percent)
        self.count = itertools.count(1)
        self.lock = threading.Lock()

    def pick(self):
        with self.lock:
            n = next(self.count)
        roll = int.from_bytes(hashlib.sha256(f"{self.seed}:{n}".encode()).digest()[:8], "big")
        if roll % 100 >= self.percent:
            return None
        return FAULT_KINDS[(roll >> 32) % len(FAULT_KINDS)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store = None
    log = None
    faults = None
    kubelet = None

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fail(self, kind):
        """Answers as an overloaded server (or the proxy before it) would."""
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            self.wfile = io.BytesIO()
            return
        code = int(kind)
        if code in (429, 502):
            text = b"Too many requests, please try again later.\n" if code == 429 else b"Bad Gateway\n"
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            if code == 429:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        reason = {500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}[code]
        self.reply(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": f"injected {reason}", "reason": reason, "code": code})

    def handle_any(self, method):
        if self.kubelet is not None and self.path[:7].lower() == "http://":
            self.pod_network(method)
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        agent = self.headers.get("User-Agent") or "-"
        # Only stack's requests fail: the tests' own reads must not.
        fault = self.faults.pick() if self.faults and agent.startswith("stack/") else None
        if self.log:
            # One line a request, method and path first: tests count lines and grep them.
            line = f"FAULT {fault} {method} {self.path}" if fault else f"{method} {self.path} user-agent={agent}"
            with open(self.log, "a") as f:
                f.write(line + "\n")
        if fault:
            self.fail(fault)
            return
        try:
            if self.kubelet is not None:
                proxy = PROXY_PATH.match(url.path)
                if proxy:
                    self.proxy(method, url, proxy, body)
                    return
                forward = PORTFORWARD_PATH.match(url.path)
                if forward and method in ("GET", "POST"):
                    self.portforward(url, forward)
                    return
                with self.store.lock:
                    self.kubelet.reconcile()
                    evict = EVICTION_PATH.match(url.path)
                    if evict and method == "POST":
                        self.reply(201, self.kubelet.evict(evict.group(1), evict.group(2)))
                        return
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

    def couch_only(self):
        # Without a database flag these methods are as unsupported as they always were here.
        if self.kubelet is None:
            self.send_error(501, "Unsupported method (%r)" % self.command)
        else:
            self.handle_any(self.command)

    do_PUT = do_HEAD = do_OPTIONS = do_COPY = couch_only

    def proxy(self, method, url, match, body):
        """pods/NAME[:PORT]/proxy and services/NAME[:PORT]/proxy, as the API server proxies them."""
        ns, kind, spec, rest = match.groups()
        with self.store.lock:
            self.kubelet.reconcile()
            pod_key, ip, port = self.kubelet.target(ns, kind, spec)
        path = (rest or "/") + ("?" + url.query if url.query else "")
        # The API server authenticated the caller itself: Authorization never reaches the pod.
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED
                   and not k.lower().startswith("impersonate-")}
        try:
            status, out_headers, out = self.kubelet.handle(pod_key, method, path, headers, body, port=port)
        except NotListening:
            raise ApiError(503, "ServiceUnavailable",
                           f"error trying to reach service: dial tcp {ip}:{port}: connect: connection refused")
        # The pod's own Server and Date, as a reverse proxy passes them on.
        self.log_request(status)
        self.send_response_only(status)
        for k, v in out_headers.items():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(out)

    def portforward(self, url, match):
        """pods/NAME/portforward?ports=P: the API server's port-forward, WebSocket (v4.channel.k8s.io).

        What answers before the upgrade, as the real API server and kubelet do: a missing pod is
        the API server's 404 Status; a pod without spec.nodeName its 400 Status `pod NAME does
        not have a host assigned`; then the kubelet answers and the API server passes that on
        as it is (text/plain, not a Status): `ports` missing or invalid is a 400, a pod whose
        sandbox does not run (no pod IP yet) a 500 `pod not found ("NAME_NAMESPACE")`. A pod
        that has a sandbox but whose container does not listen (Pending, starting, crashed,
        Terminating) upgrades, and each port's error channel says `connection refused`
        (portforward.py). The store lock is not held while the forward runs."""
        import portforward
        ns, name = match.groups()
        with self.store.lock:
            self.kubelet.reconcile()
            pod = self.store.objects.get(POD + (ns, name))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
            if not pod["spec"].get("nodeName"):
                raise ApiError(400, "BadRequest", f"pod {name} does not have a host assigned")
            key = self.kubelet.pod_key(pod)
            sandbox = bool(pod.get("status", {}).get("podIP")) and \
                pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            registry = self.kubelet.node_registry(key) or \
                self.kubelet.db_container(pod["spec"].get("containers", []))[1]
        self.close_connection = True
        try:
            ports = portforward.parse_ports(parse_qs(url.query).get("ports"))
        except ValueError as e:
            portforward._plain(self.wfile, 400, "Bad Request", str(e).encode())
            return
        if not sandbox:
            portforward._plain(self.wfile, 500, "Internal Server Error", f'pod not found ("{name}_{ns}")'.encode())
            return
        if registry is None:
            def connect(port):
                raise NotListening("connection refused")
        else:
            connect = portforward.registry_connect(registry, key)
        portforward.serve(self.rfile, self.wfile, self.headers, ports, connect, pod_key=key)

    def pod_network(self, method):
        """An absolute-form request (`GET http://HOST:PORT/path`): a pod's HTTP traffic through its
        http_proxy, the pod network. HOST resolves as from a pod; every header, Authorization
        included, reaches the node. Not an API request: not in --log, no --faults."""
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        host = (url.hostname or "").lower()
        port = url.port or 80
        path = (url.path or "/") + ("?" + url.query if url.query else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP
                   and not k.lower().startswith("proxy-")}
        kubelet = self.kubelet
        from_pod = None
        auth = self.headers.get("Proxy-Authorization") or ""
        if auth[:6].lower() == "basic ":
            try:
                ns, _, name = base64.b64decode(auth[6:].strip()).decode().partition(":")
                from_pod = f"{ns}/{name}" if ns and name else None
            except (ValueError, UnicodeDecodeError):
                from_pod = None
        with self.store.lock:
            target, ip = kubelet.pod_target(host, port, from_pod)
        status, out_headers, out = 502, {"Content-Type": "text/plain; charset=utf-8"}, b""
        if target is None:
            # What a Go proxy answers when the name does not resolve.
            out = f"dial tcp: lookup {host} on 10.96.0.10:53: no such host\n".encode()
        else:
            try:
                status, out_headers, out = kubelet.handle(target[0], method, path, headers, body, port=target[1])
            except NotListening:
                out = f"dial tcp {ip}:{target[1]}: connect: connection refused\n".encode()
        kubelet.hook_log({"proxy": method, "url": redact_query(self.path), "pod": target[0] if target else None,
                          "from": from_pod, "status": status})
        self.send_response_only(status)
        for k, v in out_headers.items():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(out)

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
            items = [store.present(k, o) for k, o in sorted(store.objects.items(), key=lambda kv: str(kv[0]))
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
            if kind == "Pod" and self.kubelet is not None:
                # Graceful: Terminating while its preStop hooks run, gone at once without any.
                pod = self.kubelet.delete_pod(key)
                return 200, store.present(key, pod) if key in store.objects else obj
            if kind != "Namespace":
                store.forget(key)
                return 200, obj
            # Like the namespace controller: Terminating first, gone (with
            # everything in it) a moment later, or as long as the annotation says.
            if "deletionTimestamp" not in obj["metadata"]:
                store.objects[key]["metadata"]["deletionTimestamp"] = now()
                store.objects[key]["status"] = {"phase": "Terminating"}
                seconds = annotation_seconds(obj, TERMINATING_SECONDS) or NAMESPACE_TERMINATION_SECONDS

                def finish():
                    with store.lock:
                        store.forget(key)
                        for k in [k for k in store.objects if k[3] == name]:
                            store.forget(k)
                threading.Timer(seconds, finish).start()
            return 200, copy.deepcopy(store.objects[key])
        if method == "POST":
            config = json.loads(body)
            name = config.get("metadata", {}).get("name")
            key = res + (ns, name)
            if key in store.objects:
                raise ApiError(409, "AlreadyExists", f'{res[2]} "{name}" already exists',
                               {"name": name, "kind": res[2]})
            manager = query.get("fieldManager", "kubectl-create")
            return 201, self.write(key, res, ns, None, config, manager, "Update", True, query.get("dryRun") == "All")
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
                                       "Update", True, dry, patch=True)
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}")
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def existing(self, key, res, name):
        obj = self.store.objects.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'{res[2]} "{name}" not found', {"name": name, "kind": res[2]})
        return self.store.present(key, obj)

    def write(self, key, res, ns, previous, config, manager, operation, force, dry, patch=False):
        store = self.store
        group, version, plural = res
        kind = RESOURCES[res][0]
        if ns is not None and ("", "v1", "namespaces", None, ns) not in store.objects:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        managed = copy.deepcopy((previous or {}).get("metadata", {}).get("managedFields", []))
        # Computed from what was sent, not what is stored: the applier owns
        # `f:paused` even though `paused: false` is never written back.
        applied = config_set({**config, "kind": kind})
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
            causes = [{"reason": "FieldManagerConflict",
                       "message": f'conflict with "{m}": ' + ".".join(p[2:] for p in path), "field": ".".join(p[2:] for p in path)}
                      for m, path in conflicts]
            raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s)", {"causes": causes,
                           "name": key[4], "kind": plural})
        # What this applier set before and no longer sets (and nobody else
        # owns) is removed: whole list items first, then single fields.
        if operation == "Apply":
            mine = next((e for e in managed if e["manager"] == manager and e["operation"] == "Apply"), None)
            if mine:
                others = [e["fieldsV1"] for e in managed if e is not mine]
                for path in list(keyed_items(mine["fieldsV1"])) + list(leaves(mine["fieldsV1"])):
                    if not has_path(applied, path) and not any(has_path(fs, path) for fs in others):
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
        merged = merge(kind, obj, {k: v for k, v in config.items() if k != "status"}, by_key=not patch)
        merged["metadata"]["name"] = key[4]
        managed.append({"manager": manager, "operation": operation,
                        "apiVersion": merged["apiVersion"], "time": now(),
                        "fieldsType": "FieldsV1", "fieldsV1": applied})
        if kind == "Secret":
            string_data(merged)
        kind_defaults(merged, store, previous)
        if kind not in UNTYPED:
            merged = omit_empty(kind, merged)
        # Both sides defaulted and written back the same way, so the same
        # configuration applied again is never refused.
        if previous:
            validate_update(kind, group, key[4], previous, merged)
        # The namespace lifecycle admission refuses creates only: updates of
        # what is already in a Terminating namespace go through.
        elif ns is not None and "deletionTimestamp" in store.objects.get(("", "v1", "namespaces", None, ns), {}).get("metadata", {}):
            raise ApiError(403, "Forbidden", f'{plural} "{key[4]}" is forbidden: unable to create new content in namespace {ns} because it is being terminated')
        meta_defaults(merged, ns, store)
        merged["metadata"]["managedFields"] = managed
        generation = (previous or {}).get("metadata", {}).get("generation", 0)
        if previous is None or merged.get("spec") != previous.get("spec"):
            generation += 1
        merged["metadata"]["generation"] = max(generation, 1)
        if kind == "StatefulSet" and self.kubelet is not None and \
                merged["metadata"].get("annotations", {}).get(NEVER_READY) != "true":
            # --couchdb: the status comes from the pods, worked out by the Kubelet.
            merged["status"] = (previous or {}).get("status") or {"replicas": 0, "availableReplicas": 0}
        elif kind in WORKLOADS + ("Ingress",):
            converge(merged)
        # A Deployment rolls out again when its pod template changes (not on create).
        started = None
        if kind == "Deployment" and previous and \
                merged.get("spec", {}).get("template") != previous.get("spec", {}).get("template"):
            started = time.monotonic()
        if dry:
            return store.present(key, merged, started)
        store.objects[key] = merged
        if started is not None:
            store.rollouts[key] = started
        elif previous is None:
            store.rollouts.pop(key, None)
        if merged["metadata"].get("annotations", {}).get(NEVER_READY) == "true":
            self.event(ns, merged, "Warning", "BackOff", "Back-off restarting failed container (kube-api-double never-ready)")
        return store.present(key, merged)

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
    parser.add_argument("--faults", help="SEED:PERCENT of requests to fail transiently")
    parser.add_argument("--couchdb", action="store_true",
                        help="run StatefulSet pods, CouchDB containers as nodes of the CouchDB double")
    parser.add_argument("--couchdb-settle-seconds", type=float, default=60.0,
                        help="how long replication jobs sit in initializing after a membership change")
    parser.add_argument("--couchdb-fill-seconds", type=float, default=2.0,
                        help="how long internal replication takes to fill a shard copy that is behind")
    parser.add_argument("--couchdb-setup-wait-seconds", type=float, default=5.0,
                        help="how long finish_cluster waits for nodes to connect before its 500")
    parser.add_argument("--couchdb-boot-seconds", type=float, default=2.0,
                        help="from a CouchDB container's start to its port accepting connections")
    parser.add_argument("--couchdb-log", help="every request a CouchDB node serves, as JSON lines")
    parser.add_argument("--couchdb-fault", action="append", default=[], metavar="POD@IMAGE=KIND",
                        help="the node of pod POD started from an image containing IMAGE has fault KIND "
                             f"({', '.join(NODE_FAULTS)}; see couchdb_double.py; repeatable)")
    parser.add_argument("--immudb", action="store_true",
                        help="run StatefulSet pods, immudb containers as nodes of the immudb double")
    parser.add_argument("--immudb-log", help="every request an immudb node serves, as JSON lines")
    parser.add_argument("--immudb-boot-seconds", type=float, default=0.5,
                        help="from an immudb container's start to its ports accepting connections")
    parser.add_argument("--immudb-replication-seconds", type=float, default=0.05,
                        help="a replica copies one transaction of each database this often")
    parser.add_argument("--immudb-lag", action="append", default=[], metavar="POD=SECONDS",
                        help="the replica in pod POD pulls nothing for SECONDS after each start (repeatable)")
    parser.add_argument("--immudb-sync-wait-seconds", type=float, default=5.0,
                        help="how long a write on a primary with IMMUDB_REPLICATION_SYNC_ACKS waits for the acks")
    parser.add_argument("--agraph", action="store_true",
                        help="run StatefulSet pods, AllegroGraph containers as nodes of agraph_double.py")
    parser.add_argument("--agraph-log", help="every request an AllegroGraph node serves, as JSON lines")
    parser.add_argument("--agraph-boot-seconds", type=float, default=None,
                        help="from an AllegroGraph container's start to its port accepting connections")
    parser.add_argument("--hook-log", help="every lifecycle hook run and pod-network request, as JSON lines")
    parser.add_argument("--controller-log",
                        help="every pod the StatefulSet controller creates or deletes, as JSON lines")
    parser.add_argument("--container-log", help="the output of the containers run for real (curlimages/curl)")
    parser.add_argument("--container-env", action="append", default=[], metavar="NAME=VALUE",
                        help="added to (over) the env of every container run for real (repeatable)")
    args = parser.parse_args()
    Handler.store = Store()
    Handler.log = args.log
    Handler.faults = Faults(args.faults) if args.faults else None
    registries = []
    if args.couchdb:
        faults = []
        for spec in args.couchdb_fault:
            target, eq, kind = spec.rpartition("=")
            pod, at, image = target.partition("@")
            if not (eq and at and pod and image and kind in NODE_FAULTS):
                parser.error(f"--couchdb-fault wants POD@IMAGE=KIND, KIND one of {', '.join(NODE_FAULTS)}, "
                             f"not {spec!r}")
            faults.append((pod, image, kind))
        registries.append(CouchAdapter(CouchRegistry(args.couchdb_settle_seconds, args.couchdb_fill_seconds,
                                                     args.couchdb_log, args.couchdb_setup_wait_seconds,
                                                     args.couchdb_boot_seconds, faults=faults)))
    if args.immudb:
        from immudb_double import ImmudbRegistry
        lag = {}
        for spec in args.immudb_lag:
            pod, _, seconds = spec.partition("=")
            lag[pod] = float(seconds)
        registries.append(ImmudbRegistry(log_path=args.immudb_log, boot_seconds=args.immudb_boot_seconds,
                                         replication_seconds=args.immudb_replication_seconds, lag=lag,
                                         sync_wait_seconds=args.immudb_sync_wait_seconds))
    if args.agraph:
        try:
            from agraph_double import AgraphRegistry
        except ImportError as e:
            parser.error(f"--agraph needs agraph_double.AgraphRegistry next to this file: {e}")
        kwargs = {"log_path": args.agraph_log}
        if args.agraph_boot_seconds is not None:
            kwargs["boot_seconds"] = args.agraph_boot_seconds
        registries.append(AgraphRegistry(**kwargs))
    if registries:
        extra_env = {}
        for spec in args.container_env:
            name, eq, value = spec.partition("=")
            if not name or not eq:
                parser.error(f"--container-env wants NAME=VALUE, not {spec!r}")
            extra_env[name] = value
        Handler.kubelet = Kubelet(Handler.store, registries, proxy_port=args.port, hook_log=args.hook_log,
                                  container_log=args.container_log, container_env=extra_env,
                                  controller_log=args.controller_log)

        def terminate(signum, frame):
            # No container run for real outlives the double.
            Handler.kubelet.runner.kill_all()
            sys.exit(0)
        signal.signal(signal.SIGTERM, terminate)

        def controllers():
            while True:
                time.sleep(0.1)
                try:
                    with Handler.store.lock:
                        Handler.kubelet.reconcile()
                except Exception as e:  # keep reconciling; say what went wrong
                    print(f"kube-api-double: reconcile failed: {e!r}", file=sys.stderr, flush=True)
        threading.Thread(target=controllers, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"kube-api-double listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
