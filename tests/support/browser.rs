//! A real browser: Debian's `chromium`, headless, one run per page load.
//! Each run gets a fresh profile directory and its own process group,
//! which is killed by id when the run overstays its limit.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Longest one browser run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Virtual time the page gets to fetch and draw before the browser
/// reports it: two refreshes of the status page.
const PAGE_TIME_MS: u32 = 4500;

/// The DOM of `url` after its scripts ran.
pub fn dump_dom(url: &str, profile: &Path) -> Result<String, String> {
    let output = run(&["--dump-dom", url], profile)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A PNG screenshot of `url` in a 1400×1000 window, written to `to`.
pub fn screenshot(url: &str, to: &Path, profile: &Path) -> Result<(), String> {
    run(
        &[
            "--window-size=1400,1000",
            "--hide-scrollbars",
            &format!("--screenshot={}", to.display()),
            url,
        ],
        profile,
    )?;
    Ok(())
}

fn run(args: &[&str], profile: &Path) -> Result<Output, String> {
    let _ = std::fs::remove_dir_all(profile);
    std::fs::create_dir_all(profile).map_err(|e| format!("profile dir: {e}"))?;
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--virtual-time-budget={PAGE_TIME_MS}"),
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start chromium (scripts/deps.sh installs it): {e}"))?;
    let group = Pid::from_raw(child.id() as i32);
    let started = Instant::now();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let result = done_rx.recv_timeout(RUN_LIMIT);
    // Whatever happened, nothing of this run outlives it.
    let _ = killpg(group, Signal::SIGKILL);
    let output = match result {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("chromium failed: {e}")),
        Err(_) => {
            return Err(format!(
                "chromium did not finish within {:?}",
                started.elapsed()
            ))
        }
    };
    if !output.status.success() {
        return Err(format!(
            "chromium exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}
