"""A team's web app that serves taskstack HTTP tasks (profile "app" of
compose/docker-compose.yml). Standard library only, so the project's tests
build its image offline; with FastAPI the endpoint is the README's.

    python3 app.py              serve on 0.0.0.0:$PORT (default 8000)
    python3 app.py healthcheck  exit 0 when GET /health answers 200

Each task is POSTed as one JSON object (id, task, args, kwargs, retries,
...); a 2xx JSON answer is the task's result, 503 asks the worker to retry,
another 4xx/5xx fails the task.
"""

import json
import os
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8000"))


def charge(customer, cents):
    """billing.charge: the task function, now an endpoint."""
    if cents <= 0:
        raise ValueError(f"cannot charge {cents} cents")
    return {"customer": customer, "charged": cents, "currency": "EUR"}


TASKS = {"/tasks/billing.charge": charge}


class Handler(BaseHTTPRequestHandler):
    def _answer(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._answer(200, "ok")
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self):
        func = TASKS.get(self.path)
        if func is None:
            self._answer(404, {"error": f"no task at {self.path}"})
            return
        length = int(self.headers.get("Content-Length", "0"))
        task = json.loads(self.rfile.read(length))
        try:
            result = func(*task["args"], **task["kwargs"])
        except (TypeError, ValueError) as e:
            self._answer(422, {"error": str(e)})  # FAILURE, no retry
            return
        self._answer(200, result)

    def log_message(self, fmt, *args):
        sys.stderr.write("app: " + fmt % args + "\n")


def main():
    if sys.argv[1:] == ["healthcheck"]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                return 0 if r.status == 200 else 1
        except OSError:
            return 1
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
