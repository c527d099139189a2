//! Slices: how an object larger than the item limit is cached, as pieces of
//! `cache.slice_size_mb` fetched with `Range` and `If-Match` (pure
//! arithmetic and key naming; the request step is `proxy::slices`).
//!
//! A slice is stored under its object's cache key plus
//! `\0slice\0<slice size>\0<n>`; the object's length, ETag and headers
//! under `\0slice\0meta`. Every slice of one object shares the meta's ETag:
//! a fetch that finds another ETag (a 412 to `If-Match`, or a 206 naming
//! another ETag) drops the object's slices and meta together, so slices of
//! two versions are never joined. The slice size is in the key because a
//! slice's number means nothing without it: slices the disk tier kept from
//! a run with another `slice_size_mb` are never read as this run's.

/// The key of slice `n`, of `size` bytes, of the object cached under
/// `object_key`.
pub fn key(object_key: &str, size: u64, n: u64) -> String {
    format!("{object_key}\0slice\0{size}\0{n}")
}

/// The key of the object's slice metadata (length, ETag, headers).
pub fn meta_key(object_key: &str) -> String {
    format!("{object_key}\0slice\0meta")
}

/// The prefix of every slice and the meta of one object.
pub fn prefix(object_key: &str) -> String {
    format!("{object_key}\0slice\0")
}

/// Object bytes `(first, last)` of slice `n` of an object of `total` bytes
/// (the last slice may be shorter).
pub fn bounds(n: u64, size: u64, total: u64) -> (u64, u64) {
    let first = n.saturating_mul(size);
    let last = first.saturating_add(size).min(total).saturating_sub(1);
    (first, last)
}

/// The slices holding object bytes `first..=last`.
pub fn covering(first: u64, last: u64, size: u64) -> std::ops::RangeInclusive<u64> {
    first / size..=last / size
}

/// The slice to fetch first when the object's length is not known yet: the
/// one holding the range's first byte (`bytes=a-b`, `bytes=a-`), or slice 0
/// for a suffix range (`bytes=-n`), whose answer tells the length.
pub fn first_to_fetch(range: &str, size: u64) -> u64 {
    let spec = range.trim().strip_prefix("bytes=").unwrap_or("");
    let start = spec.split_once('-').map(|(a, _)| a.trim()).unwrap_or("");
    crate::http::head::parse_decimal(start.as_bytes()).map_or(0, |a| a / size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn bounds_and_covering() {
        let total = 300 * MIB + 5;
        assert_eq!(bounds(0, 8 * MIB, total), (0, 8 * MIB - 1));
        assert_eq!(bounds(37, 8 * MIB, total), (296 * MIB, 300 * MIB + 4));
        assert_eq!(covering(10 * MIB, 11 * MIB - 1, 8 * MIB), 1..=1);
        assert_eq!(covering(7 * MIB, 9 * MIB, 8 * MIB), 0..=1);
        assert_eq!(covering(0, 0, 8 * MIB), 0..=0);
    }

    #[test]
    fn the_first_slice_to_fetch() {
        assert_eq!(first_to_fetch("bytes=10485760-11534335", 8 * MIB), 1);
        assert_eq!(first_to_fetch("bytes=0-", 8 * MIB), 0);
        assert_eq!(first_to_fetch("bytes=-500", 8 * MIB), 0);
        assert_eq!(first_to_fetch("bytes=x-", 8 * MIB), 0);
    }

    #[test]
    fn keys_share_the_object_prefix() {
        let k = crate::cache::store::key("b", "o", "big.bin", "");
        assert!(key(&k, MIB, 3).starts_with(&prefix(&k)));
        assert!(meta_key(&k).starts_with(&prefix(&k)));
        assert!(prefix(&k).starts_with(&crate::cache::store::object_prefix("b", "big.bin")));
        assert_ne!(key(&k, MIB, 1), key(&k, MIB, 11));
        assert_ne!(
            key(&k, MIB, 1),
            key(&k, 2 * MIB, 1),
            "another size, another slice"
        );
    }
}
