"""The Celery side of taskstack's canvas benchmark (``bench/src/bin/canvas.rs``).

As a worker: ``python -m celery -A canvas_tasks worker ...`` from this
directory. As a client: ``python canvas_tasks.py chain|chord N``, which
builds the canvas, prints ``{"built": ...}``, waits for a line on stdin,
sends the canvas with Celery's own client (``apply_async``) and prints
``{"send_start": <unix time>, "send_s": ..., "result_id": ...}`` (or
``{"error": ...}`` when Celery cannot send it). It does not wait for the
result: the benchmark watches the result key itself.

The broker and result backend both come from ``BENCH_CELERY_URL``.
"""

import json
import os
import sys
import time
import traceback

from celery import Celery, chain, chord
from celery.signals import worker_ready

URL = os.environ["BENCH_CELERY_URL"]

app = Celery("canvas_tasks", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.add")
def add(*args):
    """The sum of the arguments, as taskstack's built-in ``taskstack.add``."""
    return sum(args)


@app.task(name="bench.echo")
def echo(*args, **kwargs):
    """``{"args": [...], "kwargs": {...}}``, as taskstack's ``taskstack.echo``."""
    return {"args": list(args), "kwargs": kwargs}


@worker_ready.connect
def _announce(**_):
    # The benchmark runs the worker at log level WARNING (no line per task)
    # and waits for this line instead of Celery's INFO "ready." line.
    print("BENCH-WORKER-READY", file=sys.stderr, flush=True)


def build(kind, n):
    """The canvas the Rust side sends too: a chain of ``add(1)`` steps
    (result ``n``), or a chord of ``add(i, i)`` members with an ``echo``
    body (result ``{"args": [[0, 2, 4, ...]], "kwargs": {}}``)."""
    if kind == "chain":
        return chain(*[add.s(1) for _ in range(n)])
    if kind == "chord":
        return chord([add.s(i, i) for i in range(n)], echo.s())
    raise SystemExit(f"unknown canvas {kind!r}: expected chain or chord")


def main():
    kind, n = sys.argv[1], int(sys.argv[2])
    try:
        canvas = build(kind, n)
    except RecursionError as exc:
        print(json.dumps({"error": f"building: RecursionError: {exc}"}), flush=True)
        return 0
    print(json.dumps({"built": n}), flush=True)
    sys.stdin.readline()
    start = time.time()
    try:
        res = canvas.apply_async()
    except Exception as exc:  # noqa: BLE001 - reported to the benchmark as it is
        detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
        print(json.dumps({"error": f"apply_async: {type(exc).__name__}: {detail}"}), flush=True)
        return 0
    sent = time.time()
    print(
        json.dumps({"send_start": start, "send_s": sent - start, "result_id": res.id}),
        flush=True,
    )
    # Leaving without dropping a 10,000-deep chain of parent results one by
    # one (that recursion is the client's, not the benchmark's concern).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
