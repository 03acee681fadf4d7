//! Named prepared statements under transaction pooling.
//!
//! A client prepares a statement once and uses it on whatever server
//! it gets for each transaction. rolegate keeps, per client, its names
//! and what each one is; per server, which statements that server has
//! prepared; and one registry for the process that gives every distinct
//! statement (query text and parameter types, as bytes) one server-side
//! name, `rolegate_<n>`. Clients preparing the same query share the
//! server's statement, as PgBouncer 1.21+ does: a server prepares it
//! once, not once per client.
//!
//! A server keeps at most `max_prepared_statements`; the least recently
//! used is closed to make room. The registry holds statements weakly:
//! one no client names any more is forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// One distinct statement: the name servers know it by, and the part of
/// the client's Parse after the name (query text and parameter types).
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    pub name: String,
    pub rest: Box<[u8]>,
}

/// The process's statements, by what they are.
#[derive(Default)]
pub struct Registry {
    by_text: Mutex<HashMap<Box<[u8]>, Weak<Statement>>>,
    next: AtomicU64,
}

impl Registry {
    /// The statement for a Parse whose body after the name is `rest`.
    pub fn statement(&self, rest: &[u8]) -> Arc<Statement> {
        let mut by_text = self.by_text.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = by_text.get(rest).and_then(Weak::upgrade) {
            return found;
        }
        // Forgotten statements are dropped when the map would grow past
        // twice the live ones: amortised, never a scan per Parse.
        if by_text.len() == by_text.capacity() {
            by_text.retain(|_, statement| statement.strong_count() > 0);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let statement = Arc::new(Statement {
            id,
            name: server_name(id),
            rest: rest.into(),
        });
        by_text.insert(rest.into(), Arc::downgrade(&statement));
        statement
    }

    #[cfg(test)]
    fn known(&self) -> usize {
        let by_text = self.by_text.lock().unwrap_or_else(|p| p.into_inner());
        by_text.values().filter(|s| s.strong_count() > 0).count()
    }
}

/// The name servers know statement `id` by.
pub fn server_name(id: u64) -> String {
    format!("rolegate_{id}")
}

/// A client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    names: HashMap<Box<[u8]>, Arc<Statement>>,
}

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.names.get(name)
    }

    pub fn insert(&mut self, name: &[u8], statement: Arc<Statement>) {
        self.names.insert(name.into(), statement);
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.names.remove(name);
    }

    /// `DEALLOCATE ALL`, `DISCARD ALL`.
    pub fn clear(&mut self) {
        self.names.clear();
    }
}

/// The statements one server has prepared, least recently used first
/// out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Statement id and when it was last used.
    used: HashMap<u64, u64>,
    clock: u64,
}

impl ServerStatements {
    /// Whether the server has `id`; marks it used.
    pub fn touch(&mut self, id: u64) -> bool {
        self.clock += 1;
        match self.used.get_mut(&id) {
            Some(at) => {
                *at = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared; returns the statement to close first
    /// when the server already has `capacity`.
    pub fn add(&mut self, id: u64, capacity: usize) -> Option<u64> {
        let evicted = if self.used.len() >= capacity {
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.used.remove(&oldest);
            }
            oldest
        } else {
            None
        };
        self.clock += 1;
        self.used.insert(id, self.clock);
        evicted
    }

    /// The server did not prepare `id` after all (its Parse failed or was
    /// skipped after an error).
    pub fn remove(&mut self, id: u64) {
        self.used.remove(&id);
    }

    /// Everything was deallocated on the server.
    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_statement_is_shared_and_a_forgotten_one_dropped() {
        let registry = Registry::default();
        let a = registry.statement(b"select 1\0\0\0");
        let b = registry.statement(b"select 1\0\0\0");
        let c = registry.statement(b"select 2\0\0\0");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.name, server_name(a.id));
        drop(c);
        assert_eq!(registry.known(), 1);
        for i in 0..100 {
            drop(registry.statement(format!("select {i}\0\0\0").as_bytes()));
        }
        let by_text = registry.by_text.lock().expect("lock");
        assert!(by_text.len() < 100, "forgotten statements are pruned");
    }

    #[test]
    fn a_full_server_closes_its_least_recently_used_statement() {
        let mut server = ServerStatements::default();
        assert_eq!(server.add(1, 2), None);
        assert_eq!(server.add(2, 2), None);
        assert!(server.touch(1));
        assert_eq!(server.add(3, 2), Some(2), "2 was used least recently");
        assert!(!server.touch(2));
        assert!(server.touch(3) && server.touch(1));
        server.remove(3);
        assert_eq!(server.len(), 1);
        server.clear();
        assert_eq!(server.len(), 0);
    }
}
