"""Celery client calls for taskstack's remote-control tests; prints one JSON line.

Usage (broker from ``INTEROP_REDIS_URL``):
  control_client.py send <task> <json args> [<task id> [<queue>]]
  control_client.py revoke <task id>             # app.control.revoke (no reply)
  control_client.py revoke_terminate <task id>   # AsyncResult.revoke(terminate=True)
  control_client.py broadcast <command> <json arguments>   # replies within 3 s
  control_client.py state <task id>
"""

import json
import sys

from celery.result import AsyncResult

from interop_tasks import app


def main():
    cmd = sys.argv[1]
    if cmd == "send":
        task_id = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
        queue = sys.argv[5] if len(sys.argv) > 5 else None
        r = app.send_task(
            sys.argv[2], args=json.loads(sys.argv[3]), task_id=task_id, queue=queue
        )
        out = {"id": r.id}
    elif cmd == "revoke":
        app.control.revoke(sys.argv[2])
        out = {"sent": True}
    elif cmd == "revoke_terminate":
        AsyncResult(sys.argv[2], app=app).revoke(terminate=True)
        out = {"sent": True}
    elif cmd == "broadcast":
        replies = app.control.broadcast(
            sys.argv[2], arguments=json.loads(sys.argv[3]), reply=True, timeout=3
        )
        out = {"replies": replies}
    elif cmd == "state":
        out = {"state": AsyncResult(sys.argv[2], app=app).state}
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
