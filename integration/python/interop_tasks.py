"""A real Celery app for taskstack's interoperability tests.

Run as a worker with ``python -m celery -A interop_tasks worker ...`` from
this directory; the broker and result backend come from ``INTEROP_REDIS_URL``
(the broker from ``INTEROP_BROKER_URL`` when it is set, e.g. RabbitMQ).
"""

import os

from celery import Celery

REDIS_URL = os.environ["INTEROP_REDIS_URL"]

BROKER_URL = os.environ.get("INTEROP_BROKER_URL") or REDIS_URL

app = Celery("interop_tasks", broker=BROKER_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="interop.mul")
def mul(a, b):
    return a * b
