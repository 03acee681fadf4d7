//! libpq through rolegate: psql and pgbench.

use super::*;

pub(crate) fn psql_command(port: u16, application: &str) -> Command {
    let mut command = Command::new("psql");
    command
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
            "-d",
        ])
        .arg(format!(
            "{} application_name={application}",
            conninfo(port, "app", "app")
        ));
    command
}

/// Runs psql with `-c sql`.
pub(crate) fn psql_c(env: &Env, port: u16, sql: &str) -> Result<Finished, String> {
    run_bounded(
        env,
        "psql",
        psql_command(port, "drivers-psql").args(["-c", sql]),
        SCENARIO_LIMIT,
    )
}

/// Runs psql with a script file; fails unless it exits 0.
pub(crate) fn psql_script(env: &Env, port: u16, script: &str) -> Result<String, String> {
    let path = env.scratch("script.sql");
    std::fs::write(&path, script).map_err(|e| e.to_string())?;
    let finished = run_bounded(
        env,
        "psql",
        psql_command(port, "drivers-psql").arg("-f").arg(&path),
        SCENARIO_LIMIT,
    )?;
    let _ = std::fs::remove_file(&path);
    if finished.success() {
        Ok(finished.stdout())
    } else {
        Err(format!(
            "psql exited {}: {}",
            finished.describe(),
            finished.stderr.trim()
        ))
    }
}

pub(crate) fn ok_output(finished: Finished) -> Result<String, String> {
    if finished.success() {
        Ok(finished.stdout())
    } else {
        Err(format!(
            "psql exited {}: {}",
            finished.describe(),
            finished.stderr.trim()
        ))
    }
}

pub(crate) fn expect_eq(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, expected {want:?}"))
    }
}

pub(crate) fn psql_scenario(env: &Env, scenario: &str, t: &Target) -> Result<String, String> {
    let port = t.port;
    match scenario {
        "simple_query" => {
            // Two statements in one -c string: one simple Query message.
            let out = ok_output(psql_c(
                env,
                port,
                "select 1; select pg_is_in_recovery(), inet_server_port()",
            )?)?;
            let lines: Vec<&str> = out.lines().collect();
            let (one, row) = match lines.as_slice() {
                [one, row] => (*one, *row),
                _ => return Err(format!("unexpected output {out:?}")),
            };
            expect_eq("select 1", one, "1")?;
            let (recovery, server_port) = row.split_once('|').ok_or(format!("row {row:?}"))?;
            expect_eq("pg_is_in_recovery()", recovery, recovery_flag(t.writable))?;
            Ok(format!("server port {server_port} in_recovery={recovery}"))
        }
        "extended_prepared" => {
            // psql 15 has no \bind, so its statements always travel as
            // simple queries; this is a server-side prepared statement with
            // binds through SQL. libpq's extended protocol (Parse/Bind/
            // Execute) runs in pgbench -M prepared.
            let out = psql_script(
                env,
                port,
                "prepare drv(int, text) as select $1 * 2, $2 || '!', pg_is_in_recovery();\n\
                 execute drv(1, 'v1');\nexecute drv(2, 'v2');\nexecute drv(3, 'v3');\n",
            )?;
            let flag = recovery_flag(t.writable);
            expect_eq(
                "executions",
                out.trim_end(),
                &format!("2|v1!|{flag}\n4|v2!|{flag}\n6|v3!|{flag}"),
            )?;
            Ok("SQL PREPARE + 3 EXECUTEs with binds (psql 15 has no \\bind)".to_owned())
        }
        "transaction_rollback" => {
            if t.writable {
                let out = psql_script(
                    env,
                    port,
                    "create temp table drv_tx (v int);\nbegin;\n\
                     insert into drv_tx select generate_series(1, 3);\n\
                     select count(*) from drv_tx;\nrollback;\nselect count(*) from drv_tx;\n",
                )?;
                expect_eq("counts inside and after", out.trim_end(), "3\n0")?;
                return Ok("3 inserted rows rolled back".to_owned());
            }
            let out = psql_script(
                env,
                port,
                "begin;\nset local statement_timeout = '1234ms';\nshow statement_timeout;\n\
                 rollback;\nshow statement_timeout;\n\\set ON_ERROR_STOP 0\nbegin;\n\
                 create temp table drv_tx (v int);\nrollback;\nselect 'usable';\n",
            );
            // psql exits 0 with ON_ERROR_STOP off, even after the error.
            let out = out?;
            let lines: Vec<&str> = out.lines().collect();
            let reverted =
                matches!(lines.as_slice(), ["1234ms", after, "usable"] if *after != "1234ms");
            if !reverted {
                return Err(format!("unexpected output {out:?}"));
            }
            // The refusal itself goes to stderr; check it on its own.
            let refused = psql_c(
                env,
                port,
                "begin; create temp table drv_tx2 (v int); rollback",
            )?;
            if refused.success() || !refused.stderr.contains("25006") {
                return Err(format!(
                    "write on the ro listener: {}",
                    refused.stderr.trim()
                ));
            }
            Ok("SET LOCAL rolled back; write refused with 25006, session usable".to_owned())
        }
        "copy_10mb" => {
            let data = copy_bytes();
            let input = env.scratch("copy-in.tsv");
            let output = env.scratch("copy-out.tsv");
            std::fs::write(&input, &data).map_err(|e| e.to_string())?;
            let script = if t.writable {
                format!(
                    "create temp table drv_copy (i int, t text);\n\\copy drv_copy from '{}'\n\
                     \\copy (select i, t from drv_copy order by i) to '{}'\n",
                    input.display(),
                    output.display()
                )
            } else {
                format!("\\copy ({COPY_QUERY}) to '{}'\n", output.display())
            };
            let result = psql_script(env, port, &script);
            let got = std::fs::read(&output).unwrap_or_default();
            let _ = std::fs::remove_file(&input);
            let _ = std::fs::remove_file(&output);
            result?;
            if got != data {
                return Err(format!(
                    "COPY TO returned {} bytes, differing from the {} expected",
                    got.len(),
                    data.len()
                ));
            }
            Ok(format!(
                "{} bytes {}, identical",
                data.len(),
                if t.writable { "in and back out" } else { "out" }
            ))
        }
        "listen_notify" => {
            let script = env.scratch("listen.sql");
            std::fs::write(
                &script,
                "listen drv_channel;\nselect pg_sleep(5);\nselect 'done';\n",
            )
            .map_err(|e| e.to_string())?;
            let listener = Running::spawn(
                env,
                "psql-listen",
                psql_command(port, "drivers-psql-listener")
                    .arg("-f")
                    .arg(&script),
                Stdio::null(),
            )?;
            // Notify once the listener sits in pg_sleep (same server: rw).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = ok_output(psql_c(
                    env,
                    port,
                    "select count(*) from pg_stat_activity where application_name = \
                     'drivers-psql-listener' and state = 'active' and query like '%pg_sleep%'",
                )?)?;
                if out.trim() == "1" {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("the listening session never reached pg_sleep".to_owned());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let notify = ok_output(psql_c(
                env,
                port,
                "select pg_backend_pid(); select pg_notify('drv_channel', 'from psql')",
            )?)?;
            let pid = notify.lines().next().unwrap_or("").trim().to_owned();
            let heard = listener.finish(Duration::from_secs(30));
            let _ = std::fs::remove_file(&script);
            let stdout = heard.stdout();
            let want = format!(
                "Asynchronous notification \"drv_channel\" with payload \"from psql\" received from server process with PID {pid}."
            );
            if heard.success() && stdout.contains(&want) {
                Ok(format!("notification from pid {pid} received"))
            } else {
                Err(format!(
                    "listener exited {}; stdout {stdout:?}; stderr {:?}",
                    heard.describe(),
                    heard.stderr
                ))
            }
        }
        "result_50mb" => {
            let finished = psql_c(env, port, BIG_QUERY)?;
            let took = finished.elapsed;
            if !finished.success() {
                return ok_output(finished);
            }
            let (mut rows, mut bytes) = (0usize, 0usize);
            for line in finished
                .stdout
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
            {
                rows += 1;
                let text = line.split(|b| *b == b'|').nth(1).unwrap_or_default();
                if text.iter().all(|b| *b == b'x') {
                    bytes += text.len();
                }
            }
            if rows == BIG_ROWS && bytes == BIG_ROWS * BIG_WIDTH {
                Ok(format!("{rows} rows, {bytes} bytes of text in {took:.2?}"))
            } else {
                Err(format!("{rows} rows, {bytes} bytes"))
            }
        }
        "cancel" => {
            // SIGINT makes psql send a CancelRequest on a new connection.
            let running = Running::spawn(
                env,
                "psql-cancel",
                psql_command(port, "drivers-psql").args(["-c", "select pg_sleep(60)"]),
                Stdio::null(),
            )?;
            std::thread::sleep(Duration::from_secs(1));
            signal(running.pid(), Signal::SIGINT);
            let finished = running.finish(Duration::from_secs(20));
            if finished.stderr.contains("57014") && finished.elapsed < Duration::from_secs(15) {
                Ok(format!(
                    "cancelled after {:.2?} (57014); psql exits {} (it ends a -c run on error)",
                    finished.elapsed,
                    finished.describe()
                ))
            } else {
                Err(format!(
                    "psql exited {} after {:.1?}: {}",
                    finished.describe(),
                    finished.elapsed,
                    finished.stderr.trim()
                ))
            }
        }
        other => Err(format!("unknown scenario {other}")),
    }
}

// ---------------------------------------------------------------------------
// libpq: pgbench

pub(crate) fn pgbench(env: &Env, port: u16, args: &[&str]) -> Result<String, String> {
    let finished = run_bounded(
        env,
        "pgbench",
        Command::new("pgbench").args(args).arg(format!(
            "{} application_name=drivers-pgbench",
            conninfo(port, "app", "app")
        )),
        SCENARIO_LIMIT,
    )?;
    if finished.success() {
        Ok(finished.stdout() + &finished.stderr)
    } else {
        Err(format!(
            "pgbench {} exited {}: {}{}",
            args.join(" "),
            finished.describe(),
            finished.stdout(),
            finished.stderr.trim()
        ))
    }
}

/// Creates pgbench's tables (scale 1) through `ports.rw` unless they are
/// there at that scale, and waits until `ports.ro` sees them.
pub(crate) fn ensure_pgbench_tables(env: &Env, ports: &Ports) -> Result<Option<String>, String> {
    // An error (no such table) or another scale both mean: initialise.
    let branches = psql_c(env, ports.rw, "select count(*) from pgbench_branches")?;
    let mut done = None;
    if !branches.success() || branches.stdout().trim() != "1" {
        let started = Instant::now();
        pgbench(env, ports.rw, &["-i", "-s", "1", "-q"])?;
        done = Some(format!("pgbench -i -s 1 in {:.1?}", started.elapsed()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = psql_c(env, ports.ro, "select count(*) from pgbench_branches")?;
        if seen.success() && seen.stdout().trim() == "1" {
            return Ok(done);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "pgbench tables not visible on ro: {}",
                seen.stderr.trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Summary of a pgbench run: processed transactions and tps.
pub(crate) fn pgbench_summary(out: &str, expected: u32) -> Result<String, String> {
    let processed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .ok_or(format!("no transaction count in {out:?}"))?;
    let failed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .unwrap_or("0");
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps = "))
        .unwrap_or("")
        .trim_end_matches(" (without initial connection time)");
    if processed != format!("{expected}/{expected}") || !failed.starts_with("0 ") && failed != "0" {
        return Err(format!("processed {processed}, failed {failed}"));
    }
    Ok(format!("{processed} transactions, {tps}"))
}

pub(crate) fn pgbench_scenario(env: &Env, scenario: &str, ports: &Ports) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut push = |listener: &str, result: Result<String, String>| {
        checks.push(Check {
            ok: result.is_ok(),
            listener: listener.to_owned(),
            scenario: scenario.to_owned(),
            detail: result.unwrap_or_else(|e| e),
        });
    };
    match ensure_pgbench_tables(env, ports) {
        Ok(Some(init)) => push("rw", Ok(init)),
        Ok(None) => {}
        Err(e) => {
            push("rw", Err(format!("init: {e}")));
            return checks;
        }
    }
    // 4 clients, 2 threads, a fixed number of transactions each: bounded
    // in count, and in time by SCENARIO_LIMIT.
    let runs: [(&str, u16, Vec<&str>, u32); 2] = match scenario {
        "select_only" => [
            (
                "rw",
                ports.rw,
                vec!["-n", "-S", "-c", "4", "-j", "2", "-t", "250"],
                1000,
            ),
            (
                "ro",
                ports.ro,
                vec!["-n", "-S", "-c", "4", "-j", "2", "-t", "250"],
                1000,
            ),
        ],
        _ => [
            // The default TPC-B-like script writes: rw only; ro runs -S.
            (
                "rw",
                ports.rw,
                vec!["-n", "-M", "prepared", "-c", "4", "-j", "2", "-t", "100"],
                400,
            ),
            (
                "ro",
                ports.ro,
                vec![
                    "-n", "-M", "prepared", "-S", "-c", "4", "-j", "2", "-t", "250",
                ],
                1000,
            ),
        ],
    };
    for (listener, port, args, expected) in runs {
        let result = pgbench(env, port, &args)
            .and_then(|out| pgbench_summary(&out, expected))
            .map(|s| format!("pgbench {}: {s}", args.join(" ")));
        push(listener, result);
    }
    checks
}

pub(crate) fn psql_switchover(env: &Env) -> Result<Vec<Check>, String> {
    let mut running = Running::spawn(
        env,
        "psql-switchover",
        psql_command(env.rw, "drivers-psql-switchover").args(["-v", "ON_ERROR_STOP=1"]),
        Stdio::piped(),
    )?;
    let mut stdin = running.child.stdin.take().ok_or("psql stdin")?;
    writeln!(stdin, "select inet_server_port();").map_err(|e| e.to_string())?;
    // Wait until the session is open on the leader.
    let leader = env.lab.leader();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.lab.psql(
        &leader,
        "select count(*) from pg_stat_activity where application_name = 'drivers-psql-switchover'",
    ) != "1"
    {
        if Instant::now() > deadline {
            return Err("the psql session did not appear on the leader".to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_old, _new, port) = switchover(env)?;
    writeln!(stdin, "select 'still here';").map_err(|e| e.to_string())?;
    drop(stdin);
    let finished = running.finish(Duration::from_secs(20));
    let old_session = if finished.success() && finished.stdout().contains("still here") {
        Err(format!(
            "the session on the old leader still answers: {:?}",
            finished.stdout()
        ))
    } else {
        Ok(format!(
            "psql exited {}: {}",
            finished.describe(),
            finished.stderr.trim().replace('\n', " | ")
        ))
    };
    let mut checks = vec![switchover_check("switchover_old_session", old_session)];
    checks.push(reconnect_until(port, || {
        let out = ok_output(psql_c(
            env,
            env.rw,
            "create temp table drv_after (v int); select pg_is_in_recovery(), inet_server_port()",
        )?)?;
        match out.trim().split_once('|') {
            Some(("f", p)) => p.parse().map_err(|_| out.clone()),
            _ => Err(out.clone()),
        }
    }));
    Ok(checks)
}
