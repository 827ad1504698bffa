"""Tests of portforward.py, the TEST DOUBLE of the API server's pods/portforward over WebSocket.

Run: cd tests/kube-api-double && python3 -m unittest test_portforward -v
A loopback HTTP server hands the upgrade to portforward.serve; a tiny
stdlib WebSocket client here speaks to it the way kube-client 5.0 does.
"""

import base64
import os
import socket
import struct
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import portforward
from couchdb_double import NotListening

SEEN = []


def fake_connect(port):
    if port == 9999:
        raise NotListening("connection refused")

    def handle(method, path, headers, body):
        SEEN.append((port, method, path, dict(headers), body))
        if path == "/big":
            return 200, {"Content-Type": "application/octet-stream"}, b"x" * 100000
        if path == "/gone":
            raise NotListening("stopped")
        if path == "/bye":
            return 200, {"Connection": "close"}, b"bye"
        return 200, {"Content-Type": "text/plain", "Server": "double"}, f"{method} {path} {len(body)}".encode()
    return handle


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        values = [v.split("=", 1)[1] for v in query.split("&") if v.startswith("ports=")]
        ports = portforward.parse_ports(values)
        portforward.serve(self.rfile, self.wfile, self.headers, ports, fake_connect, pod_key="demo/ag-0")
        self.close_connection = True


class Client:
    """What kube-client does, with stdlib sockets."""

    def __init__(self, port, ports, protocol="v5.channel.k8s.io, v4.channel.k8s.io", version="13"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.rfile = self.sock.makefile("rb")
        self.key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /api/v1/namespaces/demo/pods/ag-0/portforward?ports={ports} HTTP/1.1\r\n"
               "Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               f"Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {self.key}\r\n"
               f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n")
        self.sock.sendall(req.encode())
        self.status = int(self.rfile.readline().split()[1])
        self.headers = {}
        while True:
            line = self.rfile.readline().decode().strip()
            if not line:
                break
            k, v = line.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()

    def send(self, payload, opcode=portforward.OP_BIN, fragments=1):
        step = max(1, -(-len(payload) // fragments))
        pieces = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        for n, piece in enumerate(pieces):
            op = opcode if n == 0 else portforward.OP_CONT
            fin = 0x80 if n == len(pieces) - 1 else 0
            f = portforward.frame(op, piece, mask=os.urandom(4))
            self.sock.sendall(bytes([fin | op]) + f[1:])

    def recv(self):
        """Next message -> (opcode, payload), control frames included."""
        fin, op, payload = portforward.read_frame(self.rfile)
        parts = [payload]
        while not fin:
            fin, _, payload = portforward.read_frame(self.rfile)
            parts.append(payload)
        return op, b"".join(parts)

    def channel_data(self, ch, until):
        """Data on channel ch until until(bytes) holds."""
        got = b""
        while not until(got):
            op, payload = self.recv()
            self.assert_bin(op)
            if payload[0] == ch:
                got += payload[1:]
        return got

    @staticmethod
    def assert_bin(op):
        if op != portforward.OP_BIN:
            raise AssertionError(f"opcode {op}")

    def close(self):
        self.sock.close()


def one_response(data):
    head, _, rest = data.partition(b"\r\n\r\n")
    if not _:
        return False
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), 0)
    return len(rest) >= length


class PortForwardTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        cls.port = cls.server.server_address[1]
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        SEEN.clear()

    def open(self, ports="10035"):
        c = Client(self.port, ports)
        self.addCleanup(c.close)
        self.assertEqual(c.status, 101)
        return c

    def test_handshake_chooses_v4_and_sends_port_frames(self):
        c = self.open("10035,5984")
        self.assertEqual(c.headers["sec-websocket-protocol"], "v4.channel.k8s.io")
        self.assertEqual(c.headers["sec-websocket-accept"], portforward.accept_key(c.key))
        self.assertEqual(c.headers["upgrade"].lower(), "websocket")
        frames = [c.recv() for _ in range(4)]
        self.assertEqual(frames, [(2, bytes([0]) + struct.pack("<H", 10035)), (2, bytes([1]) + struct.pack("<H", 10035)),
                                  (2, bytes([2]) + struct.pack("<H", 5984)), (2, bytes([3]) + struct.pack("<H", 5984))])

    def test_handshake_refusals(self):
        self.assertEqual(Client(self.port, "1", version="8").status, 400)
        self.assertEqual(Client(self.port, "1", protocol="v5.channel.k8s.io").status, 403)

    def test_requests_tunnel_with_authorization_keepalive_and_fragments(self):
        c = self.open()
        c.recv(), c.recv()
        req = (b"PUT /repositories/r?override=false HTTP/1.1\r\nHost: localhost\r\n"
               b"Authorization: Basic YWRtaW46cHc=\r\nContent-Length: 5\r\n\r\nhello")
        # Two requests, sent as one fragmented message split inside the first request's body.
        c.send(b"\x00" + req + b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n", fragments=3)
        first = c.channel_data(0, one_response)
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), first)
        self.assertTrue(first.endswith(b"PUT /repositories/r?override=false 5"), first)
        second = c.channel_data(0, one_response)
        self.assertTrue(second.endswith(b"GET /version 0"), second)
        self.assertEqual(SEEN[0][3]["Authorization"], "Basic YWRtaW46cHc=")
        self.assertEqual(SEEN[0][4], b"hello")
        # A chunked body, and a request split over two messages.
        c.send(b"\x00POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        c.send(b"\x002\r\nde\r\n0\r\n\r\n")
        self.assertTrue(c.channel_data(0, one_response).endswith(b"POST /s 5"))
        self.assertEqual(SEEN[-1][4], b"abcde")

    def test_big_answer_spans_frames(self):
        c = self.open()
        c.recv(), c.recv()
        c.send(b"\x00GET /big HTTP/1.1\r\n\r\n")
        sizes, got = [], b""
        while not one_response(got):
            op, payload = c.recv()
            sizes.append(len(payload))
            got += payload[1:]
        self.assertGreater(len(sizes), 3)
        self.assertLessEqual(max(sizes), portforward.CHUNK + 1)
        self.assertTrue(got.endswith(b"x" * 100000))

    def test_connection_close_ends_the_forward(self):
        c = self.open()
        c.recv(), c.recv()
        c.send(b"\x00GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertIn(b"Connection: close", c.channel_data(0, one_response))
        self.assertEqual(c.recv()[0], portforward.OP_CLOSE)
        # Closed by the pod's server.
        c2 = self.open()
        c2.recv(), c2.recv()
        c2.send(b"\x00GET /bye HTTP/1.1\r\n\r\n")
        c2.channel_data(0, one_response)
        self.assertEqual(c2.recv(), (portforward.OP_CLOSE, struct.pack("!H", 1000)))

    def test_nothing_listening_errors_on_the_error_channel(self):
        c = self.open("9999")
        c.recv(), c.recv()
        op, payload = c.recv()
        self.assertEqual(payload[0], 1)
        msg = payload[1:].decode()
        self.assertTrue(msg.startswith("error forwarding port 9999 to pod "), msg)
        self.assertIn("failed to connect to localhost:9999 inside namespace", msg)
        self.assertIn("connect: connection refused", msg)
        self.assertEqual(c.recv()[0], portforward.OP_CLOSE)

    def test_node_gone_mid_connection_resets(self):
        c = self.open()
        c.recv(), c.recv()
        c.send(b"\x00GET /gone HTTP/1.1\r\n\r\n")
        op, payload = c.recv()
        self.assertEqual(payload[0], 1)
        self.assertIn(b"connection reset by peer", payload)

    def test_ping_and_close(self):
        c = self.open()
        c.recv(), c.recv()
        c.send(b"hi", opcode=portforward.OP_PING)
        self.assertEqual(c.recv(), (portforward.OP_PONG, b"hi"))
        # Frames on the error channel or a channel without a port are ignored.
        c.send(b"\x01junk")
        c.send(b"\x07junk")
        c.send(struct.pack("!H", 1000), opcode=portforward.OP_CLOSE)
        self.assertEqual(c.recv(), (portforward.OP_CLOSE, struct.pack("!H", 1000)))
        self.assertEqual(c.rfile.read(1), b"")

    def test_registry_connect_to_the_agraph_double(self):
        import time
        from agraph_double import AgraphRegistry
        reg = AgraphRegistry(boot_seconds=0.0)
        connect = portforward.registry_connect(reg, "demo/ag-0")
        with self.assertRaises(NotListening):
            connect(10035)
        reg.start_node("demo/ag-0", {"AGRAPH_SUPER_USER": "u", "AGRAPH_SUPER_PASSWORD": "p"}, shm_bytes=1 << 30)
        time.sleep(0.01)
        with self.assertRaises(NotListening):
            connect(10000)
        handle = connect(10035)
        auth = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
        self.assertEqual(handle("GET", "/repositories", auth, b"")[0], 200)
        self.assertEqual(handle("GET", "/repositories", {}, b"")[0], 401)

    def test_parse_ports(self):
        self.assertEqual(portforward.parse_ports(["10035,5984", "80"]), [10035, 5984, 80])
        with self.assertRaises(ValueError):
            portforward.parse_ports([])
        with self.assertRaises(ValueError):
            portforward.parse_ports(["http"])


if __name__ == "__main__":
    unittest.main()
