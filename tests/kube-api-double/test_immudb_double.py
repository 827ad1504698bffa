"""Tests of the immudb TEST DOUBLE (immudb_double.py) and of the kubelet's lifecycle hooks.

Run: python3 -m unittest discover -s tests/kube-api-double
The registry tests are in-process (no network); the kubelet test starts the
Kubernetes API double with --immudb on a free loopback port.
"""

import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

from immudb_double import (ImmudbRegistry, NotListening, PASSWORD_REQUIREMENTS, is_strong_password)
from test_couchdb_double import free_port, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "kube_api_double.py")
B = lambda s: base64.b64encode(s.encode()).decode()
PRIMARY, REPLICA = "ledger/ledger-0", "ledger/ledger-replica-0"
STRONG = "Adm1n!pass"


class Registry:
    """An ImmudbRegistry with a resolver for `ledger-0` and fast timings."""

    def __init__(self, **kw):
        kw.setdefault("boot_seconds", 0.0)
        kw.setdefault("sync_wait_seconds", 0.5)
        self.log = tempfile.mktemp(prefix="immudb-log-")
        self.r = ImmudbRegistry(log_path=self.log, **kw)
        self.r.resolver = lambda host, port, from_pod: (PRIMARY, port) if host.startswith("ledger-0") else None

    def call(self, pod, method, path, body=None, token=None, header="Grpc-Metadata-Authorization", port=8080):
        headers = {"Content-Type": "application/json"}
        if token:
            headers[header] = "Bearer " + token
        data = json.dumps(body).encode() if body is not None else b""
        status, hdrs, out = self.r.handle(pod, method, path, headers, data, port)
        ctype = hdrs.get("Content-Type", "")
        return status, json.loads(out) if ctype.startswith("application/json") else out.decode()

    def login(self, pod, user="immudb", password=STRONG):
        status, out = self.call(pod, "POST", "/api/login", {"user": B(user), "password": B(password)})
        assert status == 200, (status, out)
        return out["token"]

    def metric(self, pod, db):
        _, text = self.call(pod, "GET", "/metrics", port=9497)
        for line in text.splitlines():
            if line.startswith(f'immudb_last_committed_trx_id{{db="{db}"'):
                return int(line.rsplit(" ", 1)[1])
        raise AssertionError(text)

    def lines(self):
        with open(self.log) as f:
            return [json.loads(x) for x in f]


def replica_env(user="repl", password="Repl1!pass"):
    return {"IMMUDB_REPLICATION_IS_REPLICA": "true", "IMMUDB_REPLICATION_PRIMARY_HOST": "ledger-0.ledger-headless",
            "IMMUDB_REPLICATION_PRIMARY_PORT": "3322", "IMMUDB_REPLICATION_PRIMARY_USERNAME": user,
            "IMMUDB_REPLICATION_PRIMARY_PASSWORD": password}


class ImmudbRegistryTest(unittest.TestCase):
    def setUp(self):
        self.x = Registry()
        self.x.r.start_node(PRIMARY, {"IMMUDB_ADMIN_PASSWORD": STRONG}, "codenotary/immudb:1.11.0", {}, None)

    def test_password_policy(self):
        self.assertIsNone(is_strong_password("Adm1n!pass"))
        for weak in ("Sh0rt!", "nouppercase1!", "NoDigits!!", "NoSpecial1A", "With space1!", "A1!" + "x" * 30):
            self.assertEqual(is_strong_password(weak), PASSWORD_REQUIREMENTS, weak)
        # immudb 1.9+ checks no strength on the server: only an empty password is refused.
        x, token = self.x, self.x.login(PRIMARY)
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user", {"user": B("weak"), "password": B("weak"),
                                                               "permission": 2, "database": "defaultdb"}, token),
                         (200, {}))
        status, out = x.call(PRIMARY, "POST", "/api/user", {"user": B("empty"), "password": "", "permission": 2,
                                                            "database": "defaultdb"}, token)
        self.assertEqual((status, out["code"], out["message"]), (500, 2, "password is empty"))

    def test_admin_password_only_at_first_start(self):
        x = self.x
        x.r.stop_node(PRIMARY, keep_data=True)
        x.r.start_node(PRIMARY, {"IMMUDB_ADMIN_PASSWORD": "Other2@pass"}, "codenotary/immudb:1.11.0", {}, None)
        x.login(PRIMARY, password=STRONG)
        status, out = x.call(PRIMARY, "POST", "/api/login", {"user": B("immudb"), "password": B("Other2@pass")})
        self.assertEqual((status, out["message"]), (500, "invalid user name or password"))
        # An empty data dir: the environment's password applies again; without one, the vendor's default.
        x.r.stop_node(PRIMARY, keep_data=False)
        x.r.start_node(PRIMARY, {}, "codenotary/immudb:1.11.0", {}, None)
        status, out = x.call(PRIMARY, "POST", "/api/login", {"user": B("immudb"), "password": B("immudb")})
        self.assertEqual(status, 200)
        self.assertIn("default password", base64.b64decode(out["warning"]).decode())

    def test_login_auth_headers_and_not_logged_in(self):
        x = self.x
        token = x.login(PRIMARY)
        for header in ("Authorization", "Grpc-Metadata-Authorization"):
            status, out = x.call(PRIMARY, "GET", "/api/user/list", token=token, header=header)
            self.assertEqual(status, 200, header)
            self.assertEqual(out["users"][0]["user"], B("immudb"))
            self.assertEqual(out["users"][0]["permissions"], [{"database": "*", "permission": 255}])
        # No token: immudb's ErrNotLoggedIn is gRPC Unknown, so a 500 (not a 401) with immudb's details.
        self.assertEqual(x.call(PRIMARY, "GET", "/api/user/list"),
                         (500, {"error": "not logged in", "code": 2, "message": "not logged in",
                                "details": [{"@type": "type.googleapis.com/immudb.schema.ErrorInfo",
                                             "code": "28000", "cause": "not logged in"},
                                            {"@type": "type.googleapis.com/immudb.schema.RetryInfo"}]}))
        self.assertEqual(x.call(PRIMARY, "GET", "/api/user/list", token="v2.public.forged.aW1tdWRi")[1]["message"],
                         "not logged in")
        self.assertEqual(x.call(PRIMARY, "GET", "/api/user/list", token="garbage")[1]["code"], 13)
        # Plain text where the proto wants bytes: the gateway's 400.
        status, out = x.call(PRIMARY, "POST", "/api/login", {"user": "immudb", "password": STRONG})
        self.assertEqual((status, out["code"], out["message"]), (400, 3, "illegal base64 data at input byte 4"))
        # Tokens are signed with keys held in memory: a restart logs everybody out.
        x.r.stop_node(PRIMARY, keep_data=True)
        x.r.start_node(PRIMARY, {}, "codenotary/immudb:1.11.0", {}, None)
        self.assertEqual(x.call(PRIMARY, "GET", "/api/user/list", token=token)[1]["message"], "not logged in")
        self.assertEqual(x.call(PRIMARY, "GET", "/api/v2/user/list", token=x.login(PRIMARY))[0], 200)

    def test_create_user_duplicate_and_systemdb_tx(self):
        x = self.x
        token = x.login(PRIMARY)
        self.assertEqual((x.metric(PRIMARY, "defaultdb"), x.metric(PRIMARY, "systemdb")), (1, 2))
        body = {"user": B("app"), "password": B("App1!pass"), "permission": 2, "database": "defaultdb"}
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user", body, token), (200, {}))
        self.assertEqual(x.metric(PRIMARY, "systemdb"), 3)
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user", body, token),
                         (500, {"error": "user already exists", "code": 2, "message": "user already exists"}))
        status, out = x.call(PRIMARY, "POST", "/api/db/set", {"KVs": [{"key": B("k"), "value": B("v")}]},
                             x.login(PRIMARY, "app", "App1!pass"))
        self.assertEqual((status, out["id"], out["nentries"]), (200, "2", 1))
        self.assertEqual(x.metric(PRIMARY, "defaultdb"), 2)
        logged = [line for line in x.lines() if line.get("path") == "/api/user"]
        self.assertEqual(logged[0]["body"]["password"], "***")
        self.assertEqual([line["status"] for line in logged], [200, 500])

    def test_an_inactive_user_cannot_log_in_nor_be_granted_until_activated(self):
        x = self.x
        token = x.login(PRIMARY)
        body = {"user": B("repl"), "password": B("Repl1!pass"), "permission": 254, "database": "defaultdb"}
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user", body, token)[0], 200)
        off = {"active": False, "username": "repl"}
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user/setactiveUser", off, token), (200, {}))
        grant = {"action": "GRANT", "username": "repl", "database": "systemdb", "permission": 254}
        status, out = x.call(PRIMARY, "POST", "/api/user/changepermission", grant, token)
        self.assertEqual((status, out["message"]), (400, "user repl is not active"))
        me = {"active": False, "username": "immudb"}
        status, out = x.call(PRIMARY, "POST", "/api/user/setactiveUser", me, token)
        self.assertEqual((status, out["message"]), (500, "changing your own status is not allowed"))
        on = {"active": True, "username": "repl"}
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user/setactiveUser", on, token), (200, {}))
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user/changepermission", grant, token), (200, {}))
        x.login(PRIMARY, "repl", "Repl1!pass")

    def test_replica_needs_admin_on_each_database_then_catches_up(self):
        x = self.x
        token = x.login(PRIMARY)
        x.r.start_node(REPLICA, replica_env(), "codenotary/immudb:1.11.0", {}, None)
        body = {"user": B("repl"), "password": B("Repl1!pass"), "permission": 2, "database": "defaultdb"}
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user", body, token)[0], 200)
        for _ in range(5):
            x.r.replicate_once()
        # readwrite is not enough for ExportTx: nothing copied, and the replica says why.
        self.assertEqual((x.metric(REPLICA, "defaultdb"), x.metric(REPLICA, "systemdb")), (0, 0))
        self.assertTrue(any("permission denied" in line.get("log", "") for line in x.lines()))
        change = {"action": "GRANT", "username": "repl", "database": "defaultdb", "permission": 254}
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user/changepermission", change, token), (200, {}))
        for _ in range(5):
            x.r.replicate_once()
        self.assertEqual(x.metric(REPLICA, "defaultdb"), 1)
        self.assertEqual(x.metric(REPLICA, "systemdb"), 0)     # systemdb wants admin on systemdb
        change["database"] = "systemdb"
        self.assertEqual(x.call(PRIMARY, "POST", "/api/user/changepermission", change, token), (200, {}))
        for _ in range(10):
            x.r.replicate_once()
        self.assertEqual(x.metric(REPLICA, "systemdb"), x.metric(PRIMARY, "systemdb"))
        # The users came along; a replica refuses writes.
        rtoken = x.login(REPLICA)
        status, out = x.call(REPLICA, "POST", "/api/db/set", {"KVs": [{"key": B("k"), "value": B("v")}]}, rtoken)
        self.assertEqual((status, out["message"]), (500, "database is read-only because it's a replica"))

    def test_lag_flag(self):
        x = Registry(lag={"ledger-replica-0": 0.3})
        x.r.start_node(PRIMARY, {}, "codenotary/immudb:1.11.0", {}, None)
        x.r.start_node(REPLICA, replica_env("immudb", "immudb"), "codenotary/immudb:1.11.0", {}, None)
        x.r.replicate_once()
        self.assertEqual(x.metric(REPLICA, "defaultdb"), 0)
        time.sleep(0.35)
        x.r.replicate_once()
        self.assertEqual(x.metric(REPLICA, "defaultdb"), 1)

    def test_image_pinned_by_digest(self):
        image = "127.0.0.1:5000/codenotary/immudb:1.10.0@sha256:" + "e" * 64
        self.assertTrue(ImmudbRegistry.IMAGE.search(image))
        self.x.r.start_node(PRIMARY, {}, image, {}, None)
        _, out = self.x.call(PRIMARY, "GET", "/version", port=9497)
        self.assertEqual(out["version"], "1.10.0")

    def test_metrics_text_readyz_and_ports(self):
        x = Registry(boot_seconds=0.2)
        x.r.start_node(PRIMARY, {}, "codenotary/immudb:1.11.0", {}, None)
        with self.assertRaises(NotListening):
            x.r.handle(PRIMARY, "GET", "/readyz", {}, b"", 9497)
        self.assertFalse(x.r.probe(PRIMARY, "/readyz", 9497))
        time.sleep(0.25)
        self.assertEqual(x.r.handle(PRIMARY, "GET", "/readyz", {}, b"", 9497)[::2], (200, b""))
        self.assertTrue(x.r.probe(PRIMARY, "/readyz", 9497))
        with self.assertRaises(NotListening):
            x.r.handle(PRIMARY, "GET", "/api/health", {}, b"", 3322)      # gRPC only
        _, text = x.call(PRIMARY, "GET", "/metrics", port=9497)
        self.assertIn("# HELP immudb_last_committed_trx_id ", text)
        self.assertIn("# TYPE immudb_last_committed_trx_id gauge\n", text)
        self.assertIn('immudb_last_committed_trx_id{db="defaultdb",index="index"} 1\n', text)
        self.assertIn('immudb_last_committed_trx_id{db="systemdb",index="index"} 2\n', text)

    def test_sync_replication_waits_for_acks(self):
        x = Registry(sync_wait_seconds=0.3)
        sync = {"IMMUDB_REPLICATION_SYNC_ENABLED": "true"}
        x.r.start_node(PRIMARY, {**sync, "IMMUDB_REPLICATION_SYNC_ACKS": "1"}, "codenotary/immudb:1.11.0", {}, None)
        token = x.login(PRIMARY, password="immudb")
        kv = {"KVs": [{"key": B("k"), "value": B("v")}]}
        status, out = x.call(PRIMARY, "POST", "/api/db/set", kv, token)
        self.assertEqual((status, out["code"]), (504, 4))
        self.assertEqual(x.metric(PRIMARY, "defaultdb"), 1)             # precommitted only
        x.r.start_node(REPLICA, {**replica_env("immudb", "immudb"), **sync}, "codenotary/immudb:1.11.0", {}, None)
        for _ in range(5):
            x.r.replicate_once()
        self.assertEqual(x.metric(REPLICA, "defaultdb"), 2)


# ---- the kubelet's exec hooks and pod network, with the API double -----------

HOOK = """#!/bin/sh
set -e
# Reaches the node by its pod DNS name through http_proxy, as from the pod,
# once it listens (right after the start nothing does: the proxy's 502).
body="{\\"user\\":\\"aW1tdWRi\\",\\"password\\":\\"$(printf %s "$ADMIN_PASSWORD" | base64)\\"}"
for i in $(seq 100); do
  if curl -sf -X POST http://$HOSTNAME.ledger-headless:8080/api/login \\
      -H 'Content-Type: application/json' -d "$body" > /dev/null; then
    echo "$1 done on $HOSTNAME"
    exit 0
  fi
  sleep 0.1
done
exit 1
"""


class KubeletHooksTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="immudb-kube-")
        self.port = free_port()
        self.hook_log = os.path.join(self.dir, "hooks.log")
        self.immudb_log = os.path.join(self.dir, "immudb.log")
        self.api_log = os.path.join(self.dir, "api.log")
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--port", str(self.port), "--log", self.api_log,
                                      "--immudb", "--immudb-boot-seconds", "0.2", "--immudb-log", self.immudb_log,
                                      "--hook-log", self.hook_log], stdout=subprocess.DEVNULL)
        self.addCleanup(lambda: (self.proc.terminate(), self.proc.wait(5)))
        wait_for("the double", self.up)

    def up(self):
        try:
            return self.request("GET", "/api/v1/namespaces")[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, ctype="application/json"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers={"Content-Type": ctype, "User-Agent": "test"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, json.loads(raw) if raw and resp.getheader("Content-Type", "").startswith(
            "application/json") else raw

    def apply(self, plural, obj, group="api/v1"):
        ns = "" if plural == "namespaces" else "/namespaces/ledger"
        path = f"/{group}{ns}/{plural}/{obj['metadata']['name']}?fieldManager=test&force=true"
        status, out = self.request("PATCH", path, obj, "application/apply-patch+yaml")
        self.assertIn(status, (200, 201), out)

    def statefulset(self, replicas):
        labels = {"app": "ledger"}
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ledger"},
                "spec": {"serviceName": "ledger-headless", "replicas": replicas,
                         "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": {
                             "containers": [{
                                 "name": "immudb", "image": "codenotary/immudb:1.11.0",
                                 "env": [{"name": "IMMUDB_ADMIN_PASSWORD", "value": STRONG},
                                         {"name": "ADMIN_PASSWORD", "value": STRONG}],
                                 "ports": [{"name": "http", "containerPort": 8080}],
                                 "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9497}},
                                 "volumeMounts": [{"name": "hooks", "mountPath": "/hooks"}],
                                 "lifecycle": {
                                     "postStart": {"exec": {"command": ["/bin/sh", "/hooks/hook.sh", "postStart"]}},
                                     "preStop": {"exec": {"command": ["/bin/sh", "-c", "/bin/sh /hooks/hook.sh preStop"]}}}}],
                             "volumes": [{"name": "hooks", "configMap": {"name": "ledger-hooks"}}]}}}}

    def pod_ready(self, name):
        status, out = self.request("GET", f"/api/v1/namespaces/ledger/pods/{name}")
        return status == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in out.get("status", {}).get("conditions", []))

    def hooks(self):
        if not os.path.exists(self.hook_log):
            return []
        with open(self.hook_log) as f:
            return [json.loads(x) for x in f]

    def test_post_start_and_pre_stop_hooks_reach_the_node_by_pod_dns(self):
        self.apply("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ledger"}})
        self.apply("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ledger-hooks"},
                                  "data": {"hook.sh": HOOK}})
        self.apply("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ledger-headless"},
                                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                                         "selector": {"app": "ledger"}, "ports": [{"name": "http", "port": 8080}]}})
        self.apply("statefulsets", self.statefulset(2), "apis/apps/v1")
        wait_for("pods ready", lambda: self.pod_ready("ledger-0") and self.pod_ready("ledger-1"))
        runs = [h for h in self.hooks() if h.get("hook") == "postStart"]
        self.assertEqual(sorted(h["pod"] for h in runs), ["ledger/ledger-0", "ledger/ledger-1"])
        self.assertTrue(all(h["exit_code"] == 0 for h in runs), runs)
        self.assertIn("postStart done on ledger-", runs[0]["output_tail"])
        proxied = [h for h in self.hooks() if "proxy" in h]
        # 502 while the node boots (nothing listens), then the node's own answer.
        self.assertTrue(all(h["status"] in (200, 502) for h in proxied), proxied)
        self.assertEqual({h["pod"] for h in proxied if h["status"] == 200}, {"ledger/ledger-0", "ledger/ledger-1"})
        with open(self.immudb_log) as f:
            logins = [json.loads(x) for x in f]
        self.assertEqual(sorted(x["pod"] for x in logins if x["path"] == "/api/login"),
                         ["ledger/ledger-0", "ledger/ledger-1"])
        with open(self.api_log) as f:
            self.assertNotIn("http://", f.read())          # the pod network is not API traffic
        # Scale down: ledger-1 runs its preStop, then goes.
        self.apply("statefulsets", self.statefulset(1), "apis/apps/v1")
        wait_for("preStop", lambda: [h for h in self.hooks() if h.get("hook") == "preStop"])
        stop = [h for h in self.hooks() if h.get("hook") == "preStop"]
        self.assertEqual([(h["pod"], h["exit_code"]) for h in stop], [("ledger/ledger-1", 0)])
        wait_for("ledger-1 gone", lambda: self.request("GET", "/api/v1/namespaces/ledger/pods/ledger-1")[0] == 404)

    def test_claim_at_the_data_dir_keeps_users_across_pod_restarts(self):
        self.apply("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ledger"}})
        sts = self.statefulset(1)
        spec = sts["spec"]["template"]["spec"]
        spec["containers"][0].pop("lifecycle")
        spec["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/var/lib/immudb"}]
        spec.pop("volumes")
        sts["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
        self.apply("statefulsets", sts, "apis/apps/v1")
        wait_for("ledger-0 ready", lambda: self.pod_ready("ledger-0"))
        proxy = "/api/v1/namespaces/ledger/pods/ledger-0:8080/proxy"

        def login(password):
            return self.request("POST", proxy + "/api/login", {"user": B("immudb"), "password": B(password)})
        status, out = login(STRONG)
        self.assertEqual(status, 200, out)
        # The API server's proxy drops Authorization: only the Grpc-Metadata form reaches immudb.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        conn.request("POST", proxy + "/api/user", body=json.dumps({"user": B("app"), "password": B("App1!pass"),
                                                                   "permission": 2, "database": "defaultdb"}),
                     headers={"Content-Type": "application/json", "Authorization": "Bearer " + out["token"]})
        resp = conn.getresponse()
        self.assertEqual((resp.status, json.loads(resp.read())["message"]), (500, "not logged in"))
        conn.request("POST", proxy + "/api/user", body=json.dumps({"user": B("app"), "password": B("App1!pass"),
                                                                   "permission": 2, "database": "defaultdb"}),
                     headers={"Content-Type": "application/json",
                              "Grpc-Metadata-Authorization": "Bearer " + out["token"]})
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.read()), (200, b"{}"))
        conn.close()
        # The pod goes and comes back with its claim: a new password in the env changes nothing.
        spec["containers"][0]["env"][0]["value"] = "Changed9!pw"
        self.apply("statefulsets", sts, "apis/apps/v1")
        wait_for("the rolled pod ready", lambda: self.pod_ready("ledger-0") and (self.request(
            "GET", "/api/v1/namespaces/ledger/pods/ledger-0")[1]["metadata"]["labels"]["controller-revision-hash"]
            == self.request("GET", "/apis/apps/v1/namespaces/ledger/statefulsets/ledger")[1]["status"].get(
                "updateRevision")))
        self.assertEqual(login(STRONG)[0], 200)
        self.assertEqual(login("Changed9!pw")[0], 500)
        status, _ = self.request("POST", proxy + "/api/login", {"user": B("app"), "password": B("App1!pass")})
        self.assertEqual(status, 200)

    def test_failing_post_start_restarts_the_container(self):
        self.apply("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ledger"}})
        self.apply("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ledger-hooks"},
                                  "data": {"hook.sh": "#!/bin/sh\necho nope\nexit 3\n"}})
        self.apply("statefulsets", self.statefulset(1), "apis/apps/v1")
        wait_for("a restart", lambda: (self.request("GET", "/api/v1/namespaces/ledger/pods/ledger-0")[1]
                                       .get("status", {}).get("containerStatuses") or [{}])[0]
                 .get("restartCount", 0) >= 1)
        self.assertFalse(self.pod_ready("ledger-0"))
        _, events = self.request("GET", "/api/v1/namespaces/ledger/events")
        self.assertIn("FailedPostStartHook", [e["reason"] for e in events["items"]])


if __name__ == "__main__":
    unittest.main()
