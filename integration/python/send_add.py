"""A real Celery client sending tasks to a taskstack worker.

Usage: ``python send_add.py BROKER_URL [RESULT_BACKEND_URL]`` (the result
backend defaults to the broker's URL). Sends ``taskstack.add(2, 3)`` and
``taskstack.fail("boom")`` to the default ``celery`` queue, waits for both
results and prints one JSON line describing what the client saw.
"""

import json
import sys

from celery import Celery


def main() -> int:
    url = sys.argv[1]
    backend = sys.argv[2] if len(sys.argv) > 2 else url
    app = Celery("interop_client", broker=url, backend=backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
    )

    add = app.send_task("taskstack.add", (2, 3))
    add_result = add.get(timeout=30)

    fail = app.send_task("taskstack.fail", ("boom",))
    fail_result = fail.get(timeout=30, propagate=False)

    print(
        json.dumps(
            {
                "add_id": add.id,
                "add_state": add.state,
                "add_result": add_result,
                "fail_id": fail.id,
                "fail_state": fail.state,
                "fail_failed": fail.failed(),
                "fail_exc_type": type(fail_result).__name__,
                "fail_exc_module": type(fail_result).__module__,
                "fail_is_exception": isinstance(fail_result, BaseException),
                "fail_message": str(fail_result),
                "fail_traceback": fail.traceback,
            }
        ),
        flush=True,
    )
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
