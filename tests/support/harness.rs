//! The shape every integration test binary shares: start an environment
//! once, run named tests against it (libtest-mimic, so `cargo test` filters
//! and reports as usual), stop the environment, clean up.

use std::path::PathBuf;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

pub type TestFn<E> = fn(&E) -> Result<(), Failed>;

/// A suite's table of tests, each registered once, by its function's name:
/// `by_name![first_test, second_test]`. (`drivers` builds its trials per
/// driver and scenario instead, hence the allowances.)
#[allow(unused_macros)]
macro_rules! by_name {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test)),*]
    };
}
#[allow(unused_imports)]
pub(crate) use by_name;

/// An environment the harness starts once per test binary.
pub trait TestEnv: Send + Sync + 'static {
    /// A directory to remove after the environment has stopped.
    fn scratch_dir(&self) -> Option<PathBuf> {
        None
    }

    /// Runs after every test, whatever its result (e.g. hand the next test
    /// a healthy cluster).
    fn after_test(&self) {}
}

/// Runs `tests` against the environment `start` builds (not built when
/// only listing tests). `serial` runs them one at a time.
pub fn run_suite<E: TestEnv>(
    tests: &[(&'static str, TestFn<E>)],
    start: impl FnOnce() -> E,
    serial: bool,
) -> ! {
    let mut args = Arguments::from_args();
    if serial {
        args.test_threads = Some(1);
    }
    if args.list {
        let trials = tests
            .iter()
            .map(|(name, _)| Trial::test(*name, || Ok(())))
            .collect();
        libtest_mimic::run(&args, trials).exit();
    }
    let env = Arc::new(start());
    let scratch = env.scratch_dir();
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            let env = Arc::clone(&env);
            Trial::test(name, move || {
                let result = test(&env);
                env.after_test();
                result
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // The last handle: servers the environment started stop here, by PID.
    drop(env);
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    conclusion.exit()
}

/// `Ok` when `condition` holds, else a failure with `message`.
pub fn check(condition: bool, message: impl Into<String>) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message.into().into())
    }
}
