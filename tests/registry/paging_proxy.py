#!/usr/bin/env python3
"""TEST DOUBLE: a reverse proxy in front of a real registry that pages its
tags lists, for the upgrade tests' pagination.

Debian's docker-registry 2.8.2 answers `GET /v2/NAME/tags/list` with every
tag and no `Link` header, whatever `n` says (checked). Distribution 3 and
hosted registries page it as the distribution spec says: tags in lexical
order, at most `n` of them after `last`, and `Link: </v2/NAME/tags/list?n=N&last=TAG>;
rel="next"` while more remain; many also cap the page size. This proxy
does that over the real registry's full list, with a cap of --page-size;
every other request (manifests, auth challenges) is passed through as is.
Every request line is logged to --log.
"""

import argparse
import http.client
import json
import re
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TAGS = re.compile(r"^/v2/(.+)/tags/list$")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--page-size", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def forward(self, path):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            connection = http.client.HTTPConnection(args.upstream, timeout=30)
            connection.request(self.command, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            connection.close()
            return response, data

        def relay(self, status, headers, data):
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def handle_any(self):
            with open(args.log, "a") as log:
                log.write(f"{self.command} {self.path}\n")
            url = urllib.parse.urlsplit(self.path)
            match = TAGS.match(url.path)
            if self.command != "GET" or not match:
                response, data = self.forward(self.path)
                self.relay(response.status, response.getheaders(), data)
                return
            response, data = self.forward(url.path)
            if response.status != 200:
                self.relay(response.status, response.getheaders(), data)
                return
            query = urllib.parse.parse_qs(url.query)
            n = min(int(query.get("n", [args.page_size])[0]), args.page_size)
            last = query.get("last", [""])[0]
            tags = sorted(t for t in json.loads(data)["tags"] or [] if t > last)
            page, more = tags[:n], len(tags) > n
            headers = [("Content-Type", "application/json")]
            if more:
                next_query = urllib.parse.urlencode({"n": n, "last": page[-1]})
                headers.append(("Link", f'<{url.path}?{next_query}>; rel="next"'))
            body = json.dumps({"name": match.group(1), "tags": page}).encode()
            self.relay(200, headers, body)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
