"""reports.render, a program task: `python3 -m reports.render` reads the
task (one JSON object) on stdin and writes its result as JSON on stdout.
Exit 75 asks for a retry; any other failure is the task's failure, with
the end of stderr as its traceback."""

import json
import sys


def render(title, rows):
    lines = [title, "=" * len(title)] + [f"{k}: {v}" for k, v in rows.items()]
    return {"title": title, "lines": len(lines), "text": "\n".join(lines)}


def main():
    task = json.load(sys.stdin)
    try:
        result = render(*task["args"], **task["kwargs"])
    except TimeoutError as e:  # e.g. a database that is not reachable yet
        print(e, file=sys.stderr)
        return 75
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
