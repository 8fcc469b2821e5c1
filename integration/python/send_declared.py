"""A real Celery client sending declared tasks (a program and an HTTP
endpoint, `[tasks."name"]` in the worker's TOML file) to a taskstack worker.

Usage: ``python send_declared.py REDIS_URL``. Sends ``reports.render`` (a
program), ``billing.charge`` (an HTTP endpoint) and a ``billing.charge``
the endpoint refuses with 422, waits for the three results and prints one
JSON line describing what the client saw.
"""

import json
import sys

from celery import Celery


def main() -> int:
    url = sys.argv[1]
    app = Celery("declared_client", broker=url, backend=url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
    )

    render = app.send_task("reports.render", ("Q3", {"orders": 12, "refunds": 1}))
    charge = app.send_task("billing.charge", ("c-7",), {"cents": 1250})
    refused = app.send_task("billing.charge", ("c-7", 0))
    render_result = render.get(timeout=60)
    charge_result = charge.get(timeout=60)
    refused_result = refused.get(timeout=60, propagate=False)

    print(
        json.dumps(
            {
                "render_id": render.id,
                "render_state": render.state,
                "render_result": render_result,
                "charge_id": charge.id,
                "charge_state": charge.state,
                "charge_result": charge_result,
                "refused_state": refused.state,
                "refused_exc_type": type(refused_result).__name__,
                "refused_is_exception": isinstance(refused_result, BaseException),
                "refused_message": str(refused_result),
            }
        ),
        flush=True,
    )
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
