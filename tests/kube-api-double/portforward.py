"""A TEST DOUBLE of the Kubernetes API server's pods/portforward over WebSocket.

kube_api_double.py imports this module and calls `serve` for
`GET /api/v1/namespaces/NS/pods/POD/portforward?ports=P[,P...]` once it has
checked that the pod exists and runs. It speaks what kube-client 5.0
(`Api::<Pod>::portforward`, src/api/portforward.rs and src/client/upgrade.rs)
expects, and what the real API server (kubelet/CRI streaming
`portforward/websocket.go`, `wsstream`, containerd's `portForward`) does:

- the client offers `Sec-WebSocket-Protocol: v5.channel.k8s.io,
  v4.channel.k8s.io`; the portforward handler only knows "",
  `v4.channel.k8s.io` and the base64 variants, so the answer is 101 with
  `v4.channel.k8s.io` (kube-client refuses a 101 without one of v4/v5);
  no offered protocol it knows: 403, as x/net/websocket answers a failed
  handshake; `Sec-WebSocket-Version` other than 13: 400;
- for the i-th port, data channel 2i and error channel 2i+1; before
  anything else the server sends on every channel a 3-byte frame
  [channel, port & 0xff, port >> 8] (kube-client checks both size and port);
- every port is dialled at once when the WebSocket opens, as containerd
  does; nothing listening: the error channel carries the real message
  (`error forwarding port P to pod SANDBOX, uid : failed to execute
  portforward in network namespace "...": failed to connect to localhost:P
  inside namespace "SANDBOX", IPv4: dial tcp4 127.0.0.1:P: connect:
  connection refused IPv6 dial tcp6 [::1]:P: connect: connection refused `)
  and the port is done;
- it is a raw TCP tunnel: the bytes the client sends on a data channel
  are parsed here as HTTP/1.1 requests (Content-Length or chunked bodies,
  several requests per connection, pipelined or not) and handed to the
  pod's server with ALL their headers, Authorization included (unlike the
  pods/proxy subresource); each answer goes back as HTTP/1.1 bytes on the
  data channel, in frames of at most 32 KiB (io.Copy's buffer), so one
  answer may span several WebSocket messages;
- the pod's server closes the connection after an answer with
  `Connection: close` (asked by the client or set by the server) and after
  a malformed request (400); a node that stops mid-connection resets it
  (`... read: connection reset by peer` on the error channel);
- once every port is done, the server sends a Close frame (1000) and the
  connection ends, as the real handler returns when all its copies end;
- client frames masked or not, fragmented messages reassembled, pings
  answered with pongs, a client Close answered with a Close; data frames
  for error channels or unknown channels ignored, as wsstream does; v4 has
  no half-close signal, so a client can only end a port by closing the
  whole WebSocket.

Not checked against a real server: the 400/403 handshake bodies, and that
the reset message reads exactly like that.
"""

import base64
import hashlib
import struct
import uuid

from couchdb_double import NotListening

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PROTOCOLS = ("", "v4.channel.k8s.io", "base64.channel.k8s.io", "v4.base64.channel.k8s.io")
CHOSEN = "v4.channel.k8s.io"
CHUNK = 32 * 1024
OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 412: "Precondition Failed", 415: "Unsupported Media Type",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def parse_ports(values):
    """The `ports` query values (each may be comma-separated) -> [int]; ValueError with the API server's words."""
    ports = []
    for value in values or []:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 0 < int(part) < 65536:
                raise ValueError(f"invalid port: {part!r}")
            ports.append(int(part))
    if not ports:
        raise ValueError('query parameter "port" is required')
    return ports


def sandbox_id(pod_key):
    """A stable 64-hex pod sandbox id, what containerd names the pod in its messages."""
    return hashlib.sha256(("sandbox:" + pod_key).encode()).hexdigest()


def refused_message(port, pod_key):
    sid = sandbox_id(pod_key)
    netns = "cni-" + str(uuid.UUID(sid[:32]))
    return (f"error forwarding port {port} to pod {sid}, uid : failed to execute portforward in network "
            f"namespace \"/var/run/netns/{netns}\": failed to connect to localhost:{port} inside namespace "
            f"\"{sid}\", IPv4: dial tcp4 127.0.0.1:{port}: connect: connection refused "
            f"IPv6 dial tcp6 [::1]:{port}: connect: connection refused ")


def reset_message(port, pod_key):
    return (f"error forwarding port {port} to pod {sandbox_id(pod_key)}, uid : read tcp4 "
            f"127.0.0.1:{40000 + port % 20000}->127.0.0.1:{port}: read: connection reset by peer")


def _header(headers, name):
    name = name.lower()
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


def _plain(wfile, status, reason, body, extra=()):
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close"] + list(extra)
    wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    wfile.flush()


# ---- WebSocket framing -------------------------------------------------------

class Closed(Exception):
    """The client closed the WebSocket (Close frame or EOF)."""


def read_exact(rfile, n):
    data = b""
    while len(data) < n:
        chunk = rfile.read(n - len(data))
        if not chunk:
            raise Closed("eof")
        data += chunk
    return data


def read_frame(rfile):
    """One frame -> (fin, opcode, payload), unmasked."""
    b0, b1 = read_exact(rfile, 2)
    fin, opcode = bool(b0 & 0x80), b0 & 0x0F
    masked, length = bool(b1 & 0x80), b1 & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exact(rfile, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exact(rfile, 8))[0]
    mask = read_exact(rfile, 4) if masked else None
    payload = read_exact(rfile, length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return fin, opcode, payload


def frame(opcode, payload, mask=None):
    """A single-frame message; servers send unmasked, clients pass a 4-byte mask."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


def read_message(rfile, on_control):
    """Next data message -> (opcode, payload); control frames go to on_control(opcode, payload) in between."""
    parts, opcode = [], None
    while True:
        fin, op, payload = read_frame(rfile)
        if op >= 8:
            on_control(op, payload)
            continue
        if op != OP_CONT:
            opcode, parts = op, []
        parts.append(payload)
        if fin:
            return opcode, b"".join(parts)


# ---- HTTP/1.1 inside the tunnel ------------------------------------------------

class BadRequest(Exception):
    pass


def parse_request(buf):
    """-> (request, rest) when buf holds a whole request, else None. request = (method, target, headers, body)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise BadRequest("header too large")
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    while lines and lines[0] == "":
        lines.pop(0)
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("bad request line")
    headers = {}
    for line in lines[1:]:
        if ":" not in line:
            raise BadRequest("bad header")
        k, v = line.split(":", 1)
        k, v = k.strip(), v.strip()
        old = next((h for h in headers if h.lower() == k.lower()), None)
        if old is not None:
            headers[old] += ", " + v
        else:
            headers[k] = v
    rest = buf[end + 4:]
    te = (_header(headers, "Transfer-Encoding") or "").lower()
    if "chunked" in te:
        body, pos = b"", 0
        while True:
            eol = rest.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(rest[pos:eol].split(b";")[0].strip() or b"x", 16)
            except ValueError:
                raise BadRequest("bad chunk size")
            if size == 0:
                after = eol + 2
                if len(rest) < after + 2:
                    return None
                if rest[after:after + 2] == b"\r\n":
                    rest = rest[after + 2:]
                else:
                    t = rest.find(b"\r\n\r\n", after)
                    if t < 0:
                        return None
                    rest = rest[t + 4:]
                break
            if len(rest) < eol + 2 + size + 2:
                return None
            body += rest[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
        headers = {k: v for k, v in headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
    else:
        length = _header(headers, "Content-Length")
        try:
            n = int(length) if length is not None else 0
        except ValueError:
            raise BadRequest("bad Content-Length")
        if len(rest) < n:
            return None
        body, rest = rest[:n], rest[n:]
    return (parts[0], parts[1], headers, body, parts[2]), rest


def http_response(method, status, headers, body, close):
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    for k, v in headers.items():
        if k.lower() not in ("content-length", "connection", "transfer-encoding"):
            head.append(f"{k}: {v}")
    if status >= 200 and status not in (204, 304):
        head.append(f"Content-Length: {len(body)}")
    if close:
        head.append("Connection: close")
    out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    if method != "HEAD" and status not in (204, 304):
        out += body
    return out


# ---- the handler ------------------------------------------------------------------

def registry_connect(registry, pod_key):
    """A `connect` for serve() that dials a pod of a database double (AgraphRegistry, CouchRegistry).

    The dial fails at once when the registry says nothing listens (a
    registry without `listening`: at the first request, as a reset).
    """
    def connect(port):
        if hasattr(registry, "listening") and not registry.listening(pod_key, port):
            raise NotListening("connection refused")

        def handle(method, path, headers, body):
            return registry.handle(pod_key, method, path, headers, body, port=port)
        return handle
    return connect


def serve(rfile, wfile, request_headers, ports, connect, pod_key=""):
    """Answer the upgrade and run the port-forward until it ends. -> the HTTP status answered (101, 400, 403).

    rfile/wfile: the request handler's streams, positioned after the request
    head; request_headers: its headers (a Mapping); ports: [int] from
    parse_ports; connect(port): a callable handle(method, path, headers,
    body) -> (status, headers, body_bytes) for that pod port, or raises
    NotListening. The caller must close the connection afterwards.
    """
    h = dict(request_headers.items())
    upgrade = (_header(h, "Upgrade") or "").lower()
    connection = [t.strip().lower() for t in (_header(h, "Connection") or "").split(",")]
    key = _header(h, "Sec-WebSocket-Key")
    if upgrade != "websocket" or "upgrade" not in connection or not key:
        _plain(wfile, 400, "Bad Request", b"unable to upgrade: missing upgrade headers in request")
        return 400
    if (_header(h, "Sec-WebSocket-Version") or "").strip() != "13":
        _plain(wfile, 400, "Bad Request", b"", ["Sec-WebSocket-Version: 13"])
        return 400
    offered = [p.strip() for p in (_header(h, "Sec-WebSocket-Protocol") or "").split(",")]
    chosen = next((p for p in offered if p in PROTOCOLS), None)
    if chosen is None:
        _plain(wfile, 403, "Forbidden", b"")
        return 403
    if chosen != CHOSEN:
        # The base64 and unnamed variants exist on the real server; kube-client never asks for them.
        _plain(wfile, 403, "Forbidden", b"this double speaks only v4.channel.k8s.io")
        return 403
    head = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(key)}", f"Sec-WebSocket-Protocol: {chosen}"]
    wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
    Tunnel(rfile, wfile, ports, connect, pod_key).run()
    return 101


class Tunnel:
    def __init__(self, rfile, wfile, ports, connect, pod_key):
        self.rfile, self.wfile = rfile, wfile
        self.ports, self.connect, self.pod_key = list(ports), connect, pod_key
        self.handles = [None] * len(self.ports)
        self.bufs = [b""] * len(self.ports)
        self.done = [False] * len(self.ports)
        self.closed = False

    def send(self, opcode, payload):
        self.wfile.write(frame(opcode, payload))
        self.wfile.flush()

    def send_channel(self, ch, data):
        for i in range(0, len(data), CHUNK):
            self.send(OP_BIN, bytes([ch]) + data[i:i + CHUNK])

    def finish(self, i, error=None):
        if error:
            self.send_channel(2 * i + 1, error.encode())
        self.done[i] = True
        self.handles[i] = None

    def control(self, op, payload):
        if op == OP_PING:
            self.send(OP_PONG, payload)
        elif op == OP_CLOSE:
            code = payload[:2] if len(payload) >= 2 else struct.pack("!H", 1000)
            try:
                self.send(OP_CLOSE, code)
            except OSError:
                pass
            self.closed = True
            raise Closed("close frame")

    def run(self):
        for i, port in enumerate(self.ports):
            lohi = struct.pack("<H", port)
            self.send(OP_BIN, bytes([2 * i]) + lohi)
            self.send(OP_BIN, bytes([2 * i + 1]) + lohi)
        for i, port in enumerate(self.ports):
            try:
                self.handles[i] = self.connect(port)
            except NotListening:
                self.finish(i, refused_message(port, self.pod_key))
        try:
            while not all(self.done):
                _, data = read_message(self.rfile, self.control)
                if len(data) < 1:
                    continue
                ch, data = data[0], data[1:]
                i = ch // 2
                if ch % 2 or i >= len(self.ports) or self.done[i] or not data:
                    continue
                self.bufs[i] += data
                self.pump(i)
            self.send(OP_CLOSE, struct.pack("!H", 1000))
        except (Closed, OSError, ConnectionError):
            pass

    def pump(self, i):
        """Answer every whole request buffered for port i."""
        while not self.done[i]:
            try:
                got = parse_request(self.bufs[i])
            except BadRequest:
                self.send_channel(2 * i, http_response("GET", 400, {"Content-Type": "text/plain"},
                                                       b"Bad Request", True))
                self.finish(i)
                return
            if got is None:
                return
            (method, target, headers, body, version), self.bufs[i] = got
            conn = (_header(headers, "Connection") or "").lower()
            close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
            try:
                status, out_headers, out = self.handles[i](method, target, headers, body)
            except NotListening:
                self.finish(i, reset_message(self.ports[i], self.pod_key))
                return
            close = close or "close" in (_header(out_headers, "Connection") or "").lower()
            self.send_channel(2 * i, http_response(method, status, out_headers, out, close))
            if close:
                self.finish(i)
