//! The `rolegate` command: run the proxy, check a config file, or show a
//! running proxy's status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rolegate::config::{Config, ConfigError, LogFormat};
use rolegate::tls::TlsFiles;

#[derive(Parser)]
#[command(
    name = "rolegate",
    version,
    about = "A role-aware PostgreSQL proxy for Patroni clusters"
)]
struct Cli {
    /// The configuration file.
    #[arg(short, long, env = "ROLEGATE_CONFIG", default_value = "proxy.toml")]
    config: PathBuf,
    /// Log format; overrides `[log] format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate a config file and exit: 0 when valid, 2 when not.
    CheckConfig {
        /// The file to check (defaults to --config).
        file: Option<PathBuf>,
    },
    /// Show a running rolegate's clusters, members, listeners and last
    /// events. Exit 0 when every cluster has a confirmed primary, 1 when
    /// one has none, 2 when the admin endpoint cannot be read.
    Status {
        /// The admin endpoint (default: `[admin] listen` of --config, else
        /// http://127.0.0.1:9432).
        #[arg(long)]
        admin: Option<String>,
        /// Show only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// The admin token (default: `[admin] token` of --config).
        #[arg(long, env = "ROLEGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file.unwrap_or(cli.config)),
        Some(Command::Status {
            admin,
            cluster,
            watch,
            token,
        }) => status(&cli.config, admin, cluster, watch, token),
        Some(Command::Run) | None => run(&cli.config, cli.log_format),
    }
}

/// Reads the configuration at `path` and loads the TLS files it names.
fn load(path: &std::path::Path) -> Result<(Config, TlsFiles), ConfigError> {
    let config = Config::load(path)?;
    let tls = TlsFiles::load(&config, path)?;
    Ok((config, tls))
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match load(path) {
        Ok((config, _)) => {
            println!(
                "{}: ok ({} cluster(s), {} listener(s))",
                path.display(),
                config.clusters.len(),
                config.listeners.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn status(
    config: &std::path::Path,
    admin: Option<String>,
    cluster: Option<String>,
    watch: bool,
    token: Option<String>,
) -> ExitCode {
    // The config file, when there is one, says where the admin endpoint is.
    let config = Config::load(config).ok();
    let admin = admin.unwrap_or_else(|| {
        let listen = config
            .as_ref()
            .map_or("127.0.0.1:9432", |c| c.admin.listen.as_str());
        let reachable = listen
            .replace("0.0.0.0:", "127.0.0.1:")
            .replace("[::]:", "[::1]:");
        format!("http://{reachable}")
    });
    let token = token.or_else(|| config.and_then(|c| c.admin.token));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rolegate status: cannot start the async runtime: {e}");
            return ExitCode::from(rolegate::status::EXIT_UNREACHABLE);
        }
    };
    let options = rolegate::status::Options {
        admin,
        cluster,
        token,
        watch,
    };
    ExitCode::from(runtime.block_on(rolegate::status::run(&options)))
}

fn run(path: &std::path::Path, log_format: Option<LogFormat>) -> ExitCode {
    let (config, tls) = match load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("rolegate: {e}");
            return ExitCode::from(2);
        }
    };
    let log = rolegate::logging::init(&config.log, log_format);
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::warn!("a TLS crypto provider was already installed");
    }
    // One thread: the other `worker_threads` are event loops of their own,
    // which the proxy starts (server::loops).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rolegate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rolegate::proxy::run(config, tls, path.to_owned(), log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
