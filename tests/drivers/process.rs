//! Child processes of the driver tests: bounded in time, output in files,
//! stopped by PID.

use super::*;

pub(crate) struct Finished {
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub(crate) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub(crate) fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub(crate) fn describe(&self) -> String {
        match self.status {
            Some(status) => format!("{status}"),
            None => format!("no exit within {:.0?}, killed", self.elapsed),
        }
    }
}

/// A child process with its stdout and stderr in files.
pub(crate) struct Running {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
    started: Instant,
}

impl Running {
    pub(crate) fn spawn(
        env: &Env,
        what: &str,
        command: &mut Command,
        stdin: Stdio,
    ) -> Result<Self, String> {
        let out = env.scratch(&format!("{what}.out"));
        let err = env.scratch(&format!("{what}.err"));
        let child = command
            .stdin(stdin)
            .stdout(File::create(&out).map_err(|e| e.to_string())?)
            .stderr(File::create(&err).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        Ok(Self {
            child,
            out,
            err,
            started: Instant::now(),
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits up to `limit` (from the start); past it the process is killed.
    pub(crate) fn finish(mut self, limit: Duration) -> Finished {
        let mut status = None;
        while self.started.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if status.is_none() {
            stop_child(&mut self.child, Duration::from_secs(3));
        }
        let finished = Finished {
            status,
            stdout: std::fs::read(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        };
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
        finished
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(2));
    }
}

/// SIGTERM to the child's PID, SIGKILL after `grace`; reaps it.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let pid = child.id() as i32;
    signal(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(pid, Signal::SIGKILL);
    let _ = child.wait();
}

pub(crate) fn run_bounded(
    env: &Env,
    what: &str,
    command: &mut Command,
    limit: Duration,
) -> Result<Finished, String> {
    Ok(Running::spawn(env, what, command, Stdio::null())?.finish(limit))
}

/// Stops (by PID) and reaps a child when dropped.
pub(crate) struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(2));
    }
}
