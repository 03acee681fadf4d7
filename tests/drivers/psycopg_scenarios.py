#!/usr/bin/env python3
"""psycopg 3 through rolegate: the scenarios of tests/drivers.rs.

Usage:
  psycopg_scenarios.py --rw PORT --ro PORT SCENARIO [SCENARIO ...]
  psycopg_scenarios.py --rw PORT --ro PORT switchover

Scenarios: simple_query extended_prepared transaction_rollback copy_10mb
listen_notify result_50mb cancel (or `all`). Each runs through both
listeners (rw and ro; writes only through rw; LISTEN/NOTIFY on rw only).

`switchover` opens a write session, prints `ready`, reads the new leader's
PostgreSQL port from stdin (written once the switchover is done), then
checks that the old session got an error and that a new rw session reaches
the new leader.

Prints one line per check: `ok <listener> <scenario> <detail>` or
`FAIL <listener> <scenario> <error>`; exits 1 if any check failed.
"""

import argparse
import sys
import threading
import time

import psycopg
from psycopg import errors

COPY_ROWS = 100_000
BIG_ROWS, BIG_WIDTH = 51_200, 1024  # 50 MiB of text
COPY_QUERY = (
    f"select i, repeat(chr(97 + i % 26), 100) from generate_series(1, {COPY_ROWS}) as i"
)
TIMEOUT = 60  # seconds, per step that could hang

failed = False


def report(ok, listener, scenario, detail):
    global failed
    failed |= not ok
    detail = " | ".join(line.strip() for line in str(detail).splitlines() if line.strip())
    print(f"{'ok' if ok else 'FAIL'} {listener} {scenario} {detail}".rstrip(), flush=True)


def copy_bytes():
    return b"".join(f"{i}\t{chr(97 + i % 26) * 100}\n".encode() for i in range(1, COPY_ROWS + 1))


def sqlstate(exc):
    return getattr(getattr(exc, "diag", None), "sqlstate", None)


class Target:
    def __init__(self, args, port, listener):
        self.port, self.listener = port, listener
        self.conninfo = (
            f"host={args.host} port={port} user={args.user} password={args.password} "
            f"dbname={args.dbname} connect_timeout=10 application_name=drivers-psycopg"
        )

    def connect(self, autocommit=True):
        return psycopg.connect(self.conninfo, autocommit=autocommit)

    @property
    def writable(self):
        return self.listener == "rw"


def simple_query(t):
    with t.connect() as conn:
        # No parameters: psycopg uses the simple query protocol, which
        # allows several statements in one query string.
        cur = conn.execute("select 1; select pg_is_in_recovery(), inet_server_port()")
        assert cur.fetchone() == (1,)
        assert cur.nextset(), "no second result"
        recovery, port = cur.fetchone()
        assert recovery == (not t.writable), f"pg_is_in_recovery() = {recovery}"
        return f"server port {port} in_recovery={recovery}"


def extended_prepared(t):
    with t.connect() as conn:
        query = "select %s::int * 2, %s::text || '!', pg_is_in_recovery()"
        for i in range(1, 4):
            row = conn.execute(query, (i, f"v{i}"), prepare=True).fetchone()
            assert row == (i * 2, f"v{i}!", not t.writable), f"bind {i}: {row}"
        # psycopg prepared it server-side (Parse once, then Bind/Execute).
        names = conn.execute(
            "select count(*) from pg_prepared_statements where not from_sql"
        ).fetchone()[0]
        assert names >= 1, "no server-side prepared statement"
        return f"3 binds of a named prepared statement, {names} prepared"


def transaction_rollback(t):
    with t.connect() as conn:
        if t.writable:
            conn.execute("create temp table drv_tx (v int)")
            with conn.transaction(force_rollback=True):
                conn.execute("insert into drv_tx select generate_series(1, 3)")
                n = conn.execute("select count(*) from drv_tx").fetchone()[0]
                assert n == 3, f"{n} rows inside the transaction"
            n = conn.execute("select count(*) from drv_tx").fetchone()[0]
            assert n == 0, f"{n} rows after rollback"
            return "3 inserted rows rolled back"
        with conn.transaction(force_rollback=True):
            conn.execute("set local statement_timeout = '1234ms'")
            v = conn.execute("show statement_timeout").fetchone()[0]
            assert v == "1234ms", v
        v = conn.execute("show statement_timeout").fetchone()[0]
        assert v != "1234ms", "SET LOCAL survived the rollback"
        try:
            with conn.transaction():
                conn.execute("create temp table drv_tx (v int)")
            raise AssertionError("a write succeeded on the ro listener")
        except errors.ReadOnlySqlTransaction:
            pass
        conn.execute("select 1")
        return "SET LOCAL rolled back; write refused with 25006, session usable"


def copy_10mb(t):
    data = copy_bytes()
    with t.connect() as conn:
        cur = conn.cursor()
        if t.writable:
            cur.execute("create temp table drv_copy (i int, t text)")
            with cur.copy("copy drv_copy from stdin") as copy:
                for start in range(0, len(data), 1 << 16):
                    copy.write(data[start : start + (1 << 16)])
            assert cur.rowcount == COPY_ROWS, f"COPY FROM reported {cur.rowcount} rows"
            source = "copy (select i, t from drv_copy order by i) to stdout"
        else:
            source = f"copy ({COPY_QUERY}) to stdout"
        out = bytearray()
        with cur.copy(source) as copy:
            for chunk in copy:
                out += chunk
        assert bytes(out) == data, f"COPY TO returned {len(out)} bytes, differing from the {len(data)} expected"
        what = "in and back out" if t.writable else "out"
        return f"{len(data)} bytes {what}, identical"


def listen_notify(t):
    with t.connect() as listener, t.connect() as notifier:
        listener.execute("listen drv_channel")
        pid = notifier.execute("select pg_backend_pid()").fetchone()[0]
        notifier.execute("select pg_notify('drv_channel', 'from psycopg')")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert got, "no notification within 10 s"
        n = got[0]
        assert (n.channel, n.payload, n.pid) == ("drv_channel", "from psycopg", pid), repr(n)
        return f"notification from pid {pid} received"


def notify_self(t):
    """Skipping one's own notifications by the pid from BackendKeyData."""
    with t.connect() as conn, t.connect() as other:
        conn.execute("listen drv_self")
        conn.execute("select pg_notify('drv_self', 'mine')")
        other.execute("select pg_notify('drv_self', 'theirs')")
        got = {n.payload: n.pid for n in conn.notifies(timeout=10, stop_after=2)}
        assert set(got) == {"mine", "theirs"}, f"notifications received: {got}"
        own = conn.info.backend_pid
        assert got["mine"] == own, f"own notification from pid {got['mine']}, BackendKeyData said {own}"
        assert got["theirs"] != own, f"another session's notification carries this session's pid {own}"
        real = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert real != own, f"BackendKeyData's pid {own} is the server's own: the fleet issued no key"
        return f"own notification carries pid {own} (BackendKeyData; pg_backend_pid() is {real}), the other session's does not"


def result_50mb(t):
    with t.connect() as conn:
        started = time.monotonic()
        rows = conn.execute(
            f"select i, repeat('x', {BIG_WIDTH}) from generate_series(1, {BIG_ROWS}) as i"
        ).fetchall()
        total = sum(len(r[1]) for r in rows)
        assert len(rows) == BIG_ROWS and total == BIG_ROWS * BIG_WIDTH, f"{len(rows)} rows, {total} bytes"
        assert rows[-1][0] == BIG_ROWS
        return f"{len(rows)} rows, {total} bytes of text in {time.monotonic() - started:.2f}s"


def cancel(t):
    with t.connect() as conn:
        timer = threading.Timer(1.0, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        try:
            conn.execute("select pg_sleep(60)")
            raise AssertionError("pg_sleep(60) was not cancelled")
        except errors.QueryCanceled:
            pass
        finally:
            timer.cancel()
        took = time.monotonic() - started
        assert took < 15, f"cancel took {took:.1f}s"
        conn.execute("select 1")
        return f"cancelled after {took:.2f}s (57014), session still usable"


def cancel_idle_then_query(t):
    # libpq's cancel returns once the server has closed the cancel
    # connection, which PostgreSQL does after signalling the backend: a
    # cancel of an idle session can then never reach the next query.
    rounds = 20
    with t.connect() as conn:
        cancelled = 0
        for _ in range(rounds):
            conn.cancel_safe()
            try:
                conn.execute("select pg_sleep(0.05)")
            except errors.QueryCanceled:
                cancelled += 1
        assert cancelled == 0, f"{cancelled} of {rounds} queries sent after a cancel were cancelled"
        return f"{rounds} cancels of an idle session, none reached the next query"


SCENARIOS = {
    "simple_query": simple_query,
    "extended_prepared": extended_prepared,
    "transaction_rollback": transaction_rollback,
    "copy_10mb": copy_10mb,
    "listen_notify": listen_notify,
    "result_50mb": result_50mb,
    "cancel": cancel,
    "notify_self": notify_self,
    "cancel_idle_then_query": cancel_idle_then_query,
}
RW_ONLY = {"listen_notify", "notify_self"}


def run(targets, names):
    for name in names:
        for t in targets:
            if name in RW_ONLY and not t.writable:
                continue
            try:
                report(True, t.listener, name, SCENARIOS[name](t))
            except Exception as exc:  # report and go on with the next check
                state = sqlstate(exc)
                report(False, t.listener, name, f"{type(exc).__name__}: {exc}" + (f" [{state}]" if state else ""))


def switchover(rw):
    old = rw.connect()
    before = old.execute("select inet_server_port()").fetchone()[0]
    print(f"ready on port {before}", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        report(False, "rw", "switchover", "no new leader port on stdin")
        return
    new_port = int(line)
    try:
        old.execute("select 1")
        report(False, "rw", "switchover_old_session", "the session on the old leader still answers")
    except psycopg.Error as exc:
        state = sqlstate(exc)
        report(True, "rw", "switchover_old_session", f"error: {type(exc).__name__}: {str(exc).strip()} [sqlstate {state}]")
    finally:
        old.close()
    deadline = time.monotonic() + 30
    attempts = 0
    while True:
        attempts += 1
        try:
            with rw.connect() as conn:
                recovery, port = conn.execute("select pg_is_in_recovery(), inet_server_port()").fetchone()
                conn.execute("create temp table drv_after (v int); insert into drv_after values (1)")
                assert not recovery and port == new_port, f"reached port {port}, in_recovery={recovery}; new leader on {new_port}"
                report(True, "rw", "switchover_reconnect", f"attempt {attempts}: port {port} writable")
                return
        except Exception as exc:
            if time.monotonic() > deadline:
                report(False, "rw", "switchover_reconnect", f"after {attempts} attempts: {type(exc).__name__}: {exc}")
                return
            time.sleep(0.2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--rw", type=int, required=True)
    p.add_argument("--ro", type=int, required=True)
    p.add_argument("--user", default="app")
    p.add_argument("--password", default="app")
    p.add_argument("--dbname", default="app")
    p.add_argument("scenarios", nargs="+")
    args = p.parse_args()
    rw, ro = Target(args, args.rw, "rw"), Target(args, args.ro, "ro")
    if args.scenarios == ["switchover"]:
        switchover(rw)
    else:
        names = list(SCENARIOS) if args.scenarios == ["all"] else args.scenarios
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            p.error(f"unknown scenario(s): {unknown}")
        run([rw, ro], names)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
