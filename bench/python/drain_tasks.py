"""The Celery side of taskstack's drain benchmark (``bench/src/bin/drain_defaults.rs``).

As a worker: ``python -m celery -A drain_tasks worker ...`` from this
directory. It registers ``taskstack.echo`` (what taskstack's built-in echo
does) so both workers drain the very same prefilled messages; every other
setting is Celery's default. The broker comes from ``BENCH_CELERY_URL``
(``redis://`` or ``amqp://``), the result backend from
``BENCH_CELERY_RESULT_URL`` (default: the broker's URL).
"""

import os
import sys

from celery import Celery
from celery.signals import worker_ready

URL = os.environ["BENCH_CELERY_URL"]

RESULTS = os.environ.get("BENCH_CELERY_RESULT_URL") or URL

app = Celery("drain_tasks", broker=URL, backend=RESULTS)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="taskstack.echo")
def echo(*args, **kwargs):
    """``{"args": [...], "kwargs": {...}}``, as taskstack's ``taskstack.echo``."""
    return {"args": list(args), "kwargs": kwargs}


@worker_ready.connect
def _announce(**_):
    # The benchmark runs the worker at log level WARNING (no line per task)
    # and waits for this line instead of Celery's INFO "ready." line.
    print("BENCH-WORKER-READY", file=sys.stderr, flush=True)
