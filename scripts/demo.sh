#!/usr/bin/env bash
# The main job: a 3-node Patroni cluster on this machine with rolegate in
# front of it, using the top-level proxy.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
lab/lab up
cargo build --release

cat <<'MSG'

rolegate is starting in front of the lab cluster (etcd 127.0.0.1:2379,
Patroni pg1..pg3 on 5441..5443). Connect with:

  read-write:  psql "host=127.0.0.1 port=6432 user=app dbname=app"   (password: app)
  read-only:   psql "host=127.0.0.1 port=6433 user=app dbname=app"

Watch it:        http://127.0.0.1:9432/ (status page)   or
                 target/release/rolegate status --watch
Try a failover:  lab/lab switchover     or     lab/lab kill-leader
Stop rolegate:   Ctrl-C              Stop the cluster:  lab/lab down [--wipe]

MSG
exec target/release/rolegate --config proxy.toml
