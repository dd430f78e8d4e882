#!/usr/bin/env bash
# The project's one entry point; it sets everything up on a fresh machine.
#   ./run.sh demo [--broker amqp://...]   the seed's workflow, end to end
#   ./run.sh test [pytest args]           the test suite (starts the local RabbitMQ if needed)
#   ./run.sh lint                          ruff
#   ./run.sh bench [args]                  tasks/s through each bus (bench peers: beside Celery, ...)
#   ./run.sh orchestrator COMMAND [args]   the command line (.venv/bin/orchestrator)
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi

broker_up() {
  .venv/bin/python - <<'PY'
import os, socket, sys
from urllib.parse import urlsplit
url = urlsplit(os.environ.get("ORCHESTRATOR_BROKER_URL", "amqp://127.0.0.1:5672/"))
try:
    socket.create_connection((url.hostname or "127.0.0.1", url.port or 5672), 2).close()
except OSError:
    sys.exit(1)
PY
}

ensure_rabbitmq() {
  broker_up && return 0
  if [ -z "${ORCHESTRATOR_BROKER_URL:-}" ] && command -v rabbitmq-server >/dev/null 2>&1; then
    echo "RabbitMQ is not answering on 127.0.0.1:5672; starting it" >&2
    rabbitmq-server -detached || true
    for _ in $(seq 1 90); do
      broker_up && return 0
      sleep 1
    done
  fi
  echo "RabbitMQ is not reachable; RabbitMQ tests will skip (and fail under CI=true)" >&2
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo) exec .venv/bin/python -m orchestrator demo "$@" ;;
  # Two workers, a test file at a time each (module fixtures such as the cluster
  # stay in one process); PYTEST_WORKERS=0 runs it in this one process.
  # Bytecode first: the suite starts hundreds of Python processes (the command
  # line, agents, serve), and where PYTHONDONTWRITEBYTECODE is set (CI machines)
  # each would compile the project's modules again (~0.2 s of CPU apiece).
  test) ensure_rabbitmq
        .venv/bin/python -m compileall -q -j 0 broker orchestrator agents tests deploy >/dev/null
        exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" ;;
  lint) .venv/bin/ruff check . && .venv/bin/ruff format --check . ;;
  bench) ensure_rabbitmq; [ "${1:-}" = peers ] && shift && exec .venv/bin/python -m tests.bench.peers "$@"
         exec .venv/bin/python tests/bench/throughput.py "$@" ;;
  orchestrator) exec .venv/bin/orchestrator "$@" ;;
  *) sed -n '2,7p' "$0" >&2; exit 2 ;;
esac
