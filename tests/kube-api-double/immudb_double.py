"""A TEST DOUBLE of immudb 1.11 (codenotary/immudb), for stack's tests.

No immudb can run on the machines the tests run on, so the Kubernetes API
double (kube_api_double.py, with --immudb) imports this module and lets it
answer the HTTP requests that reach an immudb pod (through the API server's
pod and service proxies, and over the pod network from lifecycle hooks),
and its probes. There is no server here: one ImmudbRegistry per process holds
every simulated node (one per pod) and the data on each pod's volume.

It behaves like the real server where stack's correctness depends on it,
the inconvenient parts included (the facts are from the immudb sources,
pkg/server, pkg/auth, pkg/api/schema/schema.proto, and grpc-gateway v1):

- ports: 3322 is gRPC, never HTTP: an HTTP request there is refused here
  (NotListening; a real gRPC server would answer an HTTP/1.1 request with
  garbage, never with a REST answer). 8080 is the web server with the REST
  gateway under /api/ and /api/v2/ (the same routes). 9497 is the metrics
  server: /metrics, /readyz, /livez, /initz (always 200, empty body, replicas
  too), /version. Nothing listens for `boot_seconds` after a start.
- the REST gateway is grpc-gateway v1: bodies are proto3 JSON (bytes fields
  base64, standard alphabet with padding, else 400 `illegal base64 data at
  input byte N`; uint64 answered as strings; zero values left out), errors
  `{"error": MSG, "code": GRPC_CODE, "message": MSG}` with the gRPC code's
  HTTP status; an unknown route is a 404 text `Not Found`.
- auth: POST /api/login {"user": b64, "password": b64} -> {"token"} (and
  `warning`, base64, when immudb logs in with the default password). Other
  calls need `Authorization: Bearer TOKEN` or `Grpc-Metadata-Authorization:
  Bearer TOKEN` (the gateway passes both on; "Bearer " is optional); tokens
  are signed with keys held in memory, so a restart logs everybody out; a
  user whose permissions changed must log in again. A missing or unknown
  token is NOT a 401: pkg/auth.ErrNotLoggedIn is an immudb error (SQLSTATE
  28000) that maps to gRPC Unknown, so 500 {"error": "not logged in",
  "code": 2, "message": "not logged in", "details": [ErrorInfo{code
  "28000", cause}, RetryInfo]}; a token not made of 3+ dot-separated
  pieces: 500 code 13 `invalid token`. A wrong password: 500 code 2 `invalid
  user name or password` (ErrorInfo code 08004). Plain fmt.Errorf errors
  (`user already exists`, ...) are 500 code 2 without details.
- the superuser `immudb` gets IMMUDB_ADMIN_PASSWORD (default `immudb`) only
  at the first start on an empty data dir (/var/lib/immudb); later starts keep
  the stored password (IMMUDB_FORCE_ADMIN_PASSWORD=true resets it, and makes
  a replica fail to start; an empty password: the container exits). immudb
  1.9+ checks no password strength on the server
  (only an empty password: 500 `password is empty`); `is_strong_password`
  holds the old rule immuadmin still warns about.
- users (CreateUser, ListUsers, ChangePermission, ChangePassword) live in
  systemdb; each change commits a systemdb transaction. Errors as immudb
  gives them: `user already exists` (500, code 2), usernames `^[a-zA-Z0-9_]+$`
  (400), permissions 1 read, 2 readwrite, 254 admin, 255 sysadmin.
- POST /api/db/set {"KVs": [{"key": b64, "value": b64}]} commits one
  transaction on defaultdb and answers its TxHeader.
- replication (IMMUDB_REPLICATION_IS_REPLICA=true): a server-level replica
  replicates systemdb AND defaultdb (users included), each pulled from
  IMMUDB_REPLICATION_PRIMARY_HOST:_PORT (default 3322, resolved from the
  pod, gRPC) as _PRIMARY_USERNAME/_PASSWORD; exporting a database needs the
  sysadmin or admin (254) on that database, else the replica keeps retrying,
  stays behind and logs why. A fresh replica has no transactions of its own
  (and so no users until systemdb is copied: its IMMUDB_ADMIN_PASSWORD is not
  used). One transaction per database every `replication_seconds`; `lag`
  {pod name: seconds} pulls nothing for that long after each start. Writes
  on a replica: 500 `database is read-only because it's a replica`.
  Sync replication: a primary with IMMUDB_REPLICATION_SYNC_ENABLED=true and
  IMMUDB_REPLICATION_SYNC_ACKS=N commits a write once N replicas with
  IMMUDB_REPLICATION_SYNC_ENABLED=true have it; the request waits (the real
  one waits for good; here `sync_wait_seconds`, then 504 code 4 `context
  deadline exceeded`, the transaction still precommitted).
- metrics: immudb_last_committed_trx_id and immudb_last_indexed_trx_id
  (embedded/store/indexer.go: "The highest id of committed transaction")
  with labels {db, index} (immudb 1.9+; the index label's value for the KV
  index is not confirmed, "index" here: match on db only), a fresh primary
  at defaultdb 1 and systemdb 2, a fresh replica at 0 (a replica database
  writes no first transaction of its own); replicas also
  immudb_replication_lag{db}.

Every request a node serves on 8080 or 9497 (not the kubelet's probes) is
appended to the log as one JSON line {"pod", "port", "method", "path",
"status", "body"}, with password fields ("password", "oldPassword",
"newPassword") as "***". Replication trouble is logged as {"pod", "log"}
lines, once each time the reason changes.
"""

import base64
import binascii
import datetime
import hashlib
import json
import os
import re
import threading
import time

try:
    from couchdb_double import NotListening
except ImportError:  # pragma: no cover - used alone
    class NotListening(Exception):
        """Nothing listens on that port: connection refused."""

IMAGE = re.compile(r"(^|/)immudb(:|@|$)")
DATA_DIR = "/var/lib/immudb"
GRPC_PORT, WEB_PORT, METRICS_PORT = 3322, 8080, 9497
DEFAULT_ADMIN_PASSWORD = "immudb"
SYSADMIN = "immudb"
PERM_READ, PERM_RW, PERM_ADMIN, PERM_SYSADMIN = 1, 2, 254, 255
WARN_DEFAULT_PASSWORD = "immudb user has the default password: please change it to ensure proper security"
PASSWORD_REQUIREMENTS = ("password must have between 8 and 32 letters, digits and special characters "
                         "of which at least 1 uppercase letter, 1 digit and 1 special character")
USERNAME = re.compile(r"^[a-zA-Z0-9_]+$")
DBS = ("systemdb", "defaultdb")
# gRPC code -> HTTP status, as grpc-gateway v1 maps them.
HTTP_OF = {0: 200, 1: 408, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
           11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
B64 = re.compile(r"^[A-Za-z0-9+/]*$")


def is_strong_password(password):
    """pkg/auth.IsStrongPassword: None when strong, else the error message (immuadmin warns with it)."""
    if not 8 <= len(password.encode()) <= 32:
        return PASSWORD_REQUIREMENTS
    upper = digit = special = False
    for ch in password:
        if ch.isupper():
            upper = True
        elif ch.islower():
            pass
        elif ch.isdigit():
            digit = True
        elif not ch.isalnum() and not ch.isspace() and ch.isprintable():
            special = True          # unicode.IsPunct || unicode.IsSymbol
        else:
            return PASSWORD_REQUIREMENTS
    return None if upper and digit and special else PASSWORD_REQUIREMENTS


class GrpcError(Exception):
    """A gRPC status the gateway turns into its error JSON. `immu` (SQLSTATE code, cause): an immudb
    error (pkg/errors), whose status carries ErrorInfo and RetryInfo details."""

    def __init__(self, code, message, immu=None):
        super().__init__(message)
        self.code, self.message, self.immu = code, message, immu


def not_logged_in():
    # pkg/auth.ErrNotLoggedIn: an immudb error with SQLSTATE 28000, which maps to no gRPC code: Unknown.
    return GrpcError(2, "not logged in", ("28000", "not logged in"))


def b64decode(value, field):
    """encoding/json's []byte: standard base64 with padding, or 400 like the gateway."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise GrpcError(3, f"json: cannot unmarshal {type(value).__name__} into Go value of type []uint8")
    s = value.replace("\r", "").replace("\n", "")
    bad = next((i for i, ch in enumerate(s.rstrip("=")) if not B64.match(ch)), None)
    if bad is None and len(s) % 4:
        bad = len(s) - len(s) % 4
    if bad is None:
        try:
            return base64.b64decode(s, validate=True)
        except binascii.Error:
            bad = len(s.rstrip("=")) - len(s.rstrip("=")) % 4
    raise GrpcError(3, f"illegal base64 data at input byte {bad}")


def b64(data):
    return base64.b64encode(data).decode()


def go_time(t):
    """Go's time.String() of a UTC time read back from JSON (no monotonic part)."""
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    frac = f"{d.microsecond * 1000:09d}".rstrip("0")
    return d.strftime("%Y-%m-%d %H:%M:%S") + (("." + frac) if frac else "") + " +0000 UTC"


def uint(value, field):
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GrpcError(3, f"invalid value for {field}: {value!r}")


class Db:
    """One database's transactions: [{"id", "ts", "entries": [(key, value)]}]; `committed` of them."""

    def __init__(self):
        self.txs = []
        self.committed = 0

    def commit(self, entries, committed=True):
        tx = {"id": len(self.txs) + 1, "ts": int(time.time()), "entries": list(entries)}
        self.txs.append(tx)
        if committed:
            self.committed = len(self.txs)
        return tx

    def header(self, tx):
        """A TxHeader as the gateway writes it (zero values left out, uint64 as strings)."""
        i = tx["id"]
        prev = hashlib.sha256(b"alh" + str(i - 1).encode()).digest()
        out = {"id": str(i), "prevAlh": b64(prev), "ts": str(tx["ts"]), "nentries": len(tx["entries"]),
               "eH": b64(hashlib.sha256(json.dumps([[b64(k), b64(v)] for k, v in tx["entries"]]).encode()).digest()),
               "version": 1}
        if i > 1:
            out["blTxId"] = str(i - 1)
            out["blRoot"] = b64(hashlib.sha256(b"bl" + str(i - 1).encode()).digest())
        return out


class Data:
    """What lives on the volume mounted at /var/lib/immudb."""

    def __init__(self):
        self.initialized = False
        self.dbs = {name: Db() for name in DBS}

    def users(self):
        """systemdb's users, replayed from its transactions: {name: record}."""
        out = {}
        for tx in self.dbs["systemdb"].txs:
            for k, v in tx["entries"]:
                if k[:1] == b"\x01":
                    out[k[1:].decode()] = json.loads(v)
        return out


def user_entry(record):
    return (b"\x01" + record["username"].encode(), json.dumps(record).encode())


def password_hash(password, salt=None):
    salt = salt or os.urandom(8).hex()
    return salt + "$" + hashlib.sha256((salt + password).encode()).hexdigest()


def password_ok(stored, password):
    salt = stored.split("$", 1)[0]
    return password_hash(password, salt) == stored


class Node:
    def __init__(self, pod):
        self.pod = pod
        self.name = pod.split("/", 1)[1]
        self.data = Data()
        self.running = False
        self.started = 0.0
        self.env = {}
        self.tokens = {}          # token -> username (keys in memory: gone with a restart)
        self.logged_in = set()
        self.replica = False
        self.why = {}             # db -> last reason replication is stuck (logged on change)
        self.next_pull = 0.0

    def opt(self, name, default=""):
        return (self.env.get("IMMUDB_" + name) or default).strip()

    def flag(self, name):
        return self.opt(name).lower() in ("true", "1", "t", "yes")


class ImmudbRegistry:
    """Every simulated immudb node of the process, by pod key ("NAMESPACE/POD")."""

    IMAGE = IMAGE
    DATA_PATHS = (DATA_DIR,)

    def __init__(self, log_path=None, boot_seconds=0.5, replication_seconds=0.05, lag=None, sync_wait_seconds=5.0):
        self.log_path = log_path
        self.boot = float(boot_seconds)
        self.replication_seconds = float(replication_seconds)
        self.lag = dict(lag or {})
        self.sync_wait = float(sync_wait_seconds)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.nodes = {}
        self.resolver = None      # resolver(host, port, from_pod) -> (pod_key, port) or None
        self._thread = None
        self._log_lock = threading.Lock()

    # ---- the kubelet's side -------------------------------------------

    def start_node(self, pod_key, env, image, files, fqdn):
        """The pod's container started. False when immudb exits at once (an empty admin password)."""
        with self.lock:
            node = self.nodes.get(pod_key) or Node(pod_key)
            self.nodes[pod_key] = node
            node.env = dict(env or {})
            tag = image.rsplit("/", 1)[-1].split("@", 1)[0]     # no digest (IMAGE@sha256:...)
            node.version = tag.split(":", 1)[1] if ":" in tag else "1.11.0"
            admin_password = node.env["IMMUDB_ADMIN_PASSWORD"].strip() \
                if "IMMUDB_ADMIN_PASSWORD" in node.env else DEFAULT_ADMIN_PASSWORD
            if admin_password.startswith("enc:"):
                try:
                    admin_password = base64.b64decode(admin_password[4:], validate=True).decode(errors="replace")
                except binascii.Error:
                    return False
            if admin_password == "":
                return False            # "Admin password cannot be empty": the server does not start
            directory = node.opt("DIR", DATA_DIR).rstrip("/")
            if directory != DATA_DIR:
                node.data = Data()      # the data lives in the container's own filesystem
            node.replica = node.flag("REPLICATION_IS_REPLICA")
            if not node.data.initialized:
                node.data.initialized = True
                if not node.replica:
                    # A fresh server: systemdb's first tx, the sysadmin, defaultdb's first tx.
                    node.data.dbs["systemdb"].commit([(b"\x02catalog", b"{}")])
                    node.data.dbs["systemdb"].commit([user_entry(self._record(
                        SYSADMIN, admin_password, [{"database": "*", "permission": PERM_SYSADMIN}], ""))])
                    node.data.dbs["defaultdb"].commit([(b"\x02catalog", b"{}")])
            elif node.flag("FORCE_ADMIN_PASSWORD"):
                # --force-admin-password: the stored password reset when it differs; a replica cannot.
                if node.replica:
                    node.running = False
                    return False
                admin = node.data.users().get(SYSADMIN)
                if admin is not None and not password_ok(admin["hashedPassword"], admin_password):
                    node.data.dbs["systemdb"].commit([user_entry({**admin, "hashedPassword": password_hash(
                        admin_password)})])
            node.running = True
            node.started = time.monotonic()
            node.tokens, node.logged_in, node.why = {}, set(), {}
            node.next_pull = node.started + self.lag.get(node.name, 0.0)
            self._ensure_thread()
            self.changed.notify_all()
            return True

    def stop_node(self, pod_key, keep_data=True):
        with self.lock:
            node = self.nodes.get(pod_key)
            if node is None:
                return
            node.running = False
            node.tokens, node.logged_in = {}, set()
            if not keep_data:
                node.data = Data()
            self.changed.notify_all()

    def running(self, pod_key):
        with self.lock:
            node = self.nodes.get(pod_key)
            return bool(node and node.running)

    def probe(self, pod_key, path, port):
        try:
            status, _, _ = self.handle(pod_key, "GET", path, {"User-Agent": "kube-probe/1.31"}, b"", port, log=False)
        except NotListening:
            return False
        return 200 <= status < 400

    # ---- HTTP ------------------------------------------------------------

    def handle(self, pod_key, method, path, headers, body, port=WEB_PORT, log=True):
        """One HTTP request reaching the pod's port -> (status, headers, body); NotListening when refused."""
        with self.lock:
            node = self.nodes.get(pod_key)
            if node is None or not node.running or time.monotonic() < node.started + self.boot:
                raise NotListening("connection refused")
            if port not in (WEB_PORT, METRICS_PORT):
                raise NotListening("connection refused")    # 3322 is gRPC: no HTTP answer there
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        if port == METRICS_PORT:
            status, out_headers, out = self._metrics_port(node, method, path)
        else:
            status, out_headers, out = self._web(node, method, path, hdrs, body or b"")
        if log:
            self._log(node, port, method, path, status, body)
        return status, out_headers, out

    def _log(self, node, port, method, path, status, body):
        if not self.log_path:
            return
        parsed = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        if isinstance(parsed, dict):
            parsed = {k: ("***" if k in ("password", "oldPassword", "newPassword") else v) for k, v in parsed.items()}
        self._write_log({"pod": node.pod, "port": port, "method": method, "path": path, "status": status,
                         "body": parsed})

    def _write_log(self, line):
        if self.log_path:
            with self._log_lock, open(self.log_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    @staticmethod
    def _json(status, value):
        return status, {"Content-Type": "application/json", "Grpc-Metadata-Content-Type": "application/grpc"}, \
            json.dumps(value, separators=(",", ":")).encode()

    def _error(self, e):
        body = {"error": e.message, "code": e.code, "message": e.message}
        if e.immu:
            body["details"] = [{"@type": "type.googleapis.com/immudb.schema.ErrorInfo", "code": e.immu[0],
                                "cause": e.immu[1]},
                               {"@type": "type.googleapis.com/immudb.schema.RetryInfo"}]
        return self._json(HTTP_OF.get(e.code, 500), body)

    def _metrics_port(self, node, method, path):
        route = path.split("?", 1)[0]
        text = lambda status, body, ctype="text/plain; charset=utf-8": (
            status, {"Content-Type": ctype, "Access-Control-Allow-Origin": "*"}, body.encode())
        if route in ("/readyz", "/livez", "/initz"):
            return 200, {"Access-Control-Allow-Origin": "*"}, b""
        if route == "/metrics":
            return text(200, self._metrics(node), "text/plain; version=0.0.4; charset=utf-8")
        if route == "/version":
            return text(200, json.dumps({"component": "immudb", "version": node.version, "buildtime": "",
                                         "builtby": "", "static": True}), "application/json")
        return text(404, "404 page not found\n")

    def _metrics(self, node):
        with self.lock:
            lines = []
            for name, help_ in (("immudb_last_committed_trx_id", "The highest id of committed transaction"),
                                ("immudb_last_indexed_trx_id", "The highest id of indexed transaction")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
                for db in ("defaultdb", "systemdb"):
                    lines.append(f'{name}{{db="{db}",index="index"}} {node.data.dbs[db].committed}')
            if node.replica:
                lines += ["# HELP immudb_replication_lag The difference between the last transaction committed "
                          "by the primary and replicated by the replica",
                          "# TYPE immudb_replication_lag gauge"]
                for db in ("defaultdb", "systemdb"):
                    primary = self._primary(node)
                    behind = max(0, primary.data.dbs[db].committed - node.data.dbs[db].committed) if primary else 0
                    lines.append(f'immudb_replication_lag{{db="{db}"}} {behind}')
            lines += ["# HELP immudb_uptime_hours Server uptime in hours.", "# TYPE immudb_uptime_hours counter",
                      f"immudb_uptime_hours {(time.monotonic() - node.started) / 3600:.6g}"]
            return "\n".join(lines) + "\n"

    # ---- the REST gateway -------------------------------------------------

    def _web(self, node, method, path, headers, body):
        route = path.split("?", 1)[0]
        if route.startswith("/api/v2/"):
            route = route[len("/api/v2"):]
        elif route.startswith("/api/"):
            route = route[len("/api"):]
        else:
            if route == "/" and method == "GET":
                return 200, {"Content-Type": "text/html; charset=utf-8"}, b"<!doctype html><title>immudb</title>\n"
            return 404, {"Content-Type": "text/plain; charset=utf-8"}, b"404 page not found\n"
        routes = {
            ("POST", "/login"): self._login, ("POST", "/logout"): self._logout,
            ("POST", "/user"): self._create_user, ("GET", "/user/list"): self._list_users,
            ("POST", "/user/changepermission"): self._change_permission,
            ("POST", "/user/setactiveUser"): self._set_active_user,
            ("POST", "/user/password/change"): self._change_password,
            ("POST", "/db/set"): self._set, ("GET", "/db/state"): self._state,
            ("GET", "/health"): self._health, ("GET", "/serverinfo"): self._serverinfo,
        }
        fn = routes.get((method, route))
        getkey = re.match(r"^/db/get/([^/]+)$", route) if method == "GET" else None
        use = re.match(r"^/db/use/([^/]+)$", route) if method == "GET" else None
        if fn is None and getkey is None and use is None:
            return 404, {"Content-Type": "text/plain; charset=utf-8"}, b"Not Found\n"
        try:
            req = {}
            if body.strip():
                try:
                    req = json.loads(body)
                except ValueError as e:
                    raise GrpcError(3, f"invalid character in JSON body: {e}")
                if not isinstance(req, dict):
                    raise GrpcError(3, "json: cannot unmarshal into a message")
            if getkey:
                return self._get(node, headers, getkey.group(1))
            if use:
                return self._use(node, headers, use.group(1))
            return fn(node, headers, req)
        except GrpcError as e:
            return self._error(e)

    def _user_of(self, node, headers):
        """The logged-in user of a request (Authorization, or Grpc-Metadata-Authorization), else 500 `not logged in`."""
        for name in ("authorization", "grpc-metadata-authorization"):
            value = headers.get(name)
            if value:
                token = value[len("Bearer "):] if value.startswith("Bearer ") else value
                if token and len(token.split(".")) < 3:
                    # immuerror.Wrap(err, "invalid token"): SQLSTATE XX000, gRPC Internal.
                    raise GrpcError(13, "invalid token", ("XX000", "malformed token: expected at least 3 pieces"))
                with self.lock:
                    user = node.tokens.get(token)
                    if user is not None and user in node.logged_in:
                        record = node.data.users().get(user)
                        if record is not None and record.get("active", True):
                            return record
                break
        raise not_logged_in()

    @staticmethod
    def _record(name, password, permissions, created_by):
        return {"username": name, "hashedPassword": password_hash(password), "permissions": permissions,
                "createdBy": created_by, "createdAt": time.time(), "active": True}

    @staticmethod
    def _has(record, db, perm):
        if record["username"] == SYSADMIN:
            return True
        return any(p["database"] == db and p["permission"] == perm for p in record.get("permissions", []))

    def _login(self, node, headers, req):
        user = b64decode(req.get("user"), "user").decode(errors="replace")
        password = b64decode(req.get("password"), "password").decode(errors="replace")
        with self.lock:
            record = node.data.users().get(user)
            if record is None or not password_ok(record["hashedPassword"], password):
                cause = "key not found" if record is None else \
                    "crypto/bcrypt: hashedPassword is not the hash of the given password"
                raise GrpcError(2, "invalid user name or password", ("08004", cause))
            if not record.get("active", True):
                raise GrpcError(2, "user is not active")
            token = "v2.public." + base64.urlsafe_b64encode(os.urandom(96)).decode().rstrip("=") + ".aW1tdWRi"
            node.tokens[token] = user
            node.logged_in.add(user)
        out = {"token": token}
        if user == SYSADMIN and password == DEFAULT_ADMIN_PASSWORD:
            out["warning"] = b64(WARN_DEFAULT_PASSWORD.encode())
        return self._json(200, out)

    def _logout(self, node, headers, req):
        record = self._user_of(node, headers)
        with self.lock:
            node.logged_in.discard(record["username"])
            for t in [t for t, u in node.tokens.items() if u == record["username"]]:
                node.tokens.pop(t)
        return self._json(200, {})

    def _write_users(self, node, record):
        """Saves a user: one systemdb transaction (refused on a replica, waits for sync acks)."""
        self._commit(node, "systemdb", [user_entry(record)])

    def _commit(self, node, dbname, entries):
        with self.lock:
            if node.replica:
                raise GrpcError(2, "database is read-only because it's a replica")
            db = node.data.dbs[dbname]
            acks = uint(node.opt("REPLICATION_SYNC_ACKS", "0") or 0, "syncAcks") \
                if node.flag("REPLICATION_SYNC_ENABLED") else 0
            tx = db.commit(entries, committed=acks == 0)
            if acks:
                deadline = time.monotonic() + self.sync_wait
                while self._acks(node, dbname, tx["id"]) < acks:
                    left = deadline - time.monotonic()
                    if left <= 0 or not node.running:
                        raise GrpcError(4, "context deadline exceeded")
                    self.changed.wait(min(left, 0.05))
                db.committed = max(db.committed, tx["id"])
            self.changed.notify_all()
            return db.header(tx)

    def _acks(self, primary, dbname, txid):
        n = 0
        for node in self.nodes.values():
            if node.running and node.replica and node.flag("REPLICATION_SYNC_ENABLED") and \
                    self._primary(node) is primary and len(node.data.dbs[dbname].txs) >= txid:
                n += 1
        return n

    def _create_user(self, node, headers, req):
        me = self._user_of(node, headers)
        user = b64decode(req.get("user"), "user").decode(errors="replace")
        password = b64decode(req.get("password"), "password").decode(errors="replace")
        permission = uint(req.get("permission"), "permission")
        database = req.get("database") or ""
        if not user:
            raise GrpcError(2, "username can not be empty")
        if not database:
            database = "defaultdb"          # one database: not in multidb mode
        if database != "defaultdb":
            raise GrpcError(2, f"database {database} does not exist")
        if permission == 0 or PERM_RW < permission < PERM_ADMIN or permission > PERM_SYSADMIN:
            raise GrpcError(2, "unrecognized permission")
        if not self._has(me, database, PERM_ADMIN):
            raise GrpcError(2, "you do not have permission on this database")
        if permission == PERM_SYSADMIN:
            raise GrpcError(2, "can not create another system admin")
        with self.lock:
            if user in node.data.users():
                raise GrpcError(2, "user already exists")
        if not USERNAME.match(user) or len(user) > 63:
            raise GrpcError(3, "username can only contain letters, digits and underscores")
        if password == "":
            raise GrpcError(2, "password is empty")
        self._write_users(node, self._record(user, password, [{"database": database, "permission": permission}],
                                             me["username"]))
        return self._json(200, {})

    @staticmethod
    def _schema_user(record):
        out = {"user": b64(record["username"].encode()),
               "permissions": [{"database": p["database"], "permission": p["permission"]}
                               for p in record.get("permissions", [])],
               "createdat": go_time(record.get("createdAt", 0))}
        if record.get("createdBy"):
            out["createdby"] = record["createdBy"]
        if record.get("active", True):
            out["active"] = True
        return out

    def _list_users(self, node, headers, req):
        me = self._user_of(node, headers)
        with self.lock:
            users = node.data.users()
        if me["username"] == SYSADMIN:
            shown = list(users.values())
        elif self._has(me, "defaultdb", PERM_ADMIN):
            shown = [u for u in users.values() if any(p["database"] == "defaultdb" for p in u.get("permissions", []))]
        else:
            shown = [me]
        return self._json(200, {"users": [self._schema_user(u) for u in shown]})

    def _change_permission(self, node, headers, req):
        username = req.get("username") or ""
        database = req.get("database") or ""
        action = req.get("action", 0)
        action = {"GRANT": 0, "REVOKE": 1}.get(action, action)
        permission = uint(req.get("permission"), "permission")
        if not username:
            raise GrpcError(3, "username can not be empty")
        if not database:
            raise GrpcError(3, "database can not be empty")
        if database not in DBS:
            raise GrpcError(3, "database does not exist")
        if action not in (0, 1):
            raise GrpcError(3, "action not recognized")
        if permission == 0 or PERM_RW < permission < PERM_ADMIN:
            raise GrpcError(3, "unrecognized permission")
        me = self._user_of(node, headers)
        if username == me["username"]:
            raise GrpcError(3, "changing your own permissions is not allowed")
        if username == SYSADMIN:
            raise GrpcError(3, "changing sysadmin permissions is not allowed")
        if database == "systemdb" and permission == PERM_RW:
            raise GrpcError(13, "permission denied", ("XX000", "permission denied"))
        with self.lock:
            target = node.data.users().get(username)
        if target is None:
            raise GrpcError(5, f"user {username} not found")
        if not target.get("active", True):
            raise GrpcError(9, f"user {username} is not active")
        if not self._has(me, database, PERM_ADMIN):
            raise GrpcError(7, "you do not have permission on this database")
        perms = [p for p in target.get("permissions", []) if p["database"] != database]
        if action == 0:
            perms.append({"database": database, "permission": permission})
        target = {**target, "permissions": perms, "createdBy": me["username"], "createdAt": time.time()}
        self._write_users(node, target)
        with self.lock:
            node.logged_in.discard(username)
        return self._json(200, {})

    def _set_active_user(self, node, headers, req):
        """SetActiveUser as pkg/server/user.go has it: plain errors (500, code 2)."""
        username = req.get("username") or ""
        if not username:
            raise GrpcError(2, "username can not be empty")
        me = self._user_of(node, headers)
        if me["username"] != SYSADMIN and not any(p["permission"] == PERM_ADMIN for p in me.get("permissions", [])):
            raise GrpcError(2, "user is not system admin nor admin in any of the databases")
        if username == me["username"]:
            raise GrpcError(2, "changing your own status is not allowed")
        with self.lock:
            target = node.data.users().get(username)
        if target is None:
            raise GrpcError(2, f"user {username} not found")
        if me["username"] != SYSADMIN and not any(self._has(me, p["database"], PERM_ADMIN)
                                                   for p in target.get("permissions", [])):
            raise GrpcError(2, "you are not allowed to change the status of this user")
        target = {**target, "active": bool(req.get("active", False))}
        self._write_users(node, target)
        with self.lock:
            node.logged_in.discard(username)
        return self._json(200, {})

    def _change_password(self, node, headers, req):
        me = self._user_of(node, headers)
        user = b64decode(req.get("user"), "user").decode(errors="replace")
        old = b64decode(req.get("oldPassword"), "oldPassword").decode(errors="replace")
        new = b64decode(req.get("newPassword"), "newPassword").decode(errors="replace")
        if user == SYSADMIN and not password_ok(me["hashedPassword"], old):
            raise GrpcError(7, "old password is incorrect")
        if me["username"] != SYSADMIN and not any(p["permission"] == PERM_ADMIN for p in me.get("permissions", [])):
            raise GrpcError(2, "user is not system admin nor admin in any of the databases")
        with self.lock:
            target = node.data.users().get(user)
        if target is None or (me["username"] != SYSADMIN and target.get("createdBy") != me["username"]):
            raise GrpcError(2, f"user {user} was not found or it was not created by you")
        if new == "":
            raise GrpcError(2, "password is empty")
        target = {**target, "hashedPassword": password_hash(new), "createdBy": me["username"],
                  "createdAt": time.time()}
        self._write_users(node, target)
        with self.lock:
            node.logged_in.discard(user)
            for t in [t for t, u in node.tokens.items() if u == user]:
                node.tokens.pop(t)
        return self._json(200, {})

    def _db_user(self, node, headers, perm_needed):
        me = self._user_of(node, headers)
        if me["username"] == SYSADMIN:
            return me
        have = [p["permission"] for p in me.get("permissions", []) if p["database"] == "defaultdb"]
        if not have or (perm_needed == PERM_RW and not any(p in (PERM_RW, PERM_ADMIN) for p in have)):
            raise GrpcError(7, "you do not have permission for this operation")
        return me

    def _set(self, node, headers, req):
        self._db_user(node, headers, PERM_RW)
        kvs = req.get("KVs") or req.get("kvs") or []
        if not kvs:
            raise GrpcError(3, "illegal arguments")
        entries = []
        for kv in kvs:
            key = b64decode(kv.get("key"), "key")
            if not key:
                raise GrpcError(3, "illegal arguments")
            entries.append((key, b64decode(kv.get("value"), "value")))
        return self._json(200, self._commit(node, "defaultdb", entries))

    def _get(self, node, headers, key):
        self._db_user(node, headers, PERM_READ)
        key = b64decode(key.replace("-", "+").replace("_", "/"), "key")
        with self.lock:
            db = node.data.dbs["defaultdb"]
            for tx in reversed(db.txs[:db.committed]):
                for k, v in tx["entries"]:
                    if k == key:
                        return self._json(200, {"tx": str(tx["id"]), "key": b64(k), "value": b64(v)})
        raise GrpcError(5, "key not found")

    def _state(self, node, headers, req):
        self._db_user(node, headers, PERM_READ)
        with self.lock:
            db = node.data.dbs["defaultdb"]
            out = {"db": "defaultdb"}
            if db.committed:
                out["txId"] = str(db.committed)
                out["txHash"] = b64(hashlib.sha256(b"alh" + str(db.committed).encode()).digest())
            return self._json(200, out)

    def _use(self, node, headers, name):
        me = self._user_of(node, headers)
        if name != "defaultdb":
            raise GrpcError(5, f"database {name} does not exist")
        with self.lock:
            token = "v2.public." + base64.urlsafe_b64encode(os.urandom(96)).decode().rstrip("=") + ".aW1tdWRi"
            node.tokens[token] = me["username"]
        return self._json(200, {"token": token})

    def _health(self, node, headers, req):
        return self._json(200, {"status": True, "version": node.version})

    def _serverinfo(self, node, headers, req):
        return self._json(200, {"version": node.version})

    # ---- replication ------------------------------------------------------

    def _primary(self, node):
        """The node a replica's primary host:port reaches over gRPC, or None."""
        host = node.opt("REPLICATION_PRIMARY_HOST")
        port = uint(node.opt("REPLICATION_PRIMARY_PORT", str(GRPC_PORT)) or GRPC_PORT, "primaryPort")
        if not host or self.resolver is None:
            return None
        try:
            got = self.resolver(host, port, node.pod)
        except Exception:
            got = None
        if not got:
            return None
        target = self.nodes.get(got[0])
        if target is None or got[1] != GRPC_PORT:
            return None
        return target

    def _ensure_thread(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._replicate_forever, daemon=True)
            self._thread.start()

    def _replicate_forever(self):
        while True:
            time.sleep(self.replication_seconds)
            try:
                self.replicate_once()
            except Exception as e:  # keep replicating; say what went wrong
                self._write_log({"pod": None, "log": f"immudb double: replication failed: {e!r}"})

    def replicate_once(self):
        """Every running replica past its lag copies one transaction of each database it is behind on."""
        with self.lock:
            now = time.monotonic()
            for node in list(self.nodes.values()):
                if not (node.running and node.replica) or now < node.next_pull or now < node.started + self.boot:
                    continue
                for dbname in DBS:
                    why = self._pull(node, dbname)
                    if why != node.why.get(dbname):
                        node.why[dbname] = why
                        if why:
                            self._write_log({"pod": node.pod, "log": f"replication of {dbname}: {why}"})
            self.changed.notify_all()

    def _pull(self, node, dbname):
        """One transaction of `dbname` from the primary -> None, or why nothing could be copied."""
        primary = self._primary(node)
        host = node.opt("REPLICATION_PRIMARY_HOST")
        if primary is None or not primary.running or time.monotonic() < primary.started + self.boot:
            return f"error connecting to primary {host}: connection refused"
        user = node.opt("REPLICATION_PRIMARY_USERNAME")
        password = node.env.get("IMMUDB_REPLICATION_PRIMARY_PASSWORD", "")
        record = primary.data.users().get(user)
        if record is None or not password_ok(record["hashedPassword"], password) or not record.get("active", True):
            return "invalid user name or password"
        if not self._has(record, dbname, PERM_ADMIN):
            return "permission denied"      # ExportTx needs the sysadmin or admin (254) on the database
        src, dst = primary.data.dbs[dbname], node.data.dbs[dbname]
        # Sync replicas also take precommitted transactions (their acks commit them).
        upto = len(src.txs) if node.flag("REPLICATION_SYNC_ENABLED") else src.committed
        if len(dst.txs) < upto:
            tx = src.txs[len(dst.txs)]
            dst.txs.append({"id": tx["id"], "ts": tx["ts"], "entries": list(tx["entries"])})
            dst.committed = len(dst.txs)
        return None

