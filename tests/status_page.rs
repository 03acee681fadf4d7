//! What an operator sees, in front of the real lab: the status page in a
//! real browser (headless Chromium) before and after a switchover, the
//! token that guards it, and `rolegate status` with its exit codes.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use nix::sys::signal::Signal;
use serde_json::Value;

use support::browser;
use support::harness::{by_name, check, run_suite, TestFn};
use support::lab::{http_request, MEMBERS};
use support::lab_suite::LabSuite;
use support::process::stop_pid;
use support::rolegate::Rolegate;
use support::routes::wait_for_writable_leader;
use support::{free_port, runtime};

type Env = LabSuite;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        the_status_page_shows_a_switchover,
        the_page_and_its_data_are_behind_the_token,
        status_exits_one_without_a_primary_and_two_without_an_endpoint
    ];
    run_suite(tests, || LabSuite::start("status-page"), true);
}

fn page_url(rolegate: &Rolegate) -> String {
    format!("http://127.0.0.1:{}/", rolegate.admin_port)
}

/// Runs `rolegate status` with `args`.
fn rolegate_status(args: &[&str]) -> Result<Output, Failed> {
    Ok(Command::new(env!("CARGO_BIN_EXE_rolegate"))
        .arg("status")
        .args(args)
        .env_remove("ROLEGATE_ADMIN_TOKEN")
        .env("ROLEGATE_CONFIG", "/nonexistent/rolegate.toml")
        .output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The page as the browser drew it: it drew the data, every member, and
/// `leader` as the cluster's leader.
fn check_drawn(dom: &str, leader: &str) -> Result<(), Failed> {
    check(
        dom.contains("data-rendered=\"yes\""),
        format!("the page drew no data:\n{dom}"),
    )?;
    for member in MEMBERS {
        check(
            dom.contains(&format!("data-member=\"{member}\"")),
            format!("member {member} missing from the page"),
        )?;
    }
    check(
        dom.contains(&format!("data-cluster=\"demo\" data-leader=\"{leader}\"")),
        format!("the page does not show {leader} as the leader"),
    )
}

/// The `/events` answer once `check` accepts it, within `limit`.
fn wait_for_events(
    rolegate: &Rolegate,
    limit: Duration,
    accept: impl Fn(&Value) -> bool,
) -> Result<Value, Failed> {
    let started = Instant::now();
    loop {
        if let Some((200, body)) = rolegate.admin_get("/events") {
            if let Ok(events) = serde_json::from_str::<Value>(&body) {
                if accept(&events) {
                    return Ok(events);
                }
                if started.elapsed() > limit {
                    return Err(format!("/events never showed what was expected: {body}").into());
                }
            }
        }
        if started.elapsed() > limit {
            return Err("/events did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn the_status_page_shows_a_switchover(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, _ro) = env.default_rolegate("page");
    let profile = env.root.join("chromium-page");
    let old = runtime().block_on(wait_for_writable_leader(
        &env.lab,
        rw,
        None,
        Duration::from_secs(20),
    ))?;
    let before = browser::dump_dom(&page_url(&rolegate), &profile)?;
    check_drawn(&before, &old)?;
    check(
        before.contains(&format!("{old} confirmed as leader by")),
        "the timeline shows the first confirmation",
    )?;

    // A client keeps trying to write while the lab switches over, so the
    // new leader's first session comes as soon as rolegate serves it.
    let new = std::thread::scope(|scope| {
        let switchover = scope.spawn(|| env.lab.run(&["switchover"]));
        let new = runtime().block_on(wait_for_writable_leader(
            &env.lab,
            rw,
            Some(&old),
            Duration::from_secs(60),
        ));
        let _ = switchover.join();
        new
    })?;
    // The session that found the new leader was its first through rolegate.
    let events = wait_for_events(&rolegate, Duration::from_secs(20), |events| {
        let phases = &events["last_failover"]["demo"];
        phases["to"] == new.as_str()
            && phases["phases"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["phase"] == "first session served"))
    })?;
    let phases = &events["last_failover"]["demo"];
    check(
        phases["from"] == old.as_str() && phases["kind"] == "switchover",
        format!("last failover: {phases}"),
    )?;
    let names: Vec<_> = phases["phases"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["phase"].as_str()).collect())
        .unwrap_or_default();
    for phase in ["requested", "leader key moved", "new leader confirmed"] {
        check(
            names.contains(&phase),
            format!("phase {phase:?} missing: {names:?}"),
        )?;
    }

    let after = browser::dump_dom(&page_url(&rolegate), &profile)?;
    check_drawn(&after, &new)?;
    for wanted in [
        format!("{new} confirmed as leader (was {old})"),
        format!("data-failover-to=\"{new}\""),
        "switchover requested".to_owned(),
        "first session served".to_owned(),
    ] {
        check(
            after.contains(&wanted),
            format!("{wanted:?} missing from the page"),
        )?;
    }
    let shot = env.root.join("status-page.png");
    browser::screenshot(&page_url(&rolegate), &shot, &profile)?;
    let png = std::fs::read(&shot)?;
    check(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        format!("a screenshot of {} bytes", png.len()),
    )?;
    if let Some(dir) = std::env::var_os("ROLEGATE_SCREENSHOT_DIR") {
        std::fs::copy(&shot, std::path::Path::new(&dir).join("status-page.png"))?;
    }

    let admin = format!("http://127.0.0.1:{}", rolegate.admin_port);
    let shown = rolegate_status(&["--admin", &admin])?;
    let table = text(&shown.stdout);
    check(
        shown.status.code() == Some(0),
        format!(
            "rolegate status exited {:?}: {}",
            shown.status,
            text(&shown.stderr)
        ),
    )?;
    for wanted in [
        format!("Cluster demo  leader {new} (confirmed by"),
        format!("{new} confirmed as leader (was {old})"),
        "Listeners".to_owned(),
    ] {
        check(
            table.contains(&wanted),
            format!("{wanted:?} missing from:\n{table}"),
        )?;
    }
    for member in MEMBERS {
        check(
            table.lines().any(|l| l.starts_with(member)),
            format!("no row for {member}:\n{table}"),
        )?;
    }
    // --watch redraws every second until stopped.
    let watching = Command::new(env!("CARGO_BIN_EXE_rolegate"))
        .args(["status", "--watch", "--admin", &admin])
        .env("ROLEGATE_CONFIG", "/nonexistent/rolegate.toml")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(2_500));
    stop_pid(
        watching.id() as i32,
        Signal::SIGTERM,
        Duration::from_secs(5),
    );
    let watched = watching.wait_with_output()?;
    let frames = text(&watched.stdout).matches("\x1b[2J").count();
    check(
        (2..=4).contains(&frames),
        format!("--watch drew {frames} frames in 2.5 s"),
    )?;

    let unknown = rolegate_status(&["--admin", &admin, "--cluster", "nosuch"])?;
    check(
        unknown.status.code() == Some(2) && text(&unknown.stderr).contains("\"nosuch\""),
        format!(
            "an unknown cluster: {:?} {}",
            unknown.status,
            text(&unknown.stderr)
        ),
    )
}

fn the_page_and_its_data_are_behind_the_token(env: &Env) -> Result<(), Failed> {
    let admin_port = free_port();
    let config = env.lab.rolegate_config(
        free_port(),
        free_port(),
        &env.lab.etcd_line(),
        &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"s3cret;x\"\n"),
    );
    let mut rolegate = Rolegate::start(&env.root, "token", &config);
    rolegate.admin_port = admin_port;
    let request = |method: &str, path: &str, headers: &[&str], body: &str| {
        http_request(admin_port, method, path, headers, body)
            .ok_or_else(|| Failed::from(format!("{method} {path}: no answer")))
    };

    for path in ["/", "/cluster", "/events"] {
        let (status, _, _) = request("GET", path, &[], "")?;
        check(
            status == 401,
            format!("GET {path} without the token: {status}"),
        )?;
    }
    let (status, _, _) = request("GET", "/cluster", &["Authorization: Bearer s3cret;x"], "")?;
    check(status == 200, format!("bearer token: {status}"))?;
    let form = ["Content-Type: application/x-www-form-urlencoded"];
    let (status, head, _) = request("POST", "/login", &form, "token=guess")?;
    check(
        status == 401 && !head.to_ascii_lowercase().contains("set-cookie"),
        format!("a wrong token: {status}\n{head}"),
    )?;
    let (status, head, _) = request("POST", "/login", &form, "token=s3cret%3Bx")?;
    check(status == 303, format!("sign-in: {status}\n{head}"))?;
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .ok_or_else(|| Failed::from(format!("no cookie set:\n{head}")))?
        .to_owned();
    check(
        head.contains("HttpOnly") && head.contains("SameSite=Strict"),
        format!("cookie attributes:\n{head}"),
    )?;
    let with_cookie = format!("Cookie: {cookie}");
    for path in ["/", "/cluster", "/events"] {
        let (status, _, _) = request("GET", path, &[&with_cookie], "")?;
        check(status == 200, format!("GET {path} signed in: {status}"))?;
    }

    // The browser without the cookie gets the sign-in form and no data.
    let dom = browser::dump_dom(&page_url(&rolegate), &env.root.join("chromium-token"))?;
    check(
        dom.contains("id=\"signin\" method=\"post\" action=\"/login\" style=\"display: block;\"")
            && !dom.contains("data-rendered=\"yes\""),
        format!("the page without the token:\n{dom}"),
    )?;

    let admin = format!("http://127.0.0.1:{admin_port}");
    let refused = rolegate_status(&["--admin", &admin])?;
    check(
        refused.status.code() == Some(2) && text(&refused.stderr).contains("--token"),
        format!(
            "status without the token: {:?} {}",
            refused.status,
            text(&refused.stderr)
        ),
    )?;
    let shown = rolegate_status(&["--admin", &admin, "--token", "s3cret;x"])?;
    check(
        shown.status.code() == Some(0),
        format!(
            "status with the token: {:?} {}",
            shown.status,
            text(&shown.stderr)
        ),
    )
}

fn status_exits_one_without_a_primary_and_two_without_an_endpoint(env: &Env) -> Result<(), Failed> {
    // A scope no Patroni cluster uses: etcd answers, no leader ever shows.
    let config = env
        .lab
        .rolegate_config(free_port(), free_port(), &env.lab.etcd_line(), "")
        .replace("scope = \"demo\"", "scope = \"absent\"");
    let rolegate = Rolegate::start(&env.root, "leaderless", &config);
    let admin = format!("http://127.0.0.1:{}", rolegate.admin_port);
    let shown = rolegate_status(&["--admin", &admin])?;
    check(
        shown.status.code() == Some(1) && text(&shown.stdout).contains("leader NONE"),
        format!(
            "status without a primary: {:?}\n{}",
            shown.status,
            text(&shown.stdout)
        ),
    )?;
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let unreachable = rolegate_status(&["--admin", &nowhere])?;
    check(
        unreachable.status.code() == Some(2)
            && text(&unreachable.stderr).contains("cannot reach the admin endpoint"),
        format!(
            "status without an endpoint: {:?} {}",
            unreachable.status,
            text(&unreachable.stderr)
        ),
    )
}
