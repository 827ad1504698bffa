#!/usr/bin/env python3
"""TEST DOUBLE of a registry token service (the `realm` of registry 2.8's
`auth: token`), for the upgrade tests: no real token service can run here.

It makes an RSA key and a self-signed certificate, writes the certificate
to --bundle (the registry's `rootcertbundle`), and answers
`GET /token?service=...&scope=repository:NAME:pull` with a JWT signed RS256
whose header carries the certificate in `x5c`, as registry 2.8 verifies
tokens (it checks the x5c chain against rootcertbundle, then `iss`, `aud`,
`exp`, `nbf` and the `access` claim). Only basic credentials it was given
(--user NAME:PASSWORD) get a token, granting pull on the scope's
repository; anything else is 401. Every request is logged as a JSON line
to --log.
"""

import argparse
import base64
import datetime
import json
import os
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_key_and_certificate():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stack test token issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--user", action="append", default=[])
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    key, certificate = make_key_and_certificate()
    users = dict(u.split(":", 1) for u in args.user)
    der = certificate.public_bytes(serialization.Encoding.DER)
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}

    def token_for(subject, repository):
        now = int(time.time())
        claims = {
            "iss": args.issuer,
            "sub": subject,
            "aud": args.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": b64url(os.urandom(12)),
            "access": [{"type": "repository", "name": repository, "actions": ["pull"]}],
        }
        signing_input = (
            b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        )
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            user = None
            authorization = self.headers.get("Authorization", "")
            if authorization.startswith("Basic "):
                try:
                    name, password = base64.b64decode(authorization[6:]).decode().split(":", 1)
                    if users.get(name) == password:
                        user = name
                except ValueError:
                    pass
            scope = query.get("scope", [""])[0]
            with open(args.log, "a") as log:
                log.write(json.dumps({"path": url.path, "scope": scope, "user": user,
                                      "service": query.get("service", [""])[0]}) + "\n")
            parts = scope.split(":")
            if user is None:
                self.answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "login refused"}]})
                return
            if url.path != "/token" or len(parts) != 3 or parts[0] != "repository":
                self.answer(400, {"errors": [{"code": "BAD_REQUEST", "message": "no scope"}]})
                return
            self.answer(200, {"token": token_for(user, parts[1]), "expires_in": 300})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    with open(args.bundle + ".tmp", "wb") as bundle:
        bundle.write(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(args.bundle + ".tmp", args.bundle)
    server.serve_forever()


if __name__ == "__main__":
    main()
