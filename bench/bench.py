#!/usr/bin/python3
"""Clients and bookkeeping for bench/run (rolegate's benchmark suite).

Run with Debian's /usr/bin/python3: the only non-stdlib module used is
psycopg2 from the python3-psycopg2 package (a pyenv/venv python3 earlier on
PATH would not see it).

Subcommands (each bounded in time; bench/run calls them):
  free-ports N              print N distinct free TCP ports on 127.0.0.1
  haproxy-servers SOCK      print "backend server status" per server (stats socket)
  writer ...                failover writer: insert every 20 ms, reconnect on
                            failure, then count what went wrong (see writer())
  idle ...                  open N idle sessions, hold them until told to stop
  storm ...                 N writing sessions through a leader change: how
                            long until all write again (see cmd_storm())
  burst ...                 N clients logging in to the leader at one instant,
                            no failover: the storm's floor (see cmd_burst())
  pgbench-log-pct FILE...   p50/p99/p99.9 latency (µs) from pgbench --log files
  sched-delay               p50/p99 scheduling delay (µs) from `perf sched timehist` on stdin
  report ...                aggregate results.jsonl into the markdown table
                            (and, with --write, into BENCHMARKS.md)

Results are JSON lines: {"metric": ..., "target": ..., "rep": ..., "value": ...}.
"""

import argparse
import json
import os
import re
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def append_result(path, metric, target, rep, value):
    with open(path, "a") as f:
        f.write(json.dumps({"metric": metric, "target": target, "rep": rep, "value": value}) + "\n")


# ------------------------------------------------------------------ helpers --

def cmd_free_ports(args):
    # Bind all sockets at once so the N ports are distinct; the kernel picks
    # them from the ephemeral range. They are free again once we close, and
    # bench/run uses them right away (a race with another program is possible
    # but unlikely on a quiet machine; the proxies fail loudly if it happens).
    socks = []
    try:
        for _ in range(args.n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()


def haproxy_servers(sock_path):
    """[(backend, server, status)] from HAProxy's `show stat` (CSV)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(sock_path)
    s.sendall(b"show stat\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    lines = data.decode(errors="replace").splitlines()
    header = lines[0].lstrip("# ").split(",")
    ipx, isv, ist = header.index("pxname"), header.index("svname"), header.index("status")
    out = []
    for line in lines[1:]:
        f = line.split(",")
        if len(f) > ist and f[isv] not in ("FRONTEND", "BACKEND"):
            out.append((f[ipx], f[isv], f[ist]))
    return out


def cmd_haproxy_servers(args):
    for b, s, st in haproxy_servers(args.sock):
        print(b, s, st)


# ------------------------------------------------------------------- writer --

def close_quietly(conn):
    """Closes a psycopg2 connection that may be broken already."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:
        pass


def error_line(e):
    """An error as the logs count it: its SQLSTATE (or -) and first line."""
    text = str(e).strip()
    first = text.splitlines()[0][:120] if text else repr(e)
    return f"{getattr(e, 'pgcode', None) or '-'} {first}"


def connect(psycopg2, dsn):
    # connect_timeout=1 as the brief asks; libpq raises values below 2 to 2 s.
    # tcp_user_timeout/keepalives bound a write on a peer that vanished.
    return psycopg2.connect(dsn, connect_timeout=1, application_name="rolegate-bench-writer",
                            tcp_user_timeout=3000, keepalives=1, keepalives_idle=1,
                            keepalives_interval=1, keepalives_count=2)


def cmd_writer(args):
    """Insert one row every 20 ms through args.dsn until the event is over.

    The event (switchover, kill) is run by bench/run, which creates
    args.done when it has returned. The writer then goes on until it has
    written without any error for args.steady seconds (the proxy has settled),
    or args.max_after seconds have passed, and in any case stops at
    args.max_total. Every failure makes it drop the connection and reconnect
    (after 20 ms), like a simple application or a pool that discards broken
    connections would.

    Counted:
      window_ms          longest gap between two acknowledged inserts (also
                         from the last ack to the end: a writer that never
                         recovered has an open window)
      connect_failures   connection attempts that failed (refused, reset,
                         timed out, or an ErrorResponse during startup)
      readonly_refused   inserts refused with SQLSTATE 25006 (the write
                         reached a server in recovery: a demoted leader)
      recovery_sessions  sessions whose server said pg_is_in_recovery() = t
      sessions_ended     established sessions that failed otherwise (ended by
                         the proxy or the server: 57P01, connection lost)
      missing            acknowledged rows absent from the leader afterwards
    """
    import psycopg2

    st = dict(connect_attempts=0, connect_failures=0, sessions=0, recovery_sessions=0,
              readonly_refused=0, sessions_ended=0, acked=0)
    errors = {}  # first line of each error message -> count (for the log)

    def note(e):
        msg = error_line(e)
        errors[msg] = errors.get(msg, 0) + 1

    acks = []  # (seq, monotonic time of the acknowledgement)
    failures = []  # (monotonic time, "connect" | "read-only" | "ended")
    event_at = None  # when bench/run started the event (its marker file)
    conn = cur = None
    seq = 0
    t0 = time.monotonic()
    deadline = t0 + args.max_total
    done_at = None
    last_error = t0
    next_tick = t0

    def drop():
        nonlocal conn, cur
        close_quietly(conn)
        conn = cur = None

    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if event_at is None and args.started and os.path.exists(args.started):
            event_at = now
        if done_at is None and os.path.exists(args.done):
            done_at = now
        if done_at is not None:
            if now - done_at >= args.max_after:
                break
            if now - done_at >= args.steady and now - last_error >= args.steady and acks and now - acks[-1][1] < 0.5:
                break
        if conn is None:
            st["connect_attempts"] += 1
            try:
                conn = connect(psycopg2, args.dsn)
            except Exception as e:
                st["connect_failures"] += 1
                failures.append((time.monotonic(), "connect"))
                note(e)
                conn = None
                last_error = time.monotonic()
                time.sleep(0.02)
                next_tick = time.monotonic()
                continue
            st["sessions"] += 1
            try:
                conn.autocommit = True
                cur = conn.cursor()
                cur.execute("select pg_is_in_recovery()")
                if cur.fetchone()[0]:
                    st["recovery_sessions"] += 1
            except Exception as e:
                st["sessions_ended"] += 1
                failures.append((time.monotonic(), "ended"))
                note(e)
                drop()
                last_error = time.monotonic()
                continue
        seq += 1
        try:
            cur.execute("insert into bench_failover (run, seq) values (%s, %s)", (args.run, seq))
            acks.append((seq, time.monotonic()))
        except Exception as e:
            if getattr(e, "pgcode", None) == "25006":
                st["readonly_refused"] += 1
                failures.append((time.monotonic(), "read-only"))
            else:
                st["sessions_ended"] += 1
                failures.append((time.monotonic(), "ended"))
            note(e)
            drop()
            last_error = time.monotonic()
        next_tick += 0.02
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_tick = time.monotonic()  # fell behind (e.g. a slow connect): don't burst
    end = time.monotonic()
    drop()

    st["acked"] = len(acks)
    gaps = [(b[1] - a[1], a[1] - t0) for a, b in zip(acks, acks[1:])]
    if acks:
        gaps.append((end - acks[-1][1], acks[-1][1] - t0))
    else:
        gaps.append((end - t0, 0.0))
    window, at = max(gaps)
    st["window_ms"] = round(window * 1000, 1)
    st["window_starts_at_s"] = round(at, 2)
    outage_start = t0 + at  # the last acknowledgement before the longest gap
    st["duration_s"] = round(end - t0, 2)

    # Which acknowledged rows survived? Ask whichever member is writable now
    # (libpq multi-host with target_session_attrs=read-write), directly.
    acked = dict(acks)  # seq -> time of its acknowledgement
    present = None
    for _ in range(30):
        try:
            c = psycopg2.connect(args.check_dsn, connect_timeout=2)
            try:
                k = c.cursor()
                k.execute("select seq from bench_failover where run = %s", (args.run,))
                present = {r[0] for r in k.fetchall()}
            finally:
                c.close()
            break
        except Exception as e:
            note(e)
            time.sleep(1)
    if present is None:
        print("writer: could not read the rows back", file=sys.stderr)
        st["missing"] = st["missing_after_outage"] = None
    else:
        missing = [s for s in acked if s not in present]
        st["missing"] = len(missing)
        # A killed leader can take its last acknowledged commits with it
        # (asynchronous replication): those were acknowledged at or before
        # the start of the outage. A row acknowledged after the outage began
        # came from the server the proxy chose afterwards; losing one of
        # those would mean the proxy wrote to a server that was not (or no
        # longer) the real leader.
        st["missing_after_outage"] = sum(1 for s in missing if acked[s] > outage_start)
        st["missing_seqs"] = sorted(missing)[:20]

    for k in ("window_ms", "connect_failures", "readonly_refused", "recovery_sessions",
              "sessions_ended", "missing", "missing_after_outage", "acked"):
        append_result(args.results, f"failover/{args.event}/{k}", args.target, args.rep, st[k])
    st["errors"] = errors
    # Every acknowledgement and failed attempt, in seconds from the start of
    # the event, for bench/plot.py's pictures.
    origin = event_at if event_at is not None else t0
    st["timeline"] = {
        "event_at_s": round(origin - t0, 3),
        "acks": [round(at - origin, 3) for _, at in acks],
        "failures": [[round(at - origin, 3), kind] for at, kind in failures],
    }
    print(json.dumps({"run": args.run, **st}, sort_keys=True))


# -------------------------------------------------------------------- storm --

def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cpu_ms(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cmd_storm(args):
    """The reconnect storm after a leader change: args.n clients each hold a
    session through args.dsn and insert a row every second. Once all have
    written, args.ready appears; bench/run then creates args.started when it
    starts the switchover or kill, and args.done when that returned.

    A client whose write fails drops its connection and tries again at once
    (after 20 ms), connecting (libpq's connect_timeout of 2 s) and writing
    until it succeeds, like an application's pool after a failover. A
    prober asks each member's Patroni REST API (args.rest) every 20 ms and
    notes when a member other than the old leader first answers /primary
    with 200 and a running primary in the body: the new leader confirmed,
    the earliest moment any client could write again. (Patroni's REST
    costs the members no connection slot, so a storm through the
    PostgreSQL ports does not delay the mark, as a SQL prober was.)

    Counted (per run):
      recovery_ms      from that moment until every client that failed has
                       written again (its first acknowledgement after its
                       last failure); the storm's length
      recovery_p50_ms  the same for the median client
      failed           connection attempts and writes that failed
      refused          of which refused for lack of connections (53300)
      not_recovered    clients still failing when the run stopped
      rss_idle_kib     the proxy's RSS with the N sessions open, before
      rss_peak_kib     its highest RSS from the event until the end
      cpu_ms           its CPU time from the event until everyone wrote
    """
    import threading

    import psycopg2

    deadline = time.monotonic() + args.max_total
    stop = threading.Event()
    lock = threading.Lock()
    clients = [dict(acks=[], failures=[], refused=0) for _ in range(args.n)]
    errors = {}  # first line of each error -> count
    opened = threading.Semaphore(0)

    def client(i):
        me = clients[i]
        conn = cur = None
        first = True
        time.sleep(i * args.ramp / max(args.n, 1))
        next_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = psycopg2.connect(args.dsn, connect_timeout=2, application_name="rolegate-bench-storm")
                    conn.autocommit = True
                    cur = conn.cursor()
                cur.execute("insert into bench_storm (client) values (%s)", (i,))
                me["acks"].append(time.monotonic())
                if first:
                    first = False
                    opened.release()
                next_at += 1.0
            except Exception as e:
                msg = error_line(e)
                with lock:
                    me["failures"].append(time.monotonic())
                    errors[msg] = errors.get(msg, 0) + 1
                    if getattr(e, "pgcode", None) == "53300" or "too many" in str(e):
                        me["refused"] += 1
                close_quietly(conn)
                conn = cur = None
                next_at = time.monotonic() + 0.02
            stop.wait(max(0.0, next_at - time.monotonic()))
        close_quietly(conn)

    # Table for the clients' rows, made straight on the leader.
    with psycopg2.connect(args.check_dsn, connect_timeout=5) as c:
        c.autocommit = True
        c.cursor().execute("create table if not exists bench_storm (client int, at timestamptz default now())")
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.n)]
    for t in threads:
        t.start()
    ready_by = time.monotonic() + args.ramp + 60
    for _ in range(args.n):
        if not opened.acquire(timeout=max(0.0, ready_by - time.monotonic())):
            break
    with open(args.ready + ".tmp", "w") as f:
        f.write(f"{sum(1 for c in clients if c['acks'])} {args.n}\n")
    os.rename(args.ready + ".tmp", args.ready)

    def primary():
        """The REST URL of the member that answers /primary as a running
        primary, if one does."""
        for url in args.rest:
            try:
                code, body = http_json("GET", url + "/primary", timeout=1)
            except Exception:
                continue
            if code == 200 and isinstance(body, dict) and body.get("role") in ("master", "primary") and body.get("state") == "running":
                return url
        return None

    old_leader = primary()
    # The proxy's RSS while the sessions are open and mostly idle, then the
    # prober and the proxy's samples from the event on.
    idle_rss = []
    while not os.path.exists(args.started) and time.monotonic() < deadline:
        if args.pid:
            idle_rss.append(proc_rss_kib(args.pid))
        time.sleep(0.05)
    event_at = time.monotonic()
    cpu_at_event = proc_cpu_ms(args.pid) if args.pid else None
    new_at = None
    peak_rss = max([r for r in idle_rss if r] or [0])
    done_at = None
    cpu_at_recovery = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        if args.pid:
            peak_rss = max(peak_rss, proc_rss_kib(args.pid) or 0)
        if new_at is None:
            leader = primary()
            if leader is not None and leader != old_leader:
                new_at = time.monotonic()
        if done_at is None and os.path.exists(args.done):
            done_at = now
        if new_at is not None and done_at is not None:
            with lock:
                pending = [c for c in clients if c["failures"] and not any(a > c["failures"][-1] for a in c["acks"])]
                failed_any = any(c["failures"] for c in clients)
            if failed_any and not pending:
                if cpu_at_recovery is None and args.pid:
                    cpu_at_recovery = proc_cpu_ms(args.pid)
                if now - max(c["failures"][-1] for c in clients if c["failures"]) >= args.steady:
                    break
            if now - done_at >= args.max_after:
                break
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(timeout=5)

    recoveries = []
    not_recovered = 0
    for c in clients:
        if not c["failures"]:
            continue
        after = [a for a in c["acks"] if a > c["failures"][-1]]
        if not after:
            not_recovered += 1
        elif new_at is not None:
            recoveries.append(after[0] - new_at)
    st = {
        "clients": args.n,
        "failed_clients": sum(1 for c in clients if c["failures"]),
        "failed": sum(len(c["failures"]) for c in clients),
        "refused": sum(c["refused"] for c in clients),
        "not_recovered": not_recovered,
        "new_leader_after_s": None if new_at is None else round(new_at - event_at, 3),
        "recovery_ms": round(max(recoveries) * 1000, 1) if recoveries else None,
        "recovery_p50_ms": round(statistics.median(recoveries) * 1000, 1) if recoveries else None,
    }
    if args.pid:
        st["rss_idle_kib"] = statistics.median([r for r in idle_rss if r] or [0])
        st["rss_peak_kib"] = peak_rss
        end_cpu = cpu_at_recovery if cpu_at_recovery is not None else proc_cpu_ms(args.pid)
        st["cpu_ms"] = None if end_cpu is None or cpu_at_event is None else round(end_cpu - cpu_at_event, 1)
    prefix = f"storm/{args.event}/{args.n}"
    for k in ("recovery_ms", "recovery_p50_ms", "failed", "refused", "not_recovered",
              "rss_idle_kib", "rss_peak_kib", "cpu_ms"):
        if st.get(k) is not None:
            append_result(args.results, f"{prefix}/{k}", args.target, args.rep, st[k])
    st["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8])
    print(json.dumps({"target": args.target, **st}, sort_keys=True))


def cmd_burst(args):
    """The reconnect storm's floor on this machine: args.n clients, the
    storm's clients in all but the failover, start to log in straight to
    the leader at the same instant and each writes one row. This is the
    best any proxy can do that lets sessions through only once the new
    leader is confirmed: every login then starts at that moment. A client
    whose login fails (libpq's connect_timeout of 2 s, as in the storm)
    tries again 20 ms later.

    Counted: burst_ms, from the start until the last client wrote;
    burst_p50_ms, the median client; burst_failed, failed attempts.
    """
    import threading

    import psycopg2

    start = threading.Barrier(args.n + 1, timeout=120)
    done = [None] * args.n
    failed = [0] * args.n
    deadline = time.monotonic() + args.max_total

    def client(i):
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        while time.monotonic() < deadline:
            conn = None
            try:
                conn = psycopg2.connect(args.dsn, connect_timeout=2, application_name="rolegate-bench-burst")
                conn.autocommit = True
                conn.cursor().execute("insert into bench_storm (client) values (%s)", (i,))
                done[i] = time.monotonic()
                return
            except Exception:
                failed[i] += 1
                time.sleep(0.02)
            finally:
                close_quietly(conn)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    times = [d - t0 for d in done if d is not None]
    st = {
        "clients": args.n,
        "burst_failed": sum(failed),
        "not_done": args.n - len(times),
        "burst_ms": round(max(times) * 1000, 1) if len(times) == args.n else None,
        "burst_p50_ms": round(statistics.median(times) * 1000, 1) if times else None,
    }
    for k in ("burst_ms", "burst_p50_ms", "burst_failed"):
        if st[k] is not None:
            append_result(args.results, f"storm/switchover/{args.n}/{k}", "direct", args.rep, st[k])
    print(json.dumps(st, sort_keys=True))


# ---------------------------------------------------------- max_connections --

def http_json(method, url, body=None, timeout=10):
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def cmd_max_connections(args):
    """Set Patroni's dynamic max_connections and restart every member in the
    order given (replicas first, leader last): PATCH /config on the first URL,
    then per member wait for Patroni to flag pending_restart (it rewrites
    postgresql.conf in its next HA loop), POST /restart, wait until running."""
    status, body = http_json("PATCH", args.urls[-1] + "/config",
                             {"postgresql": {"parameters": {"max_connections": args.n}}})
    if status != 200:
        raise SystemExit(f"PATCH /config: HTTP {status}: {body}")
    for url in args.urls:
        deadline = time.monotonic() + 60
        while True:
            _, info = http_json("GET", url + "/patroni")
            if isinstance(info, dict) and info.get("pending_restart"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}: Patroni never flagged pending_restart")
            time.sleep(0.5)
        status, body = http_json("POST", url + "/restart", {}, timeout=120)
        if status != 200:
            raise SystemExit(f"{url}: POST /restart: HTTP {status}: {body}")
        deadline = time.monotonic() + 120
        while True:
            _, info = http_json("GET", url + "/patroni")
            if isinstance(info, dict) and info.get("state") == "running" and not info.get("pending_restart"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}: not running again within 120 s after the restart")
            time.sleep(0.5)
        print(f"max-connections: {url} restarted", file=sys.stderr)


# --------------------------------------------------------------------- idle --

def cmd_idle(args):
    """Open args.n sessions (8 at a time), run `select 1` on each so the
    backend side is fully set up, report on args.ready, hold them until
    args.release exists (or args.timeout), then close them."""
    import psycopg2

    deadline = time.monotonic() + args.timeout

    def open_one(_):
        if time.monotonic() > deadline:
            return None
        try:
            c = psycopg2.connect(args.dsn, connect_timeout=10)
            c.autocommit = True
            k = c.cursor()
            k.execute("select 1")
            k.fetchone()
            return c
        except Exception as e:
            print(f"idle: connect failed: {str(e).strip()[:200]}", file=sys.stderr)
            return None

    with ThreadPoolExecutor(8) as ex:
        conns = list(ex.map(open_one, range(args.n)))
    ok = [c for c in conns if c is not None]
    with open(args.ready + ".tmp", "w") as f:
        f.write(f"{len(ok)} {args.n - len(ok)}\n")
    os.rename(args.ready + ".tmp", args.ready)
    while not os.path.exists(args.release) and time.monotonic() < deadline:
        time.sleep(0.1)
    for c in ok:
        try:
            c.close()
        except Exception:
            pass


# ------------------------------------------------------------------ latency --

def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def cmd_pgbench_log_pct(args):
    # pgbench --log lines: client_id transaction_no time_us script_no epoch epoch_us
    lat = []
    for path in args.files:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
    lat.sort()
    print(f"{percentile(lat, 50)} {percentile(lat, 99)} {percentile(lat, 99.9)} {len(lat)}")


def cmd_sched_delay(args):
    # `perf sched timehist` rows end in: wait time, scheduling delay, run
    # time (ms); the delay is from the task's wake-up until it ran.
    delays = []
    for line in sys.stdin:
        parts = line.split()
        if len(parts) < 6:
            continue
        try:
            delays.append(float(parts[-2]) * 1000.0)
        except ValueError:
            continue
    delays.sort()
    print(f"{percentile(delays, 50):.0f} {percentile(delays, 99):.0f} {len(delays)}")


# ------------------------------------------------------------------- report --

TARGETS = ("rolegate", "haproxy", "direct")

# (metric key, label, unit, decimals, kind); kind "counter" = a count of bad
# events (ratios are meaningless), "measure" = a measurement.
# The reconnect storm's sizes: bench/run's full run and its smoke run.
STORM_SIZES = (20, 100, 500, 1000)

ROWS = [
    ("tput/simple/8", "Throughput `pgbench -S`, 8 clients", "tps", 0, "measure"),
    ("tput/simple/32", "Throughput `pgbench -S`, 32 clients", "tps", 0, "measure"),
    ("tput/prepared/8", "Throughput `pgbench -S -M prepared`, 8 clients", "tps", 0, "measure"),
    ("tput/prepared/32", "Throughput `pgbench -S -M prepared`, 32 clients", "tps", 0, "measure"),
    ("connrate/8", "Connection rate `pgbench -S -C`, 8 clients", "conn/s", 0, "measure"),
    ("cpu/simple/8", "Proxy CPU per 1,000 tx, `-S` 8 clients", "ms", 1, "measure"),
    ("cpu/simple/32", "Proxy CPU per 1,000 tx, `-S` 32 clients", "ms", 1, "measure"),
    ("cpu/prepared/8", "Proxy CPU per 1,000 tx, `-S -M prepared` 8 clients", "ms", 1, "measure"),
    ("cpu/prepared/32", "Proxy CPU per 1,000 tx, `-S -M prepared` 32 clients", "ms", 1, "measure"),
    ("cpu/rate/16", "Proxy CPU per 1,000 tx at a fixed 5,000 tx/s, `-S -R 5000` 16 clients", "ms", 1, "measure"),
    ("cpu/connrate/8", "Proxy CPU per 1,000 connections, `-S -C` 8 clients", "ms", 1, "measure"),
    ("sys/user_us", "Proxy user-space CPU per tx, `-S -t` 8 clients", "µs", 2, "measure"),
    ("sys/kernel_us", "Proxy kernel CPU per tx, `-S -t` 8 clients", "µs", 2, "measure"),
    ("instr/tx", "Proxy user-space instructions per tx, `-S` 8 clients (callgrind)", "per tx", 0, "measure"),
    ("instr/conn", "Proxy user-space instructions per connection, `-S -C` 4 clients (callgrind)", "per conn", 0, "measure"),
    ("sys/wakeups", "Proxy wake-ups (voluntary context switches) per tx, `-S -t` 8 clients", "per tx", 2, "measure"),
    ("sys/cswitch", "Proxy context switches (all) per tx, `-S -t` 8 clients (perf stat)", "per tx", 2, "measure"),
    ("sys/epoll_wait_perf", "Proxy `epoll_wait` calls per tx, `-S -t` 8 clients (perf stat, undisturbed)", "per tx", 2, "measure"),
    ("sys/total", "Proxy syscalls per tx, `-S -t` 8 clients (strace -c -f)", "per tx", 2, "measure"),
    ("sys/epoll_wait", "Proxy `epoll_wait` calls per tx, `-S -t` 8 clients (strace -c -f, slowed)", "per tx", 2, "measure"),
    ("sys/conn_total", "Proxy syscalls per connection, `-S -C` 4 clients (strace -c -f)", "per conn", 2, "measure"),
    ("sys/conn_epoll_ctl", "Proxy `epoll_ctl` calls per connection, `-S -C` 4 clients", "per conn", 2, "measure"),
    ("sys/conn_setsockopt", "Proxy `setsockopt` calls per connection, `-S -C` 4 clients", "per conn", 2, "measure"),
    ("lat/p50", "Latency p50, 1 client `-S`", "µs", 0, "measure"),
    ("lat/p99", "Latency p99, 1 client `-S`", "µs", 0, "measure"),
    ("lat/p999", "Latency p99.9, 1 client `-S`", "µs", 0, "measure"),
    ("latadd/p50", "Added latency p50 vs direct, 1 client", "µs", 0, "measure"),
    ("latadd/p99", "Added latency p99 vs direct, 1 client", "µs", 0, "measure"),
    ("latadd/p999", "Added latency p99.9 vs direct, 1 client", "µs", 0, "measure"),
    ("latrate/p50", "Latency p50 at a fixed 5,000 tx/s, `-S -R 5000` 8 clients", "µs", 0, "measure"),
    ("latrate/p99", "Latency p99 at a fixed 5,000 tx/s", "µs", 0, "measure"),
    ("latrate/p999", "Latency p99.9 at a fixed 5,000 tx/s", "µs", 0, "measure"),
    ("latrateadd/p50", "Added latency p50 vs direct, 5,000 tx/s", "µs", 0, "measure"),
    ("latrateadd/p99", "Added latency p99 vs direct, 5,000 tx/s", "µs", 0, "measure"),
    ("latrateadd/p999", "Added latency p99.9 vs direct, 5,000 tx/s", "µs", 0, "measure"),
    ("sched/p50", "Proxy threads' wait for a CPU once woken, p50, 5,000 tx/s (perf sched)", "µs", 0, "measure"),
    ("sched/p99", "Proxy threads' wait for a CPU once woken, p99, 5,000 tx/s (perf sched)", "µs", 0, "measure"),
    ("mem/rest", "Proxy RSS at rest (fresh process)", "KiB", 0, "measure"),
    ("mem/loaded", "Proxy RSS with {idle} idle sessions", "KiB", 0, "measure"),
    ("mem/per_session", "Memory per idle session", "KiB", 1, "measure"),
] + [
    row
    for n in STORM_SIZES
    for row in (
        (f"storm/switchover/{n}/recovery_ms",
         f"Reconnect storm, {n:,} writing sessions, switchover: until all write again, from the new leader's confirmation (Patroni REST)", "ms", 0, "measure"),
        (f"storm/switchover/{n}/recovery_p50_ms", f"Reconnect storm, {n:,}: the same for the median client", "ms", 0, "measure"),
        (f"storm/switchover/{n}/failed", f"Reconnect storm, {n:,}: failed attempts (connections and writes)", "count", 0, "counter"),
        (f"storm/switchover/{n}/burst_ms", f"Reconnect storm, {n:,}: floor, the same clients logging in straight to the leader at one instant (no failover): until all wrote", "ms", 0, "measure"),
        (f"storm/switchover/{n}/burst_p50_ms", f"Reconnect storm, {n:,}: floor, the same for the median client", "ms", 0, "measure"),
        (f"storm/switchover/{n}/burst_failed", f"Reconnect storm, {n:,}: floor, failed attempts", "count", 0, "counter"),
        (f"storm/switchover/{n}/refused", f"Reconnect storm, {n:,}: refused for lack of connections (53300)", "count", 0, "counter"),
        (f"storm/switchover/{n}/not_recovered", f"Reconnect storm, {n:,}: clients never writing again", "count", 0, "counter"),
        (f"storm/switchover/{n}/rss_idle_kib", f"Reconnect storm, {n:,}: proxy RSS with the sessions open, before", "KiB", 0, "measure"),
        (f"storm/switchover/{n}/rss_peak_kib", f"Reconnect storm, {n:,}: proxy peak RSS during the storm", "KiB", 0, "measure"),
        (f"storm/switchover/{n}/cpu_ms", f"Reconnect storm, {n:,}: proxy CPU from the switchover until all write again", "ms", 0, "measure"),
    )
] + [
    ("failover/switchover/window_ms", "Switchover: write-unavailability window", "ms", 0, "measure"),
    ("failover/switchover/connect_failures", "Switchover: failed connection attempts", "count", 0, "counter"),
    ("failover/switchover/readonly_refused", "Switchover: writes refused read-only (25006)", "count", 0, "counter"),
    ("failover/switchover/recovery_sessions", "Switchover: sessions on a server in recovery", "count", 0, "counter"),
    ("failover/switchover/sessions_ended", "Switchover: established sessions ended", "count", 0, "counter"),
    ("failover/switchover/missing", "Switchover: acknowledged rows missing", "rows", 0, "counter"),
    ("failover/switchover/missing_after_outage", "Switchover: of which acknowledged after the outage began", "rows", 0, "counter"),
    ("failover/kill/window_ms", "Leader `kill -9`: write-unavailability window", "ms", 0, "measure"),
    ("failover/kill/connect_failures", "Leader `kill -9`: failed connection attempts", "count", 0, "counter"),
    ("failover/kill/readonly_refused", "Leader `kill -9`: writes refused read-only (25006)", "count", 0, "counter"),
    ("failover/kill/recovery_sessions", "Leader `kill -9`: sessions on a server in recovery", "count", 0, "counter"),
    ("failover/kill/sessions_ended", "Leader `kill -9`: established sessions ended", "count", 0, "counter"),
    ("failover/kill/missing", "Leader `kill -9`: acknowledged rows missing", "rows", 0, "counter"),
    ("failover/kill/missing_after_outage", "Leader `kill -9`: of which acknowledged after the outage began", "rows", 0, "counter"),
]

# The failover rows again for the second stack bench/run measures (events
# `switchover@current`, `kill@current`): Patroni 4.1 + PostgreSQL 18.
SECOND_STACK = "current"
SECOND_STACK_LABEL = "Patroni 4.1 + PostgreSQL 18"
ROWS += [
    (m.replace("failover/switchover/", f"failover/switchover@{SECOND_STACK}/")
      .replace("failover/kill/", f"failover/kill@{SECOND_STACK}/"),
     f"{SECOND_STACK_LABEL}: {label}", unit, dec, kind)
    for m, label, unit, dec, kind in list(ROWS) if m.startswith("failover/")
]


def load_results(path):
    data = {}  # metric -> target -> {rep: value}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r["value"] is None:
                continue
            data.setdefault(r["metric"], {}).setdefault(r["target"], {})[r["rep"]] = float(r["value"])
    # Added latency per repetition: proxy minus direct of the same repetition,
    # so that drift between repetitions cancels out.
    for run in ("lat", "latrate"):
        for p in ("p50", "p99", "p999"):
            lat = data.get(f"{run}/{p}", {})
            direct = lat.get("direct", {})
            for t in ("rolegate", "haproxy"):
                for rep, v in lat.get(t, {}).items():
                    if rep in direct:
                        data.setdefault(f"{run}add/{p}", {}).setdefault(t, {})[rep] = v - direct[rep]
    return data


def med(data, metric, target):
    vals = list(data.get(metric, {}).get(target, {}).values())
    return statistics.median(vals) if vals else None


def fmt(v, decimals):
    if v is None:
        return "—"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:,.{decimals}f}"


def cell(data, metric, target, decimals, kind):
    vals = sorted(data.get(metric, {}).get(target, {}).values())
    if not vals:
        return "—"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt(m, decimals)
    return f"{fmt(m, decimals)} ({fmt(vals[0], decimals)}–{fmt(vals[-1], decimals)})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×"


def evaluate_targets(data, meta):
    """{metric: (target text, met: bool|None, detail)} per the issue's targets."""
    out = {}
    rg = lambda m: med(data, m, "rolegate")
    ha = lambda m: med(data, m, "haproxy")
    di = lambda m: med(data, m, "direct")
    mx = lambda m, t="rolegate": max(data.get(m, {}).get(t, {}).values(), default=None)

    for m in ("tput/simple/8", "tput/simple/32", "tput/prepared/8", "tput/prepared/32"):
        rh, rd = ratio(rg(m), ha(m)), ratio(rg(m), di(m))
        met = None if rh is None or rd is None else (rh >= 1.0 and rd >= 0.90)
        out[m] = ("≥ 1.00× HAProxy and ≥ 0.90× direct", met, f"{fmt_ratio(rh)} HAProxy, {fmt_ratio(rd)} direct")
    rh = ratio(rg("connrate/8"), ha("connrate/8"))
    out["connrate/8"] = ("≥ 1.00× HAProxy", None if rh is None else rh >= 1.0, f"{fmt_ratio(rh)} HAProxy")
    rh = ratio(rg("cpu/connrate/8"), ha("cpu/connrate/8"))
    out["cpu/connrate/8"] = ("≤ 0.90× HAProxy", None if rh is None else rh <= 0.90, f"{fmt_ratio(rh)} HAProxy")
    for m in ("cpu/simple/8", "cpu/simple/32", "cpu/prepared/8", "cpu/prepared/32", "cpu/rate/16"):
        rh = ratio(rg(m), ha(m))
        out[m] = ("≤ 0.90× HAProxy", None if rh is None else rh <= 0.90, f"{fmt_ratio(rh)} HAProxy")
    # Added tail latency: rolegate's no more than HAProxy's.
    for m in ("latadd/p99", "latrateadd/p99"):
        r, h = rg(m), ha(m)
        out[m] = ("≤ HAProxy's", None if r is None or h is None else r <= h,
                  f"{fmt(r, 0)} µs vs HAProxy {fmt(h, 0)} µs")
    # epoll_wait per tx, counted both ways (see the rows' names).
    for m in ("sys/epoll_wait_perf", "sys/epoll_wait"):
        rh = ratio(rg(m), ha(m))
        out[m] = ("≤ HAProxy", None if rh is None else rh <= 1.0, f"{fmt_ratio(rh)} HAProxy")
    # The reconnect storm at 500 sessions.
    m = "storm/switchover/500/recovery_ms"
    out[m] = ("≤ 1,000 ms", None if rg(m) is None else rg(m) <= 1000, f"{fmt(rg(m), 0)} ms")
    m = "storm/switchover/500/refused"
    out[m] = ("0", None if rg(m) is None else rg(m) == 0, f"{fmt(rg(m), 0)}")
    m = "storm/switchover/500/rss_peak_kib"
    idle = rg("storm/switchover/500/rss_idle_kib")
    r = ratio(rg(m), idle)
    out[m] = ("≤ 2× the RSS before", None if r is None else r <= 2.0, f"{fmt_ratio(r)} the RSS before")
    m = "mem/per_session"
    if rg(m) is not None and ha(m) is not None:
        met = rg(m) <= ha(m) and rg(m) <= 16.0
        out[m] = ("≤ HAProxy and ≤ 16 KiB", met, f"{rg(m):.1f} KiB vs HAProxy {ha(m):.1f} KiB")
    else:
        out[m] = ("≤ HAProxy and ≤ 16 KiB", None, "")
    # The same failover targets on each stack measured.
    for stack in ("", f"@{SECOND_STACK}"):
        switchover, kill = f"failover/switchover{stack}", f"failover/kill{stack}"
        m = f"{switchover}/window_ms"
        rh = ratio(rg(m), ha(m))
        out[m] = ("≤ 1/5 of HAProxy (≤ 0.20×)", None if rh is None else rh <= 0.20, f"{fmt_ratio(rh)} HAProxy")
        m = f"{kill}/window_ms"
        limit = (float(meta.get("ttl", 20)) + 1.0) * 1000
        worst = mx(m)
        out[m] = (f"≤ ttl + 1 s = {limit / 1000:.0f} s (every run)", None if worst is None else worst <= limit,
                  "" if worst is None else f"worst {worst / 1000:.1f} s")
        m = f"{switchover}/connect_failures"
        worst = mx(m)
        out[m] = ("0 (every run)", None if worst is None else worst == 0, "")
        for ev in (switchover, kill):
            for k in ("readonly_refused", "recovery_sessions"):
                m = f"{ev}/{k}"
                worst = mx(m)
                out[m] = ("0 (every run): none reach the demoted leader", None if worst is None else worst == 0, "")
        # A switchover shuts the old leader down cleanly: nothing may be lost.
        m = f"{switchover}/missing"
        worst = mx(m)
        out[m] = ("0 (every run)", None if worst is None else worst == 0, "")
        # A kill -9 may lose the killed leader's last commits (asynchronous
        # replication; Patroni's maximum_lag_on_failover), whatever the proxy
        # does: only rows acknowledged after the outage began are the proxy's.
        m = f"{kill}/missing_after_outage"
        worst = mx(m)
        out[m] = ("0 lost by rolegate's fault (every run)", None if worst is None else worst == 0, "")
    return out


def build_table(data, meta):
    idle = meta.get("idle_sessions", "?")
    targets = evaluate_targets(data, meta)
    lines = [
        "| Measurement | Unit | rolegate | HAProxy | direct | rolegate ÷ HAProxy | rolegate ÷ direct | Target | Met? |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for metric, label, unit, dec, kind in ROWS:
        if metric not in data:
            continue
        label = label.format(idle=idle)
        cells = [cell(data, metric, t, dec, kind) for t in TARGETS]
        if kind == "counter" or metric.startswith(("latadd/", "latrateadd/")):
            rh = rd = None
        else:
            rh = ratio(med(data, metric, "rolegate"), med(data, metric, "haproxy"))
            rd = ratio(med(data, metric, "rolegate"), med(data, metric, "direct"))
        tgt, met, _ = targets.get(metric, ("", None, ""))
        mark = "" if not tgt else ("—" if met is None else ("met" if met else "**missed**"))
        lines.append(f"| {label} | {unit} | {cells[0]} | {cells[1]} | {cells[2]} | {fmt_ratio(rh)} | {fmt_ratio(rd)} | {tgt} | {mark} |")
    return "\n".join(lines), targets


def targets_summary(data, targets):
    label = {m: l for m, l, *_ in ROWS}
    out = []
    for m, (tgt, met, detail) in targets.items():
        if m not in data:
            continue
        state = "not measured" if met is None else ("met" if met else "MISSED")
        out.append(f"- {state}: {label[m].format(idle='N')} — target {tgt}" + (f"; measured {detail}" if detail else ""))
    return "\n".join(out)


def failover_errors(writer_dir):
    """One line per (event, proxy): every distinct error message the writer
    saw over all runs, with counts (from the writer-*.json files)."""
    agg = {}
    for name in sorted(os.listdir(writer_dir)):
        if not (name.startswith("writer-") and name.endswith(".json")):
            continue
        try:
            d = json.load(open(os.path.join(writer_dir, name)))
        except ValueError:
            continue
        event, target = d["run"].split("-")[:2]
        bucket = agg.setdefault((event, target), {})
        for msg, n in d.get("errors", {}).items():
            bucket[msg] = bucket.get(msg, 0) + n
    lines = []
    order = lambda ev: (ev.split("@")[1:], ev.split("@")[0] != "switchover")
    for (event, target), msgs in sorted(agg.items(), key=lambda kv: (order(kv[0][0]), kv[0][1])):
        text = "; ".join(f"{n} × `{m}`" for m, n in sorted(msgs.items(), key=lambda kv: -kv[1])) or "none"
        name = event.replace(f"@{SECOND_STACK}", f" ({SECOND_STACK_LABEL})")
        lines.append(f"- {name}, {'HAProxy' if target == 'haproxy' else target}: {text}")
    return "\n".join(lines) or "(no failover runs)"


PLACEHOLDER = ("_To be filled in by the rolegate developers: what was changed in rolegate "
               "to meet these targets, with the commits. Nothing is listed here yet._")
CHANGES_HEADING = "## What was changed to meet the targets"


def preserved_changes(path):
    """Keep the hand-written 'What was changed' section of an existing file."""
    try:
        text = open(path).read()
    except OSError:
        return PLACEHOLDER
    m = re.search(re.escape(CHANGES_HEADING) + r"\n(.*?)(?=\n## |\Z)", text, re.S)
    body = m.group(1).strip() if m else ""
    return body or PLACEHOLDER


def cmd_report(args):
    meta = {}
    with open(args.meta) as f:
        for line in f:
            if "\t" in line:
                k, v = line.rstrip("\n").split("\t", 1)
                meta[k] = v
    data = load_results(args.results)
    table, targets = build_table(data, meta)
    summary = targets_summary(data, targets)
    errors = failover_errors(args.writers) if args.writers else "(none)"
    print(table)
    print()
    print("Targets:")
    print(summary)
    print()
    print("Errors the failover writer saw:")
    print(errors)
    if not args.write:
        return
    changes = preserved_changes(args.write)
    doc = open(args.template).read()
    for k, v in meta.items():
        doc = doc.replace("@" + k.upper() + "@", v)
    doc = doc.replace("@TABLE@", table).replace("@TARGETS@", summary).replace("@FAILOVER_ERRORS@", errors)
    doc = doc.replace("@CHANGES@", changes)
    left = re.findall(r"@[A-Z_]+@", doc)
    if left:
        raise SystemExit(f"report: unfilled placeholders in {args.template}: {sorted(set(left))}")
    tmp = args.write + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.rename(tmp, args.write)
    print(f"\nwrote {args.write}", file=sys.stderr)


# --------------------------------------------------------------------- main --

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("free-ports")
    p.add_argument("n", type=int)
    p.set_defaults(fn=cmd_free_ports)

    p = sub.add_parser("haproxy-servers")
    p.add_argument("sock")
    p.set_defaults(fn=cmd_haproxy_servers)

    p = sub.add_parser("writer")
    p.add_argument("--dsn", required=True)
    p.add_argument("--check-dsn", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--event", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--rep", type=int, required=True)
    p.add_argument("--done", required=True)
    p.add_argument("--started", help="file bench/run creates when it starts the event")
    p.add_argument("--results", required=True)
    p.add_argument("--steady", type=float, default=3.0)
    p.add_argument("--max-after", type=float, default=60.0)
    p.add_argument("--max-total", type=float, default=300.0)
    p.set_defaults(fn=cmd_writer)

    p = sub.add_parser("storm")
    p.add_argument("--dsn", required=True)
    p.add_argument("--check-dsn", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--event", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--rep", type=int, required=True)
    p.add_argument("--pid", type=int, help="the proxy's PID (none for direct)")
    p.add_argument("--ready", required=True)
    p.add_argument("--started", required=True)
    p.add_argument("--done", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--rest", nargs=3, required=True, help="the members' Patroni REST base URLs")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds over which the sessions open")
    p.add_argument("--steady", type=float, default=3.0)
    p.add_argument("--max-after", type=float, default=60.0)
    p.add_argument("--max-total", type=float, default=300.0)
    p.set_defaults(fn=cmd_storm)

    p = sub.add_parser("burst")
    p.add_argument("--dsn", required=True, help="the leader, straight")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--rep", type=int, required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--max-total", type=float, default=120.0)
    p.set_defaults(fn=cmd_burst)

    p = sub.add_parser("max-connections")
    p.add_argument("n", type=int)
    p.add_argument("urls", nargs="+", help="Patroni REST base URLs, leader last")
    p.set_defaults(fn=cmd_max_connections)

    p = sub.add_parser("idle")
    p.add_argument("--dsn", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--release", required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(fn=cmd_idle)

    p = sub.add_parser("sched-delay")
    p.set_defaults(fn=cmd_sched_delay)
    p = sub.add_parser("pgbench-log-pct")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=cmd_pgbench_log_pct)

    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--writers", help="directory with the writer-*.json files")
    p.add_argument("--template")
    p.add_argument("--write")
    p.set_defaults(fn=cmd_report)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
