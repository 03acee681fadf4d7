#!/usr/bin/env bash
# Installs the Debian packages rolegate's demo and tests need, when missing.
# Runs apt only if something is absent, so a second run costs nothing.
set -euo pipefail

packages=(
  postgresql-15        # the servers behind rolegate, psql
  postgresql-contrib   # pgbench
  etcd-server          # Patroni's DCS in the lab
  etcd-client          # etcdctl, for the lab and its tests
  patroni              # the cluster manager rolegate follows
  protobuf-compiler    # protoc, needed to build etcd-client
  curl                 # REST checks in the lab script
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
