#!/usr/bin/env bash
# Start each local service the tests use that is not answering yet (CI machines start them
# before a run; a developer's machine may have stopped one). Addresses are the tests' defaults.
set -u

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "start-services: $1 did not come up on 127.0.0.1:$2" >&2
  return 1
}

start() {  # name port seconds command...
  local name=$1 port=$2 seconds=$3; shift 3
  if port_open "$port"; then return 0; fi
  echo "start-services: starting $name"
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "start-services: $name is not installed ($1 not found); its tests will fail in CI" >&2
    return 0
  fi
  "$@" >/dev/null 2>&1 || true
  wait_port "$name" "$port" "$seconds" || true
}

start Redis 6379 20 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
  --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
start PostgreSQL 5432 60 bash -c 'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
start MariaDB 3306 60 start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
start RabbitMQ 5672 120 rabbitmq-server -detached
exit 0
