"""The AllegroGraph cluster stack renders, run by the kube API double's kubelet (--agraph).

Run: cd tests/kube-api-double && python3 -m unittest test_agraph_kubelet -v
The double runs as a subprocess; the objects are those pinned in stack's
snapshot (3 copies); the copies' member sidecar (manifests/allegrograph-member.sh,
in the snapshot's ConfigMap) runs for real with the host's sh and curl. The
AllegroGraph API is reached through the API server's port-forward, over a
small stdlib WebSocket client that speaks like kube-client.
"""

import base64
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
from urllib.parse import urlencode

from test_couchdb_double import free_port, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "kube_api_double.py")
SNAPSHOT = os.path.join(HERE, "..", "..", "src", "phases", "databases", "allegrograph", "snapshots",
                        "stack__phases__databases__allegrograph__objects__tests__allegrograph-3.snap")
NS = "shop"
PLURALS = {"Secret": "api/v1/namespaces/{ns}/secrets", "ConfigMap": "api/v1/namespaces/{ns}/configmaps",
           "Service": "api/v1/namespaces/{ns}/services",
           "PodDisruptionBudget": "apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
           "StatefulSet": "apis/apps/v1/namespaces/{ns}/statefulsets"}
CONTROLLING = "graph-controlling-0"
CONTROLLING_HOST = "graph-controlling-0.graph-controlling.shop.svc.cluster.local"


def snapshot_objects():
    with open(SNAPSHOT) as f:
        text = f.read()
    # insta's header (between the two `---` lines), then the JSON.
    return json.loads(text.split("\n---\n", 1)[1])


def mask(payload, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class PortForward:
    """GET .../pods/POD/portforward?ports=P as kube-client sends it; one HTTP exchange on the data channel."""

    def __init__(self, port, pod, pod_port=10035):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.rfile = self.sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /api/v1/namespaces/{NS}/pods/{pod}/portforward?ports={pod_port} HTTP/1.1\r\n"
                           "Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                           f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Protocol: v5.channel.k8s.io, v4.channel.k8s.io\r\n"
                           "User-Agent: test\r\n\r\n").encode())
        self.status = int(self.rfile.readline().split()[1])
        self.headers = {}
        while True:
            line = self.rfile.readline().decode().strip()
            if not line:
                break
            k, v = line.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()
        self.body = b""
        if self.status != 101:
            self.body = self.rfile.read(int(self.headers.get("content-length", 0)))
            self.sock.close()
            return
        self.port = pod_port
        # First frame on each channel: [channel, port lo, port hi].
        for ch in (0, 1):
            op, data = self.recv()
            if data != bytes([ch]) + struct.pack("<H", pod_port):
                raise AssertionError(f"first frame on channel {ch}: {data!r}")

    def recv(self):
        """-> (opcode, payload) of the next message."""
        parts = []
        while True:
            b0, b1 = self.read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.read(8))[0]
            parts.append(self.read(n))
            if b0 & 0x80:
                return b0 & 0x0F, b"".join(parts)

    def read(self, n):
        data = self.rfile.read(n)
        if len(data) != n:
            raise EOFError("the WebSocket ended")
        return data

    def send(self, payload):
        key = os.urandom(4)
        n = len(payload)
        head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
        self.sock.sendall(head + key + mask(payload, key))

    def request(self, method, path, auth=None):
        """One HTTP/1.1 request through the tunnel (Connection: close) -> (status, body bytes)."""
        head = [f"{method} {path} HTTP/1.1", "Host: localhost:10035", "Connection: close", "Content-Length: 0"]
        if auth:
            head.append("Authorization: Basic " + base64.b64encode(":".join(auth).encode()).decode())
        self.send(b"\x00" + ("\r\n".join(head) + "\r\n\r\n").encode())
        data, errors = b"", b""
        while True:
            op, payload = self.recv()
            if op == 8:             # Close: every port is done
                break
            if payload[:1] == b"\x00":
                data += payload[1:]
            elif payload[:1] == b"\x01":
                errors += payload[1:]
        self.sock.close()
        if errors:
            raise AssertionError(f"error channel: {errors.decode()}")
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body


class AgraphKubeletTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="agraph-kube-")
        if not os.environ.get("KEEP_LOGS"):
            self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port()
        self.logs = {name: os.path.join(self.dir, name + ".log") for name in ("api", "agraph", "hooks", "containers")}
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--port", str(self.port), "--log", self.logs["api"],
             "--agraph", "--agraph-log", self.logs["agraph"], "--agraph-boot-seconds", "0.3",
             "--hook-log", self.logs["hooks"], "--container-log", self.logs["containers"],
             "--container-env", "STACK_CHECK_SECONDS=1"], stdout=subprocess.DEVNULL)
        self.addCleanup(lambda: (self.proc.terminate(), self.proc.wait(5)))
        wait_for("the double", self.up)

    def up(self):
        try:
            return self.request("GET", "/api/v1/namespaces")[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, ctype="application/json"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers={"Content-Type": ctype, "User-Agent": "test"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, json.loads(raw) if raw and resp.getheader("Content-Type", "").startswith(
            "application/json") else raw

    def apply(self, obj):
        base = PLURALS[obj["kind"]].format(ns=NS)
        path = f"/{base}/{obj['metadata']['name']}?fieldManager=stack&force=true"
        status, out = self.request("PATCH", path, obj, "application/apply-patch+yaml")
        self.assertIn(status, (200, 201), out)

    def pod(self, name):
        status, out = self.request("GET", f"/api/v1/namespaces/{NS}/pods/{name}")
        return out if status == 200 else None

    def ready(self, name):
        pod = self.pod(name)
        return pod is not None and "deletionTimestamp" not in pod["metadata"] and any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

    def forward(self, method, path, pod=CONTROLLING):
        pf = PortForward(self.port, pod)
        self.assertEqual((pf.status, pf.headers.get("sec-websocket-protocol")), (101, "v4.channel.k8s.io"))
        return pf.request(method, path, auth=("admin", self.password))

    def instances(self):
        """{instanceName: state} from the controlling instance's repl/status, through a port-forward."""
        status, body = self.forward("GET", "/repositories/kg/repl/status")
        self.assertEqual(status, 200, body)
        return {i["instanceName"]: i["state"] for i in json.loads(body)["instances"]}

    def wait_members(self, want, timeout):
        seen = []

        def check():
            seen[:] = [self.instances()]
            return seen[0] == want
        try:
            wait_for(f"members {want}", check, timeout=timeout)
        except AssertionError:
            with open(self.logs["containers"]) as f:
                raise AssertionError(f"members {seen}, want {want}; containers:\n{f.read()[-3000:]}")

    def agraph_log(self):
        with open(self.logs["agraph"]) as f:
            return [json.loads(x) for x in f]

    def test_copies_join_leave_on_scale_down_and_rejoin_after_a_restart(self):
        objects = snapshot_objects()
        self.password = base64.b64decode(next(o for o in objects if o["kind"] == "Secret")["data"]["password"]).decode()
        status, out = self.request("POST", "/api/v1/namespaces",
                                   {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        self.assertEqual(status, 201, out)
        # The license Secret the StatefulSets name (licenseSecret) is the user's, not rendered by stack.
        self.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "agraph-license", "namespace": NS},
                    "data": {"license": base64.b64encode(b"stand-in license").decode()}})
        for obj in objects:
            self.apply(obj)
        wait_for("the controlling pod ready", lambda: self.ready(CONTROLLING))

        # A missing pod: the API server's 404 Status, before any upgrade.
        pf = PortForward(self.port, "graph-controlling-9")
        self.assertEqual((pf.status, json.loads(pf.body)["reason"]), (404, "NotFound"))

        # Nothing listens on that port: upgraded, then the port's error channel says so, and the end.
        pf = PortForward(self.port, CONTROLLING, pod_port=10036)
        op, data = pf.recv()
        self.assertEqual(data[:1], b"\x01")
        self.assertIn(b"dial tcp4 127.0.0.1:10036: connect: connection refused", data)
        self.assertEqual(pf.recv()[0], 8)
        pf.sock.close()

        query = urlencode({"host": CONTROLLING_HOST, "port": 10035, "user": "admin", "password": self.password,
                           "instanceName": CONTROLLING})
        status, body = self.forward("PUT", "/repositories/kg/repl/createCluster?" + query)
        self.assertEqual(status, 204, body)
        copies = [f"graph-copy-{i}" for i in range(3)]
        self.wait_members({CONTROLLING: "running", **{c: "running" for c in copies}}, timeout=15)
        wait_for("the copies ready", lambda: all(self.ready(c) for c in copies))
        member = next(c for c in self.pod("graph-copy-0")["status"]["containerStatuses"] if c["name"] == "member")
        self.assertEqual((member["ready"], list(member["state"])), (True, ["running"]))

        # 3 -> 1 copies: copy-1 and copy-2 take themselves out as they stop.
        status, out = self.request("PATCH", f"/apis/apps/v1/namespaces/{NS}/statefulsets/graph-copy",
                                   {"spec": {"replicas": 1}}, "application/merge-patch+json")
        self.assertEqual(status, 200, out)
        wait_for("copy-1 and copy-2 gone", lambda: self.pod("graph-copy-1") is None and
                 self.pod("graph-copy-2") is None, timeout=10)
        self.assertEqual(self.instances(), {CONTROLLING: "running", "graph-copy-0": "running"})
        removes = [x for x in self.agraph_log() if "/repl/remove" in x["path"] and x["status"] == 204]
        self.assertEqual(sorted(x["path"].rsplit("=", 1)[1] for x in removes), ["graph-copy-1", "graph-copy-2"])

        # copy-0 deleted: it leaves, its pod comes back empty (no claims) and joins again.
        uid = self.pod("graph-copy-0")["metadata"]["uid"]
        status, _ = self.request("DELETE", f"/api/v1/namespaces/{NS}/pods/graph-copy-0")
        self.assertEqual(status, 200)
        wait_for("a new graph-copy-0", lambda: (self.pod("graph-copy-0") or {"metadata": {"uid": uid}})[
            "metadata"]["uid"] != uid, timeout=10)
        self.wait_members({CONTROLLING: "running", "graph-copy-0": "running"}, timeout=10)
        grows = [x for x in self.agraph_log() if "/repl/growCluster" in x["path"] and "graph-copy-0" in x["path"]
                 and x["status"] == 204]
        self.assertEqual(len(grows), 2, grows)

        # Everything reached AllegroGraph through the port-forward, pods/proxy was never used.
        with open(self.logs["api"]) as f:
            api = f.read().splitlines()
        forwards = [x for x in api if x.startswith(f"GET /api/v1/namespaces/{NS}/pods/graph-controlling-0/"
                                                   "portforward?ports=10035 ")]
        self.assertGreaterEqual(len(forwards), 4)
        self.assertFalse([x for x in api if "/proxy" in x])
        # The sidecars' requests came from their own pods.
        with open(self.logs["hooks"]) as f:
            proxied = [json.loads(x) for x in f if '"proxy"' in x]
        self.assertTrue(proxied)
        self.assertTrue(all(x["from"] and x["from"].startswith(NS + "/graph-copy-") for x in proxied), proxied[:3])

        self.assertFalse([x for x in proxied if "stand-in-password" in x["url"]])    # redacted

    def test_curl_containers_run_restart_and_stop_within_the_grace_period(self):
        self.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        self.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tick", "namespace": NS},
                    "data": {"word": base64.b64encode(b"hello").decode()}})
        self.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tick", "namespace": NS},
                    "data": {"tick.sh": "echo \"$POD_NAME says $WORD $STACK_CHECK_SECONDS\"\n"
                                        "[ -f /tmp/tick-$$ ] || exit 3\n"}})
        labels = {"app": "tick"}
        sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "tick", "namespace": NS},
               "spec": {"replicas": 1, "serviceName": "tick", "selector": {"matchLabels": labels},
                        "template": {"metadata": {"labels": labels}, "spec": {
                            "terminationGracePeriodSeconds": 1,
                            "containers": [{
                                "name": "tick", "image": "docker.io/curlimages/curl:8.11.1",
                                "command": ["/bin/sh", "/opt/tick/tick.sh"],
                                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                        {"name": "WORD", "valueFrom": {"secretKeyRef": {"name": "tick", "key": "word"}}}],
                                "volumeMounts": [{"name": "tick", "mountPath": "/opt/tick"}]}],
                            "volumes": [{"name": "tick", "configMap": {"name": "tick"}}]}}}}
        self.apply(sts)

        def restarted():
            pod = self.pod("tick-0")
            cs = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
            return cs[0].get("restartCount", 0) >= 1 and cs[0]
        cs = wait_for("a restart", restarted, timeout=10)
        self.assertFalse(cs["ready"])
        self.assertFalse(self.ready("tick-0"))
        with open(self.logs["containers"]) as f:
            out = f.read()
        self.assertIn("shop/tick-0/tick: tick-0 says hello 1", out)
        self.assertIn("shop/tick-0/tick: exited with code 3", out)
        # One that runs and ignores TERM: Running and Ready, then Terminating for the grace period.
        self.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tick", "namespace": NS},
                    "data": {"tick.sh": "trap '' TERM\nwhile :; do sleep 0.1; done\n"}})
        self.request("DELETE", f"/api/v1/namespaces/{NS}/pods/tick-0")
        wait_for("tick-0 ready", lambda: self.ready("tick-0"), timeout=10)
        uid = self.pod("tick-0")["metadata"]["uid"]
        started = time.monotonic()
        self.request("DELETE", f"/api/v1/namespaces/{NS}/pods/tick-0")
        self.assertIn("deletionTimestamp", self.pod("tick-0")["metadata"])
        wait_for("the old tick-0 gone", lambda: (self.pod("tick-0") or {"metadata": {}})["metadata"].get("uid") != uid,
                 timeout=10)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)


if __name__ == "__main__":
    unittest.main()
