"""A real Celery client sending tasks through Redis Sentinel while the
master fails over.

Usage: ``python send_through_failover.py SENTINEL_PORTS MASTER_PASSWORD
MASTER_NAME SENTINEL_PASSWORD N ACKED_FILE``.

SENTINEL_PORTS is a comma-separated list of sentinel ports on 127.0.0.1.
The broker URL is Celery's own Sentinel form
(``sentinel://:pw@h1:p1;sentinel://:pw@h2:p2;...``) with the master's name
and the sentinels' password in ``broker_transport_options``.

Sends N ``t.record`` tasks, each with a fresh id, in groups of 25 with a
short pause between groups so that the run spans the failover. A send that
raises is sent again with the same id until it goes through (as a careful
producer would), for at most 90 s in all. Each id whose send returned is
written to ACKED_FILE with the Unix time it returned (``id<TAB>time``).
Prints one JSON line: how many were sent and how many sends failed.
"""

import json
import sys
import time
import uuid

from celery import Celery


def main() -> int:
    ports, master_pw, master_name, sentinel_pw, n, acked_file = sys.argv[1:7]
    url = ";".join(f"sentinel://:{master_pw}@127.0.0.1:{p}" for p in ports.split(","))
    app = Celery("failover_client", broker=url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "master_name": master_name,
            "sentinel_kwargs": {"password": sentinel_pw},
        },
    )
    started = time.monotonic()
    sent = 0
    send_errors = 0
    last_error = None
    with open(acked_file, "w", encoding="utf-8") as out:
        for i in range(int(n)):
            task_id = str(uuid.uuid4())
            while True:
                try:
                    app.send_task("t.record", task_id=task_id)
                    break
                except Exception as e:  # noqa: BLE001 - any failed send is retried
                    send_errors += 1
                    last_error = f"{type(e).__name__}: {e}"
                    if time.monotonic() - started > 90:
                        raise
                    time.sleep(0.05)
            out.write(f"{task_id}\t{time.time():.6f}\n")
            out.flush()
            sent += 1
            if i % 25 == 24:
                time.sleep(0.015)
    print(
        json.dumps(
            {
                "sent": sent,
                "send_errors": send_errors,
                "last_error": last_error,
                "seconds": round(time.monotonic() - started, 2),
            }
        ),
        flush=True,
    )
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
