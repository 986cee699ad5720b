"""Serve the model as deployed: nginx (the HTTP front) on PORT in front of ``bentoml serve``.

    python -m pipeline.serve                      # front on 0.0.0.0:$PORT (3000), service on a loopback port
    python -m pipeline.serve --host 127.0.0.1 --port 8080
    python -m pipeline.serve --limits             # the front's FRONT_* settings as they resolve here
    python -m pipeline.serve --check              # only: is nginx installed? (one line and exit 1 if not)

The model is the service's (``SERVING_MODEL``; ``make serve`` sets it). Ctrl-C (or SIGTERM) stops
both processes. For a container behind an ingress, run ``bentoml serve serving.service:Classifier``
alone (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.common.errors import run_command
from pipeline.lib.local_server import describe_front, front_binary, run_stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="the front's address (HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")), help="the front's port (PORT)")
    parser.add_argument("--service-port", type=int, default=None, help="the service's loopback port (default: free)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="nginx's folder (config, pid, temp files, access log); default a temp folder")
    parser.add_argument("--limits", action="store_true", help="print the front's settings and exit")
    parser.add_argument("--check", action="store_true", help="check that nginx is installed and exit")
    args = parser.parse_args(argv)
    if args.limits:
        print(describe_front())
        return 0
    status = 0

    def body() -> None:
        nonlocal status
        if args.check:
            front_binary()
            return
        status = run_stack(args.host, args.port, args.run_dir, args.service_port)

    return run_command(body) or status


if __name__ == "__main__":
    sys.exit(main())
