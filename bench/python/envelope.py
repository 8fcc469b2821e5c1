"""Python Celery's own message for a ``taskstack.echo`` task, for the backlog benchmark.

``python envelope.py QUEUE ARG`` sends ``taskstack.echo(ARG)`` with Celery's
client (``send_task``, JSON, Celery's defaults otherwise) to ``QUEUE`` of the
Redis at ``BENCH_CELERY_URL``, where the benchmark reads the message as
Celery wrote it (``bench/src/bin/backlog.rs``).
"""

import os
import sys

from celery import Celery

app = Celery("envelope", broker=os.environ["BENCH_CELERY_URL"])
app.conf.update(task_serializer="json", accept_content=["json"])

if __name__ == "__main__":
    queue, arg = sys.argv[1], int(sys.argv[2])
    app.send_task("taskstack.echo", args=[arg], queue=queue)
