#!/bin/sh
# Patroni's bootstrap.post_bootstrap: run once, on the member that initialises
# the cluster, with a superuser connection URL as $1. Creates what `lab/lab up`
# creates: role app (password app) and database app owned by it. The password
# is stored as SCRAM (password_encryption in the bootstrap DCS config).
set -eu
psql -v ON_ERROR_STOP=1 -X -q "$1" <<'SQL'
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
SQL
