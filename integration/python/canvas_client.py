"""A real Celery client using the canvas against taskstack workers.

Usage: ``python canvas_client.py BROKER_URL SCENARIO [PYTHON_QUEUE]
[--results RESULT_URL]`` (results on BROKER_URL when not given, which
is then a Redis URL).
Runs one scenario (chain, immutable, chain_fail, link, chord, chord_send, chord_fail,
chain_group, nested_chord, mixed_chord), waits for its outcome and prints one JSON line describing
what the client saw. Tasks named ``taskstack.*`` are taskstack's built-ins
(served on the default ``celery`` queue); ``interop.*`` tasks run on a
Python Celery worker serving PYTHON_QUEUE.
"""

import json
import sys

from celery import Celery, chain, chord, group

TIMEOUT = 60


def sig(app, name, *args, **options):
    return app.signature(name, args=args, options=options)


def main() -> int:
    argv = sys.argv[1:]
    results = None
    if "--results" in argv:
        at = argv.index("--results")
        results = argv[at + 1]
        del argv[at : at + 2]
    url, scenario = argv[0], argv[1]
    pyq = argv[2] if len(argv) > 2 else None
    app = Celery("canvas_client", broker=url, backend=results or url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
    )
    add = lambda *a, **o: sig(app, "taskstack.add", *a, **o)  # noqa: E731
    echo = lambda *a, **o: sig(app, "taskstack.echo", *a, **o)  # noqa: E731
    fail = lambda *a, **o: sig(app, "taskstack.fail", *a, **o)  # noqa: E731
    out = {"scenario": scenario}

    if scenario == "chain":
        res = chain(add(2, 2), add(4), add(8)).apply_async()
        out["result"] = res.get(timeout=TIMEOUT)
        # A step's follow-up goes out before its own result is stored (as in
        # Celery, so the stored result names its children): the last step can
        # be ready a moment before its parents are, so wait for each of them.
        res.parent.parent.get(timeout=TIMEOUT)
        res.parent.get(timeout=TIMEOUT)
        out["ids"] = [res.parent.parent.id, res.parent.id, res.id]
        out["parent_ids"] = [None, res.parent.parent.id, res.parent.id]
        out["states"] = [res.parent.parent.state, res.parent.state, res.state]
        out["first_children"] = [c.id for c in (res.parent.parent.children or [])]
    elif scenario == "immutable":
        res = chain(add(2, 2), add(10, 1).set(immutable=True), add(1)).apply_async()
        out["result"] = res.get(timeout=TIMEOUT)
    elif scenario == "chain_fail":
        eb = echo("errback")
        eb.freeze()
        first = add(1, 1)
        res = chain(first, fail("boom"), add(5)).on_error(eb).apply_async()
        failing = res.parent
        try:
            res.get(timeout=TIMEOUT)
            out["raised"] = None
        except Exception as exc:  # noqa: BLE001
            out["raised"] = type(exc).__name__
            out["message"] = str(exc)
        out["failing_id"] = failing.id
        out["failing_state"] = failing.state
        out["last_state"] = res.state
        errback = app.AsyncResult(eb.id)
        out["errback_result"] = errback.get(timeout=TIMEOUT)
        out["errback_parent_id"] = errback._get_task_meta().get("parent_id")
    elif scenario == "link":
        cb = echo("linked")
        cb.freeze()
        res = add(3, 4).apply_async(link=cb)
        out["result"] = res.get(timeout=TIMEOUT)
        out["callback_result"] = app.AsyncResult(cb.id).get(timeout=TIMEOUT)
        out["children"] = [c.id for c in (res.children or [])]
        out["callback_id"] = cb.id
    elif scenario == "chord":
        res = chord([add(i, i) for i in range(5)], echo("body")).apply_async()
        out["result"] = res.get(timeout=TIMEOUT)
        out["body_id"] = res.id
    elif scenario == "chord_fail":
        header = [add(1, 1), fail("member broke"), add(2, 2)]
        res = chord(header, echo("body")).apply_async()
        try:
            res.get(timeout=TIMEOUT)
            out["raised"] = None
        except Exception as exc:  # noqa: BLE001
            # get() re-raises a failed header task's own error first (it
            # watches the header too), as with a Python worker.
            out["raised"] = type(exc).__name__
        # The body's own result, read without its parent: ChordError.
        body = app.AsyncResult(res.id)
        exc = body.get(timeout=TIMEOUT, propagate=False)
        out["body_exc_type"] = type(exc).__name__
        out["body_exc_module"] = type(exc).__module__
        out["message"] = str(exc)
        out["state"] = body.state
    elif scenario == "chord_send":
        # Sent only: the results live where this client cannot read them
        # (a worker with a PostgreSQL result store); the test reads them.
        res = chord([add(i, i) for i in range(5)], echo("body")).apply_async()
        out["body_id"] = res.id
        out["header_ids"] = [r.id for r in res.parent.results]
    elif scenario == "chain_group":
        res = chain(add(1, 1), group(add(10), add(20))).apply_async()
        out["result"] = res.get(timeout=TIMEOUT)
    elif scenario == "nested_chord":
        res = chain(add(1, 1), chord([add(1), add(2)], echo("body"))).apply_async()
        exc = res.get(timeout=TIMEOUT, propagate=False)
        out["exc_type"] = type(exc).__name__
        out["message"] = str(exc)
        out["state"] = res.state
    elif scenario == "mixed_chord":
        header = [
            sig(app, "interop.mul", 1, 2, queue=pyq),
            add(3, 4),
            sig(app, "interop.mul", 5, 6, queue=pyq),
            add(7, 8),
        ]
        res = chord(header, echo("body")).apply_async()
        out["result"] = res.get(timeout=TIMEOUT)
        out["body_id"] = res.id
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")

    print(json.dumps(out), flush=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
