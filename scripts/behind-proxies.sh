#!/usr/bin/env bash
# Two demo replicas on one Redis behind nginx, then behind HAProxy: does each client get its own
# budget, and can a client dodge its budget by writing X-Forwarded-For itself?
#
#   cargo build --example demo && bash scripts/behind-proxies.sh [target/debug/examples/demo]
#
# Needs nginx, haproxy, redis-server and curl (Debian: apt-get install nginx haproxy
# redis-server curl). Everything runs on loopback: the proxies listen on 127.0.0.1 and connect
# to the replicas from 127.0.0.1; each "client" is curl bound to its own loopback address
# (127.0.0.11, 127.0.0.12, ...), which is the address the proxy sees. The route is the demo's
# `GET /sliding` (an exact sliding log, 5 requests per 10 s), with no x-api-key. Prints one line
# per scenario: how many of 10 requests each client got through. Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-target/debug/examples/demo}
for tool in nginx haproxy redis-server redis-cli curl; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[ -x "$demo" ] || { echo "build the demo first: cargo build --example demo" >&2; exit 2; }

base=$((20000 + RANDOM % 9000))
redis_port=$base proxy_port=$((base + 1)) r1=$((base + 2)) r2=$((base + 3))
work=$(mktemp -d)
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

redis-server --port "$redis_port" --save '' --appendonly no --daemonize no >"$work/redis.log" &
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

wait_port() {
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/stats" && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  return 1
}

# Starts both replicas with TRUSTED_PROXIES=$1 (empty: unset) and the proxy $2.
start() {
  local trusted=$1 proxy=$2
  redis-cli -p "$redis_port" flushall >/dev/null
  for port in $r1 $r2; do
    if [ -n "$trusted" ]; then
      TRUSTED_PROXIES=$trusted PORT=$port REDIS_URL=redis://127.0.0.1:$redis_port "$demo" \
        >"$work/demo-$port.log" 2>&1 &
    else
      PORT=$port REDIS_URL=redis://127.0.0.1:$redis_port "$demo" >"$work/demo-$port.log" 2>&1 &
    fi
    pids+=($!)
  done
  wait_port "$r1"
  wait_port "$r2"
  case $proxy in
    nginx)
      mkdir -p "$work/nginx"
      cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
error_log $work/nginx/error.log;
pid $work/nginx/nginx.pid;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  upstream demo { server 127.0.0.1:$r1; server 127.0.0.1:$r2; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / {
      proxy_pass http://demo;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
      nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' &
      pids+=($!)
      ;;
    haproxy)
      cat >"$work/haproxy.cfg" <<EOF
defaults
  mode http
  timeout connect 1s
  timeout client 5s
  timeout server 5s
frontend web
  bind 127.0.0.1:$proxy_port
  option forwardfor
  default_backend demo
backend demo
  balance roundrobin
  server r1 127.0.0.1:$r1
  server r2 127.0.0.1:$r2
EOF
      haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
      pids+=($!)
      ;;
  esac
  wait_port "$proxy_port"
}

# How many of 10 requests from client address $1 to port $2 pass, and the other statuses;
# $3 "spoof" adds an X-Forwarded-For with a new address each time.
passed() {
  local from=$1 port=$2 spoof=${3:-} ok=0 code others=""
  for i in $(seq 10); do
    if [ "$spoof" = spoof ]; then
      code=$(curl -s -o /dev/null -w '%{http_code}' --interface "$from" \
        -H "X-Forwarded-For: 198.51.100.$i" "http://127.0.0.1:$port/sliding")
    else
      code=$(curl -s -o /dev/null -w '%{http_code}' --interface "$from" \
        "http://127.0.0.1:$port/sliding")
    fi
    if [ "$code" = 200 ]; then ok=$((ok + 1)); else others="$others $code"; fi
  done
  others=$(echo "$others" | tr ' ' '\n' | grep . | sort | uniq -c | awk '{printf " %sx%s", $1, $2}')
  echo "$ok/10${others:+ (${others# })}"
}

scenario() {
  local proxy=$1 trusted=$2
  start "$trusted" "$proxy"
  local a b c d
  a=$(passed 127.0.0.11 "$proxy_port")
  b=$(passed 127.0.0.12 "$proxy_port")
  c=$(passed 127.0.0.13 "$proxy_port" spoof)
  # A client that reaches a replica directly, around the proxy.
  d=$(passed 127.0.0.14 "$r1" spoof)
  printf '%-8s TRUSTED_PROXIES=%-13s A %-14s B %-14s C (spoofs XFF) %-14s D (direct, spoofs) %s\n' \
    "$proxy" "${trusted:-unset}" "$a" "$b" "$c" "$d"
  stop_all
}

for proxy in nginx haproxy; do
  scenario "$proxy" ""
  scenario "$proxy" 1
  scenario "$proxy" 127.0.0.1/32
  scenario "$proxy" 2
done
kill "$redis_pid" 2>/dev/null || true
