//! What a pooled listener's sessions need from its configuration, with
//! its `auth_file` read: made once per start or reload, compared whole
//! (secrets included) to tell whether a reload changed the listener.

use std::collections::HashMap;
use std::time::Duration;

use crate::auth::auth_query::DEFAULT_QUERY;
use crate::auth::secret::Secret;
use crate::auth::userlist;
use crate::config::{ListenerConfig, PoolMode};

#[derive(Debug, PartialEq)]
pub struct PoolSettings {
    /// The listener's dotted key (`listeners[0]`), for errors that name
    /// what to fix.
    pub key: String,
    pub mode: PoolMode,
    /// Roles and their secrets; a role not here is refused like a wrong
    /// password.
    pub secrets: HashMap<String, Secret>,
    pub size: usize,
    pub reset_query: String,
    pub max_prepared: usize,
    pub idle_timeout: Duration,
    pub wait_timeout: Duration,
    /// Secrets read from the cluster for roles `secrets` does not list.
    pub auth_query: Option<AuthQuerySettings>,
}

/// `auth_user` and the query it runs.
#[derive(Debug, PartialEq)]
pub struct AuthQuerySettings {
    pub user: String,
    /// `None`: the member lets `auth_user` in without one (trust).
    pub password: Option<Password>,
    pub query: String,
    pub lifetime: Duration,
}

/// `auth_user`'s password: shown as `..` by `Debug`, so it reaches no log.
#[derive(PartialEq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl PoolSettings {
    /// The settings of a pooled listener (`None` for a passthrough one),
    /// reading its `auth_file`. `key` is the listener's dotted key, for
    /// errors.
    pub fn load(listener: &ListenerConfig, key: &str) -> Result<Option<Self>, String> {
        let Some(mode) = listener.pool_mode else {
            return Ok(None);
        };
        let secrets = match &listener.auth_file {
            None => HashMap::new(),
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("{key}.auth_file: cannot read {}: {e}", file.display()))?;
                userlist::parse(&text)
                    .map_err(|e| format!("{key}.auth_file: {}: {e}", file.display()))?
            }
        };
        let auth_query = match &listener.auth_user {
            None => None,
            Some(user) => Some(AuthQuerySettings {
                user: user.clone(),
                password: auth_password(listener, key)?,
                query: listener
                    .auth_query
                    .clone()
                    .unwrap_or_else(|| DEFAULT_QUERY.to_owned()),
                lifetime: listener.auth_cache_lifetime.get(),
            }),
        };
        Ok(Some(Self {
            key: key.to_owned(),
            mode,
            secrets,
            size: listener.pool_size,
            reset_query: listener.server_reset_query.clone(),
            max_prepared: listener.max_prepared_statements,
            idle_timeout: listener.server_idle_timeout.get(),
            wait_timeout: listener.query_wait_timeout.get(),
            auth_query,
        }))
    }
}

/// `auth_user`'s password from its file (the first line) or variable;
/// the errors name the key and never the password.
fn auth_password(listener: &ListenerConfig, key: &str) -> Result<Option<Password>, String> {
    if let Some(file) = &listener.auth_password_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            format!(
                "{key}.auth_password_file: cannot read {}: {e}",
                file.display()
            )
        })?;
        let password = text.lines().next().unwrap_or_default();
        if password.is_empty() {
            return Err(format!(
                "{key}.auth_password_file: {} is empty",
                file.display()
            ));
        }
        return Ok(Some(Password(password.to_owned())));
    }
    if let Some(name) = &listener.auth_password_env {
        return match std::env::var(name) {
            Ok(password) if !password.is_empty() => Ok(Some(Password(password))),
            _ => Err(format!(
                "{key}.auth_password_env: the environment variable {name} is not set (or empty)"
            )),
        };
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(auth_file: &std::path::Path) -> ListenerConfig {
        let text = format!(
            "listen = \"127.0.0.1:6432\"\ncluster = \"main\"\nrole = \"primary\"\n\
             pool_mode = \"session\"\nauth_file = \"{}\"\n",
            auth_file.display()
        );
        toml::from_str(&text).expect("listener")
    }

    #[test]
    fn a_bad_auth_file_names_the_key_the_file_and_the_line() {
        let dir = std::env::temp_dir().join(format!("rolegate-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("userlist.txt");
        std::fs::write(&file, "; users\n\"app\" \"plain-password\"\n").expect("write");
        let err = PoolSettings::load(&listener(&file), "listeners[0]").expect_err("plaintext");
        assert!(err.starts_with("listeners[0].auth_file: "), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("line 2") && err.contains("plaintext"), "{err}");
        assert!(
            !err.contains("plain-password"),
            "the secret is in the error: {err}"
        );
        let missing = dir.join("missing.txt");
        let err = PoolSettings::load(&listener(&missing), "listeners[0]").expect_err("missing");
        assert!(err.contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
