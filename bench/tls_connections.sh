#!/usr/bin/env bash
# Connection setup cost with TLS: `pgbench -S -C` (a new connection per
# transaction) with sslmode=require, directly to a PostgreSQL 15 server with
# ssl=on, and through rolegate terminating the client's TLS (with plaintext,
# then TLS, from rolegate to the server). Prints a markdown table.
#
# Usage: bench/tls_connections.sh [SECONDS] [REPEATS]   (default 10 s, 3 times)
# Everything runs on 127.0.0.1; every process is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
repeats=${2:-3}
bin=/usr/lib/postgresql/15/bin
work=$(mktemp -d /tmp/rolegate-tls-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  if [[ -f $work/data/postmaster.pid ]]; then
    kill -INT "$(head -1 "$work/data/postmaster.pid")" 2>/dev/null || true
  fi
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
as_pg() { if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet
((EUID == 0)) && chown postgres: "$work"

# A throwaway CA and a certificate for 127.0.0.1, for both server and proxy.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$work/san.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/san.ext" -out "$work/server.crt" 2>/dev/null
chmod 600 "$work/server.key"; ((EUID == 0)) && chown postgres: "$work"/server.*

pg_port=$(free_port)
as_pg "$bin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
ssl = on
ssl_cert_file = '$work/server.crt'
ssl_key_file = '$work/server.key'
fsync = off
max_connections = 100
EOF
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
as_pg "$bin/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1

# Starts a rolegate and sets $started_port. Not called in $(...): the
# background process would hold the substitution's pipe open, and its PID
# must be recorded in this shell.
start_rolegate() { # name backend_tls
  local port admin
  port=$(free_port); admin=$(free_port)
  cat >"$work/$1.toml" <<EOF
[admin]
listen = "127.0.0.1:$admin"
[log]
level = "warn"
[tls]
cert = "$work/server.crt"
key = "$work/server.key"
[clusters.bench]
primary = "127.0.0.1:$pg_port"
backend_tls = "$2"
[[listeners]]
listen = "127.0.0.1:$port"
cluster = "bench"
role = "primary"
EOF
  # Only the proxy module at info: its "ready" line, not a line per session.
  RUST_LOG=warn,rolegate::proxy=info target/release/rolegate --config "$work/$1.toml" >/dev/null 2>"$work/$1.log" &
  pids+=($!)
  for _ in $(seq 50); do grep -q "rolegate is ready" "$work/$1.log" && break; sleep 0.1; done
  grep -q "rolegate is ready" "$work/$1.log" || { cat "$work/$1.log" >&2; exit 1; }
  started_port=$port
}
start_rolegate plain disable; plain_backend=$started_port
start_rolegate tls require; tls_backend=$started_port

rate() { # port -> connections per second
  PGSSLMODE=require as_pg "$bin/pgbench" -S -C -c 8 -j 2 -T "$seconds" -h 127.0.0.1 -p "$1" -U postgres postgres 2>/dev/null |
    awk '/^tps/ {print int($3); exit}'
}
declare -A results
for ((i = 1; i <= repeats; i++)); do
  for target in direct plain_backend tls_backend; do
    case $target in
      direct) port=$pg_port ;;
      plain_backend) port=$plain_backend ;;
      tls_backend) port=$tls_backend ;;
    esac
    results[$target]+="$(rate "$port") "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR==1{min=$1} {max=$1} END {print min "–" max}'; }
direct=$(median <<<"${results[direct]}")
echo
echo "| pgbench -S -C, 8 clients, sslmode=require, ${seconds} s × $repeats | connections/s (median) | spread | vs direct |"
echo "|---|---|---|---|"
for target in direct plain_backend tls_backend; do
  m=$(median <<<"${results[$target]}")
  s=$(spread <<<"${results[$target]}")
  label=$target
  [[ $target == direct ]] && label="direct to PostgreSQL (ssl=on)"
  [[ $target == plain_backend ]] && label="through rolegate, TLS to rolegate, plaintext to PostgreSQL"
  [[ $target == tls_backend ]] && label="through rolegate, TLS on both hops (backend_tls = require)"
  echo "| $label | $m | $s | $(awk -v a="$m" -v b="$direct" 'BEGIN {printf "%.2f×", a/b}') |"
done
