"""A real Celery client sending many tasks to taskstack workers.

Usage: ``python send_sleeps.py BROKER_URL N SECONDS IDS_FILE``. Sends N
``taskstack.sleep(SECONDS, i)`` tasks to the default ``celery`` queue,
one ``send_task`` each, writing every id to IDS_FILE (one per line,
flushed) as soon as its send returned, so a test can act mid-run. Waits
for no result. Prints one JSON line: how many were sent.
"""

import json
import sys

from celery import Celery


def main() -> int:
    url, n, seconds, ids_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    app = Celery("sleeps_client", broker=url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    with open(ids_file, "w", encoding="utf-8") as out:
        for i in range(n):
            r = app.send_task("taskstack.sleep", (seconds, i))
            out.write(r.id + "\n")
            out.flush()
    print(json.dumps({"sent": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
