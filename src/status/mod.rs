//! `rolegate status`: what the status page shows, as a table in a
//! terminal, like `patronictl list`. It reads a running rolegate's
//! `/cluster` and `/events` over HTTP, so it works wherever the admin
//! endpoint is reachable.
//!
//! Exit status, for scripts and health checks: 0 when every cluster shown
//! has a confirmed primary, 1 when one has none, 2 when the admin endpoint
//! cannot be read (unreachable, refused the token, or answered nonsense).

mod table;

use std::time::Duration;

use serde_json::Value;

pub use table::{render, Picture};

/// How long one read of the admin endpoint may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `--watch` redraws.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What `rolegate status` was asked for.
pub struct Options {
    /// Base URL of the admin endpoint, e.g. `http://127.0.0.1:9432`.
    pub admin: String,
    pub cluster: Option<String>,
    pub token: Option<String>,
    pub watch: bool,
}

/// Exit status: every cluster has a confirmed primary.
pub const EXIT_PRIMARY: u8 = 0;
/// Exit status: some cluster has no confirmed primary.
pub const EXIT_NO_PRIMARY: u8 = 1;
/// Exit status: the admin endpoint could not be read.
pub const EXIT_UNREACHABLE: u8 = 2;

/// Prints the picture once (or, with `--watch`, every second until
/// interrupted) and returns the exit status.
pub async fn run(options: &Options) -> u8 {
    let client = match reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("rolegate status: cannot make an HTTP client: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    loop {
        let (text, code) = match read(&client, options).await {
            Ok(picture) => {
                let code = if picture.every_cluster_has_a_primary {
                    EXIT_PRIMARY
                } else {
                    EXIT_NO_PRIMARY
                };
                (picture.text, code)
            }
            Err(e) => (format!("rolegate status: {e}\n"), EXIT_UNREACHABLE),
        };
        if !options.watch {
            if code == EXIT_UNREACHABLE {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            return code;
        }
        // Clear the screen and draw from the top.
        print!("\x1b[2J\x1b[H{text}");
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

async fn read(client: &reqwest::Client, options: &Options) -> Result<Picture, String> {
    let base = options.admin.trim_end_matches('/');
    let query = options
        .cluster
        .as_deref()
        .map(|c| {
            let encoded: String = url::form_urlencoded::byte_serialize(c.as_bytes()).collect();
            format!("?cluster={encoded}")
        })
        .unwrap_or_default();
    let cluster = get(client, &format!("{base}/cluster"), options).await?;
    let events = get(client, &format!("{base}/events{query}"), options).await?;
    render(&cluster, &events, options.cluster.as_deref())
}

async fn get(client: &reqwest::Client, url: &str, options: &Options) -> Result<Value, String> {
    let mut request = client.get(url);
    if let Some(token) = &options.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach the admin endpoint at {url}: {e}"))?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(format!(
            "{url} needs the admin token: pass --token or set ROLEGATE_ADMIN_TOKEN"
        ));
    }
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    let body = response
        .text()
        .await
        .map_err(|e| format!("{url}: the answer broke off: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("{url} did not answer JSON: {e}"))
}
