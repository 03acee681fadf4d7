//! What a pooled listener's sessions need from its configuration, with
//! its `auth_file` read: made once per start or reload, compared whole
//! (secrets included) to tell whether a reload changed the listener.

use std::collections::HashMap;
use std::time::Duration;

use crate::auth::secret::Secret;
use crate::auth::userlist;
use crate::config::{ListenerConfig, PoolMode};

#[derive(Debug, PartialEq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    /// Roles and their secrets; a role not here is refused like a wrong
    /// password.
    pub secrets: HashMap<String, Secret>,
    pub size: usize,
    pub reset_query: String,
    pub idle_timeout: Duration,
    pub wait_timeout: Duration,
}

impl PoolSettings {
    /// The settings of a pooled listener (`None` for a passthrough one),
    /// reading its `auth_file`. `key` is the listener's dotted key, for
    /// errors.
    pub fn load(listener: &ListenerConfig, key: &str) -> Result<Option<Self>, String> {
        let (Some(mode), Some(file)) = (listener.pool_mode, &listener.auth_file) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("{key}.auth_file: cannot read {}: {e}", file.display()))?;
        let secrets = userlist::parse(&text)
            .map_err(|e| format!("{key}.auth_file: {}: {e}", file.display()))?;
        Ok(Some(Self {
            mode,
            secrets,
            size: listener.pool_size,
            reset_query: listener.server_reset_query.clone(),
            idle_timeout: listener.server_idle_timeout.get(),
            wait_timeout: listener.query_wait_timeout.get(),
        }))
    }
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
