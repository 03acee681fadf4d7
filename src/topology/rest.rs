//! Patroni REST health checks of one member.
//!
//! A check asks `GET /primary` and `GET /replica` (with `?lag=` when a lag
//! limit is set) at the same time, each bounded by `health_timeout`. The
//! HTTP status is the verdict, as in HAProxy's `httpchk` setup; the JSON
//! body is kept for the cluster view. Requests never go through an HTTP
//! proxy from the environment.

use std::time::Duration;

use reqwest::{Client, StatusCode};
use tokio::time::Instant;
use url::Url;

use super::fuse::RestCheck;
use super::patroni_data::{ClusterListing, RestStatus};

/// Longest REST body read; Patroni's answers are a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct RestProber {
    client: Client,
    lag: Option<u64>,
}

impl RestProber {
    pub fn new(timeout: Duration, lag: Option<u64>) -> Result<Self, String> {
        let client = Client::builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(2)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self { client, lag })
    }

    /// Checks the member whose REST API lives at `api_url`.
    pub async fn check(&self, api_url: &Url) -> RestCheck {
        let mut replica_url = endpoint(api_url, "replica");
        if let Some(lag) = self.lag {
            replica_url
                .query_pairs_mut()
                .append_pair("lag", &lag.to_string());
        }
        let started = Instant::now();
        let (primary, replica) = tokio::join!(
            self.get(endpoint(api_url, "primary")),
            self.get(replica_url)
        );
        let finished = Instant::now();
        let mut error = None;
        let mut status = None;
        let mut verdict = |result: Result<(bool, Option<RestStatus>), String>| match result {
            Ok((ok, body)) => {
                if body.is_some() {
                    status = body;
                }
                Some(ok)
            }
            Err(e) => {
                error = Some(e);
                None
            }
        };
        let primary = verdict(primary);
        let replica = verdict(replica);
        RestCheck {
            at: started,
            took: finished - started,
            primary,
            replica,
            status,
            error,
        }
    }

    async fn get(&self, url: Url) -> Result<(bool, Option<RestStatus>), String> {
        let (status, body) = self.fetch(&url).await?;
        let status_body = body.ok().and_then(|b| RestStatus::parse(&b).ok());
        Ok((status == StatusCode::OK, status_body))
    }

    /// Reads Patroni's `GET /cluster` from `base`.
    pub async fn cluster_listing(&self, base: &Url) -> Result<ClusterListing, String> {
        let url = endpoint(base, "cluster");
        let (status, body) = self.fetch(&url).await?;
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        ClusterListing::parse(&body?)
    }

    /// `GET url`: the status, and the body (at most [`MAX_BODY`] bytes).
    /// Only a request that got no answer at all is an error.
    async fn fetch(&self, url: &Url) -> Result<(StatusCode, Result<Vec<u8>, String>), String> {
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        Ok((response.status(), read_limited(response).await))
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err("REST answer too large".to_owned());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `http://host:port/anything` → `http://host:port/<path>`.
fn endpoint(api_url: &Url, path: &str) -> Url {
    let mut url = api_url.clone();
    url.set_path(path);
    url.set_query(None);
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A check is stamped with its start, not with the arrival of the
    /// answer, which may describe any moment in between.
    #[tokio::test]
    async fn a_check_is_stamped_with_its_start() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = socket.read(&mut request).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let body = r#"{"state":"running","role":"master"}"#;
                    let answer = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        // As main does; another test may have installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let prober = RestProber::new(Duration::from_secs(5), None).expect("prober");
        let url = Url::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        let before = Instant::now();
        let check = prober.check(&url).await;
        let after = Instant::now();
        assert_eq!(check.primary, Some(true), "{:?}", check.error);
        assert!(check.took >= Duration::from_millis(200), "{:?}", check.took);
        assert!(
            check.at >= before && check.at + Duration::from_millis(150) < after,
            "stamped {:?} after the start, the answer came {:?} after it",
            check.at - before,
            after - before
        );
        server.abort();
    }

    #[test]
    fn endpoints_replace_the_path() {
        let api = Url::parse("http://127.0.0.1:8041/patroni").expect("url");
        assert_eq!(
            endpoint(&api, "primary").as_str(),
            "http://127.0.0.1:8041/primary"
        );
        let api = Url::parse("https://db1:8008").expect("url");
        assert_eq!(
            endpoint(&api, "cluster").as_str(),
            "https://db1:8008/cluster"
        );
    }
}
