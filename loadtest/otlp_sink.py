#!/usr/bin/env python3
"""An OTLP/HTTP sink for the tracing cost benchmark: answers every
POST /v1/traces with 200 and counts the bytes (it does not decode; the
tests decode with the official definitions)."""
import http.server
import sys


class Sink(http.server.BaseHTTPRequestHandler):
    received = 0

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        Sink.received += n
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
