"""A TEST DOUBLE of AllegroGraph 8.x servers (franzinc/agraph image), for stack's tests.

No AllegroGraph can run on the machines the tests run on, so the Kubernetes
API double (kube_api_double.py) imports this module and lets it answer the
HTTP requests that reach an AllegroGraph pod's port 10035 (through the API
server's port-forward, the sidecar's curl, or a probe). There is no server
here: one AgraphRegistry per process holds every simulated server (one per
pod) and the data on each pod's volumes. It has the registry interface of
couchdb_double.CouchRegistry: start_node, stop_node, running, probe,
handle, crash_reason and the `resolver` the kubelet sets.

It behaves like the real server and image where stack's correctness depends
on it, the inconvenient parts included (from Franz's docs, the docker-agraph
entrypoint and Franz's MMR example scripts; what is marked "not checked
against a real server" is a reasonable guess):

- the image's entrypoint exits 1 when /dev/shm is smaller than 976000 KiB
  (`df -P /dev/shm`; Docker's and Kubernetes' default is 64 MiB): start_node
  gets `shm_bytes`, the size of the Memory emptyDir mounted at /dev/shm
  (None: there is none), and returns False below that;
- AGRAPH_SUPER_USER/AGRAPH_SUPER_PASSWORD (or their _FILE variants read from
  `files`; a variable and its _FILE both set: exit 1) and AGRAPH_LICENSE
  apply only at the first start, when /agraph/etc/agraph.cfg does not exist
  yet; without both, the super-user is `admin` with a random 16-character
  password, so nobody can log in knowing a default;
- /agraph/etc (users, license) and /agraph/data (repositories) are kept or
  lost separately (stop_node's keep_data); a server that restarts without
  /agraph/data comes back with no repositories, its cluster instances gone;
- HTTP Basic auth on everything but GET /version and GET /hostname; 401
  text/plain with `WWW-Authenticate: Basic realm="AllegroGraph"` otherwise;
- GET /repositories (JSON list), PUT /repositories/R (an existing R is
  overwritten with an empty one unless override=false, which is a 400),
  DELETE /repositories/R, GET /repositories/R/size, GET and POST
  /repositories/R/statements (N-Triples; Content-Type text/plain or
  application/n-triples, else 400);
- multi-master replication (MMR), every parameter in the query string:
  * PUT /repositories/R/repl/createCluster?host&port&user&password&instanceName
    creates R as the first, controlling instance (R already a cluster, or
    already present at all: 400); user/password must be valid here;
  * PUT /repositories/R/repl/growCluster?host&port&name&user&password&instanceName
    on the controlling instance: resolves host (DNS from the controlling
    pod, the registry's resolver), connects to port (nothing listening: 500
    at once; a name that does not resolve: 500 after `unreachable_seconds`),
    logs in there with user/password (refused: 500), needs the new server
    not to hold a repository `name` (400), copies the data, adds the
    member; a duplicate instanceName is a 400; on a member that is not the
    controlling instance, a 400;
  * PUT /repositories/R/repl/remove?instanceName=X on the controlling
    instance: unknown X or the controlling itself: 400; the removed
    instance's repository, if its server can be reached, stays there as a
    standalone repository (not checked against a real server), so joining
    again under any name first needs it deleted; a member that cannot be
    reached is removed all the same (after `unreachable_seconds` when its
    name does not resolve, the optional `timeout` parameter capping it);
  * GET /repositories/R/repl/status on any instance (shape below);
  * a commit on any instance reaches every other instance `repl_seconds`
    later, or when that instance's server runs again with its data;
    a member whose pod went away without a `remove` stays in the cluster
    (a dead member) until someone removes it;
- GET /metrics, super-user only (403 otherwise), Prometheus text:
  `agraph_repository_triples{catalog,repository}` and
  `agraph_replication_instances{catalog,repository,state}` (the metric
  names are made up: not checked against a real server, 9.0's docs name
  only the categories);
- error bodies are text/plain with a 4xx/5xx status.

Not checked against a real server: the repl/status JSON shape (the facts
collected say "don't hard-code a shape"), the state names, the status codes
and wording of the errors, the 204 answers of PUT/DELETE, the count AG
answers to POST statements, /version's and /hostname's exact bodies.

repl/status answers (application/json), as this double chooses it:

    {"repository": "R", "cluster": "<uuid>", "controllingInstance": "NAME",
     "instances": [{"instanceName": "NAME", "host": "HOST", "port": 10035,
                    "repository": "R", "controlling": true,
                    "state": "running" | "stopped" | "unreachable"}, ...]}

`running`: that server answers and holds the instance; `stopped`: the
server answers but no longer holds it (restarted without its data,
repository deleted); `unreachable`: the host does not resolve or nothing
listens (pod gone, container down).

Every request a server answers (not the kubelet's probes) is appended to
log_path as one JSON line {"pod", "method", "path", "status"}, `password`
query values written as `***`; no password is ever logged.
"""

import base64
import collections
import json
import re
import secrets
import string
import threading
import time
import uuid
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from couchdb_double import NotListening

HTTP_PORT = 10035
SHM_MIN_KIB = 976000          # the entrypoint's `[ "$shm_size" -lt 976000 ]`, df -P in KiB
DEFAULT_VERSION = "8.3.1"
SHM_MESSAGE = ("The container for AllegroGraph must be started with the following \n"
               "option in order to operate correctly:\n--shm-size 1g \n")
TRIPLE_RE = re.compile(r'^\s*(<[^>]*>|_:\S+)\s+(<[^>]*>)\s+(<[^>]*>|_:\S+|"(?:[^"\\]|\\.)*"(?:@[\w-]+|\^\^<[^>]*>)?)'
                       r'\s*\.\s*$')
NTRIPLES_TYPES = ("text/plain", "application/n-triples")


class HttpError(Exception):
    def __init__(self, status, text, headers=None):
        super().__init__(f"{status} {text}")
        self.status, self.text, self.headers = status, text, headers or {}


class Delay:
    """An answer given after `seconds` (a connect timeout), the registry's lock released meanwhile."""

    def __init__(self, seconds, answer):
        self.seconds, self.answer = seconds, answer


def redact_path(path):
    """The path with every `password` query value as `***`."""
    if "?" not in path:
        return path
    base, query = path.split("?", 1)
    parts = []
    for part in query.split("&"):
        name = unquote(part.split("=", 1)[0]).lower()
        parts.append(part.split("=", 1)[0] + "=***" if "password" in name else part)
    return base + "?" + "&".join(parts)


class Cluster:
    def __init__(self):
        self.id = str(uuid.uuid4())
        self.instances = collections.OrderedDict()   # instanceName -> Instance
        self.log = []                                # [(seq, triples, due)]
        self.seq = 0


class Instance:
    def __init__(self, name, host, port, repo, controlling):
        self.name, self.host, self.port, self.repo, self.controlling = name, host, int(port), repo, controlling


class Repo:
    def __init__(self, triples=None):
        self.triples = list(triples or [])
        self.cluster = None        # Cluster while this repository is an instance
        self.instance = None       # its instanceName
        self.applied = set()       # cluster log seqs already in it


class Server:
    def __init__(self, pod):
        self.pod = pod
        self.running = False
        self.started = 0.0
        self.etc = None            # /agraph/etc: {"users": {name: {"password", "super"}}, "license"}
        self.repos = {}            # /agraph/data: name -> Repo
        self.crash = None
        self.version = DEFAULT_VERSION
        self.hostname = pod.split("/")[-1]
        self.fqdn = None
        self.generated_password = None


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

    def param(self, name):
        value = self.query.get(name)
        if value is None or value == "":
            raise HttpError(400, f"Missing parameter: {name}")
        return value


def _file_text(files, path):
    """The text of `path` in the mounted files {mount_path: {filename: text}} -> str or None."""
    for mount, entries in (files or {}).items():
        prefix = mount.rstrip("/") + "/"
        if path.startswith(prefix):
            value = (entries or {}).get(path[len(prefix):])
            if isinstance(value, tuple):
                value = value[0]
            if isinstance(value, bytes):
                value = value.decode()
            return value
    return None


class AgraphRegistry:
    """Every simulated AllegroGraph server of the process, by pod key ("NAMESPACE/POD")."""

    IMAGE = re.compile(r"(^|/)agraph(:|@|$)")
    DATA_PATHS = ("/agraph/data", "/agraph/etc")

    def __init__(self, log_path=None, boot_seconds=1.0, repl_seconds=0.2, unreachable_seconds=2.0):
        self.log_path = log_path
        self.boot = float(boot_seconds)              # container start -> port 10035 accepts connections
        self.repl = float(repl_seconds)              # a commit -> on the other instances
        self.unreachable = float(unreachable_seconds)  # connecting to a name that does not resolve
        self.lock = threading.RLock()
        self.servers = {}
        # resolver(host, port, from_pod) -> (pod_key, pod_port) or None. None: a host
        # resolves to the server whose pod name, or fqdn, it is.
        self.resolver = None

    # ---- the kubelet's side -------------------------------------------

    def start_node(self, pod_key, env, image="franzinc/agraph:v" + DEFAULT_VERSION, files=None, fqdn=None,
                   shm_bytes=None, keep_data_of=None, **extra):
        """The pod's agraph container started. False when the entrypoint exits at once (small /dev/shm, bad env)."""
        env = env or {}
        with self.lock:
            server = self.servers.get(pod_key)
            if keep_data_of is not None and keep_data_of != pod_key and keep_data_of in self.servers:
                old = self.servers.pop(keep_data_of)
                server = server or Server(pod_key)
                server.etc, server.repos = old.etc, old.repos
                self.servers[pod_key] = server
            if server is None:
                server = self.servers[pod_key] = Server(pod_key)
            server.fqdn = fqdn
            server.version = self._version(image or "")
            server.crash = self._configure(server, env, files, shm_bytes)
            if server.crash:
                server.running = False
                return False
            server.running = True
            server.started = time.monotonic()
            self._tick()
            return True

    def stop_node(self, pod_key, keep_data=True):
        """The container stopped. keep_data: True, False, or the DATA_PATHS kept (on volumes that stay)."""
        with self.lock:
            server = self.servers.get(pod_key)
            if server is None:
                return
            self._tick()
            server.running = False
            kept = set(self.DATA_PATHS) if keep_data is True else set(keep_data or ())
            if "/agraph/data" not in kept:
                server.repos = {}
            if "/agraph/etc" not in kept:
                server.etc = None

    def running(self, pod_key):
        with self.lock:
            server = self.servers.get(pod_key)
            return bool(server and server.running)

    def listening(self, pod_key, port=HTTP_PORT):
        """Does a TCP connection to the pod's port succeed now (for the port-forward's dial)?"""
        with self.lock:
            return self._listening(pod_key, port) is not None

    def crash_reason(self, pod_key):
        with self.lock:
            server = self.servers.get(pod_key)
            return server.crash if server else None

    def probe(self, pod_key, path, port):
        """An httpGet probe from the kubelet (no credentials): True for 200-399. Not logged."""
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

    def handle(self, pod_key, method, path, headers, body, port=HTTP_PORT, log=True, **extra):
        """One HTTP request reaching the pod's port -> (status, headers, body); NotListening when refused."""
        with self.lock:
            self._tick()
            server = self._listening(pod_key, port)
            if server is None:
                raise NotListening("connection refused")
            req = Req(method, path, headers, body, port)
            try:
                answer = self._serve(server, req)
            except HttpError as e:
                answer = self._text(e.status, e.text, e.headers)
        if isinstance(answer, Delay):
            time.sleep(answer.seconds)
            answer = answer.answer
        status, hdrs, out = answer
        base = {"Server": "AllegroServe/1.3.x", "Date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())}
        base.update(hdrs)
        if log:
            self._log(pod_key, req, status)
        return status, base, out

    def _listening(self, pod_key, port):
        server = self.servers.get(pod_key)
        if server is None or not server.running or time.monotonic() < server.started + self.boot:
            return None
        if int(port) != HTTP_PORT:
            return None
        return server

    def _log(self, pod_key, req, status):
        if not self.log_path:
            return
        line = {"pod": pod_key, "method": req.method, "path": redact_path(req.path), "status": status}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    @staticmethod
    def _text(status, text, headers=None):
        out = {"Content-Type": "text/plain; charset=utf-8"}
        out.update(headers or {})
        body = (text if text.endswith("\n") else text + "\n").encode() if text else b""
        return status, out, body

    @staticmethod
    def _json(status, value):
        return status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(value).encode()

    @staticmethod
    def _none():
        return 204, {}, b""

    # ---- configuration ---------------------------------------------------

    @staticmethod
    def _version(image):
        tag = image.rsplit("/", 1)[-1].split("@", 1)[0]
        tag = tag.split(":", 1)[1] if ":" in tag else ""
        m = re.match(r"^v?(\d+\.\d+\.\d+)", tag)
        return m.group(1) if m else DEFAULT_VERSION

    def _configure(self, server, env, files, shm_bytes):
        """What the entrypoint does before agraph starts -> the reason it exits 1, or None."""
        if shm_bytes is None or shm_bytes < SHM_MIN_KIB * 1024:
            return SHM_MESSAGE
        if server.etc is not None:
            return None            # agraph.cfg exists: the environment is not read again
        values = {}
        for name in ("AGRAPH_SUPER_USER", "AGRAPH_SUPER_PASSWORD", "AGRAPH_LICENSE"):
            direct, via = env.get(name), env.get(name + "_FILE")
            if direct and via:
                return f"Error: Both {name} and {name}_FILE are set (but are exclusive)"
            if via:
                text = _file_text(files, via)
                if text is None:
                    return f"cat: {via}: No such file or directory"
                direct = text.rstrip("\n")
            values[name] = direct or None
        user, password = values["AGRAPH_SUPER_USER"], values["AGRAPH_SUPER_PASSWORD"]
        server.generated_password = None
        if not (user and password):
            alphabet = string.ascii_letters + string.digits
            user, password = "admin", "".join(secrets.choice(alphabet) for _ in range(16))
            server.generated_password = password
        server.etc = {"users": {user: {"password": password, "super": True}}, "license": values["AGRAPH_LICENSE"]}
        return None

    # ---- replication in the background (worked out at every request) -----

    def _tick(self):
        now = time.monotonic()
        for server in self.servers.values():
            if not server.running:
                continue
            for repo in server.repos.values():
                c = repo.cluster
                if c is None or repo.instance not in c.instances:
                    continue
                for seq, triples, due in c.log:
                    if due <= now and seq not in repo.applied:
                        repo.triples.extend(triples)
                        repo.applied.add(seq)

    def _commit(self, repo, triples):
        repo.triples.extend(triples)
        c = repo.cluster
        if c is not None and repo.instance in c.instances:
            c.seq += 1
            c.log.append((c.seq, list(triples), time.monotonic() + self.repl))
            repo.applied.add(c.seq)

    # ---- reaching other servers, as a server in a pod does ----------------

    def _resolve(self, host, port, from_pod):
        """host:port as seen from from_pod -> (pod key, pod port), or None when the name does not resolve."""
        if self.resolver is None:
            for key, s in self.servers.items():
                if host in (s.fqdn, s.hostname, key.split("/")[-1]):
                    return key, port
            return None
        try:
            try:
                got = self.resolver(host, port, from_pod)
            except TypeError:
                got = self.resolver(host, port)
        except Exception:
            return None
        if got is None:
            return None
        if isinstance(got, tuple):
            return got[0], (got[1] if len(got) > 1 and got[1] is not None else port)
        return got, port

    def _connect(self, from_pod, host, port):
        """-> ("ok", server) | ("refused", None) | ("unresolved", None)."""
        try:
            port = int(port)
        except ValueError:
            return "unresolved", None
        got = self._resolve(host, port, from_pod)
        if got is None:
            return "unresolved", None
        server = self._listening(got[0], got[1])
        return ("ok", server) if server is not None else ("refused", None)

    def _instance_state(self, c, inst, from_pod):
        how, server = self._connect(from_pod, inst.host, inst.port)
        if how != "ok":
            return "unreachable"
        repo = server.repos.get(inst.repo)
        if repo is None or repo.cluster is not c or repo.instance != inst.name:
            return "stopped"
        return "running"

    # ---- requests ------------------------------------------------------------

    def _authenticate(self, server, req):
        auth = req.headers.get("authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = None, None
            record = (server.etc or {}).get("users", {}).get(user)
            if record and record["password"] == password:
                req.user = user
                return record
        raise HttpError(401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="AllegroGraph"'})

    def _serve(self, server, req):
        p, m = req.parts, req.method
        if m == "GET" and p == ["version"]:
            return self._text(200, server.version)
        if m == "GET" and p == ["hostname"]:
            return self._text(200, server.hostname)
        record = self._authenticate(server, req)
        if p == ["metrics"] and m == "GET":
            if not record["super"]:
                raise HttpError(403, "Permission denied: super-user access required")
            return self._metrics(server)
        if p == ["repositories"] and m == "GET":
            return self._json(200, [{"uri": f"http://{server.hostname}:{HTTP_PORT}/repositories/{quote(name)}",
                                     "id": json.dumps(name), "title": name, "readable": True, "writable": True}
                                    for name in sorted(server.repos)])
        if len(p) >= 2 and p[0] == "repositories":
            return self._repository(server, req, p[1], p[2:])
        raise HttpError(404, "Not Found")

    def _repo(self, server, name):
        repo = server.repos.get(name)
        if repo is None:
            raise HttpError(404, f"Repository {name} not found.")
        return repo

    def _repository(self, server, req, name, rest):
        m = req.method
        if not rest:
            if m == "PUT":
                if name in server.repos and req.query.get("override") == "false":
                    raise HttpError(400, f"There is already a repository named {name}.")
                server.repos[name] = Repo()
                return self._none()
            if m == "DELETE":
                self._repo(server, name)
                del server.repos[name]
                return self._none()
            raise HttpError(405, "Method Not Allowed")
        if rest == ["repl", "createCluster"] and m == "PUT":
            return self._create_cluster(server, req, name)
        repo = self._repo(server, name)
        if rest == ["size"] and m == "GET":
            return self._text(200, str(len(repo.triples)))
        if rest == ["statements"]:
            if m == "GET":
                out = "".join(t + "\n" for t in repo.triples)
                return 200, {"Content-Type": "application/n-triples"}, out.encode()
            if m in ("POST", "PUT"):
                ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype not in NTRIPLES_TYPES:
                    raise HttpError(400, f"Unsupported content type: {ctype or '(none)'}")
                triples = []
                for n, line in enumerate(req.body.decode("utf-8", "replace").splitlines(), 1):
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    mt = TRIPLE_RE.match(line)
                    if not mt:
                        raise HttpError(400, f"Parse error at line {n}: not an N-Triples statement")
                    triples.append(" ".join(mt.groups()) + " .")
                if m == "PUT":
                    repo.triples = []
                self._commit(repo, triples)
                return self._text(200, str(len(triples)))
        if rest[:1] == ["repl"] and len(rest) == 2:
            c = repo.cluster
            if c is None or repo.instance not in c.instances:
                raise HttpError(400, f"Repository {name} is not a multi-master replication instance.")
            if rest[1] == "status" and m == "GET":
                return self._status(server, name, repo)
            if m == "PUT" and rest[1] in ("growCluster", "remove"):
                if not c.instances[repo.instance].controlling:
                    raise HttpError(400, f"Instance {repo.instance} is not the controlling instance of the cluster.")
                if rest[1] == "growCluster":
                    return self._grow(server, req, name, repo)
                return self._remove(server, req, name, repo)
        raise HttpError(404, "Not Found")

    def _create_cluster(self, server, req, name):
        host, port = req.param("host"), req.param("port")
        user, password, inst = req.param("user"), req.param("password"), req.param("instanceName")
        existing = server.repos.get(name)
        if existing is not None and existing.cluster is not None:
            raise HttpError(400, f"Repository {name} is already part of a multi-master replication cluster.")
        if existing is not None:
            raise HttpError(400, f"There is already a repository named {name}.")
        record = server.etc["users"].get(user)
        if not record or record["password"] != password:
            raise HttpError(400, f"Invalid user name or password for user {user}.")
        if not port.isdigit():
            raise HttpError(400, f"Invalid port: {port}")
        c = Cluster()
        repo = server.repos[name] = Repo()
        repo.cluster, repo.instance = c, inst
        c.instances[inst] = Instance(inst, host, port, name, True)
        return self._none()

    def _grow(self, server, req, name, repo):
        c = repo.cluster
        host, port, new_name = req.param("host"), req.param("port"), req.param("name")
        user, password, inst = req.param("user"), req.param("password"), req.param("instanceName")
        if inst in c.instances:
            raise HttpError(400, f"An instance named {inst} is already in the cluster.")
        if not port.isdigit():
            raise HttpError(400, f"Invalid port: {port}")
        how, target = self._connect(server.pod, host, port)
        if how == "unresolved":
            return Delay(self.unreachable, self._text(
                500, f"Failed to connect to {host}:{port}: Connection timed out."))
        if how == "refused":
            return self._text(500, f"Failed to connect to {host}:{port}: Connection refused.")
        record = target.etc["users"].get(user)
        if not record or record["password"] != password:
            return self._text(500, f"Request to {host}:{port} failed: 401 Unauthorized.")
        if not record["super"]:
            return self._text(500, f"Request to {host}:{port} failed: 403 Forbidden.")
        if new_name in target.repos:
            raise HttpError(400, f"There is already a repository named {new_name} on {host}:{port}.")
        copy = target.repos[new_name] = Repo(repo.triples)
        copy.cluster, copy.instance, copy.applied = c, inst, set(repo.applied)
        c.instances[inst] = Instance(inst, host, port, new_name, False)
        return self._none()

    def _remove(self, server, req, name, repo):
        c = repo.cluster
        inst = req.param("instanceName")
        if inst not in c.instances:
            raise HttpError(400, f"There is no instance named {inst} in the cluster.")
        if c.instances[inst].controlling:
            raise HttpError(400, f"Instance {inst} is the controlling instance and cannot be removed.")
        member = c.instances.pop(inst)
        how, target = self._connect(server.pod, member.host, member.port)
        if how == "ok":
            other = target.repos.get(member.repo)
            if other is not None and other.cluster is c and other.instance == inst:
                other.cluster, other.instance = None, None       # a standalone repository from now on
        if how == "unresolved":
            wait = self.unreachable
            try:
                wait = min(wait, float(req.query.get("timeout", wait)))
            except ValueError:
                pass
            return Delay(max(wait, 0.0), self._none())
        return self._none()

    def _status(self, server, name, repo):
        c = repo.cluster
        controlling = next((i.name for i in c.instances.values() if i.controlling), None)
        out = []
        for inst in c.instances.values():
            state = "running" if inst.name == repo.instance else self._instance_state(c, inst, server.pod)
            out.append({"instanceName": inst.name, "host": inst.host, "port": inst.port, "repository": inst.repo,
                        "controlling": inst.controlling, "state": state})
        return self._json(200, {"repository": name, "cluster": c.id, "controllingInstance": controlling,
                                "instances": out})

    def _metrics(self, server):
        lines = ["# HELP agraph_repository_triples Triples in a repository of this server.",
                 "# TYPE agraph_repository_triples gauge"]
        for name in sorted(server.repos):
            lines.append(f'agraph_repository_triples{{catalog="root",repository="{name}"}} '
                         f'{len(server.repos[name].triples)}')
        lines += ["# HELP agraph_replication_instances Instances of a repository's replication cluster "
                  "by state, as this server sees them.",
                  "# TYPE agraph_replication_instances gauge"]
        for name in sorted(server.repos):
            repo = server.repos[name]
            c = repo.cluster
            if c is None or repo.instance not in c.instances:
                continue
            counts = collections.Counter({"running": 0, "stopped": 0, "unreachable": 0})
            for inst in c.instances.values():
                counts["running" if inst.name == repo.instance else self._instance_state(c, inst, server.pod)] += 1
            for state in ("running", "stopped", "unreachable"):
                lines.append(f'agraph_replication_instances{{catalog="root",repository="{name}",state="{state}"}} '
                             f'{counts[state]}')
        return 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}, ("\n".join(lines) + "\n").encode()
