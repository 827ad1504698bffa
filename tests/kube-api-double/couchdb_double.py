"""A TEST DOUBLE of an Apache CouchDB 3.5 cluster, for stack's tests.

No CouchDB can run on the machines the tests run on, so the Kubernetes API
double (kube_api_double.py, with --couchdb) imports this module and lets it
answer the HTTP requests that reach a CouchDB pod's port 5984 through the API
server's pod and service proxies, and its readiness probes. There is no
server here: one CouchRegistry per process holds every simulated node (one
per pod) and the data on each pod's volume.

It behaves like the real server where stack's correctness depends on it,
the inconvenient parts included (what was checked against a real 3.5.0
cluster is written down in /work/shared/DESIGN.md; the rest follows the
CouchDB 3.5 sources):

- a node is configured the way the official image configures it: the node
  name from `-name` in ERL_FLAGS (else NODENAME, else `nonode@nohost`,
  which never clusters), the admin from COUCHDB_USER/COUCHDB_PASSWORD (no
  admin at all: the container exits, nothing listens), the Erlang cookie
  from COUCHDB_ERLANG_COOKIE (or `-setcookie`; none: a random one), the
  cookie-auth secret from COUCHDB_SECRET (none: a random one per start),
  and the ini files: default.ini's defaults, then default.d (mounting a
  ConfigMap there hides the image's `bind_address = any`), then local.d;
- `[chttpd] bind_address = 127.0.0.1` (or ::1) listens on loopback only: the
  pod IP refuses connections, so proxies answer 503 and probes fail;
- meshing by seedlist alone: a node writes itself and every seed into its
  `_nodes` database at start (a tombstone is respected: a removed node that
  restarts does not re-add itself), connects to the nodes it knows when the
  name resolves (headless Service DNS, through the registry's resolver) and
  the cookie matches; `_nodes` and `_dbs` replicate instantly among
  connected nodes (rev trees reduced to "descendant wins, else a live leaf,
  then the longer, then the higher rev");
- `_up` 404 `seeding` until another seed has been reached, then 200 for good;
- session cookies are HMACs keyed on the secret *and the admin's password
  salt*; a plaintext admin from the environment is hashed with a random
  salt at every container start, so a cookie from one node is refused by
  another until `finish_cluster` copies one node's admin hash to all (as
  the real `sync_admins` does), and again after a pod restart;
- shard maps with q ranges, n copies rotated over cluster_nodes by the
  database name (mem3's placement, copies also on nodes that never
  started), documents placed by mem3_hash (crc32 of term_to_binary(id)),
  each copy holding its own documents, writes 201 with a quorum of the
  range's copies, 202 below it, reads from any reachable copy;
- internal replication fills a copy that lacks documents `fill_seconds`
  after it was seen behind (a new copy in the map, a node back), shown as
  `internal_replication_jobs` in `_system` meanwhile; a copy dropped from
  the map, or on a deleted volume, loses its documents for good;
- the replication scheduler: jobs for `_replicator` documents, `initializing`
  for `settle_seconds` after any membership change, `crashing` (never
  `failed`) while an endpoint does not resolve, refuses, rejects the
  credentials or lacks the database, back to `running` `settle_seconds`
  after it works again; credentials stripped from the scheduler's output;
- `_prometheus` (admin only) with the bare `\\r` between `# HELP` and
  `# TYPE` of 3.5.0 and 3.5.1.
- faults a test injects into the node of one pod started from a given
  image (`faults`: (POD or NS/POD, IMAGE substring, KIND); a later start of
  that pod from another image is not affected), each something a real node
  can show:
  `isolated`: the node has an Erlang cookie of its own (as an image that
  ignores COUCHDB_ERLANG_COOKIE would), so it connects to no other node:
  with seeds other than itself it is `seeding` for good (mem3_seeds is
  ready only after a pull from a seed, which needs the connection), its
  `_up` 404 and the pod never Ready (without such seeds: 200 at once, as
  mem3_seeds starts ready with none), its all_nodes itself alone, absent
  from the others' all_nodes (their cluster_nodes keep it);
  `partitioned`: the node reaches a seed, so `_up` is 200 for good
  (mem3_seeds' ready is never reset), then loses every connection, as a
  node cut off by a network partition right after it seeded: Ready by its
  probes, all_nodes itself alone, absent from the others' all_nodes, so
  only a membership check sees it;
  `unready`: the container exits at once at every start (as an image that
  cannot start: CrashLoopBackOff, never Ready, nothing listens).

Every request a node serves (not the kubelet's probes, not the simulated
replicator's own traffic) is appended to the log as one JSON line
{"pod", "node", "method", "path", "status", "body"}, with `password` values,
URL passwords and Authorization/Cookie values left out.
"""

import base64
import collections
import copy
import datetime
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
import zlib
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

RINGTOP = 1 << 32
HTTP_PORT = 5984
SERVER_HEADER = "CouchDB/{} (Erlang OTP/26)"
# /opt/couchdb/etc/default.d/10-docker-default.ini of the official image:
# hidden when a volume is mounted over default.d.
IMAGE_DEFAULT_D = "[chttpd]\nbind_address = any\n\n[httpd]\nbind_address = any\n"
# default.ini's values for what this double reads.
DEFAULT_INI = {
    "chttpd": {"bind_address": "127.0.0.1", "port": "5984", "require_valid_user": "false"},
    "cluster": {"q": "2", "n": "3"},
    "chttpd_auth": {"timeout": "600", "hash_algorithms": "sha256, sha"},
    "couchdb": {"single_node": "false"},
    "prometheus": {"additional_port": "false", "bind_address": "127.0.0.1", "port": "17986"},
}
SYSTEM_DBS = ("_users", "_replicator", "_global_changes")
CLUSTER_SYSTEM_DBS = ["_users", "_replicator"]
DB_NAME_RE = re.compile(r"^[a-z][a-z0-9_$()+/-]*$")
ILLEGAL_DB = ("Name: '{}'. Only lowercase characters (a-z), digits (0-9), and any of the characters "
              "_, $, (, ), +, -, and / are allowed. Must begin with a letter.")
NO_SHARDS = "No DB shards could be opened."
NOT_ADMIN = "You are not a server admin."
BAD_CREDENTIALS = "Name or password is incorrect."
FEATURES = ["access-ready", "partitioned", "pluggable-storage-engines", "reshard", "scheduler"]
NODE_FAULTS = ("isolated", "partitioned", "unready")


class NotListening(Exception):
    """Nothing accepts connections on that pod's port (node not running, loopback bind, other port)."""


class HttpError(Exception):
    def __init__(self, status, error, reason, headers=None):
        super().__init__(f"{status} {error}: {reason}")
        self.status, self.error, self.reason, self.headers = status, error, reason, headers or {}


class Retry(Exception):
    """finish_cluster still waiting for nodes: asked again after a pause, outside the lock."""


def iso(t=None):
    return datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc) \
        .strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ini(text, into=None):
    """CouchDB's ini files: [section], key = value, ; comments; later files override earlier keys."""
    out = into if into is not None else {}
    section = None
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith(";") or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            out.setdefault(section, {})
            continue
        if section is None or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[section][key.strip()] = value.strip()
    return out


def has_admin_line(text, user):
    """What the entrypoint's `grep -Pzo "\\[admins\\]\\nUSER ="` finds."""
    return f"[admins]\n{user} =" in (text or "")


def rev_pos(rev):
    return int(rev.split("-", 1)[0])


def new_rev(prev, body, deleted):
    pos = rev_pos(prev) + 1 if prev else 1
    digest = hashlib.md5(json.dumps([prev, deleted, body], sort_keys=True).encode()).hexdigest()
    return f"{pos}-{digest}"


def winner(a, b):
    """The version of a document that wins when two copies meet."""
    if a is None:
        return b
    if b is None or a["rev"] == b["rev"]:
        return a
    if b["rev"] in a["history"]:
        return a
    if a["rev"] in b["history"]:
        return b
    return max(a, b, key=lambda d: (not d["deleted"], rev_pos(d["rev"]), d["rev"]))


def newer(src, dst):
    """True when `src` carries a version `dst` lacks."""
    return dst is None or (src["rev"] != dst["rev"] and winner(dst, src) is src)


class LocalDb:
    """One database file: a node-local one (_nodes, _dbs) or one shard copy."""

    def __init__(self):
        self.docs = {}
        self.seq = 0

    def put(self, docid, record):
        self.docs[docid] = copy.deepcopy(record)
        self.seq += 1

    def update(self, docid, body, rev=None, deleted=False):
        """An interactive edit (new_edits=true): the new rev, or HttpError 409/404."""
        cur = self.docs.get(docid)
        if cur is not None and not cur["deleted"]:
            if rev != cur["rev"]:
                raise HttpError(409, "conflict", "Document update conflict.")
        elif cur is not None:
            if deleted:
                raise HttpError(404, "not_found", "deleted")
            if rev is not None and rev != cur["rev"]:
                raise HttpError(409, "conflict", "Document update conflict.")
        else:
            if deleted:
                raise HttpError(404, "not_found", "missing")
            if rev is not None:
                raise HttpError(409, "conflict", "Document update conflict.")
        prev = cur["rev"] if cur else None
        r = new_rev(prev, body, deleted)
        self.put(docid, {"rev": r, "deleted": deleted, "body": body,
                         "history": (cur["history"] if cur else []) + [r]})
        return r

    def merge(self, other):
        changed = False
        for docid, d in other.docs.items():
            mine = self.docs.get(docid)
            if newer(d, mine):
                self.put(docid, d)
                changed = True
        return changed

    def live(self):
        return {k: v for k, v in self.docs.items() if not v["deleted"]}


def doc_json(docid, record):
    out = {"_id": docid, "_rev": record["rev"]}
    out.update(record["body"])
    if record["deleted"]:
        out["_deleted"] = True
    return out


def split_body(doc):
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def parse_range(rng):
    a, b = rng.split("-")
    return int(a, 16), int(b, 16)


def make_ranges(q):
    inc = RINGTOP // q
    out = []
    for i in range(q):
        end = RINGTOP - 1 if i == q - 1 else (i + 1) * inc - 1
        out.append(f"{i * inc:08x}-{end:08x}")
    return out


def mem3_hash(docid, partitioned=False):
    """mem3_hash:crc32: erlang:crc32(term_to_binary(Id)), the partition only for a partitioned database."""
    key = docid.split(":", 1)[0] if partitioned and ":" in docid else docid
    raw = key.encode()
    return zlib.crc32(b"\x83m" + len(raw).to_bytes(4, "big") + raw)


def strip_url(url):
    """A URL as the scheduler shows it: no userinfo, a trailing slash."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, host, path, parts.query, ""))


SECRET_KEYS = ("password", "authorization", "cookie")


def redact(value):
    """A request body fit for the log: no passwords, no credentials in URLs or headers."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if k.lower() not in SECRET_KEYS}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1@", value)
    return value


class Node:
    """One CouchDB node: its configuration while it runs, and its data directory (the pod's volume)."""

    def __init__(self, pod):
        self.pod = pod
        self.running = False
        self.nodes = LocalDb()
        self.dbs = LocalDb()
        self.shards = {}          # (db, suffix, range) -> LocalDb
        self.name = "nonode@nohost"
        self.config = {}
        self.stats = collections.Counter()
        self.version = "3.5.1"
        self.crash = None
        self.fault = None         # a NODE_FAULTS value the test injected, for this start
        self.seeds = []
        self.seeded = False
        self.seed_status = {}
        self.seed_tried = 0.0
        self.view = None
        self.changed_at = 0.0
        self.started = 0.0
        self.started_wall = 0.0
        self.admin_plain = {}     # user -> password, for admins this node hashed itself
        self.verified = {}        # (user, password, hash) -> bool

    def wipe(self):
        self.nodes, self.dbs, self.shards = LocalDb(), LocalDb(), {}

    def cfg(self, section, key, default=None):
        return self.config.get(section, {}).get(key, default)

    @property
    def host(self):
        return self.name.split("@", 1)[1] if "@" in self.name else ""

    @property
    def distributed(self):
        return self.name != "nonode@nohost" and "@" in self.name

    @property
    def port(self):
        return int(self.cfg("chttpd", "port", "5984"))

    @property
    def loopback(self):
        return self.cfg("chttpd", "bind_address", "127.0.0.1") in ("127.0.0.1", "::1", "localhost")

    @property
    def q(self):
        return int(self.cfg("cluster", "q", "2"))

    @property
    def n(self):
        return int(self.cfg("cluster", "n", "3"))

    @property
    def secret(self):
        return self.cfg("chttpd_auth", "secret") or self.cfg("couch_httpd_auth", "secret") or ""

    @property
    def timeout(self):
        return int(self.cfg("chttpd_auth", "timeout", "600"))

    def admins(self):
        return self.config.get("admins", {})

    def salt(self, user):
        parsed = parse_hash(self.admins().get(user, ""))
        return parsed[2] if parsed else ""

    def check_password(self, user, password):
        stored = self.admins().get(user)
        if stored is None or password is None:
            return False
        key = (user, password, stored)
        if key not in self.verified:
            self.verified[key] = verify_hash(stored, password, self.admin_plain.get(user))
        return self.verified[key]

    def cluster_nodes(self):
        return sorted(k for k in self.nodes.live() if not k.startswith("_design/"))

    def known(self):
        return set(self.seeds) | set(self.cluster_nodes())


def parse_hash(stored):
    """-> (scheme, derived, salt, iterations) of an [admins] value, or None for plaintext."""
    m = re.match(r"^-pbkdf2(?::(\w+))?-([0-9a-f]+),([^,]+),(\d+)$", stored)
    if m:
        return ("pbkdf2:" + (m.group(1) or "sha1"), m.group(2), m.group(3), int(m.group(4)))
    m = re.match(r"^-hashed-([0-9a-f]+),(.+)$", stored)
    if m:
        return ("hashed", m.group(1), m.group(2), 1)
    return None


def hash_plain(password, salt):
    """How a plaintext admin is written back: 3.5's pbkdf2 sha256 (the derived key is not computed here)."""
    derived = hmac.new(salt.encode(), password.encode(), hashlib.sha256).hexdigest()
    return f"-pbkdf2:sha256-{derived},{salt},600000"


def verify_hash(stored, password, plain):
    parsed = parse_hash(stored)
    if parsed is None:
        return hmac.compare_digest(stored, password)
    scheme, derived, salt, iterations = parsed
    if plain is not None and stored == hash_plain(plain, salt):
        return hmac.compare_digest(plain, password)
    if scheme == "hashed":
        return hashlib.sha1((password + salt).encode()).hexdigest() == derived
    algo = scheme.split(":")[1]
    size = hashlib.new(algo).digest_size
    return hashlib.pbkdf2_hmac(algo, password.encode(), salt.encode(), iterations, size).hex() == derived


def b64url(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Req:
    def __init__(self, method, path, headers, body, port):
        split = urlsplit(path)
        self.method = method.upper()
        self.path = path
        self.parts = [unquote(p) for p in split.path.split("/") if p != ""]
        self.query = dict(parse_qsl(split.query, keep_blank_values=True))
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body or b""
        self.port = port
        self.user = None
        self.auth = None
        self.set_cookie = None
        self._json = None

    def json(self, ctype=False):
        if ctype and not self.headers.get("content-type", "").startswith("application/json"):
            raise HttpError(415, "bad_content_type", "Content-Type must be application/json")
        try:
            return json.loads(self.body.decode() or "null")
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "bad_request", "invalid UTF-8 JSON")

    def obj(self, ctype=False):
        value = self.json(ctype)
        if not isinstance(value, dict):
            raise HttpError(400, "bad_request", "Request body must be a JSON object")
        return value

    def qjson(self, name, default=None):
        if name not in self.query:
            return default
        try:
            return json.loads(self.query[name])
        except ValueError:
            raise HttpError(400, "bad_request", f"Invalid JSON value for {name}")

    def qbool(self, name):
        return self.query.get(name) == "true"

    def qint(self, name, default=None):
        if name not in self.query:
            return default
        try:
            return int(self.query[name])
        except ValueError:
            raise HttpError(400, "query_parse_error", f"Invalid value for integer: \"{self.query[name]}\"")


class Job:
    def __init__(self, docid, rev):
        self.docid, self.rev = docid, rev
        self.state = "initializing"
        self.error_count = 0
        self.error = None
        self.node = None
        self.created = time.time()
        self.start_time = None
        self.last_updated = time.time()
        self.next_retry = 0.0
        self.ok_since = None
        self.stats = collections.Counter()
        self.settled_at = None

    def reset(self):
        self.state, self.error_count, self.error = "initializing", 0, None
        self.start_time, self.ok_since, self.next_retry = None, None, 0.0
        self.settled_at = None


class CouchRegistry:
    """Every simulated CouchDB node of the process, by pod key ("NAMESPACE/POD")."""

    def __init__(self, settle_seconds=60.0, fill_seconds=2.0, log_path=None, setup_wait_seconds=5.0,
                 boot_seconds=2.0, faults=()):
        self.boot = float(boot_seconds)     # from container start to port 5984 accepting connections
        self.faults = list(faults)          # (POD or NS/POD, IMAGE substring, kind): see the module docstring
        self.settle = float(settle_seconds)
        self.fill = float(fill_seconds)
        self.log_path = log_path
        self.setup_wait = float(setup_wait_seconds)
        self.lock = threading.RLock()
        self.nodes = {}
        # resolver(host, port, from_pod) -> (pod_key, pod_port) or None; port None for
        # Erlang distribution (node names). None: names resolve to running nodes directly.
        self.resolver = None
        self.comp = {}            # pod -> frozenset of pods it is connected to (itself included)
        self.fills = {}           # (db, suffix, range, src_pod, dst_pod) -> due (monotonic)
        self.jobs = {}            # (suffix, docid) -> Job
        self.ever_named = set()   # node names ever seen ("existing atoms")
        self.security = {}        # (db, suffix) -> _security object
        self._ticking = False

    # ---- the kubelet's side -------------------------------------------

    def start_node(self, pod_key, env, ini_text="", image="couchdb:3.5.1", keep_data_of=None,
                   local_ini_text="", fqdn=None):
        """The pod's container started. False when CouchDB exits at once (no admin)."""
        with self.lock:
            node = self.nodes.get(pod_key)
            if keep_data_of is not None and keep_data_of != pod_key and keep_data_of in self.nodes:
                old = self.nodes.pop(keep_data_of)
                node = node or Node(pod_key)
                node.nodes, node.dbs, node.shards = old.nodes, old.dbs, old.shards
            if node is None:
                node = self.nodes[pod_key] = Node(pod_key)
            self._configure(node, env or {}, ini_text or "", local_ini_text or "", image or "", fqdn)
            node.fault = next((kind for pod, part, kind in self.faults
                               if pod in (pod_key, pod_key.split("/", 1)[-1]) and part in (image or "")), None)
            if node.fault == "isolated":
                node.cookie = "isolated-" + uuid.uuid4().hex
            elif node.fault == "unready":
                node.crash = "the container exits at start (fault unready)"
            if node.crash:
                node.running = False
                return False
            node.running = True
            node.started = time.monotonic()
            node.started_wall = time.time()
            node.stats = collections.Counter()
            node.seeded = not node.seeds
            node.seed_status = {s: {} for s in node.seeds}
            node.seed_tried = 0.0
            node.view, node.changed_at = None, time.monotonic()
            self.ever_named.add(node.name)
            # mem3_nodes:initialize_nodelist: itself and every seed, unless present (tombstones too).
            for name in [node.name] + node.seeds:
                if name not in node.nodes.docs:
                    node.nodes.update(name, {})
                self.ever_named.add(name)
            self._tick()
            return True

    def stop_node(self, pod_key, keep_data=True):
        with self.lock:
            node = self.nodes.get(pod_key)
            if node is None:
                return
            node.running = False
            if not keep_data:
                node.wipe()
                for key in [k for k in self.fills if pod_key in k[3:]]:
                    self.fills.pop(key, None)
            self._tick()

    def running(self, pod_key):
        with self.lock:
            node = self.nodes.get(pod_key)
            return bool(node and node.running)

    def crash_reason(self, pod_key):
        with self.lock:
            node = self.nodes.get(pod_key)
            return node.crash if node else None

    def ready(self, pod_key):
        """What a readinessProbe httpGet /_up on port 5984 sees."""
        return self.probe(pod_key, "/_up", HTTP_PORT)

    def probe(self, pod_key, path, port):
        """An httpGet probe from the kubelet: True for 200-399. Counted, not logged."""
        try:
            status, _, _ = self.handle(pod_key, "GET", path, {"User-Agent": "kube-probe/1.31"}, b"",
                                       port=port, log=False)
        except NotListening:
            return False
        return 200 <= status < 400

    def tick(self):
        with self.lock:
            self._tick()

    # ---- HTTP ------------------------------------------------------------

    def handle(self, pod_key, method, path, headers, body, port=HTTP_PORT, log=True):
        """One HTTP request reaching the pod's port -> (status, headers, body); NotListening when refused."""
        deadline = None
        while True:
            with self.lock:
                self._tick()
                node = self.nodes.get(pod_key)
                if node is None or not node.running or time.monotonic() < node.started + self.boot:
                    raise NotListening("connection refused")
                req = Req(method, path, headers, body, port)
                prom_only = False
                if port != node.port:
                    if node.cfg("prometheus", "additional_port") == "true" and \
                            port == int(node.cfg("prometheus", "port", "17986")) and \
                            node.cfg("prometheus", "bind_address") not in ("127.0.0.1", "::1"):
                        prom_only = True
                    else:
                        raise NotListening("connection refused")
                elif node.loopback:
                    raise NotListening("connection refused")
                if deadline is None:
                    deadline = time.monotonic() + self.setup_wait
                req.deadline = deadline
                try:
                    if prom_only:
                        status, hdrs, out = self._prometheus_port(node, req)
                    else:
                        status, hdrs, out = self._serve(node, req)
                except Retry:
                    status = None
                except HttpError as e:
                    status, hdrs, out = self._error(e)
                if status is not None:
                    if req.set_cookie and "Set-Cookie" not in hdrs:
                        hdrs["Set-Cookie"] = req.set_cookie
                    node.stats["requests"] += 1
                    node.stats["method:" + req.method] += 1
                    node.stats[f"code:{status}"] += 1
                    base = {"Server": SERVER_HEADER.format(node.version), "Date": http_date(),
                            "Cache-Control": "must-revalidate", "X-Couch-Request-ID": uuid.uuid4().hex[:10],
                            "X-CouchDB-Body-Time": "0"}
                    base.update(hdrs)
                    if log:
                        self._log(node, req, status)
                    return status, base, out
            time.sleep(0.1)

    def _log(self, node, req, status):
        if not self.log_path:
            return
        body = None
        if req.body:
            ctype = req.headers.get("content-type", "")
            try:
                if ctype.startswith("application/x-www-form-urlencoded"):
                    body = dict(parse_qsl(req.body.decode()))
                else:
                    body = json.loads(req.body.decode())
            except (ValueError, UnicodeDecodeError):
                body = None
        if "/_config/admins" in req.path:
            body = None                 # the body is the password itself
        line = {"pod": node.pod, "node": node.name, "method": req.method, "path": redact(req.path),
                "status": status, "body": redact(body)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    @staticmethod
    def _json(status, value, headers=None):
        out = {"Content-Type": "application/json"}
        out.update(headers or {})
        return status, out, (json.dumps(value, separators=(",", ":")) + "\n").encode()

    def _error(self, e):
        return self._json(e.status, {"error": e.error, "reason": e.reason}, e.headers)

    # ---- configuration ---------------------------------------------------

    def _configure(self, node, env, ini_text, local_ini_text, image, fqdn):
        tag = image.rsplit("/", 1)[-1]
        tag = tag.split("@", 1)[0]
        version = tag.split(":", 1)[1] if ":" in tag else "latest"
        node.version = version if re.match(r"^\d+\.\d+\.\d+$", version) else (
            version + ".0" if re.match(r"^\d+\.\d+$", version) else "3.5.1")
        config = copy.deepcopy(DEFAULT_INI)
        parse_ini(ini_text, config)
        parse_ini(local_ini_text, config)
        # docker-entrypoint.sh writes local.d/docker.ini (last, so it wins).
        user, password = env.get("COUCHDB_USER"), env.get("COUCHDB_PASSWORD")
        node.admin_plain = {}
        node.verified = {}
        if user and password and not has_admin_line(local_ini_text, user):
            config.setdefault("admins", {})[user] = password
        if env.get("COUCHDB_SECRET") and "[chttpd_auth]\nsecret =" not in local_ini_text:
            config.setdefault("chttpd_auth", {})["secret"] = env["COUCHDB_SECRET"]
        if not config.get("admins"):
            node.crash = "ERROR: CouchDB 3.0+ will no longer run in \"Admin Party\" mode."
            node.config = config
            return
        node.crash = None
        # Plaintext admins are hashed at start with a fresh random salt.
        for name, value in list(config["admins"].items()):
            if parse_hash(value) is None:
                node.admin_plain[name] = value
                config["admins"][name] = hash_plain(value, uuid.uuid4().hex)
        if not (config.get("chttpd_auth", {}).get("secret") or config.get("couch_httpd_auth", {}).get("secret")):
            config.setdefault("chttpd_auth", {})["secret"] = uuid.uuid4().hex
        config.setdefault("couchdb", {}).setdefault("uuid", uuid.uuid4().hex)
        node.config = config
        # Erlang distribution: name and cookie.
        flags = env.get("ERL_FLAGS", "").split()
        name = None
        cookie = env.get("COUCHDB_ERLANG_COOKIE") or None
        for i, flag in enumerate(flags[:-1]):
            if flag == "-name":
                name = flags[i + 1]
            elif flag == "-sname":
                name = "short:" + flags[i + 1]
            elif flag == "-setcookie":
                cookie = flags[i + 1]
        if name is None and env.get("NODENAME"):
            name = "couchdb@" + env["NODENAME"]
        if name is None:
            name = "nonode@nohost"
        elif name.startswith("short:"):
            name = "nonode@nohost"       # short names never reach long-named nodes
        elif "@" not in name:
            name = f"{name}@{fqdn}" if fqdn else "nonode@nohost"
        node.name = name
        node.cookie = cookie or ("random-" + uuid.uuid4().hex)
        seeds = [s.strip() for s in config.get("cluster", {}).get("seedlist", "").split(",") if s.strip()]
        node.seeds = [s for s in dict.fromkeys(seeds) if s != name]

    # ---- the cluster's background work ------------------------------------

    def _resolves(self, a, b):
        """Does a reach b by b's node name (DNS from a's pod)?"""
        host = b.host
        if self.resolver is None:
            return True
        got = self._resolve(host, None, a.pod)
        pod = got[0] if isinstance(got, tuple) else got
        return pod == b.pod

    def _resolve(self, host, port, from_pod):
        """The resolver as resolver(host, port, from_pod), or the plainer resolver(host, port)."""
        try:
            try:
                return self.resolver(host, port, from_pod)
            except TypeError:
                return self.resolver(host, port)
        except Exception:
            return None

    def _connected(self, a, b):
        if not (a.distributed and b.distributed) or a.cookie != b.cookie or a.name == b.name:
            return False
        if any(n.fault == "partitioned" and n.seeded for n in (a, b)):
            return False
        return (b.name in a.known() and self._resolves(a, b)) or (a.name in b.known() and self._resolves(b, a))

    def _tick(self):
        if self._ticking:
            return
        self._ticking = True
        try:
            self._tick_once()
        finally:
            self._ticking = False

    def _tick_once(self):
        now = time.monotonic()
        running = sorted((n for n in self.nodes.values() if n.running), key=lambda n: n.name)
        comp = {}
        for _ in range(6):
            parent = {n.pod: n.pod for n in running}

            def find(x):
                while parent[x] != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x
            for i, a in enumerate(running):
                for b in running[i + 1:]:
                    if self._connected(a, b):
                        parent[find(a.pod)] = find(b.pod)
            groups = collections.defaultdict(set)
            for n in running:
                groups[find(n.pod)].add(n.pod)
            comp = {pod: frozenset(g) for g in groups.values() for pod in g}
            changed = False
            for g in groups.values():
                members = [self.nodes[p] for p in g]
                for a in members:
                    for b in members:
                        if a is not b:
                            changed |= a.nodes.merge(b.nodes)
                            changed |= a.dbs.merge(b.dbs)
            if not changed:
                break
        self.comp = comp
        for n in running:
            peers = [self.nodes[p] for p in comp[n.pod]]
            view = (tuple(sorted(p.name for p in peers)), tuple(n.cluster_nodes()))
            if view != n.view:
                n.view, n.changed_at = view, now
            if not n.seeded:
                names = {p.name for p in peers}
                reached = [s for s in n.seeds if s in names]
                if reached:
                    n.seeded = True
                    n.seed_status[reached[0]] = {
                        "timestamp": iso(), "last_replication_status": "ok",
                        "pending_updates": {"_dbs": 0, "_nodes": 0, "_users": 0}}
                elif now - n.seed_tried >= 1.0:
                    n.seed_tried = now
                    seed = n.seeds[int(now) % len(n.seeds)]
                    n.seed_status[seed] = {"timestamp": iso(), "last_replication_status": "error"}
        self._shards_tick(running, now)
        self._replicator_tick(running, now)

    def _placement(self, mapdoc):
        """{range: [node names]} from by_node, as mem3 builds its shards."""
        body = mapdoc["body"]
        out = collections.defaultdict(list)
        for name, ranges in (body.get("by_node") or {}).items():
            for rng in ranges or []:
                out[rng].append(name)
        return {rng: sorted(names) for rng, names in sorted(out.items())}

    @staticmethod
    def _suffix(mapdoc):
        raw = mapdoc["body"].get("shard_suffix", [])
        return "".join(chr(c) for c in raw) if isinstance(raw, list) else str(raw)

    def _shards_tick(self, running, now):
        # Copies on running nodes follow their node's view of the maps.
        for n in running:
            wanted = set()
            for db, mapdoc in n.dbs.live().items():
                suffix = self._suffix(mapdoc)
                for rng, names in self._placement(mapdoc).items():
                    if n.name in names:
                        wanted.add((db, suffix, rng))
            for key in list(n.shards):
                if key not in wanted:
                    del n.shards[key]          # dropped from the map: its documents are gone
            for key in wanted:
                n.shards.setdefault(key, LocalDb())
        # Internal replication between the copies of each range.
        live_pairs = set()
        seen_groups = set()
        for n in running:
            group = self.comp.get(n.pod, frozenset())
            if group in seen_groups:
                continue
            seen_groups.add(group)
            members = {self.nodes[p].name: self.nodes[p] for p in group}
            for db, mapdoc in n.dbs.live().items():
                suffix = self._suffix(mapdoc)
                for rng, names in self._placement(mapdoc).items():
                    copies = [members[x] for x in names if x in members]
                    for src in copies:
                        for dst in copies:
                            if src is dst:
                                continue
                            a = src.shards.get((db, suffix, rng))
                            b = dst.shards.get((db, suffix, rng))
                            if a is None or b is None:
                                continue
                            behind = [i for i, d in a.docs.items() if newer(d, b.docs.get(i))]
                            key = (db, suffix, rng, src.pod, dst.pod)
                            if not behind:
                                continue
                            live_pairs.add(key)
                            due = self.fills.setdefault(key, now + self.fill)
                            if now >= due:
                                for i in behind:
                                    b.put(i, winner(b.docs.get(i), a.docs[i]))
                                dst.stats["database_writes"] += len(behind)
                                live_pairs.discard(key)
        for key in list(self.fills):
            if key not in live_pairs:
                del self.fills[key]

    def _backlog(self, node):
        return sum(1 for k in self.fills if k[3] == node.pod)

    # ---- cluster helpers (seen from a coordinating node) ----------------

    def _peers(self, c):
        return [self.nodes[p] for p in self.comp.get(c.pod, frozenset([c.pod]))]

    def _peer(self, c, name):
        for p in self._peers(c):
            if p.name == name:
                return p
        return None

    def _map(self, c, db):
        doc = c.dbs.docs.get(db)
        return doc if doc is not None and not doc["deleted"] else None

    def _need_map(self, c, db):
        m = self._map(c, db)
        if m is None:
            raise HttpError(404, "not_found", "Database does not exist.")
        return m

    def _range_of(self, mapdoc, docid):
        h = mem3_hash(docid, (mapdoc["body"].get("props") or {}).get("partitioned") is True)
        for rng in self._placement(mapdoc):
            lo, hi = parse_range(rng)
            if lo <= h <= hi:
                return rng
        return None

    def _copies(self, c, db, mapdoc, rng):
        """(names listed for the range, [(node, LocalDb)] reachable from c)."""
        names = self._placement(mapdoc).get(rng, [])
        suffix = self._suffix(mapdoc)
        out = []
        for name in names:
            p = self._peer(c, name)
            if p is not None and (db, suffix, rng) in p.shards:
                out.append((p, p.shards[(db, suffix, rng)]))
        return names, out

    def _one_copy(self, c, db, mapdoc, rng):
        """The copy a streaming read (_all_docs, _changes, db info) uses: c's own, else the first."""
        _, copies = self._copies(c, db, mapdoc, rng)
        for p, shard in copies:
            if p is c:
                return p, shard
        return copies[0] if copies else (None, None)

    def _read_doc(self, c, db, mapdoc, docid):
        rng = self._range_of(mapdoc, docid)
        _, copies = self._copies(c, db, mapdoc, rng)
        if not copies:
            raise HttpError(500, "internal_server_error", NO_SHARDS)
        best = None
        for p, shard in copies:
            p.stats["database_reads"] += 1
            best = winner(best, shard.docs.get(docid))
        return best

    def _write_doc(self, c, db, mapdoc, docid, body, rev, deleted, w=None):
        """An interactive write -> (status 201/202, new rev); HttpError 409/404/500."""
        rng = self._range_of(mapdoc, docid)
        names, copies = self._copies(c, db, mapdoc, rng)
        if not copies:
            raise HttpError(500, "internal_server_error", NO_SHARDS)
        cur = None
        for _, shard in copies:
            cur = winner(cur, shard.docs.get(docid))
        probe = LocalDb()
        if cur is not None:
            probe.docs[docid] = cur
        r = probe.update(docid, body, rev, deleted)
        record = probe.docs[docid]
        for p, shard in copies:
            shard.put(docid, record)
            p.stats["database_writes"] += 1
        quorum = w if w else len(names) // 2 + 1
        return (201 if len(copies) >= quorum else 202), r

    def _write_replicated(self, c, db, mapdoc, docid, record):
        """new_edits=false: the version as it is. -> number of copies written."""
        rng = self._range_of(mapdoc, docid)
        _, copies = self._copies(c, db, mapdoc, rng)
        for p, shard in copies:
            shard.put(docid, winner(shard.docs.get(docid), record))
            p.stats["database_writes"] += 1
        return len(copies)

    def _create_db(self, c, db, q=None, n=None, props=None):
        """fabric:create_db -> 201 (every copy created) or 202."""
        nodes = c.cluster_nodes() or [c.name]
        q = q or c.q
        n = max(1, min(n or c.n, len(nodes)))
        rot = zlib.crc32(db.encode()) % len(nodes)
        rotated = nodes[rot:] + nodes[:rot]
        by_range, by_node, changelog = {}, collections.defaultdict(list), []
        k = 0
        for rng in make_ranges(q):
            chosen = []
            for _ in range(n):
                name = rotated[k % len(rotated)]
                k += 1
                if name not in chosen:
                    chosen.append(name)
            by_range[rng] = sorted(chosen)
            for name in chosen:
                by_node[name].append(rng)
                changelog.append(["add", rng, name])
        suffix = "." + str(int(time.time()))
        body = {"shard_suffix": [ord(ch) for ch in suffix], "changelog": changelog,
                "by_node": {k2: sorted(v) for k2, v in sorted(by_node.items())}, "by_range": by_range,
                "props": props or {}}
        cur = c.dbs.docs.get(db)
        c.dbs.update(db, body, cur["rev"] if cur and not cur["deleted"] else None)
        created = total = 0
        for rng, names in by_range.items():
            for name in names:
                total += 1
                p = self._peer(c, name)
                if p is not None:
                    p.dbs.merge(c.dbs)
                    p.shards.setdefault((db, suffix, rng), LocalDb())
                    created += 1
        self._tick()
        return 201 if created == total else 202

    def _delete_db(self, c, db):
        mapdoc = self._need_map(c, db)
        suffix = self._suffix(mapdoc)
        c.dbs.update(db, {}, mapdoc["rev"], deleted=True)
        missing = 0
        for rng, names in self._placement(mapdoc).items():
            for name in names:
                p = self._peer(c, name)
                if p is None:
                    missing += 1
                else:
                    p.shards.pop((db, suffix, rng), None)
        self._tick()
        return 200 if not missing else 202

    def _db_docs(self, c, db, mapdoc, deleted=False):
        """Every document of a database as a streaming read sees it: {id: record}."""
        out = {}
        for rng in self._placement(mapdoc):
            p, shard = self._one_copy(c, db, mapdoc, rng)
            if shard is None:
                raise HttpError(500, "internal_server_error", NO_SHARDS)
            for docid, d in shard.docs.items():
                if deleted or not d["deleted"]:
                    out[docid] = d
        return out

    def _db_docs_merged(self, c, db, mapdoc):
        """Winners over every reachable copy (what the replicator reads)."""
        out = {}
        for rng in self._placement(mapdoc):
            _, copies = self._copies(c, db, mapdoc, rng)
            for _, shard in copies:
                for docid, d in shard.docs.items():
                    out[docid] = winner(out.get(docid), d)
        return out

    # ---- authentication --------------------------------------------------

    def _authenticate(self, node, req):
        cookies = {}
        for part in req.headers.get("cookie", "").split(";"):
            if "=" in part:
                k, v = part.strip().split("=", 1)
                cookies[k] = v
        token = cookies.get("AuthSession")
        if token:
            try:
                raw = unb64url(token)
                user_b, time_b, mac = raw.split(b":", 2)
                user, stamp = user_b.decode(), int(time_b.decode(), 16)
            except Exception:
                raise HttpError(400, "bad_request", "Malformed AuthSession cookie. Please clear your cookies.")
            if user in node.admins():
                key = (node.secret + node.salt(user)).encode()
                data = f"{user}:{stamp:X}".encode()
                good = any(hmac.compare_digest(mac, hmac.new(key, data, algo).digest())
                           for algo in (hashlib.sha256, hashlib.sha1))
                age = time.time() - stamp
                if good and age < node.timeout:
                    req.user, req.auth = user, "cookie"
                    if age > node.timeout * 0.1:
                        req.set_cookie = self._cookie(node, user)
                    return
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, password = base64.b64decode(auth[6:].strip()).decode().split(":", 1)
            except Exception:
                raise HttpError(400, "bad_request", "Authorization header has invalid base64 value")
            if node.check_password(user, password):
                req.user, req.auth = user, "default"
                return
            raise HttpError(401, "unauthorized", BAD_CREDENTIALS)

    def _cookie(self, node, user):
        stamp = int(time.time())
        data = f"{user}:{stamp:X}".encode()
        mac = hmac.new((node.secret + node.salt(user)).encode(), data, hashlib.sha256).digest()
        return f"AuthSession={b64url(data + b':' + mac)}; Version=1; Path=/; HttpOnly"

    @staticmethod
    def _admin(req):
        if req.user is None:
            raise HttpError(401, "unauthorized", NOT_ADMIN)

    @staticmethod
    def _db_member(req):
        if req.user is None:
            raise HttpError(401, "unauthorized", "You are not authorized to access this db.")

    @staticmethod
    def _methods(req, allowed):
        if req.method not in allowed:
            raise HttpError(405, "method_not_allowed", "Only " + ",".join(allowed) + " allowed",
                            {"Allow": ",".join(allowed)})

    # ---- routing ---------------------------------------------------------

    def _serve(self, node, req):
        self._authenticate(node, req)
        parts = req.parts
        if not parts:
            self._methods(req, ("GET", "HEAD"))
            return self._json(200, self._welcome(node))
        head = parts[0]
        if head == "_up":
            self._methods(req, ("GET",))
            mode = node.cfg("couchdb", "maintenance_mode")
            if mode in ("true", "nolb"):
                return self._json(404, {"status": "maintenance_mode" if mode == "true" else "nolb"})
            status = "ok" if node.seeded else "seeding"
            return self._json(200 if node.seeded else 404, {"status": status, "seeds": node.seed_status})
        if head == "_session":
            return self._session(node, req)
        if head == "_uuids":
            count = req.qint("count", 1)
            return self._json(200, {"uuids": [uuid.uuid4().hex for _ in range(count)]})
        if head == "favicon.ico":
            raise HttpError(404, "not_found", "missing")
        if head.startswith("_") and head not in SYSTEM_DBS:
            self._admin(req)
            if head == "_membership":
                self._methods(req, ("GET",))
                return self._json(200, {"all_nodes": sorted(p.name for p in self._peers(node)),
                                        "cluster_nodes": node.cluster_nodes()})
            if head == "_cluster_setup":
                return self._cluster_setup(node, req)
            if head == "_all_dbs":
                self._methods(req, ("GET", "HEAD"))
                names = sorted(node.dbs.live())
                skip, limit = req.qint("skip", 0), req.qint("limit")
                if req.qbool("descending"):
                    names.reverse()
                names = names[skip:]
                return self._json(200, names[:limit] if limit is not None else names)
            if head == "_node":
                return self._node_req(node, req)
            if head == "_scheduler":
                return self._scheduler(node, req)
            if head == "_active_tasks":
                self._methods(req, ("GET",))
                return self._json(200, self._active_tasks(node))
            if head in ("_replicate", "_dbs_info", "_reshard", "_stats", "_config", "_utils",
                        "_db_updates", "_search_analyze", "_restart"):
                raise HttpError(404, "not_found", "missing")
            raise HttpError(400, "illegal_database_name", ILLEGAL_DB.format(head))
        return self._db_req(node, req, head, parts[1:])

    @staticmethod
    def _welcome(node):
        return {"couchdb": "Welcome", "version": node.version, "git_sha": "44f6a43d8",
                "uuid": node.cfg("couchdb", "uuid"), "features": FEATURES,
                "vendor": {"name": "The Apache Software Foundation"}}

    def _session(self, node, req):
        if req.method == "GET":
            ctx = {"name": req.user, "roles": ["_admin"] if req.user else []}
            info = {"authentication_handlers": ["cookie", "default"]}
            if req.user:
                info["authenticated"] = req.auth
            return self._json(200, {"ok": True, "userCtx": ctx, "info": info})
        if req.method == "DELETE":
            return self._json(200, {"ok": True},
                              {"Set-Cookie": "AuthSession=; Version=1; Path=/; HttpOnly"})
        if req.method != "POST":
            self._methods(req, ("GET", "HEAD", "POST", "DELETE"))
        ctype = req.headers.get("content-type", "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            form = dict(parse_qsl(req.body.decode(errors="replace")))
        elif ctype.startswith("application/json"):
            form = req.obj()
        else:
            raise HttpError(415, "bad_content_type",
                            "Content-Type must be application/x-www-form-urlencoded or application/json")
        name, password = form.get("name") or form.get("username"), form.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or not node.check_password(name, password):
            raise HttpError(401, "unauthorized", BAD_CREDENTIALS)
        req.set_cookie = None
        return self._json(200, {"ok": True, "name": name, "roles": ["_admin"]},
                          {"Set-Cookie": self._cookie(node, name)})

    # ---- /_cluster_setup -----------------------------------------------

    def _cluster_setup(self, node, req):
        if req.method == "GET":
            dbs = req.qjson("ensure_dbs_exist", CLUSTER_SYSTEM_DBS)
            has = all(self._map(node, d) is not None for d in dbs)
            if node.cfg("couchdb", "single_node") == "true":
                return self._json(200, {"state": "single_node_enabled"})
            if node.n == 1:
                return self._json(200, {"state": "single_node_enabled" if has else "single_node_disabled"})
            if node.cfg("chttpd", "bind_address") == "127.0.0.1":
                return self._json(200, {"state": "cluster_disabled"})
            return self._json(200, {"state": "cluster_finished" if has else "cluster_enabled"})
        if req.method != "POST":
            self._methods(req, ("GET", "POST"))
        setup = req.obj(ctype=True)
        action = setup.get("action", "missing")
        if action == "finish_cluster":
            others = [x for x in node.cluster_nodes() if x != node.name]
            connected = {p.name for p in self._peers(node)}
            if [x for x in others if x not in connected]:
                if time.monotonic() < req.deadline:
                    raise Retry()
                raise HttpError(500, "setup_error", "Cluster setup timed out waiting for nodes to connect")
            # sync_admins: this node's admin hashes (and so their salts) on every other node.
            for p in self._peers(node):
                if p is not node:
                    for user, value in node.admins().items():
                        p.config.setdefault("admins", {})[user] = value
                        if user in node.admin_plain:
                            p.admin_plain[user] = node.admin_plain[user]
                    p.verified = {}
            dbs = setup.get("ensure_dbs_exist", CLUSTER_SYSTEM_DBS)
            if all(self._map(node, d) is not None for d in dbs):
                raise HttpError(400, "bad_request", "Cluster is already finished")
            for d in dbs:
                if self._map(node, d) is None:
                    self._create_db(node, d)
            return self._json(201, {"ok": True})
        if action == "enable_cluster":
            if node.cfg("chttpd", "bind_address") != "127.0.0.1":
                raise HttpError(400, "bad_request", "Cluster is already enabled")
            raise HttpError(400, "bad_request", "Cluster setup requires a remote bind_address (not 127.0.0.1 nor ::1)")
        if action == "enable_single_node":
            dbs = setup.get("ensure_dbs_exist", CLUSTER_SYSTEM_DBS)
            if all(self._map(node, d) is not None for d in dbs):
                raise HttpError(400, "bad_request", "Cluster is already finished")
            for d in dbs:
                self._create_db(node, d)
            return self._json(201, {"ok": True})
        if action in ("add_node", "receive_cookie", "remove_node"):
            return self._json(201, {"ok": True})
        raise HttpError(400, "bad_request", "Invalid Action'")

    # ---- /_node ------------------------------------------------------------

    def _node_req(self, node, req):
        parts = req.parts
        if len(parts) == 1:
            raise HttpError(400, "bad_request", "Incomplete path to _node request")
        if parts[1] == "_local" and len(parts) == 2:
            self._methods(req, ("GET",))
            return self._json(200, {"name": node.name})
        target_name = node.name if parts[1] == "_local" else parts[1]
        if target_name == node.name:
            target = node
        else:
            target = self._peer(node, target_name)
            if target is None:
                if target_name not in self.ever_named:
                    raise HttpError(404, "not_found", f"no such node: {target_name}")
                raise HttpError(412, "nodedown", f"{target_name} is down")
        rest = parts[2:]
        if not rest:
            # /_node/NAME (not _local) is forwarded to that node's own "/".
            self._methods(req, ("GET", "HEAD"))
            return self._json(200, self._welcome(target))
        what = rest[0]
        if what == "_system":
            self._methods(req, ("GET",))
            return self._json(200, self._system(target))
        if what == "_prometheus":
            self._methods(req, ("GET",))
            return self._prometheus(target)
        if what == "_stats":
            self._methods(req, ("GET",))
            return self._json(200, self._stats(target))
        if what == "_config":
            return self._config(target, req, rest[1:])
        if what == "_versions":
            self._methods(req, ("GET",))
            return self._json(200, {"erlang": {"version": "26.2.5", "supported_hashes": ["sha", "sha256"]},
                                    "javascript_engine": {"name": "spidermonkey", "version": "91"}})
        if what == "_restart":
            raise HttpError(404, "not_found", "missing")
        if what in ("_dbs", "_nodes"):
            ldb = target.dbs if what == "_dbs" else target.nodes
            return self._local_db(target, req, what, ldb, rest[1:])
        raise HttpError(404, "not_found", "missing")

    def _local_db(self, node, req, dbname, ldb, rest):
        live = ldb.live()
        if not rest:
            self._methods(req, ("GET", "HEAD"))
            return self._json(200, {"db_name": dbname, "doc_count": len(live),
                                    "doc_del_count": len(ldb.docs) - len(live),
                                    "update_seq": ldb.seq, "purge_seq": 0, "compact_running": False,
                                    "sizes": {"file": 8192 * (1 + len(ldb.docs)), "external": 0, "active": 0},
                                    "instance_start_time": str(int(node.started_wall * 1e6)),
                                    "disk_format_version": 8, "committed_update_seq": ldb.seq})
        if rest[0] == "_all_docs":
            self._methods(req, ("GET", "POST"))
            return self._json(200, self._all_docs_rows(req, live, ldb.docs))
        docid = "/".join(rest)
        # As couch_doc:validate_docid/2: in the shards database the system
        # databases' names are valid ids (their shard maps).
        system_map = dbname == "_dbs" and docid in ("_users", "_replicator", "_global_changes")
        if rest[0].startswith("_") and rest[0] not in ("_design", "_local") and not system_map:
            raise HttpError(400, "bad_request", "Only reserved document ids may start with underscore.")
        if req.method in ("GET", "HEAD"):
            cur = ldb.docs.get(docid)
            if cur is None:
                raise HttpError(404, "not_found", "missing")
            if cur["deleted"]:
                raise HttpError(404, "not_found", "deleted")
            return self._json(200, doc_json(docid, cur), {"ETag": f'"{cur["rev"]}"'})
        if req.method == "PUT":
            body = req.obj()
            rev = body.get("_rev") or req.query.get("rev")
            if body.get("_deleted") is True:
                r = ldb.update(docid, {}, rev, deleted=True)
                return self._json(200, {"ok": True, "id": docid, "rev": r})
            content = split_body(body)
            if dbname == "_dbs":
                validate_shard_map(content)
            r = ldb.update(docid, content, rev)
            self._tick()
            return self._json(201, {"ok": True, "id": docid, "rev": r}, {"ETag": f'"{r}"'})
        if req.method == "DELETE":
            rev = req.query.get("rev") or req.headers.get("if-match", "").strip('"') or None
            cur = ldb.docs.get(docid)
            if cur is None:
                raise HttpError(404, "not_found", "missing")
            if cur["deleted"]:
                raise HttpError(404, "not_found", "deleted")
            r = ldb.update(docid, {}, rev, deleted=True)
            self._tick()
            return self._json(200, {"ok": True, "id": docid, "rev": r}, {"ETag": f'"{r}"'})
        self._methods(req, ("GET", "HEAD", "PUT", "DELETE"))

    def _all_docs_rows(self, req, live, alldocs):
        include = req.qbool("include_docs")
        keys = req.qjson("keys")
        if req.method == "POST":
            keys = req.obj().get("keys", keys)

        def row(docid, d):
            out = {"id": docid, "key": docid, "value": {"rev": d["rev"]}}
            if include:
                out["doc"] = doc_json(docid, d)
            return out
        if keys is not None:
            rows = []
            for k in keys:
                d = alldocs.get(k)
                if d is None:
                    rows.append({"key": k, "error": "not_found"})
                elif d["deleted"]:
                    rows.append({"id": k, "key": k, "value": {"rev": d["rev"], "deleted": True},
                                 **({"doc": None} if include else {})})
                else:
                    rows.append(row(k, d))
            return {"total_rows": len(live), "offset": None, "rows": rows}
        ids = sorted(live)
        desc = req.qbool("descending")
        if desc:
            ids.reverse()
        start = req.qjson("startkey", req.qjson("start_key"))
        end = req.qjson("endkey", req.qjson("end_key"))
        if start is not None:
            ids = [i for i in ids if (i <= start if desc else i >= start)]
        if end is not None:
            ids = [i for i in ids if (i >= end if desc else i <= end)]
        skip, limit = req.qint("skip", 0), req.qint("limit")
        offset = len(live) - len(ids) + skip if start is not None else skip
        ids = ids[skip:]
        if limit is not None:
            ids = ids[:limit]
        return {"total_rows": len(live), "offset": offset, "rows": [row(i, live[i]) for i in ids]}

    def _config(self, node, req, rest):
        def shown(section, values):
            return dict(values)
        if not rest:
            self._methods(req, ("GET",))
            return self._json(200, {s: shown(s, v) for s, v in node.config.items()})
        section = rest[0]
        if len(rest) == 1:
            self._methods(req, ("GET",))
            return self._json(200, dict(node.config.get(section, {})))
        key = rest[1]
        if len(rest) > 2:
            raise HttpError(404, "not_found", "missing")
        old = node.config.get(section, {}).get(key)
        if req.method == "GET":
            if old is None:
                raise HttpError(404, "not_found", "unknown_config_value")
            return self._json(200, old)
        if req.method == "PUT":
            value = req.json()
            if not isinstance(value, str):
                raise HttpError(400, "bad_request", "Invalid JSON value")
            value = value.strip()
            if section == "admins" and parse_hash(value) is None:
                node.admin_plain[key] = value
                value = hash_plain(value, uuid.uuid4().hex)
                node.verified = {}
            node.config.setdefault(section, {})[key] = value
            return self._json(200, old or "")
        if req.method == "DELETE":
            if old is None:
                raise HttpError(404, "not_found", "unknown_config_value")
            del node.config[section][key]
            return self._json(200, old)
        self._methods(req, ("GET", "PUT", "DELETE"))

    def _system(self, node):
        peers = [p for p in self._peers(node) if p is not node]
        dist = {p.name: {"recv_oct": 1000, "recv_cnt": 10, "recv_max": 100, "recv_avg": 100, "recv_dvi": 0,
                         "send_oct": 1000, "send_cnt": 10, "send_max": 100, "send_avg": 100, "send_pend": 0}
                for p in peers}
        return {"uptime": int(time.monotonic() - node.started),
                "memory": {"other": 30000000, "atom": 1000000, "atom_used": 900000, "processes": 20000000,
                           "processes_used": 19000000, "binary": 500000, "code": 20000000, "ets": 3000000},
                "run_queue": 0, "run_queue_dirty_cpu": 0, "ets_table_count": 150,
                "context_switches": 100000, "reductions": 10000000, "garbage_collection_count": 5000,
                "words_reclaimed": 1000000, "io_input": 1000000, "io_output": 1000000,
                "os_proc_count": 0, "stale_proc_count": 0, "process_count": 900, "process_limit": 262144,
                "message_queues": {"couch_file": {}, "couch_db_updater": {}, "couch_server": 0,
                                   "index_server": 0},
                "internal_replication_jobs": self._backlog(node), "distribution": dist}

    def _job_counts(self, node):
        counts = collections.Counter(j.state for j in self.jobs.values() if j.node == node.name)
        return counts

    def _stats(self, node):
        s = node.stats
        jobs = self._job_counts(node)

        def c(v, desc, kind="counter"):
            return {"value": v, "type": kind, "desc": desc}
        return {"couchdb": {
            "database_reads": c(s["database_reads"], "number of times a document was read from a database"),
            "database_writes": c(s["database_writes"], "number of times a database was changed"),
            "httpd": {"requests": c(s["requests"], "number of HTTP requests")},
            "httpd_request_methods": {m: c(s["method:" + m], f"number of HTTP {m} requests")
                                      for m in ("COPY", "DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT")},
            "httpd_status_codes": {str(code): c(s[f"code:{code}"], f"number of HTTP {code} responses")
                                   for code in (200, 201, 202, 400, 401, 403, 404, 405, 409, 412, 500)}},
            "couch_replicator": {"jobs": {
                "running": c(jobs["running"], "replicator scheduler running jobs", "gauge"),
                "crashing": c(jobs["crashing"], "replicator scheduler crashing jobs", "gauge"),
                "pending": c(jobs["pending"], "replicator scheduler pending jobs", "gauge"),
                "total": c(sum(jobs.values()), "total number of replicator scheduler jobs", "gauge")}}}

    def _prometheus(self, node):
        s = node.stats
        jobs = self._job_counts(node)
        quirk = node.version in ("3.5.0", "3.5.1")
        old = tuple(int(x) for x in node.version.split(".")[:2]) < (3, 5)
        lines = []

        def family(name, kind, desc, samples):
            full = "couchdb_" + name
            if old:
                head = f"# TYPE {full} {kind}"
            elif quirk:
                head = f"\n# HELP {full} {desc}\r# TYPE {full} {kind}"
            else:
                head = f"# HELP {full} {desc}\n# TYPE {full} {kind}"
            lines.append(head)
            for labels, value in samples:
                lab = "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
                lines.append(f"{full}{lab} {value}")
        family("couch_replicator_jobs_crashing", "gauge", "replicator scheduler crashing jobs",
               [((), jobs["crashing"])])
        family("couch_replicator_jobs_pending", "gauge", "replicator scheduler pending jobs",
               [((), jobs["pending"])])
        family("couch_replicator_jobs_running", "gauge", "replicator scheduler running jobs",
               [((), jobs["running"])])
        family("couch_replicator_jobs_total", "gauge", "total number of replicator scheduler jobs",
               [((), sum(jobs.values()))])
        family("database_reads_total", "counter", "number of times a document was read from a database",
               [((), s["database_reads"])])
        family("database_writes_total", "counter", "number of times a database was changed",
               [((), s["database_writes"])])
        family("httpd_request_methods", "counter", "number of HTTP requests by method",
               [((("method", m),), s["method:" + m]) for m in ("COPY", "DELETE", "GET", "HEAD", "POST", "PUT")])
        family("httpd_requests_total", "counter", "number of HTTP requests", [((), s["requests"])])
        family("httpd_status_codes", "counter", "number of HTTP responses by status code",
               [((("code", code),), s[f"code:{code}"]) for code in (200, 201, 202, 400, 401, 404, 409, 500)])
        family("open_databases", "gauge", "number of open databases", [((), len(node.shards))])
        family("uptime_seconds", "counter", "CouchDB uptime", [((), int(time.monotonic() - node.started))])
        family("erlang_memory_bytes", "gauge", "size of memory (in bytes) dynamically allocated by the Erlang emulator",
               [((("memory_type", "total"),), 74000000), ((("memory_type", "processes"),), 20000000)])
        family("internal_replication_jobs", "gauge", "count of internal replication changes to process",
               [((), self._backlog(node))])
        text = "\n".join(lines) + "\n"
        return 200, {"Content-Type": "text/plain; version=2.0"}, text.encode()

    def _prometheus_port(self, node, req):
        """[prometheus] additional_port: the metrics, without authentication, and nothing else."""
        if req.parts in (["_node", "_local", "_prometheus"], ["_node", node.name, "_prometheus"]):
            self._methods(req, ("GET",))
            return self._prometheus(node)
        raise HttpError(404, "not_found", "missing")

    # ---- databases and documents --------------------------------------

    def _db_req(self, node, req, db, rest):
        if db not in SYSTEM_DBS and not DB_NAME_RE.match(db):
            raise HttpError(400, "illegal_database_name", ILLEGAL_DB.format(db))
        if not rest:
            if req.method == "PUT":
                self._admin(req)
                if self._map(node, db) is not None:
                    raise HttpError(412, "file_exists",
                                    "The database could not be created, the file already exists.")
                q, n = req.qint("q"), req.qint("n")
                if (q is not None and q < 1) or (n is not None and n < 1):
                    raise HttpError(400, "bad_request", "q and n must be positive integers")
                props = {"partitioned": True} if req.qbool("partitioned") else {}
                status = self._create_db(node, db, q, n, props)
                return self._json(status, {"ok": True}, {"Location": f"/{quote(db, safe='')}"})
            if req.method == "DELETE":
                self._admin(req)
                return self._json(self._delete_db(node, db), {"ok": True})
            if req.method in ("GET", "HEAD"):
                self._db_member(req)
                return self._json(200, self._db_info(node, db))
            if req.method == "POST":
                self._db_member(req)
                mapdoc = self._need_map(node, db)
                doc = req.obj(ctype=True)
                docid = doc.get("_id") or uuid.uuid4().hex
                return self._put_doc(node, req, db, mapdoc, docid, doc)
            self._methods(req, ("DELETE", "GET", "HEAD", "POST", "PUT"))
        self._db_member(req)
        mapdoc = self._need_map(node, db)
        what = rest[0]
        if what == "_all_docs":
            self._methods(req, ("GET", "POST", "HEAD"))
            docs = self._db_docs(node, db, mapdoc, deleted=True)
            live = {k: v for k, v in docs.items() if not v["deleted"]}
            if req.query.get("keys") or req.method == "POST":
                docs = {}
                keys = req.qjson("keys") if req.method != "POST" else req.obj().get("keys", [])
                for k in keys or []:
                    try:
                        d = self._read_doc(node, db, mapdoc, k)
                    except HttpError:
                        d = None
                    if d is not None:
                        docs[k] = d
            return self._json(200, self._all_docs_rows(req, live, docs))
        if what == "_bulk_docs":
            self._methods(req, ("POST",))
            return self._bulk_docs(node, req, db, mapdoc)
        if what == "_shards":
            self._methods(req, ("GET",))
            placement = self._placement(mapdoc)
            if len(rest) > 1:
                docid = "/".join(rest[1:])
                rng = self._range_of(mapdoc, docid)
                return self._json(200, {"range": rng, "nodes": placement.get(rng, [])})
            return self._json(200, {"shards": placement})
        if what == "_sync_shards":
            self._methods(req, ("POST",))
            self._admin(req)
            soon = time.monotonic() + self.fill / 4
            suffix = self._suffix(mapdoc)
            for key, due in list(self.fills.items()):
                if key[0] == db and key[1] == suffix:
                    self.fills[key] = min(due, soon)
            return self._json(202, {"ok": True})
        if what == "_security":
            key = (db, self._suffix(mapdoc))
            if req.method == "PUT":
                self._admin(req)
                self.security[key] = req.obj()
                return self._json(200, {"ok": True})
            self._methods(req, ("GET", "PUT"))
            return self._json(200, self.security.get(key) or
                              {"members": {"roles": ["_admin"]}, "admins": {"roles": ["_admin"]}})
        if what == "_changes":
            self._methods(req, ("GET", "POST"))
            docs = self._db_docs(node, db, mapdoc, deleted=True)
            results = []
            for i, (docid, d) in enumerate(sorted(docs.items()), 1):
                ch = {"seq": f"{i}-g1AAAA", "id": docid, "changes": [{"rev": d["rev"]}]}
                if d["deleted"]:
                    ch["deleted"] = True
                if req.qbool("include_docs"):
                    ch["doc"] = doc_json(docid, d)
                results.append(ch)
            return self._json(200, {"results": results, "last_seq": f"{len(results)}-g1AAAA", "pending": 0})
        if what in ("_design", "_local"):
            if len(rest) < 2:
                raise HttpError(404, "not_found", "missing")
            docid = what + "/" + "/".join(rest[1:])
        elif what.startswith("_"):
            raise HttpError(400, "bad_request", "Only reserved document ids may start with underscore.")
        else:
            docid = "/".join(rest)
        return self._doc_req(node, req, db, mapdoc, docid)

    def _db_info(self, node, db):
        mapdoc = self._need_map(node, db)
        docs = self._db_docs(node, db, mapdoc, deleted=True)
        live = sum(1 for d in docs.values() if not d["deleted"])
        placement = self._placement(mapdoc)
        n = len(next(iter(placement.values()), []))
        return {"instance_start_time": "0", "db_name": db,
                "purge_seq": "0-g1AAAA", "update_seq": f"{len(docs)}-g1AAAA",
                "sizes": {"file": 16692 * max(1, len(placement)), "external": 0, "active": 0},
                "props": dict(mapdoc["body"].get("props") or {}),
                "doc_del_count": len(docs) - live, "doc_count": live,
                "disk_format_version": 8, "compact_running": False,
                "cluster": {"q": len(placement), "n": n, "w": n // 2 + 1, "r": n // 2 + 1}}

    def _check_docid(self, mapdoc, docid):
        if docid.startswith("_") and not docid.startswith(("_design/", "_local/")):
            raise HttpError(400, "illegal_docid", "Only reserved document ids may start with underscore.")
        if (mapdoc["body"].get("props") or {}).get("partitioned") is True and \
                not docid.startswith(("_design/", "_local/")):
            if ":" not in docid or docid.startswith(":") or docid.startswith("_"):
                raise HttpError(400, "illegal_docid", "Doc id must be of form partition:id")

    def _prepare(self, node, req, db, doc):
        """Before a write of a _replicator document: what couch_replicator_docs adds and refuses."""
        if db == "_replicator" and not doc.get("_deleted"):
            for field in ("source", "target"):
                if field not in doc:
                    raise HttpError(403, "forbidden", f"Replication document `{field}` is missing")
            owner = doc.get("owner")
            if owner is None:
                doc["owner"] = req.user
            elif owner != req.user and req.user is None:
                raise HttpError(403, "forbidden", "Can't update replication documents from other users.")
        return doc

    def _put_doc(self, node, req, db, mapdoc, docid, doc):
        self._check_docid(mapdoc, docid)
        doc = self._prepare(node, req, db, dict(doc))
        rev = doc.get("_rev") or req.query.get("rev") or (req.headers.get("if-match") or "").strip('"') or None
        deleted = doc.get("_deleted") is True
        status, r = self._write_doc(node, db, mapdoc, docid, {} if deleted else split_body(doc), rev, deleted,
                                    req.qint("w"))
        if deleted:
            status = 200 if status == 201 else status
        return self._json(status, {"ok": True, "id": docid, "rev": r},
                          {"ETag": f'"{r}"', "Location": f"/{quote(db, safe='')}/{quote(docid, safe='')}"})

    def _doc_req(self, node, req, db, mapdoc, docid):
        if req.method in ("GET", "HEAD"):
            d = self._read_doc(node, db, mapdoc, docid)
            if d is None:
                raise HttpError(404, "not_found", "missing")
            if d["deleted"]:
                raise HttpError(404, "not_found", "deleted")
            return self._json(200, doc_json(docid, d), {"ETag": f'"{d["rev"]}"'})
        if req.method == "PUT":
            doc = req.obj()
            doc.pop("_id", None)
            return self._put_doc(node, req, db, mapdoc, docid, doc)
        if req.method == "DELETE":
            rev = req.query.get("rev") or (req.headers.get("if-match") or "").strip('"') or None
            cur = self._read_doc(node, db, mapdoc, docid)
            if cur is None:
                raise HttpError(404, "not_found", "missing")
            if cur["deleted"]:
                raise HttpError(404, "not_found", "deleted")
            status, r = self._write_doc(node, db, mapdoc, docid, {}, rev, True, req.qint("w"))
            return self._json(200 if status == 201 else 202, {"ok": True, "id": docid, "rev": r},
                              {"ETag": f'"{r}"'})
        self._methods(req, ("COPY", "DELETE", "GET", "HEAD", "PUT"))

    def _bulk_docs(self, node, req, db, mapdoc):
        body = req.obj(ctype=True)
        docs = body.get("docs")
        if not isinstance(docs, list):
            raise HttpError(400, "bad_request", "`docs` parameter must be an array.")
        new_edits = body.get("new_edits", True)
        results, accepted = [], False
        for doc in docs:
            if not isinstance(doc, dict):
                raise HttpError(400, "bad_request", "Document must be a JSON object")
            docid = doc.get("_id") or uuid.uuid4().hex
            if not new_edits:
                rev = doc.get("_rev")
                if not rev:
                    raise HttpError(400, "bad_request", "Document rev is required with new_edits=false")
                record = {"rev": rev, "deleted": doc.get("_deleted") is True, "body": split_body(doc),
                          "history": [rev]}
                self._write_replicated(node, db, mapdoc, docid, record)
                continue
            try:
                self._check_docid(mapdoc, docid)
                doc = self._prepare(node, req, db, dict(doc))
                deleted = doc.get("_deleted") is True
                status, r = self._write_doc(node, db, mapdoc, docid, {} if deleted else split_body(doc),
                                            doc.get("_rev"), deleted, req.qint("w"))
                accepted |= status == 202
                results.append({"ok": True, "id": docid, "rev": r})
            except HttpError as e:
                if e.status == 500:
                    raise
                results.append({"id": docid, "error": e.error, "reason": e.reason})
        return self._json(202 if accepted else 201, results)

    # ---- the replicator ------------------------------------------------

    def _endpoint(self, owner, spec, create=False, q=None):
        """-> (node, db, url shown, None) when usable, or (None, None, url shown, error text)."""
        headers = {}
        user = password = None
        if isinstance(spec, dict):
            url = spec.get("url", "")
            headers = {k.lower(): v for k, v in (spec.get("headers") or {}).items()}
            basic = ((spec.get("auth") or {}).get("basic") or {})
            user, password = basic.get("username"), basic.get("password")
        else:
            url = spec if isinstance(spec, str) else ""
        if "://" not in url:
            # A bare database name: the local cluster (as 3.x still accepts with a warning)? Not in 3.x.
            return None, None, url, f"{{invalid_url, \"{url}\"}}"
        shown = strip_url(url)
        parts = urlsplit(url)
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
        auth = headers.get("authorization", "")
        if user is None and auth.lower().startswith("basic "):
            try:
                user, password = base64.b64decode(auth[6:]).decode().split(":", 1)
            except Exception:
                pass
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        db = unquote(parts.path.strip("/"))
        if host in ("localhost", "127.0.0.1", "::1"):
            target = owner if port == owner.port else None
            if target is None:
                return None, None, shown, "{conn_failed,{error,econnrefused}}"
        else:
            got = self._resolve(host, port, owner.pod) if self.resolver else None
            if got is None:
                return None, None, shown, "{conn_failed,{error,nxdomain}}"
            pod, pod_port = got if isinstance(got, tuple) else (got, port)
            target = self.nodes.get(pod)
            if target is None or not target.running or target.loopback or pod_port != target.port:
                return None, None, shown, "{conn_failed,{error,econnrefused}}"
        if parts.scheme == "https":
            return None, None, shown, "{conn_failed,{error,{tls_alert,{unexpected_message,\"TLS client: " \
                                      "In state hello received SERVER ALERT: Fatal - Unexpected Message\"}}}}"
        if user is None or not target.check_password(user, password):
            return None, None, shown, f"unauthorized: unauthorized to access or create database {shown}"
        if not db or (db not in SYSTEM_DBS and not DB_NAME_RE.match(db)):
            return None, None, shown, f"db_not_found: could not open {shown}"
        if self._map(target, db) is None:
            if not create:
                return None, None, shown, f"db_not_found: could not open {shown}"
            self._create_db(target, db)
        return target, db, shown, None

    @staticmethod
    def _shown(spec):
        url = spec.get("url", "") if isinstance(spec, dict) else (spec if isinstance(spec, str) else "")
        return strip_url(url) if "://" in url else url

    def _job_id(self, body):
        base = hashlib.md5(json.dumps([self._shown(body.get("source")), self._shown(body.get("target")),
                                       body.get("doc_ids"), body.get("filter"), body.get("selector")],
                                      sort_keys=True).encode()).hexdigest()
        return base + ("+continuous" if body.get("continuous") is True else "") + \
            ("+create_target" if body.get("create_target") is True else "")

    def _replicator_tick(self, running, now):
        alive = set()
        done = set()
        for n in running:
            group = self.comp.get(n.pod, frozenset())
            if group in done:
                continue
            done.add(group)
            mapdoc = self._map(n, "_replicator")
            if mapdoc is None:
                continue
            suffix = self._suffix(mapdoc)
            members = [self.nodes[p] for p in group]
            changed_at = max(m.changed_at for m in members)
            docs = self._db_docs_merged(n, "_replicator", mapdoc)
            for docid, d in sorted(docs.items()):
                if d["deleted"] or docid.startswith("_design/"):
                    continue
                key = (suffix, docid)
                alive.add(key)
                job = self.jobs.get(key)
                if job is None or job.rev != d["rev"]:
                    job = self.jobs[key] = Job(docid, d["rev"])
                    job.body = d["body"]
                rng = self._range_of(mapdoc, docid)
                hosts = sorted(p.name for p, _ in self._copies(n, "_replicator", mapdoc, rng)[1])
                if not hosts:
                    continue
                owner_name = hosts[zlib.crc32(("_replicator" + docid).encode()) % len(hosts)]
                owner = self._peer(n, owner_name)
                if job.node != owner_name:
                    job.node = owner_name
                if now < changed_at + self.settle:
                    if job.state != "initializing" or job.settled_at != changed_at:
                        job.reset()
                        job.settled_at = changed_at
                        job.last_updated = time.time()
                    continue
                self._step(job, owner, now)
        for key in list(self.jobs):
            if key not in alive:
                del self.jobs[key]

    def _step(self, job, owner, now):
        body = job.body
        if job.state == "completed":
            return
        src, sdb, _, serr = self._endpoint(owner, body.get("source"))
        tgt, tdb, _, terr = (None, None, None, None)
        if serr is None:
            tgt, tdb, _, terr = self._endpoint(owner, body.get("target"), create=body.get("create_target") is True)
        error = serr or terr
        if job.state == "initializing":
            job.start_time = time.time()
        if error:
            job.ok_since = None
            if job.state != "crashing" or now >= job.next_retry:
                job.error_count += 1
                job.next_retry = now + max(0.1, self.settle / 6)
                job.last_updated = time.time()
            job.state, job.error = "crashing", error
            return
        if job.state == "crashing":
            if job.ok_since is None:
                job.ok_since = now
            if now - job.ok_since < self.settle:
                return
            job.error = None
            job.last_updated = time.time()
        if job.state != "running":
            job.state = "running"
            job.last_updated = time.time()
        # Copy what the target lacks.
        smap, tmap = self._map(src, sdb), self._map(tgt, tdb)
        wanted = body.get("doc_ids")
        have = self._db_docs_merged(tgt, tdb, tmap)
        for docid, d in sorted(self._db_docs_merged(src, sdb, smap).items()):
            if wanted is not None and docid not in wanted:
                continue
            if docid.startswith("_local/") or not newer(d, have.get(docid)):
                continue
            job.stats["docs_read"] += 1
            job.stats["revisions_checked"] += 1
            if self._write_replicated(tgt, tdb, tmap, docid, d):
                job.stats["docs_written"] += 1
                job.stats["missing_revisions_found"] += 1
            else:
                job.stats["doc_write_failures"] += 1
        if body.get("continuous") is not True:
            job.state = "completed"
            job.last_updated = time.time()

    def _sched_doc(self, c, docid, d, mapdoc):
        body = d["body"]
        job = self.jobs.get((self._suffix(mapdoc), docid))
        state = job.state if job else "initializing"
        if job is None or state == "initializing":
            jid, info = None, None
        else:
            jid = self._job_id(body)
            if state == "crashing":
                info = {"error": job.error}
            else:
                info = {"revisions_checked": job.stats["revisions_checked"],
                        "missing_revisions_found": job.stats["missing_revisions_found"],
                        "docs_read": job.stats["docs_read"], "docs_written": job.stats["docs_written"],
                        "changes_pending": 0, "doc_write_failures": job.stats["doc_write_failures"],
                        "bulk_get_docs": job.stats["docs_read"], "bulk_get_attempts": job.stats["docs_read"],
                        "checkpointed_source_seq": f"{job.stats['docs_read']}-g1AAAA"}
        created = job.created if job else time.time()
        return {"database": "_replicator", "doc_id": docid, "id": jid, "node": job.node if job else None,
                "source": self._shown(body.get("source")), "target": self._shown(body.get("target")),
                "state": state, "info": info, "error_count": job.error_count if job else 0,
                "start_time": iso((job.start_time if job else None) or created),
                "last_updated": iso(job.last_updated if job else created)}

    def _scheduler(self, node, req):
        self._methods(req, ("GET",))
        parts = req.parts
        mapdoc = self._map(node, "_replicator")
        if len(parts) >= 2 and parts[1] == "docs":
            rows = []
            if mapdoc is not None:
                docs = self._db_docs_merged(node, "_replicator", mapdoc)
                rows = [self._sched_doc(node, i, d, mapdoc) for i, d in sorted(docs.items())
                        if not d["deleted"] and not i.startswith("_design/")]
            if len(parts) == 2 or (len(parts) == 3 and parts[2] == "_replicator"):
                skip, limit = req.qint("skip", 0), req.qint("limit")
                shown = rows[skip:] if limit is None else rows[skip:skip + limit]
                return self._json(200, {"docs": shown, "total_rows": len(rows), "offset": skip})
            if len(parts) >= 4 and parts[2] == "_replicator":
                docid = "/".join(parts[3:])
                for r in rows:
                    if r["doc_id"] == docid:
                        return self._json(200, r)
                raise HttpError(404, "not_found", "missing")
            raise HttpError(404, "not_found", "missing")
        if len(parts) == 2 and parts[1] == "jobs":
            jobs = []
            if mapdoc is not None:
                suffix = self._suffix(mapdoc)
                for (sfx, docid), job in sorted(self.jobs.items()):
                    if sfx != suffix or job.state not in ("running", "crashing"):
                        continue
                    jobs.append({"database": "_replicator", "id": self._job_id(job.body),
                                 "pid": "<0.1234.0>", "source": self._shown(job.body.get("source")),
                                 "target": self._shown(job.body.get("target")), "user": job.body.get("owner"),
                                 "doc_id": docid, "info": None, "history": [
                                     {"timestamp": iso(job.start_time), "type": "started"},
                                     {"timestamp": iso(job.created), "type": "added"}],
                                 "node": job.node, "start_time": iso(job.start_time)})
            return self._json(200, {"total_rows": len(jobs), "offset": 0, "jobs": jobs})
        raise HttpError(404, "not_found", "missing")

    def _active_tasks(self, node):
        names = {p.name for p in self._peers(node)}
        out = []
        for (sfx, docid), job in sorted(self.jobs.items()):
            if job.state == "running" and job.node in names:
                out.append({"node": job.node, "pid": "<0.1234.0>", "type": "replication",
                            "replication_id": self._job_id(job.body), "doc_id": docid,
                            "database": "shards/00000000-7fffffff/_replicator" + sfx,
                            "user": job.body.get("owner"), "continuous": job.body.get("continuous") is True,
                            "source": self._shown(job.body.get("source")),
                            "target": self._shown(job.body.get("target")),
                            "docs_read": job.stats["docs_read"], "docs_written": job.stats["docs_written"],
                            "doc_write_failures": job.stats["doc_write_failures"], "changes_pending": 0,
                            "started_on": int(job.start_time or 0), "updated_on": int(time.time())})
        return out


def validate_shard_map(body):
    """mem3_bdu: by_node and by_range must be objects that agree with each other."""
    def forbid(*words):
        raise HttpError(403, "forbidden", " ".join(str(w) for w in words))
    for key in ("by_node", "by_range"):
        if key not in body:
            forbid(key, "is mandatory")
        if not isinstance(body[key], dict):
            forbid(key, "not an object")
    by_node, by_range = body["by_node"], body["by_range"]
    for name, ranges in by_node.items():
        if not isinstance(ranges, list):
            forbid("by_node", json.dumps(ranges), "value not an array")
        for rng in ranges:
            if rng not in by_range:
                forbid("by_range for", rng, "missing")
            if not isinstance(by_range[rng], list) or name not in by_range[rng]:
                forbid("by_range for", rng, "missing", name)
    for rng, names in by_range.items():
        if not isinstance(names, list):
            forbid("by_range", json.dumps(names), "value not an array")
        for name in names:
            if name not in by_node:
                forbid("by_node for", name, "missing")
            if not isinstance(by_node[name], list) or rng not in by_node[name]:
                forbid("by_node for", name, "missing", rng)


def http_date():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
