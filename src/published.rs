//! A value one thread publishes rarely and every core reads on its request
//! path: the configuration generation, a replica's signing keys, the JWKS
//! key set.
//!
//! A reader checks one atomic version per use ([`Published::version`]) and
//! takes the value ([`Published::load`], a short lock and an `Arc` clone)
//! only when the version moved; [`Local`] is a core's copy that does
//! exactly that. Our own type rather than `arc-swap`: a version word is what
//! every reader needs anyway (a core rebuilds its signer or selectors when
//! it moves), and with it the value is read once per publication, so the
//! lock is never on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The published value and its version (bumped by each publication).
pub struct Published<T> {
    value: Mutex<Arc<T>>,
    version: AtomicU64,
}

impl<T: Default> Default for Published<T> {
    fn default() -> Self {
        Published::new(T::default())
    }
}

impl<T> Published<T> {
    /// `initial` at version 0.
    pub fn new(initial: T) -> Self {
        Published {
            value: Mutex::new(Arc::new(initial)),
            version: AtomicU64::new(0),
        }
    }

    /// How many times a value was published (one atomic load).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The value published last.
    pub fn load(&self) -> Arc<T> {
        match self.value.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Publishes `value` to every reader.
    pub fn publish(&self, value: T) {
        let value = Arc::new(value);
        match self.value.lock() {
            Ok(mut v) => *v = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

/// A core's copy of a published value, taken again when its version moved.
pub struct Local<T> {
    version: u64,
    value: Option<Arc<T>>,
}

impl<T> Default for Local<T> {
    fn default() -> Self {
        Local {
            version: u64::MAX,
            value: None,
        }
    }
}

impl<T> Local<T> {
    /// The current value of `p`: this copy, or `p`'s newer one.
    pub fn get(&mut self, p: &Published<T>) -> Arc<T> {
        let v = p.version();
        match &self.value {
            Some(value) if self.version == v => value.clone(),
            _ => {
                let value = p.load();
                self.version = v;
                self.value = Some(value.clone());
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_copy_follows_publications_and_reads_each_once() {
        let p = Published::new(1);
        let mut local = Local::default();
        assert_eq!(*local.get(&p), 1);
        let held = local.get(&p);
        p.publish(2);
        assert_eq!(*held, 1, "a value taken stays what it was");
        assert_eq!(*local.get(&p), 2);
        assert_eq!(p.version(), 1);
        let a = local.get(&p);
        let b = local.get(&p);
        assert!(Arc::ptr_eq(&a, &b), "no new copy without a publication");
    }
}
