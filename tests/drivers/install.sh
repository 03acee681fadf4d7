#!/usr/bin/env bash
# Installs the client drivers that tests/drivers.rs runs through rolegate.
# Idempotent and quick when everything is in place (no network then).
#
#   libpq:          psql and pgbench (Debian postgresql-15 / postgresql-contrib,
#                   installed by scripts/deps.sh; checked here)
#   psycopg 3:      from PyPI into a venv under the cargo target dir
#                   ("psycopg[binary]"; falls back to pure-Python psycopg over
#                   Debian's libpq5 when no binary wheel fits this Python)
#   node-postgres:  `pg` + `pg-copy-streams` from npm, `npm ci` in
#                   tests/drivers/node (versions pinned by package-lock.json)
#
# Prints one line per driver with its version on stdout, and the venv's
# python on the last line as `python=PATH`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
venv=${ROLEGATE_DRIVERS_VENV:-$target/drivers-venv}
psycopg_version=3.3.9

say() { echo "drivers/install: $*" >&2; }

apt_install() {
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 \
    install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- libpq: psql, pgbench -----------------------------------------------------
if ! command -v psql >/dev/null || ! command -v pgbench >/dev/null; then
  say "installing postgresql-client-15 postgresql-contrib"
  apt_install postgresql-client-15 postgresql-contrib
fi
echo "psql: $(psql --version)"
echo "pgbench: $(pgbench --version)"

# --- psycopg 3 ------------------------------------------------------------------
have_psycopg() {
  [[ -x $venv/bin/python ]] &&
    "$venv/bin/python" - "$psycopg_version" <<'PY' 2>/dev/null
import sys, psycopg
sys.exit(0 if psycopg.__version__ == sys.argv[1] else 1)
PY
}
if ! have_psycopg; then
  say "creating $venv with psycopg $psycopg_version"
  if ! python3 -m venv --clear "$venv" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv --clear "$venv"
  fi
  if ! "$venv/bin/pip" install -q --disable-pip-version-check "psycopg[binary]==$psycopg_version"; then
    say "no psycopg binary wheel here; using pure-Python psycopg with Debian's libpq5"
    dpkg-query -W -f='${Status}' libpq5 2>/dev/null | grep -q "install ok installed" || apt_install libpq5
    "$venv/bin/pip" install -q --disable-pip-version-check "psycopg==$psycopg_version"
  fi
  have_psycopg || { say "psycopg $psycopg_version did not install"; exit 1; }
fi
echo "psycopg: $("$venv/bin/python" -c 'import psycopg; print(psycopg.__version__, "impl", psycopg.pq.__impl__, "libpq", psycopg.pq.version())')"

# --- node-postgres ----------------------------------------------------------------
command -v node >/dev/null && command -v npm >/dev/null || {
  say "installing nodejs npm"
  apt_install nodejs npm
}
node_dir=$here/node
stamp=$node_dir/node_modules/.rolegate-lock.sha256
want=$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  say "npm ci in $node_dir"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error 2>&1 | grep -v 'Unknown user config' >&2 || true)
  (cd "$node_dir" && node -e 'require("pg"); require("pg-copy-streams")') || { say "npm ci failed"; exit 1; }
  echo "$want" >"$stamp"
fi
echo "node-postgres: pg $(cd "$node_dir" && node -p 'require("pg/package.json").version') pg-copy-streams $(cd "$node_dir" && node -p 'require("pg-copy-streams/package.json").version') node $(node --version)"

echo "python=$venv/bin/python"
