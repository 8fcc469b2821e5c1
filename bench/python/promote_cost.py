#!/usr/bin/env python3
"""Redis time per promoted delayed message: an earlier build's promote.lua
(three keys, `<queue key>\\n<message>` values) against this build's (five
keys, the message alone under `<id>\\n<queue key>`).

    git show c37abe6:lib/scripts/promote.lua > /tmp/promote_before.lua
    python3 bench/python/promote_cost.py /tmp/promote_before.lua lib/scripts/promote.lua

Starts its own redis-server (no persistence) on a free port; parks 100,000
due messages of about 900 bytes in each layout, moves them 500 per call as
the worker does, and prints the scripts' time per message from INFO
commandstats, three runs each, alternating. Needs redis-server and the
`redis` Python package.
"""
import socket
import subprocess
import sys
import time

import redis

N = 100_000
BATCH = 500


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(r, layout):
    r.flushall()
    p = r.pipeline(transaction=False)
    for i in range(N):
        msg = f'{{"m":{i},"pad":"{"y" * 880}"}}'
        if layout == "before":
            p.hset("d:msg", f"id{i}", f"celery\n{msg}")
            p.zadd("d:set", {f"id{i}": i})
        else:
            p.hset("p:msg", f"id{i}\ncelery", msg)
            p.zadd("p:set", {f"id{i}\ncelery": i})
        if i % 1000 == 999:
            p.execute()
    p.execute()
    r.hset("d:cnt", "celery", N)


def run(r, src, keys):
    sha = r.script_load(src)
    r.config_resetstat()
    while True:
        moved, _ = r.evalsha(sha, len(keys), *keys, N, BATCH)
        if moved < BATCH:
            break
    assert r.llen("celery") == N, "every message moved once"
    return r.info("commandstats")["cmdstat_evalsha"]["usec"] * 1000 / N


def main():
    if len(sys.argv) != 3:
        sys.exit(
            "usage: promote_cost.py <earlier promote.lua> <this build's promote.lua>\n"
            "  e.g. git show c37abe6:lib/scripts/promote.lua > /tmp/promote_before.lua"
        )
    before, now = (open(p).read() for p in sys.argv[1:3])
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        res = {"before": [], "now": []}
        for _ in range(3):
            fill(r, "before")
            res["before"].append(run(r, before, ["d:set", "d:msg", "d:cnt"]))
            fill(r, "now")
            res["now"].append(run(r, now, ["p:set", "p:msg", "d:cnt", "d:set", "d:msg"]))
        for k, v in res.items():
            runs = ", ".join(f"{x:,.0f}" for x in v)
            print(f"{k}: {runs} ns per message; median {sorted(v)[1]:,.0f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
