//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also when a thread panicked while holding it.
///
/// Updraft's mutexes guard maps and records that every critical section leaves consistent
/// (no section panics half-way on purpose, and none awaits): a poisoned lock is no reason to
/// stop serving every other pod, so the poison is ignored rather than turned into a panic.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::lock;

    #[test]
    #[allow(clippy::panic)]
    fn a_poisoned_mutex_still_locks() {
        let mutex = Mutex::new(1);
        let _ = std::panic::catch_unwind(|| {
            let _guard = lock(&mutex);
            panic!("a holder panics");
        });
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
