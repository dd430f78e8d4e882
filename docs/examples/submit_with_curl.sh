#!/usr/bin/env bash
# Submit a task to a running `orchestrator serve` with nothing but curl and jq,
# through RabbitMQ's management HTTP API, and follow it to its end: the
# request protocol of docs/asyncapi.json, spoken by a client that is not Python.
#
#   docs/examples/submit_with_curl.sh TASK_TYPE [PAYLOAD_JSON] [CAPABILITY,...]
#
# Environment: RABBITMQ_API (default http://127.0.0.1:15672/api),
# RABBITMQ_USER and RABBITMQ_PASSWORD (guest, guest), RABBITMQ_VHOST (/),
# ORCHESTRATOR_PREFIX (orchestrator), WAIT_SECONDS (60).
#
# Prints the task id, then the task's final status as JSON. Exit codes as the
# orchestrator command's: 0 completed, 1 request refused, 3 no orchestrator
# answering, 4 the task ended failed, timeout or cancelled.
set -euo pipefail

task_type=${1:?usage: $0 TASK_TYPE [PAYLOAD_JSON] [CAPABILITY,...]}
payload=${2:-"{}"}
requires=${3:-}
api=${RABBITMQ_API:-http://127.0.0.1:15672/api}
vhost=$(jq -rn --arg v "${RABBITMQ_VHOST:-/}" '$v | @uri')
prefix=${ORCHESTRATOR_PREFIX:-orchestrator}
wait_seconds=${WAIT_SECONDS:-60}
if ! jq -e 'type == "object"' <<<"$payload" >/dev/null 2>&1; then
  echo "error: PAYLOAD_JSON must be a JSON object, got: $payload" >&2
  exit 1
fi

http() { # METHOD PATH [JSON]: the API's answer; the credentials go in on stdin, not argv
  printf 'user = "%s:%s"\n' "${RABBITMQ_USER:-guest}" "${RABBITMQ_PASSWORD:-guest}" |
    curl --config - --silent --show-error --fail-with-body -X "$1" \
      -H 'content-type: application/json' ${3:+--data "$3"} "$api$2"
}

# Replies come to a queue of ours: declared here, deleted on exit, and expired
# by the broker if this script dies first.
reply_queue="$prefix.client.curl-$$-$RANDOM"
http PUT "/queues/$vhost/$reply_queue" \
  '{"durable": false, "auto_delete": false, "arguments": {"x-expires": 600000}}' >/dev/null
trap 'http DELETE "/queues/$vhost/$reply_queue" >/dev/null 2>&1 || true' EXIT

request() { # REQUEST_JSON: prints the reply; a request nobody takes in time expires
  local id message routed deadline reply
  id="curl-$$-$RANDOM$RANDOM"
  message=$(jq -n --arg queue "$reply_queue" --arg id "$id" --arg key "$prefix.rpc" \
    --arg body "$1" --arg ttl "$((wait_seconds * 1000))" '{
      routing_key: $key, payload: $body, payload_encoding: "string",
      properties: {reply_to: $queue, correlation_id: $id, expiration: $ttl,
                   content_type: "application/json"}}')
  # Through the requests exchange, bound to the request queue by the queue's name.
  routed=$(http POST "/exchanges/$vhost/$prefix.requests/publish" "$message" 2>/dev/null |
    jq .routed) || routed=false
  if [ "$routed" != true ]; then
    echo "error: no queue $prefix.rpc: is an orchestrator serving prefix $prefix?" >&2
    exit 3
  fi
  deadline=$((SECONDS + wait_seconds))
  while [ "$SECONDS" -lt "$deadline" ]; do
    reply=$(http POST "/queues/$vhost/$reply_queue/get" \
      '{"count": 10, "ackmode": "ack_requeue_false", "encoding": "auto"}' |
      jq -c --arg id "$id" '.[] | select(.properties.correlation_id == $id) | .payload | fromjson')
    if [ -n "$reply" ]; then
      if [ "$(jq .ok <<<"$reply")" != true ]; then
        echo "error: $(jq -r '.error.type + ": " + .error.message' <<<"$reply")" >&2
        exit 1
      fi
      jq -c .result <<<"$reply"
      return
    fi
    sleep 0.2
  done
  echo "error: no reply from $prefix.rpc within ${wait_seconds}s" >&2
  exit 3
}

submit=$(jq -n --arg type "$task_type" --argjson payload "$payload" --arg requires "$requires" '{
  v: 1, kind: "request.submit", name: "\($type) from curl", task_type: $type,
  payload: $payload, priority: "high",
  required_capabilities: ($requires | split(",") | map(select(. != "")))}')
task_id=$(request "$submit" | jq -r .task_id)
echo "$task_id"

status_request=$(jq -cn --arg id "$task_id" '{v: 1, kind: "request.status", task_id: $id}')
while :; do
  status=$(request "$status_request")
  case $(jq -r .status <<<"$status") in
    completed) jq . <<<"$status"; exit 0 ;;
    failed | timeout | cancelled) jq . <<<"$status"; exit 4 ;;
  esac
  sleep 0.5
done
