//! Secrets read by `auth_query`, kept for `auth_cache_lifetime`: a login
//! burst costs one query per role, not one per client. An entry past its
//! lifetime is still used while no member answers the query, so logins go
//! on while the primary (or every member) is briefly out of reach; an
//! answer replaces it as soon as one comes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::secret::Secret;

/// Entries kept at most; a cache that fills is emptied (a flood of
/// made-up role names must not grow memory without bound).
const MAX_ENTRIES: usize = 100_000;

/// A cached answer: the role's secret, or `None` for a role the query
/// refused.
pub type Answer = Option<Secret>;

/// Which listener, database and role an answer is for.
pub type CacheKey = (SocketAddr, String, String);

#[derive(Default)]
pub struct SecretCache {
    entries: Mutex<HashMap<CacheKey, (Answer, Instant)>>,
}

impl SecretCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, (Answer, Instant)>> {
        // Each change is one insert or clear: a panic cannot leave it
        // half-done.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `key` if it is younger than `lifetime`.
    pub fn fresh(&self, key: &CacheKey, lifetime: Duration) -> Option<Answer> {
        self.lock()
            .get(key)
            .filter(|(_, at)| at.elapsed() < lifetime)
            .map(|(answer, _)| answer.clone())
    }

    /// The answer for `key`, however old: for when no member answers.
    pub fn last(&self, key: &CacheKey) -> Option<Answer> {
        self.lock().get(key).map(|(answer, _)| answer.clone())
    }

    pub fn store(&self, key: CacheKey, answer: Answer) {
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(key, (answer, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_answers_age_and_last_ones_stay() {
        let cache = SecretCache::default();
        let key: CacheKey = (
            "127.0.0.1:1".parse().expect("addr"),
            "app".into(),
            "app".into(),
        );
        assert!(cache.fresh(&key, Duration::from_secs(60)).is_none());
        cache.store(key.clone(), None);
        assert_eq!(cache.fresh(&key, Duration::from_secs(60)), Some(None));
        assert_eq!(cache.fresh(&key, Duration::ZERO), None);
        assert_eq!(cache.last(&key), Some(None));
    }
}
