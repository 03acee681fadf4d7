#!/usr/bin/env bash
# Installs the Debian packages rolegate's demo and tests need, when missing.
# Runs apt only if something is absent, so a second run costs nothing.
set -euo pipefail

# etcd-server, etcd-client and patroni are installed by `lab/lab up`, which
# also keeps a distribution etcd.service off the lab's port.
packages=(
  postgresql-15        # the servers behind rolegate, psql
  postgresql-contrib   # pgbench
  protobuf-compiler    # protoc, needed to build etcd-client
  prometheus           # promtool, to validate the /metrics exposition in tests
  chromium             # the headless browser that loads the status page in tests
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  # Wait for another apt (e.g. the lab's) rather than fail on its lock.
  "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
