//! Where a pooled login's secret comes from: the listener's `auth_file`,
//! else `auth_query` run as `auth_user` (cached for
//! `auth_cache_lifetime`).
//!
//! The query goes to the leader first, then to every other member in the
//! view: replicas have the same `pg_authid`, so logins go on while the
//! primary is down. When no member answers, the last answer read is used,
//! however old; only a role never read fails then, with an error that
//! names the listener's keys to check (never the password).

use tokio::time::timeout_at;
use tracing::{info, warn};

use super::refusal::Refusal;
use super::Session;
use crate::auth::auth_query;
use crate::auth::secret::Secret;
use crate::auth::server_login::{self, Credentials};
use crate::pool::settings::{AuthQuerySettings, PoolSettings};
use crate::server::backend;
use crate::topology::Member;

impl Session<'_> {
    /// The secret of `role` in `database`, `None` for a role rolegate
    /// does not know (refused like a wrong password).
    pub(super) async fn secret_of(
        &self,
        settings: &PoolSettings,
        role: &str,
        database: &str,
    ) -> Result<Option<Secret>, Refusal> {
        if let Some(secret) = settings.secrets.get(role) {
            return Ok(Some(secret.clone()));
        }
        let Some(query) = &settings.auth_query else {
            return Ok(None);
        };
        let key = (self.listener.listen, database.to_owned(), role.to_owned());
        if let Some(answer) = self.shared.secrets.fresh(&key, query.lifetime) {
            return Ok(answer);
        }
        let view = self.listener.router.view();
        let leader = view.leader().map(|m| m.name.clone());
        let mut members: Vec<&Member> = view.members.iter().collect();
        members.sort_by_key(|m| Some(&m.name) != leader.as_ref());
        let mut failure = String::from("the cluster has no member to ask");
        for member in members {
            match self.ask(member, query, role, database).await {
                Ok(answer) => {
                    self.shared.secrets.store(key, answer.clone());
                    return Ok(answer);
                }
                Err(what) => {
                    warn!(member = %member.name, "auth_query failed: {what}");
                    failure = format!("member {}: {what}", member.name);
                }
            }
        }
        if let Some(answer) = self.shared.secrets.last(&key) {
            info!("auth_query answered nowhere: using the secret last read for {role:?}");
            return Ok(answer);
        }
        Err(Refusal::AuthQuery {
            listener: settings.key.clone(),
            user: query.user.clone(),
            failure,
        })
    }

    /// Runs the query on one member, within the handshake timeout.
    async fn ask(
        &self,
        member: &Member,
        query: &AuthQuerySettings,
        role: &str,
        database: &str,
    ) -> Result<Option<Secret>, String> {
        let member_metrics = self.listener.metrics.member(&member.name);
        let deadline = std::time::Instant::now() + self.limits.handshake_timeout.get();
        let asked = timeout_at(deadline.into(), async {
            let mut stream = backend::connect(
                member,
                &self.listener.cluster,
                &self.listener.backend_tls,
                self.limits,
                &member_metrics,
            )
            .await
            .map_err(|e| e.to_error().message)?;
            let password = query.password.as_ref().map(|p| p.0.as_str());
            let credentials = Credentials::Password(password.unwrap_or_default());
            server_login::log_in(
                &mut stream,
                &query.user,
                database,
                auth_query::SESSION_PARAMETERS,
                &credentials,
            )
            .await
            .map_err(|e| match e {
                server_login::ServerLoginError::Refused(error) => {
                    let body = error.get(5..).unwrap_or_default();
                    format!("auth_user was refused: {}", auth_query::error_message(body))
                }
                other => other.to_string(),
            })?;
            auth_query::fetch(&mut stream, &query.query, role)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        asked.unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} (handshake_timeout)",
                self.limits.handshake_timeout
            ))
        })
    }
}
