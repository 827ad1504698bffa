"""Tests of the CouchDB TEST DOUBLE behind the Kubernetes API TEST DOUBLE (--couchdb).

Run: python3 -m unittest discover -s tests/kube-api-double
Each test starts its own API double on a free loopback port, applies the
objects stack makes for a CouchDB cluster `docs` in namespace `demo`, and
talks to the nodes only through the API server's pod and service proxies.
"""

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from kube_api_double import pod_defaults

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "kube_api_double.py")
NS = "demo"
SETTLE, FILL, SETUP_WAIT, BOOT = 1.0, 0.6, 0.5, 0.3
PASSWORD = "s3cret-pw"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_name(i):
    return f"couchdb@docs-{i}.docs-headless.{NS}.svc.cluster.local"


def objects(replicas=3, seeds=3, when_scaled="Delete", policy="Parallel"):
    """What stack applies for a CouchDB cluster `docs`."""
    labels = {"app.kubernetes.io/name": "couchdb", "app.kubernetes.io/instance": "docs"}
    seedlist = ",".join(node_name(i) for i in range(seeds))
    ini = ("[chttpd]\nbind_address = 0.0.0.0\n\n[couchdb]\nuuid = 0123456789abcdef0123456789abcdef\n\n"
           f"[cluster]\nq = 2\nn = 3\nseedlist = {seedlist}\n")
    return [
        ("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        ("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "docs-admin"},
                     "stringData": {"username": "admin", "password": PASSWORD}}),
        ("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "docs-internal"},
                     "stringData": {"erlangCookie": "cookie-1234", "couchdbSecret": "secret-5678"}}),
        ("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "docs-config"},
                        "data": {"10-stack.ini": ini}}),
        ("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "docs-headless", "labels": labels},
                      "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels,
                               "ports": [{"name": "http", "port": 5984, "targetPort": 5984}]}}),
        ("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "docs", "labels": labels},
                      "spec": {"selector": labels, "ports": [{"name": "http", "port": 5984, "targetPort": 5984}]}}),
        ("poddisruptionbudgets", {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                  "metadata": {"name": "docs", "labels": labels},
                                  "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}),
        ("statefulsets", statefulset(replicas, labels, when_scaled, policy)),
    ]


def statefulset(replicas, labels=None, when_scaled="Delete", policy="Parallel", image="couchdb:3.5.1",
                partition=0):
    labels = labels or {"app.kubernetes.io/name": "couchdb", "app.kubernetes.io/instance": "docs"}
    secret = lambda name, key: {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "docs", "labels": labels},
            "spec": {"serviceName": "docs-headless", "replicas": replicas, "podManagementPolicy": policy,
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
                     "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": when_scaled},
                     "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                         "name": "couchdb", "image": image,
                         "ports": [{"name": "http", "containerPort": 5984}],
                         "env": [
                             {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                             {"name": "POD_NAMESPACE",
                              "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                             {"name": "ERL_FLAGS", "value": "-name couchdb@$(POD_NAME).docs-headless."
                              "$(POD_NAMESPACE).svc.cluster.local -kernel inet_dist_listen_min 9100 "
                              "-kernel inet_dist_listen_max 9100"},
                             {"name": "COUCHDB_USER", **secret("docs-admin", "username")},
                             {"name": "COUCHDB_PASSWORD", **secret("docs-admin", "password")},
                             {"name": "COUCHDB_ERLANG_COOKIE", **secret("docs-internal", "erlangCookie")},
                             {"name": "COUCHDB_SECRET", **secret("docs-internal", "couchdbSecret")}],
                         "volumeMounts": [{"name": "config", "mountPath": "/opt/couchdb/etc/default.d"},
                                          {"name": "data", "mountPath": "/opt/couchdb/data"}],
                         "readinessProbe": {"httpGet": {"path": "/_up", "port": 5984}},
                         "livenessProbe": {"httpGet": {"path": "/", "port": 5984}}}],
                         "volumes": [{"name": "config", "configMap": {"name": "docs-config"}}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                         "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}


GROUPS = {"statefulsets": "/apis/apps/v1", "poddisruptionbudgets": "/apis/policy/v1"}


def api_path(plural, name, ns=NS):
    base = GROUPS.get(plural, "/api/v1")
    if plural == "namespaces":
        return f"{base}/namespaces/{name}"
    return f"{base}/namespaces/{ns}/{plural}/{name}"


class Double:
    """One API double with --couchdb, on a free port."""

    def __init__(self, couchdb=True, faults=()):
        self.dir = tempfile.mkdtemp(prefix="couchdb-double-")
        self.port = free_port()
        self.couch_log = os.path.join(self.dir, "couchdb.log")
        self.api_log = os.path.join(self.dir, "api.log")
        self.controller_log = os.path.join(self.dir, "controller.log")
        args = [sys.executable, SCRIPT, "--port", str(self.port), "--log", self.api_log]
        if couchdb:
            args += ["--couchdb", "--couchdb-settle-seconds", str(SETTLE), "--couchdb-fill-seconds", str(FILL),
                     "--couchdb-setup-wait-seconds", str(SETUP_WAIT), "--couchdb-boot-seconds", str(BOOT),
                     "--couchdb-log", self.couch_log, "--controller-log", self.controller_log]
            for fault in faults:
                args += ["--couchdb-fault", fault]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        hdrs = {"Authorization": "Bearer test-token", "User-Agent": "test"}
        hdrs.update(headers or {})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        if data is not None and "Content-Type" not in hdrs:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        value = json.loads(raw) if ctype.startswith("application/json") and raw else raw
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, value

    def apply(self, plural, obj):
        path = api_path(plural, obj["metadata"]["name"]) + "?fieldManager=test&force=true"
        status, _, out = self.request("PATCH", path, obj, {"Content-Type": "application/apply-patch+yaml"})
        assert status in (200, 201), (status, out)
        return out

    def get(self, plural, name):
        return self.request("GET", api_path(plural, name))

    def couch(self, pod, method, path, body=None, headers=None, port=5984):
        """A request to a CouchDB pod through the API server's pod proxy."""
        return self.request(method, f"/api/v1/namespaces/{NS}/pods/{pod}:{port}/proxy{path}", body, headers)

    def svc(self, method, path, body=None, headers=None):
        return self.request(method, f"/api/v1/namespaces/{NS}/services/docs:http/proxy{path}", body, headers)

    def login(self, pod):
        status, hdrs, out = self.couch(pod, "POST", "/_session", {"name": "admin", "password": PASSWORD})
        assert status == 200, (status, out)
        return {"Cookie": hdrs["set-cookie"].split(";")[0]}

    def pod_ready(self, pod):
        status, _, out = self.get("pods", pod)
        return status == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in out.get("status", {}).get("conditions", []))

    def couch_log_lines(self):
        if not os.path.exists(self.couch_log):
            return []
        with open(self.couch_log) as f:
            return [json.loads(line) for line in f]

    def controller_log_lines(self):
        """--controller-log as (action, pod, revision, the couchdb container's image)."""
        if not os.path.exists(self.controller_log):
            return []
        with open(self.controller_log) as f:
            lines = [json.loads(line) for line in f]
        for line in lines:
            assert line["statefulset"] == f"{NS}/docs" and line["time"].endswith("Z"), line
        return [(x["action"], x["pod"], x["revision"], x["images"]["couchdb"]) for x in lines]

    def sts_status(self):
        return self.get("statefulsets", "docs")[2].get("status", {})


def wait_for(what, check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class CouchdbDoubleTest(unittest.TestCase):
    def setUp(self):
        self.d = Double()
        self.addCleanup(self.d.stop)

    def cluster(self, replicas=3, seeds=3, when_scaled="Delete", finish=True):
        """A meshed (and finished) cluster; -> admin cookie headers valid on every pod."""
        for plural, obj in objects(replicas, seeds, when_scaled):
            self.d.apply(plural, obj)
        wait_for("pods ready", lambda: all(self.d.pod_ready(f"docs-{i}") for i in range(replicas)))
        if finish:
            status, _, out = self.d.couch("docs-0", "POST", "/_cluster_setup", {"action": "finish_cluster"},
                                          self.d.login("docs-0"))
            self.assertEqual(status, 201, out)
        return self.d.login("docs-0")

    # ---- seeding, readiness, finish_cluster, auth --------------------

    def test_seeding_readiness_and_finish_cluster(self):
        d = self.d
        # One pod of a seedlist of four: it stays seeding, not Ready.
        for plural, obj in objects(replicas=1, seeds=4):
            d.apply(plural, obj)
        status, _, sts = d.get("statefulsets", "docs")
        self.assertNotIn("readyReplicas", sts.get("status", {}))
        wait_for("docs-0 running", lambda: d.get("pods", "docs-0")[2].get("status", {}).get("phase") == "Running")
        # Running, but CouchDB still booting: nothing listens yet.
        wait_for("docs-0 listening", lambda: d.couch("docs-0", "GET", "/_up")[0] != 503)
        status, _, up = d.couch("docs-0", "GET", "/_up")
        self.assertEqual(status, 404)
        self.assertEqual(up["status"], "seeding")
        self.assertEqual(sorted(up["seeds"]), [node_name(i) for i in (1, 2, 3)])
        time.sleep(0.5)
        self.assertFalse(d.pod_ready("docs-0"))
        status, _, sts = d.get("statefulsets", "docs")
        self.assertNotIn("readyReplicas", sts["status"])
        status, _, pods = d.request("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=app.kubernetes.io/instance%3Ddocs")
        self.assertEqual([p["metadata"]["name"] for p in pods["items"]], ["docs-0"])
        pod = pods["items"][0]
        self.assertEqual(pod["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"], "docs-0")
        self.assertEqual(pod["metadata"]["ownerReferences"][0]["kind"], "StatefulSet")

        # Three of the four seeds: they mesh by themselves and become Ready.
        d.apply("statefulsets", statefulset(3))
        wait_for("three pods ready", lambda: all(d.pod_ready(f"docs-{i}") for i in range(3)))
        wait_for("statefulset status", lambda: d.get("statefulsets", "docs")[2]["status"].get("readyReplicas") == 3)
        status, _, up = d.couch("docs-1", "GET", "/_up")
        self.assertEqual((status, up["status"]), (200, "ok"))
        admin = d.login("docs-0")
        status, _, members = d.couch("docs-0", "GET", "/_membership", headers=admin)
        self.assertEqual(members["all_nodes"], [node_name(i) for i in range(3)])
        self.assertEqual(members["cluster_nodes"], [node_name(i) for i in range(4)])
        status, _, setup = d.couch("docs-0", "GET", "/_cluster_setup", headers=admin)
        self.assertEqual(setup, {"state": "cluster_enabled"})

        # finish_cluster while a seed (docs-3) never started: 500, no system databases.
        status, _, out = d.couch("docs-0", "POST", "/_cluster_setup", {"action": "finish_cluster"}, admin)
        self.assertEqual(status, 500)
        self.assertEqual(out, {"error": "setup_error",
                               "reason": "Cluster setup timed out waiting for nodes to connect"})
        status, _, dbs = d.couch("docs-0", "GET", "/_all_dbs", headers=admin)
        self.assertEqual(dbs, [])

        # Before finish_cluster each node hashed the admin with its own salt:
        # a session cookie from docs-0 is refused by docs-1.
        status, _, out = d.couch("docs-1", "GET", "/_all_dbs", headers=admin)
        self.assertEqual((status, out["reason"]), (401, "You are not a server admin."))

        d.apply("statefulsets", statefulset(4))
        wait_for("docs-3 ready", lambda: d.pod_ready("docs-3"))
        status, _, out = d.couch("docs-0", "POST", "/_cluster_setup", {"action": "finish_cluster"}, admin)
        self.assertEqual((status, out), (201, {"ok": True}))
        status, _, out = d.couch("docs-0", "POST", "/_cluster_setup", {"action": "finish_cluster"}, admin)
        self.assertEqual((status, out), (400, {"error": "bad_request", "reason": "Cluster is already finished"}))
        for i in range(4):
            status, _, dbs = d.couch(f"docs-{i}", "GET", "/_all_dbs", headers=admin)
            self.assertEqual((status, dbs), (200, ["_replicator", "_users"]), f"docs-{i}")
            status, _, setup = d.couch(f"docs-{i}", "GET", "/_cluster_setup", headers=admin)
            self.assertEqual(setup, {"state": "cluster_finished"})

        # The proxy strips Authorization: basic auth never reaches the node.
        basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}
        status, _, out = d.couch("docs-0", "GET", "/_all_dbs", headers=basic)
        self.assertEqual((status, out), (401, {"error": "unauthorized", "reason": "You are not a server admin."}))
        status, _, out = d.couch("docs-0", "POST", "/_session", {"name": "admin", "password": "wrong"})
        self.assertEqual((status, out["reason"]), (401, "Name or password is incorrect."))
        status, _, out = d.svc("GET", "/_all_dbs", headers=admin)
        self.assertEqual(status, 200)

        # A restarted pod hashes the admin again with a new salt: the old cookie is refused there.
        status, _, _ = d.request("DELETE", api_path("pods", "docs-1"))
        self.assertEqual(status, 200)
        wait_for("docs-1 back", lambda: d.pod_ready("docs-1"))
        self.assertEqual(d.couch("docs-1", "GET", "/_all_dbs", headers=admin)[0], 401)
        self.assertEqual(d.couch("docs-1", "GET", "/_all_dbs", headers=d.login("docs-1"))[0], 200)

        # The log: exact requests, no passwords.
        lines = d.couch_log_lines()
        session = [line for line in lines if line["path"] == "/_session" and line["status"] == 200][0]
        self.assertEqual(session["body"], {"name": "admin"})
        self.assertEqual(session["node"], node_name(0))
        finishes = [(line["pod"], line["status"]) for line in lines if line["path"] == "/_cluster_setup"
                    and line["method"] == "POST"]
        self.assertEqual(finishes, [(f"{NS}/docs-0", 500), (f"{NS}/docs-0", 201), (f"{NS}/docs-0", 400)])
        with open(d.couch_log) as f:
            self.assertNotIn(PASSWORD, f.read())
        # Proxied requests are in the API server's own log too.
        with open(d.api_log) as f:
            self.assertIn(f"POST /api/v1/namespaces/{NS}/pods/docs-0:5984/proxy/_cluster_setup", f.read())

    def test_proxy_errors(self):
        d = self.d
        status, _, out = d.couch("docs-0", "GET", "/")
        self.assertEqual((status, out["reason"], out["message"]), (404, "NotFound", 'pods "docs-0" not found'))
        status, _, out = d.svc("GET", "/")
        self.assertEqual((status, out["message"]), (404, 'services "docs" not found'))
        for plural, obj in objects(replicas=1, seeds=4):
            if plural != "secrets":
                d.apply(plural, obj)
        # No Secrets: the container cannot be created, nothing listens.
        wait_for("config error", lambda: "CreateContainerConfigError" in json.dumps(d.get("pods", "docs-0")[2]))
        status, _, out = d.couch("docs-0", "GET", "/")
        self.assertEqual(status, 503)
        self.assertRegex(out["message"], r"^error trying to reach service: dial tcp 10\.1\.\d+\.\d+:5984: "
                                         r"connect: connection refused$")
        status, _, out = d.svc("GET", "/")
        self.assertEqual((status, out["message"]), (503, 'no endpoints available for service "docs"'))
        for plural, obj in objects(replicas=1, seeds=4):
            if plural == "secrets":
                d.apply(plural, obj)
        wait_for("docs-0 listening", lambda: d.couch("docs-0", "GET", "/")[0] == 200)
        status, hdrs, out = d.couch("docs-0", "GET", "/")
        self.assertEqual((out["couchdb"], out["version"]), ("Welcome", "3.5.1"))
        self.assertEqual(hdrs["server"], "CouchDB/3.5.1 (Erlang OTP/26)")
        self.assertEqual(d.couch("docs-0", "GET", "/", port=5986)[0], 503)
        # Not Ready (seeding) and the client Service publishes ready pods only.
        self.assertEqual(d.svc("GET", "/")[0], 503)
        admin = d.login("docs-0")
        self.assertEqual(d.couch("docs-0", "GET", "/nope", headers=admin)[2],
                         {"error": "not_found", "reason": "Database does not exist."})
        self.assertEqual(d.couch("docs-0", "GET", "/_node/_local/_nope", headers=admin)[2],
                         {"error": "not_found", "reason": "missing"})
        self.assertEqual(d.couch("docs-0", "DELETE", "/_membership", headers=admin)[2]["error"],
                         "method_not_allowed")
        self.assertEqual(d.couch("docs-0", "GET", "/_node/_local", headers=admin)[2], {"name": node_name(0)})

    # ---- shards: quorum, moves, internal replication ------------------

    def test_quorum_and_restart_fill(self):
        d = self.d
        admin = self.cluster()
        self.assertEqual(d.couch("docs-0", "PUT", "/notes", headers=admin)[0], 201)
        status, _, info = d.couch("docs-1", "GET", "/notes", headers=admin)
        self.assertEqual(info["cluster"], {"q": 2, "n": 3, "w": 2, "r": 2})
        self.assertEqual(d.couch("docs-0", "PUT", "/notes", headers=admin)[2]["error"], "file_exists")
        self.assertEqual(d.couch("docs-0", "PUT", "/Bad", headers=admin)[2]["error"], "illegal_database_name")
        # Take two of three nodes away for good: no Secret, the recreated pods cannot start.
        self.assertEqual(d.request("DELETE", api_path("secrets", "docs-admin"))[0], 200)
        for i in (1, 2):
            d.request("DELETE", api_path("pods", f"docs-{i}"))
        wait_for("two nodes down", lambda: len(d.couch("docs-0", "GET", "/_membership", headers=admin)[2]
                                               ["all_nodes"]) == 1)
        status, _, out = d.couch("docs-0", "PUT", "/notes/alone", {"x": 1}, admin)
        self.assertEqual(status, 202, out)
        status, _, doc = d.couch("docs-0", "GET", "/notes/alone", headers=admin)
        self.assertEqual((status, doc["x"]), (200, 1))
        self.assertEqual(d.couch("docs-0", "GET", "/notes/none", headers=admin)[2],
                         {"error": "not_found", "reason": "missing"})
        status, _, out = d.couch("docs-0", "PUT", "/notes/alone", {"x": 2}, admin)
        self.assertEqual((status, out["error"]), (409, "conflict"))
        # _up stays ok while the others are down.
        self.assertEqual(d.couch("docs-0", "GET", "/_up")[0], 200)
        # They come back: two of three answer 201, and the returning copies fill in.
        d.apply("secrets", objects()[1][1])
        wait_for("docs-1 ready", lambda: d.pod_ready("docs-1"))
        # docs-1 restarted: it hashed the admin with a new salt, docs-0's cookie is no good there.
        status, _, out = d.couch("docs-1", "PUT", "/notes/pair", {"y": 1}, d.login("docs-1"))
        self.assertEqual(status, 201, out)
        wait_for("all ready", lambda: d.pod_ready("docs-2"))
        system = lambda: d.couch("docs-0", "GET", "/_node/_local/_system", headers=admin)[2]
        self.assertGreater(system()["internal_replication_jobs"], 0)
        wait_for("filled", lambda: system()["internal_replication_jobs"] == 0)

    def test_shard_move_fills_before_drop_and_loses_docs_dropped_too_early(self):
        d = self.d
        admin = self.cluster()

        def move(db, count):
            self.assertEqual(d.couch("docs-0", "PUT", f"/{db}?q=1&n=1", headers=admin)[0], 201)
            for k in range(count):
                self.assertEqual(d.couch("docs-0", "PUT", f"/{db}/doc-{k}", {"k": k}, admin)[0], 201)
            status, _, shards = d.couch("docs-0", "GET", f"/{db}/_shards", headers=admin)
            [(rng, [old])] = shards["shards"].items()
            self.assertEqual(rng, "00000000-ffffffff")
            new = next(node_name(i) for i in range(3) if node_name(i) != old)
            status, _, m = d.couch("docs-0", "GET", f"/_node/_local/_dbs/{db}", headers=admin)
            self.assertEqual(sorted(m), ["_id", "_rev", "by_node", "by_range", "changelog", "props", "shard_suffix"])
            m["by_node"][new] = [rng]
            m["by_range"][rng] = sorted([old, new])
            m["changelog"].append(["add", rng, new])
            status, _, out = d.couch("docs-0", "PUT", f"/_node/_local/_dbs/{db}", m, admin)
            self.assertEqual(status, 201, out)
            m["_rev"] = out["rev"]
            stale = dict(m, _rev="1-0000")
            self.assertEqual(d.couch("docs-0", "PUT", f"/_node/_local/_dbs/{db}", stale, admin)[0], 409)
            return old, new, rng, m

        def drop(db, old, rng, m):
            del m["by_node"][old]
            m["by_range"][rng] = [x for x in m["by_range"][rng] if x != old]
            m["changelog"].append(["delete", rng, old])
            status, _, out = d.couch("docs-0", "PUT", f"/_node/_local/_dbs/{db}", m, admin)
            self.assertEqual(status, 201, out)

        # Edit, wait for the fill, drop: every document survives.
        old, new, rng, m = move("kept", 6)
        old_pod = "docs-" + old.split("docs-")[1].split(".")[0]
        status, _, system = d.couch(old_pod, "GET", "/_node/_local/_system", headers=admin)
        self.assertGreater(system["internal_replication_jobs"], 0)
        self.assertIn("uptime", system)
        wait_for("fill", lambda: d.couch(old_pod, "GET", "/_node/_local/_system", headers=admin)[2]
                 ["internal_replication_jobs"] == 0)
        drop("kept", old, rng, m)
        status, _, docs = d.couch("docs-1", "GET", "/kept/_all_docs?include_docs=true", headers=admin)
        self.assertEqual(len(docs["rows"]), 6)
        self.assertEqual(d.couch("docs-2", "GET", "/kept/_shards", headers=admin)[2]["shards"], {rng: [new]})

        # Edit and drop at once: the only copy with the documents is gone.
        old, new, rng, m = move("lost", 4)
        drop("lost", old, rng, m)
        time.sleep(FILL + 0.5)
        status, _, docs = d.couch("docs-1", "GET", "/lost/_all_docs", headers=admin)
        self.assertEqual((status, docs["rows"]), (200, []))
        self.assertEqual(d.couch("docs-1", "GET", "/lost/doc-0", headers=admin)[0], 404)

        # Every shard map in one answer, the node list, removing and re-adding a node.
        status, _, all_maps = d.couch("docs-0", "GET", "/_node/_local/_dbs/_all_docs?include_docs=true",
                                      headers=admin)
        self.assertEqual([r["id"] for r in all_maps["rows"]], ["_replicator", "_users", "kept", "lost"])
        self.assertIn("by_range", all_maps["rows"][2]["doc"])
        status, _, nodes = d.couch("docs-0", "GET", "/_node/_local/_nodes/_all_docs", headers=admin)
        self.assertEqual([r["id"] for r in nodes["rows"]], [node_name(i) for i in range(3)])
        status, _, doc = d.couch("docs-0", "GET", f"/_node/_local/_nodes/{node_name(2)}", headers=admin)
        status, _, out = d.couch("docs-0", "DELETE", f"/_node/_local/_nodes/{node_name(2)}?rev={doc['_rev']}",
                                 headers=admin)
        self.assertEqual(status, 200, out)
        status, _, members = d.couch("docs-1", "GET", "/_membership", headers=admin)
        self.assertEqual(members["cluster_nodes"], [node_name(0), node_name(1)])
        self.assertEqual(members["all_nodes"], [node_name(i) for i in range(3)])
        self.assertEqual(d.couch("docs-1", "GET", f"/_node/_local/_nodes/{node_name(2)}", headers=admin)[0], 404)
        # Removing a node never rewrites a shard map.
        status, _, users = d.couch("docs-0", "GET", "/_users/_shards", headers=admin)
        self.assertIn(node_name(2), json.dumps(users))
        # A removed node that restarts does not add itself back.
        d.request("DELETE", api_path("pods", "docs-2"))
        time.sleep(0.3)
        wait_for("docs-2 back", lambda: d.pod_ready("docs-2"))
        status, _, members = d.couch("docs-0", "GET", "/_membership", headers=admin)
        self.assertEqual(members["cluster_nodes"], [node_name(0), node_name(1)])
        status, _, out = d.couch("docs-0", "PUT", f"/_node/_local/_nodes/{node_name(2)}", {}, admin)
        self.assertEqual(status, 201, out)
        status, _, members = d.couch("docs-2", "GET", "/_membership", headers=d.login("docs-2"))
        self.assertEqual(members["cluster_nodes"], [node_name(i) for i in range(3)])

    def test_scale_down_with_when_scaled_delete_loses_the_data(self):
        d = self.d
        admin = self.cluster()
        db = None
        for k in range(20):
            name = f"only-{k}"
            self.assertEqual(d.couch("docs-0", "PUT", f"/{name}?q=1&n=1", headers=admin)[0], 201)
            shards = d.couch("docs-0", "GET", f"/{name}/_shards", headers=admin)[2]["shards"]
            if list(shards.values()) == [[node_name(2)]]:
                db = name
                break
        self.assertIsNotNone(db, "no database placed on docs-2 alone")
        self.assertEqual(d.couch("docs-0", "PUT", f"/{db}/keep", {"v": 1}, admin)[0], 201)
        self.assertEqual(d.get("persistentvolumeclaims", "data-docs-2")[0], 200)
        d.apply("statefulsets", statefulset(2))
        wait_for("docs-2 gone", lambda: d.get("pods", "docs-2")[0] == 404)
        self.assertEqual(d.get("persistentvolumeclaims", "data-docs-2")[0], 404)
        self.assertEqual(d.couch("docs-0", "GET", f"/{db}/keep", headers=admin)[2]["reason"], NO_SHARDS)
        d.apply("statefulsets", statefulset(3))
        wait_for("docs-2 ready", lambda: d.pod_ready("docs-2"))
        status, _, out = d.couch("docs-0", "GET", f"/{db}/keep", headers=admin)
        self.assertEqual((status, out), (404, {"error": "not_found", "reason": "missing"}))
        # The PodDisruptionBudget's status follows the pods.
        status, _, pdb = d.get("poddisruptionbudgets", "docs")
        self.assertEqual((pdb["status"]["expectedPods"], pdb["status"]["desiredHealthy"]), (3, 2))

    def test_rolling_update_one_pod_at_a_time_and_eviction_budget(self):
        d = self.d
        self.cluster()
        uids = {i: d.get("pods", f"docs-{i}")[2]["metadata"]["uid"] for i in range(3)}
        sts = statefulset(3)
        sts["spec"]["template"]["spec"]["containers"][0]["image"] = "couchdb:3.5.2"
        d.apply("statefulsets", sts)
        order, deadline = [], time.monotonic() + 15
        while len(order) < 3 and time.monotonic() < deadline:
            status = d.get("statefulsets", "docs")[2]["status"]
            for i in range(3):
                code, _, pod = d.get("pods", f"docs-{i}")
                if code == 200 and pod["metadata"]["uid"] != uids[i] and i not in order:
                    order.append(i)
            # Never more than one pod down at a time.
            self.assertGreaterEqual(status.get("readyReplicas", 0), 2)
            time.sleep(0.05)
        self.assertEqual(order, [2, 1, 0])
        final = wait_for("rollout", lambda: (lambda st: st.get("readyReplicas") == 3 and st["currentRevision"] ==
                                             st["updateRevision"] and st)(d.get("statefulsets", "docs")[2]["status"]))
        self.assertEqual(final["updatedReplicas"], 3)
        text = d.couch("docs-0", "GET", "/_node/_local/_prometheus", headers=d.login("docs-0"))[2].decode()
        self.assertIn("# HELP couchdb_httpd_requests_total number of HTTP requests\n# TYPE", text)
        # maxUnavailable 1: one eviction, then 429 until the evicted pod is Ready again.
        eviction = lambda pod: d.request("POST", f"/api/v1/namespaces/{NS}/pods/{pod}/eviction",
                                         {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod}})
        self.assertEqual(eviction("docs-1")[0], 201)
        status, _, out = eviction("docs-2")
        self.assertEqual((status, out["reason"]), (429, "TooManyRequests"))
        wait_for("docs-1 back", lambda: d.pod_ready("docs-1"))
        wait_for("budget", lambda: d.get("poddisruptionbudgets", "docs")[2]["status"]["disruptionsAllowed"] == 1)
        self.assertEqual(eviction("docs-2")[0], 201)

    # ---- the replication scheduler and metrics -------------------------

    def test_scheduler_states_and_prometheus(self):
        d = self.d
        admin = self.cluster()
        self.assertEqual(d.couch("docs-0", "PUT", "/src", headers=admin)[0], 201)
        for k in range(3):
            d.couch("docs-0", "PUT", f"/src/s{k}", {"k": k}, admin)
        # A membership change (a node restarts) right before the documents.
        d.request("DELETE", api_path("pods", "docs-2"))
        wait_for("docs-2 back", lambda: d.pod_ready("docs-2"))
        good = {"source": {"url": f"http://docs.{NS}.svc.cluster.local:5984/src",
                           "auth": {"basic": {"username": "admin", "password": PASSWORD}}},
                "target": f"http://admin:{PASSWORD}@docs-headless:5984/dst",
                "create_target": True, "continuous": True}
        bad = {"source": f"http://admin:{PASSWORD}@docs:5984/src",
               "target": f"http://admin:{PASSWORD}@nowhere.{NS}.svc.cluster.local:5984/dst",
               "continuous": True}
        self.assertEqual(d.couch("docs-1", "PUT", "/_replicator/good", good, admin)[0], 201)
        self.assertEqual(d.couch("docs-1", "PUT", "/_replicator/bad", bad, admin)[0], 201)
        stored = d.couch("docs-0", "GET", "/_replicator/good", headers=admin)[2]
        self.assertEqual(stored["owner"], "admin")
        self.assertEqual(stored["source"]["auth"]["basic"]["password"], PASSWORD)
        status, _, job = d.couch("docs-0", "GET", "/_scheduler/docs/_replicator/good", headers=admin)
        self.assertEqual((job["state"], job["id"], job["info"]), ("initializing", None, None))
        self.assertEqual(job["source"], f"http://docs.{NS}.svc.cluster.local:5984/src/")
        self.assertEqual(job["target"], "http://docs-headless:5984/dst/")
        running = lambda: d.couch("docs-0", "GET", "/_scheduler/docs/_replicator/good", headers=admin)[2]
        job = wait_for("running", lambda: running()["state"] == "running" and running())
        self.assertRegex(job["id"], r"^[0-9a-f]{32}\+continuous\+create_target$")
        self.assertTrue(job["node"].startswith("couchdb@docs-"))
        wait_for("copied", lambda: len(d.couch("docs-1", "GET", "/dst/_all_docs", headers=admin)[2]
                                       .get("rows", [])) == 3)
        self.assertEqual(d.couch("docs-2", "PUT", "/src/later", {"k": 9}, d.login("docs-2"))[0], 201)
        wait_for("continuous", lambda: d.couch("docs-0", "GET", "/dst/later", headers=admin)[0] == 200)
        bad_job = lambda: d.couch("docs-0", "GET", "/_scheduler/docs/_replicator/bad", headers=admin)[2]
        first = wait_for("crashing", lambda: bad_job()["state"] == "crashing" and bad_job())
        self.assertIn("nxdomain", first["info"]["error"])
        wait_for("error_count rising", lambda: bad_job()["error_count"] > first["error_count"])
        status, _, all_docs = d.couch("docs-1", "GET", "/_scheduler/docs", headers=admin)
        self.assertEqual(all_docs["total_rows"], 2)
        self.assertNotIn(PASSWORD, json.dumps(all_docs))
        self.assertEqual(sorted(all_docs["docs"][0]), sorted(
            ["database", "doc_id", "id", "node", "source", "target", "state", "info", "error_count",
             "start_time", "last_updated"]))
        # A missing target database: crashing, and running again about SETTLE seconds after it exists.
        late = {"source": f"http://admin:{PASSWORD}@docs:5984/src",
                "target": f"http://admin:{PASSWORD}@docs:5984/late", "continuous": True}
        self.assertEqual(d.couch("docs-0", "PUT", "/_replicator/late", late, admin)[0], 201)
        late_job = lambda: d.couch("docs-0", "GET", "/_scheduler/docs/_replicator/late", headers=admin)[2]
        job = wait_for("late crashing", lambda: late_job()["state"] == "crashing" and late_job())
        self.assertEqual(job["info"], {"error": "db_not_found: could not open http://docs:5984/late/"})
        self.assertEqual(d.couch("docs-0", "PUT", "/late", headers=admin)[0], 201)
        created = time.monotonic()
        wait_for("late running", lambda: late_job()["state"] == "running")
        self.assertGreater(time.monotonic() - created, SETTLE * 0.8)
        self.assertEqual(late_job()["state"], "running")
        # Deleting the document stops the job.
        rev = d.couch("docs-0", "GET", "/_replicator/bad", headers=admin)[2]["_rev"]
        self.assertEqual(d.couch("docs-0", "DELETE", f"/_replicator/bad?rev={rev}", headers=admin)[0], 200)
        self.assertEqual(d.couch("docs-0", "GET", "/_scheduler/docs", headers=admin)[2]["total_rows"], 2)

        # Metrics: admin only, and 3.5.1's bare \r between # HELP and # TYPE.
        status, _, out = d.couch("docs-0", "GET", "/_node/_local/_prometheus")
        self.assertEqual((status, out["error"]), (401, "unauthorized"))
        running_total = 0
        for i in range(3):
            status, hdrs, text = d.couch(f"docs-{i}", "GET", "/_node/_local/_prometheus", headers=d.login(f"docs-{i}"))
            self.assertEqual(status, 200)
            self.assertTrue(hdrs["content-type"].startswith("text/plain"))
            text = text.decode()
            self.assertIn("# HELP couchdb_httpd_requests_total number of HTTP requests\r# TYPE "
                          "couchdb_httpd_requests_total counter\n", text)
            for name in ("couchdb_database_writes_total", "couchdb_database_reads_total",
                         "couchdb_couch_replicator_jobs_running", "couchdb_couch_replicator_jobs_crashing"):
                self.assertIn(f"\n{name} ", text)
            running_total += int(text.split("\ncouchdb_couch_replicator_jobs_running ")[1].split("\n")[0])
        self.assertEqual(running_total, 2)


NO_SHARDS = "No DB shards could be opened."


# Images pinned by digest, as `stack upgrade` renders them.
OLD_IMAGE = "couchdb:3.5.1@sha256:" + "c" * 64
NEW_IMAGE = "127.0.0.1:5000/couchdb:3.5.2@sha256:" + "a" * 64


class StatefulSetControllerTest(unittest.TestCase):
    """The StatefulSet controller's order of work, a rollback, --controller-log and --couchdb-fault."""

    def double(self, *faults):
        d = Double(faults=faults)
        self.addCleanup(d.stop)
        return d

    def pod(self, d, name):
        """The pod, or {} while it is gone (between its deletion and its replacement)."""
        status, _, pod = d.get("pods", name)
        return pod if status == 200 else {}

    def revision(self, d, name):
        return self.pod(d, name).get("metadata", {}).get("labels", {}).get("controller-revision-hash")

    def waiting_reason(self, d, name):
        statuses = self.pod(d, name).get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting", {}).get("reason")

    def test_ordered_ready_a_broken_pod_blocks_the_rollback_until_it_is_deleted(self):
        d = self.double("docs-2@couchdb:3.5.2=unready")
        for plural, obj in objects(seeds=1, policy="OrderedReady")[:-1]:
            d.apply(plural, obj)
        d.apply("statefulsets", statefulset(3, policy="OrderedReady", image=OLD_IMAGE))
        wait_for("pods ready", lambda: all(d.pod_ready(f"docs-{i}") for i in range(3)))
        old = d.sts_status()["updateRevision"]
        self.assertEqual(d.controller_log_lines(), [("create", f"docs-{i}", old, OLD_IMAGE) for i in range(3)])

        # The new image on docs-2 alone (partition 2): it never starts.
        d.apply("statefulsets", statefulset(3, policy="OrderedReady", image=NEW_IMAGE, partition=2))
        wait_for("docs-2 crash looping", lambda: self.waiting_reason(d, "docs-2") == "CrashLoopBackOff")
        new = self.revision(d, "docs-2")
        self.assertNotEqual(new, old)
        status = d.sts_status()
        self.assertEqual((status["currentRevision"], status["updateRevision"]), (old, new))
        self.assertEqual((status["currentReplicas"], status["updatedReplicas"], status["readyReplicas"]), (2, 1, 2))

        # The old image back (and one replica more): its revision is the update revision again,
        # but the broken pod is not replaced (kubernetes#67250), nor docs-3 created.
        d.apply("statefulsets", statefulset(4, policy="OrderedReady", image=OLD_IMAGE))
        wait_for("rollback seen", lambda: d.sts_status()["updateRevision"] == old)
        broken = d.get("pods", "docs-2")[2]["metadata"]["uid"]
        time.sleep(1.5)
        pod = d.get("pods", "docs-2")[2]
        self.assertEqual(pod["metadata"]["uid"], broken)
        self.assertEqual(pod["spec"]["containers"][0]["image"], NEW_IMAGE)
        self.assertEqual(d.get("pods", "docs-3")[0], 404)
        self.assertEqual(d.sts_status()["currentRevision"], old)
        self.assertEqual(len(d.controller_log_lines()), 5)

        # Deleted by hand, it comes back on the old revision, then docs-3, and the rollback completes.
        self.assertEqual(d.request("DELETE", api_path("pods", "docs-2"))[0], 200)
        wait_for("docs-2 and docs-3 ready", lambda: d.pod_ready("docs-2") and d.pod_ready("docs-3"))
        self.assertEqual(d.get("pods", "docs-2")[2]["spec"]["containers"][0]["image"], OLD_IMAGE)
        status = wait_for("rollback done", lambda: (lambda st: st.get("currentReplicas") == 4 and st)(d.sts_status()))
        self.assertEqual((status["currentRevision"], status["updateRevision"], status["updatedReplicas"]),
                         (old, old, 4))
        self.assertEqual(d.controller_log_lines()[3:], [("delete", "docs-2", old, OLD_IMAGE),
                                                        ("create", "docs-2", new, NEW_IMAGE),
                                                        ("create", "docs-2", old, OLD_IMAGE),
                                                        ("create", "docs-3", old, OLD_IMAGE)])

    def test_faulty_members_on_the_new_image_and_a_parallel_rollback(self):
        d = self.double("docs-2@couchdb:3.5.2=partitioned", "docs-1@couchdb:3.5.2=isolated")
        for plural, obj in objects()[:-1]:
            d.apply(plural, obj)
        d.apply("statefulsets", statefulset(3, image=OLD_IMAGE))
        wait_for("pods ready", lambda: all(d.pod_ready(f"docs-{i}") for i in range(3)))
        old = d.sts_status()["updateRevision"]
        members = lambda pod: d.couch(pod, "GET", "/_membership", headers=d.login(pod))[2]
        everyone = [node_name(i) for i in range(3)]

        # partitioned: Ready, but connected to no other node once it seeded.
        d.apply("statefulsets", statefulset(3, image=NEW_IMAGE, partition=2))
        wait_for("docs-2 on the new image", lambda: self.revision(d, "docs-2") not in (None, old)
                 and d.pod_ready("docs-2"))
        new = self.revision(d, "docs-2")
        self.assertEqual(d.couch("docs-2", "GET", "/")[2]["version"], "3.5.2")
        self.assertEqual(d.couch("docs-2", "GET", "/_up")[2]["status"], "ok")
        self.assertEqual(members("docs-2"), {"all_nodes": [node_name(2)], "cluster_nodes": everyone})
        self.assertEqual(members("docs-0"), {"all_nodes": everyone[:2], "cluster_nodes": everyone})

        # isolated: a cookie of its own, so seeding for good and never Ready.
        d.apply("statefulsets", statefulset(3, image=NEW_IMAGE, partition=1))
        wait_for("docs-1 on the new image", lambda: self.revision(d, "docs-1") == new)
        wait_for("docs-1 listening", lambda: d.couch("docs-1", "GET", "/_up")[0] != 503)
        status, _, up = d.couch("docs-1", "GET", "/_up")
        self.assertEqual((status, up["status"]), (404, "seeding"))
        time.sleep(0.5)
        self.assertFalse(d.pod_ready("docs-1"))
        self.assertEqual(members("docs-1")["all_nodes"], [node_name(1)])
        self.assertEqual(members("docs-0")["all_nodes"], [node_name(0)])

        # Parallel: the rollback replaces the pods not on the old revision itself, the highest
        # first, each Ready before the next, the unready docs-1 included.
        d.apply("statefulsets", statefulset(3, image=OLD_IMAGE))
        wait_for("rollback done", lambda: (lambda st: st.get("currentRevision") == st.get("updateRevision") == old
                                           and st.get("updatedReplicas") == 3 and st.get("readyReplicas") == 3)(
                                               d.sts_status()), timeout=20)
        self.assertEqual(members("docs-0")["all_nodes"], everyone)
        self.assertEqual(d.controller_log_lines()[3:], [("delete", "docs-2", old, OLD_IMAGE),
                                                        ("create", "docs-2", new, NEW_IMAGE),
                                                        ("delete", "docs-1", old, OLD_IMAGE),
                                                        ("create", "docs-1", new, NEW_IMAGE),
                                                        ("delete", "docs-2", new, NEW_IMAGE),
                                                        ("create", "docs-2", old, OLD_IMAGE),
                                                        ("delete", "docs-1", new, NEW_IMAGE),
                                                        ("create", "docs-1", old, OLD_IMAGE)])


class ImagePullPolicyTest(unittest.TestCase):
    def test_default_by_tag_digest_or_both(self):
        digest = "@sha256:" + "a" * 64
        cases = {"couchdb": "Always", "couchdb:latest": "Always", "127.0.0.1:5000/couchdb": "Always",
                 "couchdb:latest" + digest: "Always", "couchdb:3.5.2": "IfNotPresent",
                 "couchdb" + digest: "IfNotPresent", NEW_IMAGE: "IfNotPresent", OLD_IMAGE: "IfNotPresent"}
        for image, policy in cases.items():
            spec = {"containers": [{"name": "couchdb", "image": image}]}
            pod_defaults(spec)
            self.assertEqual(spec["containers"][0]["imagePullPolicy"], policy, image)


class WithoutCouchdbTest(unittest.TestCase):
    """Without --couchdb the API double behaves as before: workloads converge at once, no proxies."""

    def test_statefulset_converges_at_once_and_put_is_unsupported(self):
        d = Double(couchdb=False)
        self.addCleanup(d.stop)
        for plural, obj in objects():
            d.apply(plural, obj)
        status, _, sts = d.get("statefulsets", "docs")
        self.assertEqual(sts["status"]["readyReplicas"], 3)
        self.assertEqual(d.request("GET", f"/api/v1/namespaces/{NS}/pods")[2]["items"], [])
        self.assertEqual(d.couch("docs-0", "GET", "/")[0], 404)
        self.assertEqual(d.request("PUT", "/api/v1/namespaces/demo")[0], 501)


if __name__ == "__main__":
    unittest.main()
