"""Tests of the AllegroGraph TEST DOUBLE (agraph_double.py), of the member script
manifests/allegrograph-member.sh run for real against it, and of container_runner.py.

Run: cd tests/kube-api-double && python3 -m unittest test_agraph_double -v
Loopback only. The script needs `sh` and `curl` on this machine (Debian
packages dash and curl); without curl those tests are skipped.
"""

import base64
import glob
import json
import os
import shutil
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlsplit

from agraph_double import AgraphRegistry
from container_runner import ContainerRunner
from couchdb_double import NotListening

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "manifests", "allegrograph-member.sh")
NS = "demo"
USER, PASSWORD = "stack", 'pw"with\\odd&chars=+ %'
GiB = 1 << 30
REPO = "kb"


def fqdn(i):
    return f"ag-{i}.ag.{NS}.svc.cluster.local"


def pod(i):
    return f"{NS}/ag-{i}"


def auth(user=USER, password=PASSWORD):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def q(**params):
    return "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


def wait_for(cond, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError("timed out waiting")


class Fixture(unittest.TestCase):
    """A registry with DNS for ag-0..ag-3 while their pods exist."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.log = os.path.join(self.dir, "agraph.log")
        self.reg = AgraphRegistry(log_path=self.log, boot_seconds=0.1, repl_seconds=0.2, unreachable_seconds=0.4)
        self.names = {fqdn(i): pod(i) for i in range(4)}
        self.pods = set()      # pods that exist (their DNS names resolve)
        self.reg.resolver = self.resolve

    def resolve(self, host, port, from_pod):
        key = self.names.get(host)
        return (key, port) if key in self.pods else None

    def start(self, i, env=None, shm=2 * GiB, **kw):
        self.pods.add(pod(i))
        env = {"AGRAPH_SUPER_USER": USER, "AGRAPH_SUPER_PASSWORD": PASSWORD} if env is None else env
        ok = self.reg.start_node(pod(i), env, image="franzinc/agraph:v8.3.1", files={}, fqdn=fqdn(i),
                                 shm_bytes=shm, **kw)
        if ok:
            wait_for(lambda: self.up(i))
        return ok

    def delete_pod(self, i, keep_data=False):
        self.reg.stop_node(pod(i), keep_data=keep_data)
        self.pods.discard(pod(i))

    def up(self, i):
        try:
            self.reg.handle(pod(i), "GET", "/version", {}, b"")
            return True
        except NotListening:
            return False

    def call(self, i, method, path, body=b"", headers=None, creds=True):
        h = dict(auth() if creds is True else (creds or {}))
        h.update(headers or {})
        status, hdrs, out = self.reg.handle(pod(i), method, path, h, body)
        return status, hdrs, out

    def ok(self, i, method, path, body=b"", headers=None):
        status, hdrs, out = self.call(i, method, path, body, headers)
        self.assertLess(status, 300, f"{method} {path}: {status} {out!r}")
        return out

    def create_cluster(self, i=0):
        self.ok(i, "PUT", f"/repositories/{REPO}/repl/createCluster?" +
                q(host=fqdn(i), port=10035, user=USER, password=PASSWORD, instanceName=f"ag-{i}"))

    def grow(self, i, via=0, name=None, password=PASSWORD, host=None):
        return self.call(via, "PUT", f"/repositories/{REPO}/repl/growCluster?" +
                         q(host=host or fqdn(i), port=10035, name=REPO, user=USER, password=password,
                           instanceName=name or f"ag-{i}"))

    def status(self, via=0):
        out = self.ok(via, "GET", f"/repositories/{REPO}/repl/status")
        return json.loads(out)

    def states(self, via=0):
        return {i["instanceName"]: i["state"] for i in self.status(via)["instances"]}

    def add(self, i, *triples):
        body = "".join(f"<http://x/{s}> <http://x/p> \"{o}\" .\n" for s, o in triples).encode()
        return self.ok(i, "POST", f"/repositories/{REPO}/statements", body, {"Content-Type": "text/plain"})

    def size(self, i, repo=REPO):
        return int(self.ok(i, "GET", f"/repositories/{repo}/size"))

    def log_lines(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]


class ServerTest(Fixture):
    def test_no_auth_only_for_version_and_hostname(self):
        self.start(0)
        self.assertEqual(self.call(0, "GET", "/version", creds=None)[2].strip(), b"8.3.1")
        self.assertEqual(self.call(0, "GET", "/hostname", creds=None)[2].strip(), b"ag-0")
        for creds in (None, auth(USER, "wrong"), auth("admin", "")):
            status, hdrs, out = self.call(0, "GET", "/repositories", creds=creds)
            self.assertEqual(status, 401)
            self.assertTrue(hdrs["Content-Type"].startswith("text/plain"))
            self.assertIn("Basic", hdrs["WWW-Authenticate"])
        self.assertEqual(self.call(0, "GET", "/metrics", creds=None)[0], 401)
        self.assertEqual(self.call(0, "PUT", f"/repositories/{REPO}/repl/status", creds=None)[0], 401)

    def test_image_pinned_by_digest(self):
        image = "127.0.0.1:5000/franzinc/agraph:v8.2.0@sha256:" + "f" * 64
        self.assertTrue(AgraphRegistry.IMAGE.search(image))
        self.pods.add(pod(0))
        self.assertTrue(self.reg.start_node(pod(0), {"AGRAPH_SUPER_USER": USER, "AGRAPH_SUPER_PASSWORD": PASSWORD},
                                            image=image, files={}, fqdn=fqdn(0), shm_bytes=2 * GiB))
        wait_for(lambda: self.up(0))
        self.assertEqual(self.call(0, "GET", "/version", creds=None)[2].strip(), b"8.2.0")

    def test_super_user_from_env_only_at_first_start(self):
        self.start(0)
        self.reg.stop_node(pod(0), keep_data=True)
        self.start(0, env={"AGRAPH_SUPER_USER": "other", "AGRAPH_SUPER_PASSWORD": "pw2"})
        self.assertEqual(self.call(0, "GET", "/repositories")[0], 200)
        self.assertEqual(self.call(0, "GET", "/repositories", creds=auth("other", "pw2"))[0], 401)
        # /agraph/etc kept, /agraph/data lost: still the first user.
        self.reg.stop_node(pod(0), keep_data=["/agraph/etc"])
        self.start(0, env={"AGRAPH_SUPER_USER": "other", "AGRAPH_SUPER_PASSWORD": "pw2"})
        self.assertEqual(self.call(0, "GET", "/repositories")[0], 200)
        # Both lost: the environment applies again.
        self.reg.stop_node(pod(0), keep_data=False)
        self.start(0, env={"AGRAPH_SUPER_USER": "other", "AGRAPH_SUPER_PASSWORD": "pw2"})
        self.assertEqual(self.call(0, "GET", "/repositories")[0], 401)
        self.assertEqual(self.call(0, "GET", "/repositories", creds=auth("other", "pw2"))[0], 200)

    def test_without_env_admin_has_a_random_password(self):
        self.start(0, env={"AGRAPH_SUPER_USER": "admin"})
        for pw in ("", "admin", "xyzzy", PASSWORD):
            self.assertEqual(self.call(0, "GET", "/repositories", creds=auth("admin", pw))[0], 401)
        generated = self.reg.servers[pod(0)].generated_password
        self.assertEqual(len(generated), 16)
        self.assertEqual(self.call(0, "GET", "/repositories", creds=auth("admin", generated))[0], 200)

    def test_password_file_variant(self):
        files = {"/run/secrets/ag": {"password": PASSWORD + "\n"}}
        env = {"AGRAPH_SUPER_USER": USER, "AGRAPH_SUPER_PASSWORD_FILE": "/run/secrets/ag/password"}
        self.pods.add(pod(0))
        self.assertTrue(self.reg.start_node(pod(0), env, files=files, fqdn=fqdn(0), shm_bytes=GiB))
        wait_for(lambda: self.up(0))
        self.assertEqual(self.call(0, "GET", "/repositories")[0], 200)
        self.reg.stop_node(pod(1 - 1), keep_data=False)
        env["AGRAPH_SUPER_PASSWORD"] = PASSWORD
        self.assertFalse(self.reg.start_node(pod(0), env, files=files, shm_bytes=GiB))

    def test_small_shm_refuses_to_start(self):
        self.assertFalse(self.start(0, shm=None))
        self.assertIn("--shm-size 1g", self.reg.crash_reason(pod(0)))
        self.assertFalse(self.reg.running(pod(0)))
        with self.assertRaises(NotListening):
            self.call(0, "GET", "/version")
        self.assertFalse(self.start(0, shm=64 << 20))
        self.assertFalse(self.start(0, shm=512 << 20))
        self.assertTrue(self.start(0, shm=GiB, unknown_kwarg="ignored"))
        self.assertIsNone(self.reg.crash_reason(pod(0)))

    def test_not_listening_while_booting_and_on_other_ports(self):
        self.pods.add(pod(0))
        reg = AgraphRegistry(boot_seconds=0.5)
        reg.start_node(pod(0), {}, shm_bytes=GiB)
        with self.assertRaises(NotListening):
            reg.handle(pod(0), "GET", "/version", {}, b"")
        self.assertFalse(reg.probe(pod(0), "/hostname", 10035))
        time.sleep(0.6)
        self.assertTrue(reg.probe(pod(0), "/hostname", 10035))
        with self.assertRaises(NotListening):
            reg.handle(pod(0), "GET", "/version", {}, b"", port=10000)

    def test_repositories(self):
        self.start(0)
        self.assertEqual(self.call(0, "PUT", "/repositories/r1?override=false")[0], 204)
        self.add_to("r1")
        self.assertEqual(self.size(0, "r1"), 2)
        status, _, out = self.call(0, "PUT", "/repositories/r1?override=false")
        self.assertEqual(status, 400)
        self.assertEqual(self.size(0, "r1"), 2)
        # Without override=false an existing repository is overwritten.
        self.assertEqual(self.call(0, "PUT", "/repositories/r1")[0], 204)
        self.assertEqual(self.size(0, "r1"), 0)
        listed = json.loads(self.ok(0, "GET", "/repositories"))
        self.assertEqual([r["id"] for r in listed], ['"r1"'])
        self.assertEqual(self.call(0, "POST", "/repositories/r1/statements", b"<a> <b> <c> .\n")[0], 400)
        self.assertEqual(self.call(0, "POST", "/repositories/r1/statements", b"nonsense\n",
                                   {"Content-Type": "application/n-triples"})[0], 400)
        self.assertEqual(self.call(0, "DELETE", "/repositories/r1")[0], 204)
        self.assertEqual(self.call(0, "GET", "/repositories/r1/size")[0], 404)

    def add_to(self, repo):
        body = b'<http://x/a> <http://x/p> "1" .\n# comment\n\n<http://x/b> <http://x/p> <http://x/c> .\n'
        self.assertEqual(self.ok(0, "POST", f"/repositories/{repo}/statements", body,
                                 {"Content-Type": "text/plain"}).strip(), b"2")

    def test_metrics_need_the_super_user(self):
        self.start(0)
        self.ok(0, "PUT", "/repositories/r1")
        self.add_to("r1")
        self.reg.servers[pod(0)].etc["users"]["plain"] = {"password": "p", "super": False}
        self.assertEqual(self.call(0, "GET", "/metrics", creds=auth("plain", "p"))[0], 403)
        out = self.ok(0, "GET", "/metrics").decode()
        self.assertIn('agraph_repository_triples{catalog="root",repository="r1"} 2', out)


class ReplicationTest(Fixture):
    def setUp(self):
        super().setUp()
        for i in range(3):
            self.start(i)
        self.create_cluster(0)

    def test_create_grow_remove_and_replicate(self):
        status, _, out = self.call(0, "PUT", f"/repositories/{REPO}/repl/createCluster?" +
                                   q(host=fqdn(0), port=10035, user=USER, password=PASSWORD, instanceName="x"))
        self.assertEqual(status, 400)
        self.assertIn(b"already", out)
        self.add(0, ("a", 1))
        self.assertEqual(self.grow(1)[0], 204)
        self.assertEqual(self.size(1), 1)                 # the data is copied
        self.assertEqual(self.grow(2)[0], 204)
        st = self.status(0)
        self.assertEqual(st["controllingInstance"], "ag-0")
        self.assertEqual([(i["instanceName"], i["host"], i["port"], i["controlling"], i["state"])
                          for i in st["instances"]],
                         [("ag-0", fqdn(0), 10035, True, "running"), ("ag-1", fqdn(1), 10035, False, "running"),
                          ("ag-2", fqdn(2), 10035, False, "running")])
        self.assertEqual(self.status(2)["instances"], st["instances"])    # any instance answers
        # A commit on a member reaches every other instance a little later.
        self.add(1, ("b", 2), ("c", 3))
        self.assertEqual((self.size(0), self.size(1), self.size(2)), (1, 3, 1))
        wait_for(lambda: self.size(0) == 3 and self.size(2) == 3)
        # Removing a member: out of the cluster, its copy standalone.
        self.ok(0, "PUT", f"/repositories/{REPO}/repl/remove?instanceName=ag-2")
        self.assertEqual(list(self.states()), ["ag-0", "ag-1"])
        self.assertEqual(self.call(2, "GET", f"/repositories/{REPO}/repl/status")[0], 400)
        self.add(0, ("d", 4))
        wait_for(lambda: self.size(1) == 4)
        time.sleep(0.3)
        self.assertEqual(self.size(2), 3)
        # Growing it again needs its copy gone.
        status, _, out = self.grow(2)
        self.assertEqual(status, 400)
        self.ok(2, "DELETE", f"/repositories/{REPO}")
        self.assertEqual(self.grow(2)[0], 204)
        self.assertEqual(self.size(2), 4)

    def test_grow_errors(self):
        self.assertEqual(self.grow(1)[0], 204)
        self.assertEqual(self.grow(2, name="ag-1")[0], 400)                        # duplicate instanceName
        self.assertEqual(self.grow(2, via=1)[0], 400)                              # not the controlling instance
        status, _, out = self.grow(2, password="wrong")
        self.assertEqual(status, 500)
        self.assertNotIn(b"wrong", out)
        self.ok(2, "PUT", f"/repositories/{REPO}")
        self.assertEqual(self.grow(2)[0], 400)                                     # already has the repository
        t = time.monotonic()
        status, _, out = self.grow(3, host="nowhere.demo.svc.cluster.local")
        self.assertEqual(status, 500)
        self.assertGreaterEqual(time.monotonic() - t, 0.35)                        # bounded wait
        self.assertEqual(self.grow(3)[0], 500)                                     # no pod: does not resolve
        self.pods.add(pod(3))
        self.assertEqual(self.grow(3)[0], 500)                                     # resolves, nothing listens
        self.assertEqual(list(self.states()), ["ag-0", "ag-1"])
        status, _, out = self.call(0, "PUT", f"/repositories/{REPO}/repl/growCluster?" + q(host=fqdn(2)))
        self.assertEqual(status, 400)

    def test_remove_errors(self):
        self.grow(1)
        path = f"/repositories/{REPO}/repl/remove?instanceName="
        self.assertEqual(self.call(0, "PUT", path + "ag-9")[0], 400)
        status, hdrs, out = self.call(0, "PUT", path + "ag-0")
        self.assertEqual(status, 400)
        self.assertTrue(hdrs["Content-Type"].startswith("text/plain"))
        self.assertEqual(self.call(1, "PUT", path + "ag-1")[0], 400)               # sent to a member
        self.assertEqual(self.call(0, "PUT", path + "ag-1")[0], 204)
        self.assertEqual(self.call(0, "PUT", path + "ag-1")[0], 400)

    def test_dead_member_stays_listed_until_removed(self):
        self.grow(1)
        self.grow(2)
        self.delete_pod(2, keep_data=False)              # pod and claim deleted, nobody removed it
        self.assertEqual(self.states(), {"ag-0": "running", "ag-1": "running", "ag-2": "unreachable"})
        self.add(0, ("a", 1))
        wait_for(lambda: self.size(1) == 1)
        # It comes back empty: it answers, but holds no instance.
        self.start(2)
        self.assertEqual(self.states()["ag-2"], "stopped")
        metrics = self.ok(0, "GET", "/metrics").decode()
        self.assertIn(f'agraph_replication_instances{{catalog="root",repository="{REPO}",state="running"}} 2', metrics)
        self.assertIn(f'agraph_replication_instances{{catalog="root",repository="{REPO}",state="stopped"}} 1', metrics)
        # Container down, data kept: unreachable, and catching up when back.
        self.reg.stop_node(pod(1), keep_data=True)
        self.assertEqual(self.states()["ag-1"], "unreachable")
        self.add(0, ("b", 2))
        time.sleep(0.3)
        self.start(1)
        wait_for(lambda: self.size(1) == 2)
        self.assertEqual(self.states()["ag-1"], "running")
        self.ok(0, "PUT", f"/repositories/{REPO}/repl/remove?instanceName=ag-2")
        self.assertEqual(list(self.states()), ["ag-0", "ag-1"])

    def test_log_has_no_password(self):
        self.grow(1)
        self.grow(2, password="wrong-pw")
        self.call(0, "GET", "/repositories", creds=auth(USER, "wrong-pw"))
        lines = self.log_lines()
        self.assertTrue(any("growCluster" in line["path"] and "password=***" in line["path"] for line in lines))
        with open(self.log) as f:
            text = f.read()
        for secret in (PASSWORD, quote(PASSWORD, safe=""), "wrong-pw"):
            self.assertNotIn(secret, text)


# ---- the member script, for real -------------------------------------------------

class Proxy(BaseHTTPRequestHandler):
    """A loopback http_proxy: absolute-form requests to registry.handle, by host name."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def any(self):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection",)}
        got = self.server.fixture.resolve(url.hostname, url.port or 80, None)
        path = url.path + ("?" + url.query if url.query else "")
        try:
            if got is None:
                raise NotListening("no such host")
            status, hdrs, out = self.server.fixture.reg.handle(got[0], self.command, path, headers, body,
                                                               port=url.port or 80)
        except NotListening:
            status, hdrs, out = 502, {"Content-Type": "text/plain"}, b"Bad Gateway\n"
        self.send_response(status)
        for k, v in hdrs.items():
            if k.lower() not in ("content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = any


@unittest.skipUnless(shutil.which("curl") and shutil.which("sh"), "needs sh and curl (Debian: dash, curl)")
class MemberScriptTest(Fixture):
    def setUp(self):
        super().setUp()
        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        self.proxy.fixture = self
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.addCleanup(self.proxy.server_close)
        self.addCleanup(self.proxy.shutdown)
        self.out = os.path.join(self.dir, "containers.log")
        self.runner = ContainerRunner(self.proxy.server_address[1], log_path=self.out,
                                      backoff_seconds=0.3, max_backoff_seconds=1.0)
        self.addCleanup(self.runner.stop_all, 2)
        with open(SCRIPT) as f:
            self.script = f.read()
        self.seen_cmdlines = set()
        self.watching = True
        self.addCleanup(setattr, self, "watching", False)
        threading.Thread(target=self.watch_cmdlines, daemon=True).start()

    def watch_cmdlines(self):
        """Every command line on this machine while the test runs (the password must never be in one)."""
        while self.watching:
            for path in glob.glob("/proc/[0-9]*/cmdline"):
                try:
                    with open(path, "rb") as f:
                        self.seen_cmdlines.add(f.read())
                except OSError:
                    pass
            time.sleep(0.02)

    def run_member(self, i, join_seconds=60, shell=("/bin/sh",)):
        env = {"AGRAPH_SUPER_USER": USER, "AGRAPH_SUPER_PASSWORD": PASSWORD, "POD_NAME": f"ag-{i}",
               "STACK_REPOSITORY": REPO, "STACK_CONTROLLING": fqdn(0), "STACK_SELF": fqdn(i),
               "STACK_PORT": "10035", "STACK_JOIN_SECONDS": str(join_seconds), "STACK_CHECK_SECONDS": "0.5"}
        self.runner.start(pod(i), "member", list(shell) + ["/opt/stack/allegrograph-member.sh"], env,
                          {"/opt/stack": {"allegrograph-member.sh": self.script}})

    def member_requests(self, i, since=0):
        return [(line["method"], line["path"], line["status"]) for line in self.log_lines()[since:]
                if line["pod"] == pod(0) and f"instanceName=ag-{i}" in line["path"]]

    def running_member(self, i):
        return self.states().get(f"ag-{i}") == "running"

    def container_log(self):
        if not os.path.exists(self.out):
            return ""
        with open(self.out) as f:
            return f.read()

    def check_no_password_anywhere(self):
        with open(self.log) as f:
            served = f.read()
        for text in (served, self.container_log()):
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn(quote(PASSWORD, safe=""), text)
        self.assertTrue(any(b"curl" in cmd for cmd in self.seen_cmdlines))
        for cmd in self.seen_cmdlines:
            self.assertNotIn(PASSWORD.encode(), cmd)
            self.assertNotIn(quote(PASSWORD, safe="").encode(), cmd)
            self.assertNotIn(base64.b64encode(f"{USER}:{PASSWORD}".encode()), cmd)

    def test_joins_rejoins_after_empty_restart_and_leaves_on_term(self):
        self.start(0)
        self.start(1)
        self.run_member(1)                        # before the cluster exists: it waits
        time.sleep(1.0)
        self.create_cluster(0)
        self.add(0, ("a", 1))
        wait_for(lambda: self.running_member(1), timeout=20)
        # The double counts the copy as running while it answers the
        # growCluster; the request is logged once answered.
        wait_for(lambda: (r := self.member_requests(1)) and r[-1][2] == 204, timeout=20)
        self.assertEqual(self.size(1), 1)
        reqs = self.member_requests(1)
        self.assertEqual(reqs[0][:2], ("PUT", f"/repositories/{REPO}/repl/remove?instanceName=ag-1"))
        self.assertEqual(reqs[0][2], 400)         # not a member yet: an error, and fine
        grow = reqs[-1]
        self.assertEqual(grow[0], "PUT")
        self.assertEqual(grow[2], 204)
        self.assertEqual(urlsplit(grow[1]).path, f"/repositories/{REPO}/repl/growCluster")
        query = dict(p.split("=", 1) for p in urlsplit(grow[1]).query.split("&"))
        self.assertEqual(query, {"host": quote(fqdn(1)), "port": "10035", "name": REPO, "user": USER,
                                 "instanceName": "ag-1", "password": "***"})
        status_calls = [l for l in self.log_lines() if l["path"] == f"/repositories/{REPO}/repl/status"]
        self.assertTrue(status_calls and status_calls[-1]["status"] == 200)

        # Its AllegroGraph restarts empty: removed under the old name, grown again.
        since = len(self.log_lines())
        self.reg.stop_node(pod(1), keep_data=False)
        self.start(1)
        wait_for(lambda: self.member_requests(1, since) and self.member_requests(1, since)[-1][1].count("growCluster")
                 and self.member_requests(1, since)[-1][2] == 204, timeout=20)
        again = self.member_requests(1, since)
        self.assertEqual(again[0][:3], ("PUT", f"/repositories/{REPO}/repl/remove?instanceName=ag-1", 204))
        self.assertTrue(self.running_member(1))
        self.assertEqual(self.size(1), 1)

        # SIGTERM: it removes itself and exits at once.
        since = len(self.log_lines())
        t = time.monotonic()
        self.runner.stop(pod(1), grace_seconds=20)
        self.assertLess(time.monotonic() - t, 5)
        self.assertEqual(self.member_requests(1, since),
                         [("PUT", f"/repositories/{REPO}/repl/remove?instanceName=ag-1", 204)])
        self.assertNotIn("ag-1", self.states())
        self.assertIn("exited with code 0", self.container_log())

        # Started again with its data kept: the standalone copy goes, and it joins again.
        self.run_member(1)
        wait_for(lambda: self.running_member(1), timeout=20)
        self.assertIn(("DELETE", f"/repositories/{REPO}"),
                      [(l["method"], l["path"]) for l in self.log_lines()[since:] if l["pod"] == pod(1)])
        self.runner.stop(pod(1), grace_seconds=20)
        self.check_no_password_anywhere()

    def test_a_member_already_stays(self):
        self.start(0)
        self.start(1)
        self.create_cluster(0)
        self.assertEqual(self.grow(1)[0], 204)
        since = len(self.log_lines())
        # busybox sh when there is one: the ash of curlimages/curl (Alpine).
        self.run_member(1, shell=(shutil.which("busybox"), "sh") if shutil.which("busybox") else ("/bin/sh",))
        wait_for(lambda: "a member already" in self.container_log(), timeout=10)
        self.assertEqual(self.member_requests(1, since), [])
        self.runner.stop(pod(1), grace_seconds=20)

    def test_gives_up_at_the_deadline_and_is_restarted(self):
        self.start(1)                             # no controlling instance at all
        self.run_member(1, join_seconds=1)
        wait_for(lambda: self.runner.restarts(pod(1), "member") >= 1, timeout=15)
        self.assertIn("exited with code 1", self.container_log())
        self.assertIn("giving up", self.container_log())
        self.runner.stop(pod(1), grace_seconds=5)


class ContainerRunnerTest(unittest.TestCase):
    def test_files_env_rewrite_restart_and_stop(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        out = os.path.join(d, "out.log")
        runner = ContainerRunner(4321, log_path=out, backoff_seconds=0.2, max_backoff_seconds=0.4)
        self.addCleanup(runner.stop_all, 1)
        script = "echo env: $(env | sort | tr '\\n' ' ')\necho file: $(cat \"$1\") $(cat \"$Y\")\nexit 3\n"
        runner.start("ns/p", "c", ["/bin/sh", "/etc/conf/run.sh", "/etc/conf/a.txt"], {"X": "1", "Y": "/etc/conf/a.txt"},
                     {"/etc/conf": {"run.sh": script, "a.txt": "hello"}})
        wait_for(lambda: runner.restarts("ns/p", "c") >= 2, timeout=10)
        with open(out) as f:
            text = f.read()
        self.assertIn("ns/p/c: file: hello hello", text)
        self.assertIn("ns/p/c: exited with code 3", text)
        env_line = next(line for line in text.splitlines() if "env:" in line)
        names = sorted(kv.split("=", 1)[0] for kv in env_line.split("env: ", 1)[1].split())
        self.assertEqual([n for n in names if n not in ("PWD", "SHLVL", "_", "OLDPWD")], ["PATH", "X", "Y", "http_proxy"])
        self.assertIn("http_proxy=http://127.0.0.1:4321", env_line)
        # TERM trapped and ignored: killed after the grace period.
        runner.start("ns/q", "c", ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], {}, {})
        wait_for(lambda: runner.running("ns/q", "c"))
        t = time.monotonic()
        runner.stop("ns/q", grace_seconds=0.5)
        self.assertGreaterEqual(time.monotonic() - t, 0.5)
        self.assertFalse(runner.running("ns/q", "c"))


if __name__ == "__main__":
    unittest.main()
