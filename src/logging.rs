//! Log output: human-readable lines by default, JSON on request.
//!
//! The filter comes from `RUST_LOG` when set, else from `[log] level`,
//! else `info`; the format from `--log-format` when given, else from
//! `[log] format`. Both can change on reload: the subscriber's filter and
//! its formatting layer sit behind reload handles.

use std::io::IsTerminal;

use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Formatter = Box<dyn Layer<Filtered> + Send + Sync>;

/// Changes the running subscriber's filter and format.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<Formatter, Filtered>,
    /// `--log-format`, which wins over the file.
    forced_format: Option<LogFormat>,
    current: LogConfig,
}

/// Installs the global subscriber for `config` (the format forced by the
/// command line when given). Call once, before anything logs.
pub fn init(config: &LogConfig, forced_format: Option<LogFormat>) -> LogHandle {
    let (filter, filter_handle) = reload::Layer::new(filter_for(config.level.as_deref()));
    let format = forced_format.unwrap_or(config.format);
    let (formatter, format_handle) = reload::Layer::new(formatter(format));
    tracing_subscriber::registry()
        .with(filter)
        .with(formatter)
        .init();
    LogHandle {
        filter: filter_handle,
        format: format_handle,
        forced_format,
        current: config.clone(),
    }
}

/// A reloaded `[log]`, checked and ready to apply.
pub struct LogPlan {
    filter: Option<EnvFilter>,
    format: Option<LogFormat>,
    config: LogConfig,
}

impl LogHandle {
    /// Checks a reloaded `[log]`; the error names the key.
    pub fn plan(&self, new: &LogConfig) -> Result<LogPlan, String> {
        let filter = if new.level != self.current.level && std::env::var_os("RUST_LOG").is_none() {
            let level = new.level.as_deref().unwrap_or("info");
            Some(
                EnvFilter::try_new(level)
                    .map_err(|e| format!("log.level: {level:?} is not a valid filter: {e}"))?,
            )
        } else {
            None
        };
        let format = (new.format != self.current.format && self.forced_format.is_none())
            .then_some(new.format);
        Ok(LogPlan {
            filter,
            format,
            config: new.clone(),
        })
    }

    /// Applies a checked `[log]` to the lines written from now on.
    pub fn commit(&mut self, plan: LogPlan) {
        if let Some(filter) = plan.filter {
            if let Err(e) = self.filter.reload(filter) {
                tracing::warn!("cannot change the log filter: {e}");
            }
        }
        if let Some(format) = plan.format {
            if let Err(e) = self.format.reload(formatter(format)) {
                tracing::warn!("cannot change the log format: {e}");
            }
        }
        self.current = plan.config;
    }
}

fn filter_for(level: Option<&str>) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

fn formatter(format: LogFormat) -> Formatter {
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json().flatten_event(true).with_current_span(true)),
    }
}
