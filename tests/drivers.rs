//! Client drivers through rolegate, in front of the Patroni lab.
//!
//! Every client runs the same scenarios through both listeners (rw and ro;
//! writes only through rw): a simple query, the extended protocol with a
//! prepared statement and binds, a transaction rolled back, COPY in and out
//! of 10 MB, LISTEN/NOTIFY (rw only), a 50 MB result set and a cancelled
//! `pg_sleep`. Then, once per client, a switchover: the open write session
//! gets an error and a new connection reaches the new leader.
//!
//! Clients: libpq (psql, pgbench), tokio-postgres, psycopg 3 and
//! node-postgres. `tests/drivers/install.sh` installs the last two first
//! (fast when they are in place); their scenarios live in
//! `tests/drivers/psycopg_scenarios.py` and `tests/drivers/node/scenarios.js`.
//!
//! The scenarios run again through a second rolegate whose listeners pool
//! server connections (session mode, `pooled::…`).
//!
//! When a check fails through rolegate, the same scenario is run directly
//! against the members and both outcomes are reported: a failure through
//! rolegate that passes directly is a rolegate bug.
//!
//! Tests change the cluster (switchovers), so they run one at a time and
//! each leaves the cluster healthy (`lab/lab wait`).

mod support;

#[path = "drivers/fleet.rs"]
mod fleet;
#[path = "drivers/libpq.rs"]
mod libpq;
#[path = "drivers/process.rs"]
mod process;
#[path = "drivers/tokio_pg.rs"]
mod tokio_pg;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use nix::sys::signal::Signal;

use support::harness::check;
use support::lab::{Lab, MEMBERS};
use support::process::{alive, signal};
use support::rolegate::Rolegate;
use support::{conninfo, free_port, holds_within, runtime, wait_until};

use fleet::{fleet_trial, FleetEnv};
use libpq::{pgbench_scenario, psql_scenario, psql_switchover};
use process::{run_bounded, ChildGuard, Finished, Running};
use tokio_pg::{tokio_scenario, tokio_switchover};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The scenarios every client runs, in order.
const SCENARIOS: [&str; 7] = [
    "simple_query",
    "extended_prepared",
    "transaction_rollback",
    "copy_10mb",
    "listen_notify",
    "result_50mb",
    "cancel",
];
/// The clients that run every scenario (pgbench runs its own).
const DRIVERS: [Client; 4] = [
    Client::Psql,
    Client::TokioPostgres,
    Client::Psycopg,
    Client::NodePostgres,
];
/// LISTEN is refused on a hot standby: rw only.
const RW_ONLY: [&str; 1] = ["listen_notify"];
const PGBENCH_SCENARIOS: [&str; 2] = ["select_only", "prepared"];

const COPY_ROWS: u32 = 100_000;
const COPY_QUERY: &str =
    "select i, repeat(chr(97 + i % 26), 100) from generate_series(1, 100000) as i";
const BIG_ROWS: usize = 51_200;
const BIG_WIDTH: usize = 1024; // 50 MiB of text
const BIG_QUERY: &str = "select i, repeat('x', 1024) from generate_series(1, 51200) as i";

/// How long one client process may take for one scenario (both listeners).
const SCENARIO_LIMIT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    Psql,
    Pgbench,
    TokioPostgres,
    Psycopg,
    NodePostgres,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Psql => "psql",
            Client::Pgbench => "pgbench",
            Client::TokioPostgres => "tokio_postgres",
            Client::Psycopg => "psycopg",
            Client::NodePostgres => "node_postgres",
        }
    }
}

struct Env {
    lab: Lab,
    root: PathBuf,
    rolegate: Rolegate,
    rw: u16,
    ro: u16,
    /// A rolegate whose listeners pool (session mode), and their ports.
    pooled: Rolegate,
    pooled_rw: u16,
    pooled_ro: u16,
    python: PathBuf,
    counter: AtomicUsize,
    fleet: FleetEnv,
}

impl Env {
    fn start() -> Self {
        let root = std::env::temp_dir().join(format!("rolegate-drivers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("test root");
        let python = install_drivers();
        let lab = Lab::ensure_up();
        let (rw, ro) = (free_port(), free_port());
        let config = lab.rolegate_config(
            rw,
            ro,
            &lab.etcd_line(),
            "[limits]\nhold_timeout = \"30s\"\n",
        );
        let rolegate = Rolegate::start(&root, "drivers", &config);
        let (pooled, pooled_rw, pooled_ro) = start_pooled(&lab, &root);
        let fleet = FleetEnv::start(&lab, &root);
        Self {
            fleet,
            lab,
            root,
            rolegate,
            rw,
            ro,
            pooled,
            pooled_rw,
            pooled_ro,
            python,
            counter: AtomicUsize::new(0),
        }
    }

    /// A fresh path in the scratch directory.
    fn scratch(&self, what: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!("{n:04}-{what}"))
    }

    fn through_rolegate(&self) -> Ports {
        Ports {
            rw: self.rw,
            ro: self.ro,
            how: "through rolegate".to_owned(),
        }
    }

    fn through_pooled(&self) -> Ports {
        Ports {
            rw: self.pooled_rw,
            ro: self.pooled_ro,
            how: "through a pooled rolegate".to_owned(),
        }
    }

    /// The rolegate a trial runs through.
    fn proxy(&self, pooled: bool) -> &Rolegate {
        if pooled {
            &self.pooled
        } else {
            &self.rolegate
        }
    }

    /// The leader's and a replica's own PostgreSQL ports.
    fn direct(&self) -> Ports {
        let leader = self.lab.leader();
        let replica = MEMBERS
            .into_iter()
            .find(|m| *m != leader)
            .expect("a replica");
        Ports {
            rw: self.lab.pg_port(&leader),
            ro: self.lab.pg_port(replica),
            how: format!("directly ({leader} as rw, {replica} as ro)"),
        }
    }

    fn rolegate_log_tail(&self, lines: usize) -> String {
        log_tail(&self.rolegate, lines)
    }
}

/// The last `lines` of a rolegate's log.
fn log_tail(rolegate: &Rolegate, lines: usize) -> String {
    let log = rolegate.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A rolegate with pooled listeners (session mode) in front of the lab:
/// app's secret as the leader stores it; pool_size 4 per role.
fn start_pooled(lab: &Lab, root: &Path) -> (Rolegate, u16, u16) {
    let secret = lab.psql(
        &lab.leader(),
        "select rolpassword from pg_authid where rolname = 'app'",
    );
    let userlist = root.join("pooled-userlist.txt");
    std::fs::write(&userlist, format!("\"app\" \"{secret}\"\n")).expect("write userlist");
    let pooled = format!(
        "pool_mode = \"session\"\nauth_file = \"{}\"\npool_size = 4\n",
        userlist.display()
    );
    let (rw, ro) = (free_port(), free_port());
    let config = format!(
        "[clusters.demo]\nscope = \"demo\"\nnamespace = \"/service/\"\n{}\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:{rw}\"\ncluster = \"demo\"\nrole = \"primary\"\n{pooled}\n\
         [[listeners]]\nlisten = \"127.0.0.1:{ro}\"\ncluster = \"demo\"\nrole = \"replica\"\n{pooled}\n\
         [limits]\nhold_timeout = \"30s\"\n",
        lab.etcd_line()
    );
    (Rolegate::start(root, "drivers-pooled", &config), rw, ro)
}

/// Runs `tests/drivers/install.sh` and returns the venv's python.
fn install_drivers() -> PathBuf {
    let started = Instant::now();
    let output = Command::new(Path::new(REPO).join("tests/drivers/install.sh"))
        .stdin(Stdio::null())
        .output()
        .expect("run tests/drivers/install.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tests/drivers/install.sh failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut python = None;
    for line in stdout.lines() {
        match line.strip_prefix("python=") {
            Some(path) => python = Some(PathBuf::from(path)),
            None => println!("driver {line}"),
        }
    }
    println!("drivers installed/checked in {:.1?}", started.elapsed());
    python.expect("install.sh names the venv's python")
}

#[derive(Clone)]
struct Ports {
    rw: u16,
    ro: u16,
    how: String,
}

/// The outcome of one check: one client, one listener, one scenario.
struct Check {
    ok: bool,
    listener: String,
    scenario: String,
    detail: String,
}

impl Check {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            if self.ok { "ok" } else { "FAIL" },
            self.listener,
            self.scenario,
            self.detail
        )
    }
}

/// One test: runs against the shared environment.
type TrialFn = dyn FnOnce(&Env) -> Result<(), Failed> + Send;

fn main() {
    let mut args = Arguments::from_args();
    // One cluster, switchovers: one test at a time.
    args.test_threads = Some(1);
    let env = (!args.list).then(|| Arc::new(Env::start()));

    let mut trials = Vec::new();
    let mut add = |name: String, run: Box<TrialFn>| {
        let env = env.clone();
        trials.push(Trial::test(name, move || {
            let Some(env) = env else { return Ok(()) };
            if !alive(env.rolegate.pid()) {
                return Err(
                    format!("rolegate is not running:\n{}", env.rolegate_log_tail(40)).into(),
                );
            }
            let result = run(&env);
            // Whatever happened, hand the next test a healthy cluster.
            env.lab.run(&["wait"]);
            result
        }));
    };
    for client in DRIVERS {
        for scenario in SCENARIOS {
            add(
                format!("{}::{scenario}", client.name()),
                Box::new(move |env| scenario_trial(env, client, scenario, false)),
            );
        }
    }
    for scenario in PGBENCH_SCENARIOS {
        add(
            format!("pgbench::{scenario}"),
            Box::new(move |env| scenario_trial(env, Client::Pgbench, scenario, false)),
        );
    }
    // The same scenarios through pooled listeners (session mode).
    for client in DRIVERS {
        for scenario in SCENARIOS {
            add(
                format!("pooled::{}::{scenario}", client.name()),
                Box::new(move |env| scenario_trial(env, client, scenario, true)),
            );
        }
    }
    for scenario in PGBENCH_SCENARIOS {
        add(
            format!("pooled::pgbench::{scenario}"),
            Box::new(move |env| scenario_trial(env, Client::Pgbench, scenario, true)),
        );
    }
    // Through a fleet of three: cancels reach another instance than the
    // session's; own notifications carry the pid the client was given.
    for client in DRIVERS {
        add(
            format!("fleet::{}::cancel", client.name()),
            Box::new(move |env| fleet_trial(env, client, "cancel")),
        );
    }
    for client in [Client::Psycopg, Client::NodePostgres] {
        add(
            format!("fleet::{}::notify_self", client.name()),
            Box::new(move |env| fleet_trial(env, client, "notify_self")),
        );
    }
    // The corners one driver shows best: psycopg's cancel returns only
    // once the cancel was delivered; node-postgres's end() and
    // connect(); end() must raise no error event.
    for (client, scenario) in [
        (Client::Psycopg, "cancel_idle_then_query"),
        (Client::NodePostgres, "goodbye"),
    ] {
        add(
            format!("{}::{scenario}", client.name()),
            Box::new(move |env| scenario_trial(env, client, scenario, false)),
        );
    }
    // Last: each switchover moves the leader.
    for client in DRIVERS {
        add(
            format!("{}::switchover", client.name()),
            Box::new(move |env| switchover_trial(env, client)),
        );
    }

    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(env) = env {
        let root = env.root.clone();
        drop(env);
        let _ = std::fs::remove_dir_all(root);
    }
    conclusion.exit();
}

/// Runs one scenario through rolegate; on failure runs it directly against
/// the members too and reports both.
fn scenario_trial(env: &Env, client: Client, scenario: &str, pooled: bool) -> Result<(), Failed> {
    let started = Instant::now();
    let proxy = env.proxy(pooled);
    let forwarded = || proxy.metric("rolegate_cancel_requests_total", "outcome=\"forwarded\"");
    let forwarded_before = forwarded();
    let through = if pooled {
        env.through_pooled()
    } else {
        env.through_rolegate()
    };
    let mut checks = run_scenario(env, client, scenario, &through);
    if scenario == "cancel" {
        // Each cancel must have travelled through rolegate to its member.
        // The counter rises once the member has closed the cancel
        // connection, which may be after the client saw its error.
        let cancels = checks.len() as f64;
        let ok = holds_within(Duration::from_secs(5), || {
            forwarded() - forwarded_before == cancels
        });
        let delta = forwarded() - forwarded_before;
        checks.push(Check {
            ok,
            listener: "-".to_owned(),
            scenario: "cancel_forwarded".to_owned(),
            detail: format!(
                "rolegate_cancel_requests_total{{outcome=\"forwarded\"}} rose by {delta} for {} cancels",
                checks.len()
            ),
        });
    }
    for c in &checks {
        println!("    {}: {}", client.name(), c.line());
    }
    println!(
        "    {}::{scenario} took {:.1?}",
        client.name(),
        started.elapsed()
    );
    let expected = if PGBENCH_SCENARIOS.contains(&scenario) || !RW_ONLY.contains(&scenario) {
        2
    } else {
        1
    };
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(Check::line).collect();
    if failed.is_empty() && checks.len() >= expected {
        return Ok(());
    }
    let mut message = format!(
        "{} {scenario} {}: {} of {} checks failed (expected at least {expected}):\n  {}\n",
        client.name(),
        through.how,
        failed.len(),
        checks.len(),
        failed.join("\n  ")
    );
    let direct = env.direct();
    let direct_checks = run_scenario(env, client, scenario, &direct);
    let _ = writeln!(message, "the same scenario {}:", direct.how);
    for c in &direct_checks {
        let _ = writeln!(message, "  {}", c.line());
    }
    if !direct_checks.is_empty() && direct_checks.iter().all(|c| c.ok) {
        message.push_str("=> works directly, fails through rolegate: a rolegate bug\n");
    }
    let _ = writeln!(message, "rolegate log (tail):\n{}", log_tail(proxy, 30));
    Err(message.into())
}

fn run_scenario(env: &Env, client: Client, scenario: &str, ports: &Ports) -> Vec<Check> {
    match client {
        Client::Psycopg => run_script(env, python_command(env), scenario, ports),
        Client::NodePostgres => run_script(env, node_command(), scenario, ports),
        Client::Pgbench => pgbench_scenario(env, scenario, ports),
        Client::Psql | Client::TokioPostgres => {
            let mut checks = Vec::new();
            for (listener, port) in [("rw", ports.rw), ("ro", ports.ro)] {
                if listener == "ro" && RW_ONLY.contains(&scenario) {
                    continue;
                }
                let target = Target {
                    port,
                    writable: listener == "rw",
                };
                let result = if client == Client::Psql {
                    psql_scenario(env, scenario, &target)
                } else {
                    runtime().block_on(async {
                        match tokio::time::timeout(
                            SCENARIO_LIMIT,
                            tokio_scenario(scenario, &target),
                        )
                        .await
                        {
                            Ok(result) => result,
                            Err(_) => Err(format!("no result within {SCENARIO_LIMIT:?}")),
                        }
                    })
                };
                checks.push(Check {
                    ok: result.is_ok(),
                    listener: listener.to_owned(),
                    scenario: scenario.to_owned(),
                    detail: result.unwrap_or_else(|e| e),
                });
            }
            checks
        }
    }
}

fn python_command(env: &Env) -> Command {
    let mut command = Command::new(&env.python);
    command.arg(Path::new(REPO).join("tests/drivers/psycopg_scenarios.py"));
    command
}

fn node_command() -> Command {
    let mut command = Command::new("node");
    command.arg(Path::new(REPO).join("tests/drivers/node/scenarios.js"));
    command
}

/// The COPY scenario's rows, as PostgreSQL's text format writes them.
fn copy_bytes() -> Vec<u8> {
    let mut data = Vec::with_capacity(11 << 20);
    for i in 1..=COPY_ROWS {
        let c = char::from(b'a' + (i % 26) as u8);
        data.extend_from_slice(format!("{i}\t").as_bytes());
        data.extend(std::iter::repeat_n(c as u8, 100));
        data.push(b'\n');
    }
    data
}

/// `pg_is_in_recovery()` as psql prints it for the listener.
fn recovery_flag(writable: bool) -> &'static str {
    if writable {
        "f"
    } else {
        "t"
    }
}

struct Target {
    port: u16,
    writable: bool,
}

// ---------------------------------------------------------------------------
// Python and Node: one script run per scenario, one output line per check

fn run_script(env: &Env, mut command: Command, scenario: &str, ports: &Ports) -> Vec<Check> {
    command.args([
        "--rw",
        &ports.rw.to_string(),
        "--ro",
        &ports.ro.to_string(),
        scenario,
    ]);
    let finished = match run_bounded(env, scenario, &mut command, SCENARIO_LIMIT) {
        Ok(f) => f,
        Err(e) => return vec![script_failure(scenario, e)],
    };
    let mut checks = parse_checks(&finished.stdout());
    if !finished.success() && checks.iter().all(|c| c.ok) {
        checks.push(script_failure(
            scenario,
            format!(
                "script exited {}:\n{}\n{}",
                finished.describe(),
                finished.stdout(),
                finished.stderr
            ),
        ));
    }
    checks
}

fn script_failure(scenario: &str, detail: String) -> Check {
    Check {
        ok: false,
        listener: "-".to_owned(),
        scenario: scenario.to_owned(),
        detail,
    }
}

fn parse_checks(stdout: &str) -> Vec<Check> {
    stdout
        .lines()
        .filter_map(|line| {
            let (ok, rest) = if let Some(rest) = line.strip_prefix("ok ") {
                (true, rest)
            } else {
                (false, line.strip_prefix("FAIL ")?)
            };
            let mut parts = rest.splitn(3, ' ');
            Some(Check {
                ok,
                listener: parts.next()?.to_owned(),
                scenario: parts.next()?.to_owned(),
                detail: parts.next().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Switchover: the open write session gets an error, a new one reaches the
// new leader.

/// Runs `lab/lab switchover` and returns the new leader's PostgreSQL port.
fn switchover(env: &Env) -> Result<(String, String, u16), String> {
    let old = env.lab.leader();
    let started = Instant::now();
    let new = env
        .lab
        .run(&["switchover"])
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    if new == old || !MEMBERS.contains(&new.as_str()) {
        return Err(format!("switchover from {old} gave {new:?}"));
    }
    println!("    switchover {old} -> {new} in {:.1?}", started.elapsed());
    let port = env.lab.pg_port(&new);
    Ok((old, new, port))
}

fn switchover_trial(env: &Env, client: Client) -> Result<(), Failed> {
    let checks = match client {
        Client::Psql => psql_switchover(env)?,
        Client::TokioPostgres => tokio_switchover(env)?,
        Client::Psycopg | Client::NodePostgres => {
            let command = if client == Client::Psycopg {
                python_command(env)
            } else {
                node_command()
            };
            script_switchover(env, command)?
        }
        Client::Pgbench => unreachable!("pgbench has no switchover test"),
    };
    for c in &checks {
        println!("    {}: {}", client.name(), c.line());
    }
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(Check::line).collect();
    check(
        failed.is_empty() && checks.len() >= 2,
        format!(
            "{} switchover: {}\nrolegate log (tail):\n{}",
            client.name(),
            if failed.is_empty() {
                "no checks ran".to_owned()
            } else {
                failed.join("\n")
            },
            env.rolegate_log_tail(30)
        ),
    )
}

fn switchover_check(scenario: &str, result: Result<String, String>) -> Check {
    Check {
        ok: result.is_ok(),
        listener: "rw".to_owned(),
        scenario: scenario.to_owned(),
        detail: result.unwrap_or_else(|e| e),
    }
}

/// Polls a new rw session until it reaches `port` writable (30 s at most).
fn reconnect_until(port: u16, mut attempt: impl FnMut() -> Result<u16, String>) -> Check {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = attempt();
        match last {
            Ok(reached) if reached == port => {
                return switchover_check(
                    "switchover_reconnect",
                    Ok(format!("attempt {attempts}: port {reached} writable")),
                )
            }
            other if Instant::now() > deadline => {
                return switchover_check(
                    "switchover_reconnect",
                    Err(format!(
                        "after {attempts} attempts: {other:?}; new leader on {port}"
                    )),
                )
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
/// The Python and Node scripts' `switchover` mode: they print `ready`,
/// read the new leader's port, and report their checks.
fn script_switchover(env: &Env, mut command: Command) -> Result<Vec<Check>, String> {
    command.args([
        "--rw",
        &env.rw.to_string(),
        "--ro",
        &env.ro.to_string(),
        "switchover",
    ]);
    let err_path = env.scratch("switchover.err");
    let mut child = ChildGuard(
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&err_path).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?,
    );
    let stdout = child.0.stdout.take().ok_or("stdout")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "the script did not get ready within 30 s".to_owned())?;
    if !first.starts_with("ready") {
        return Err(format!("the script said {first:?}"));
    }
    let (_old, _new, port) = switchover(env)?;
    let mut stdin = child.0.stdin.take().ok_or("stdin")?;
    writeln!(stdin, "{port}").map_err(|e| e.to_string())?;
    drop(stdin);
    // The reader ends at the script's exit (EOF) or after 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut output = String::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        output.push_str(&line);
        output.push('\n');
    }
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break Some(status),
            _ if Instant::now() > deadline => break None,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    drop(child);
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let mut checks = parse_checks(&output);
    if !status.is_some_and(|s| s.success()) && checks.iter().all(|c| c.ok) {
        checks.push(script_failure(
            "switchover",
            format!("script exited {status:?}: {output}{stderr}"),
        ));
    }
    Ok(checks)
}
