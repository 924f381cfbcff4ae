//! A small bounded cache whose entries expire, for authentication and authorization decisions.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use updraft_common::sync::lock;

/// Entries expire after their own TTL; when full, expired entries are dropped first and then
/// the whole cache is cleared, which bounds memory without bookkeeping for LRU order.
#[derive(Debug)]
pub(crate) struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<V> {
        let entries = lock(&self.entries);
        entries
            .get(key)
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, v)| v.clone())
    }

    pub(crate) fn insert(&self, key: K, value: V, ttl: Duration) {
        let mut entries = lock(&self.entries);
        if entries.len() >= self.capacity {
            let now = Instant::now();
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now() + ttl, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_capacity_is_bounded() {
        let cache = TtlCache::new(2);
        cache.insert("a", 1, Duration::from_secs(60));
        cache.insert("gone", 2, Duration::ZERO);
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.get(&"gone"), None);
        cache.insert("b", 3, Duration::from_secs(60));
        cache.insert("c", 4, Duration::from_secs(60));
        let len = cache.entries.lock().unwrap().len();
        assert!(len <= 2, "cache grew to {len}");
        assert_eq!(cache.get(&"c"), Some(4));
    }
}
