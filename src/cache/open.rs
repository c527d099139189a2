//! A core's open disk-tier entries: files kept open, with their parsed
//! metadata, between hits, so a hit from the disk tier costs no open, no
//! read of the entry's head and no close (nginx's `open_file_cache` plays
//! the same part).
//!
//! Each entry is tagged with the id the disk index gave its file
//! ([`super::disk::DiskStore::entry`]). A file is never changed once in
//! place, and a new copy under the same key gets a new id, so a kept file
//! is the entry exactly while the index still holds its id; a lookup with
//! another id (replaced, evicted, purged) drops it. [`OpenEntries::prune`]
//! drops the ones whose entry is gone, so a removed file's disk space is
//! not held long by an open descriptor.
//!
//! Core-local and bounded: at most [`OpenEntries::CAPACITY`] files, the
//! oldest opened leaving first.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

/// Open entries of one core, `T` being what is kept per file.
pub struct OpenEntries<T> {
    by_key: HashMap<String, (u64, Rc<T>)>,
    /// Keys in the order they were opened (oldest first).
    order: VecDeque<String>,
}

impl<T> Default for OpenEntries<T> {
    fn default() -> Self {
        OpenEntries {
            by_key: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T> OpenEntries<T> {
    /// Files kept open per core.
    pub const CAPACITY: usize = 64;

    /// The file kept for `key` when it is still the entry with `id`; a
    /// file kept under another id is dropped.
    pub fn get(&mut self, key: &str, id: u64) -> Option<Rc<T>> {
        match self.by_key.get(key) {
            Some((kept, file)) if *kept == id => Some(file.clone()),
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `file`, the entry for `key` with `id`, in place of any file
    /// kept for it; the oldest kept file leaves when full.
    pub fn put(&mut self, key: &str, id: u64, file: Rc<T>) {
        if self.by_key.contains_key(key) {
            self.remove(key);
        }
        while self.order.len() >= Self::CAPACITY {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.by_key.remove(&oldest);
                }
                None => break,
            }
        }
        self.order.push_back(key.to_string());
        self.by_key.insert(key.to_string(), (id, file));
    }

    /// Drops every kept file whose entry no longer has its id (`current`
    /// answers the index's id for a key, `None` when it has none); returns
    /// how many were dropped.
    pub fn prune(&mut self, mut current: impl FnMut(&str) -> Option<u64>) -> usize {
        let before = self.order.len();
        let by_key = &mut self.by_key;
        self.order.retain(|key| {
            let keep = by_key
                .get(key)
                .is_some_and(|(id, _)| current(key) == Some(*id));
            if !keep {
                by_key.remove(key);
            }
            keep
        });
        before - self.order.len()
    }

    /// How many files are kept.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no file is kept.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn remove(&mut self, key: &str) {
        self.by_key.remove(key);
        self.order.retain(|k| k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_file_serves_only_the_id_it_was_opened_under() {
        let mut open = OpenEntries::default();
        open.put("a", 7, Rc::new("file a#7"));
        assert_eq!(open.get("a", 7).as_deref(), Some(&"file a#7"));
        // The entry was written again: the kept file is another copy.
        assert!(open.get("a", 8).is_none());
        assert!(open.get("a", 7).is_none(), "dropped on the mismatch");
        assert!(open.is_empty());
    }

    #[test]
    fn put_replaces_and_the_oldest_leaves_when_full() {
        let mut open = OpenEntries::default();
        open.put("k", 1, Rc::new(1));
        open.put("k", 2, Rc::new(2));
        assert_eq!(open.len(), 1);
        assert_eq!(open.get("k", 2).as_deref(), Some(&2));
        for i in 0..OpenEntries::<u64>::CAPACITY as u64 {
            open.put(&format!("n{i}"), i, Rc::new(i));
        }
        assert_eq!(open.len(), OpenEntries::<u64>::CAPACITY);
        assert!(open.get("k", 2).is_none(), "the oldest left");
        assert_eq!(open.get("n0", 0).as_deref(), Some(&0));
    }

    #[test]
    fn prune_drops_files_whose_entry_is_gone_or_new() {
        let mut open = OpenEntries::default();
        open.put("same", 1, Rc::new(()));
        open.put("gone", 2, Rc::new(()));
        open.put("newer", 3, Rc::new(()));
        let dropped = open.prune(|k| match k {
            "same" => Some(1),
            "newer" => Some(9),
            _ => None,
        });
        assert_eq!(dropped, 2);
        assert_eq!(open.len(), 1);
        assert!(open.get("same", 1).is_some());
    }
}
