//! Heap blocks a worker thread reuses: [`ReusedBox`] is a `Box` whose block
//! comes from, and goes back to, a per-thread free list of blocks of its
//! size, so what the request path boxes once per request (the request's
//! future, a writev's iovecs) costs no allocation once the thread has
//! served a few. A block is only ever reused on the thread that freed it;
//! the lists are bounded, and freed with the thread.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Blocks kept per size: one per box alive at once on a thread, up to this
/// many (an 8 KiB future: 512 KiB at most).
const KEEP: usize = 64;

/// A value in a reused heap block. Its address never changes while it
/// lives (a future in one may be polled in place; a kernel may be handed a
/// pointer into one).
pub struct ReusedBox<T> {
    ptr: NonNull<T>,
}

impl<T> ReusedBox<T> {
    /// Moves `value` into a block of this thread's (a new one when none of
    /// its size is free).
    pub fn new(value: T) -> Self {
        let layout = Layout::new::<T>();
        let ptr: NonNull<T> = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            take(layout).cast()
        };
        // SAFETY: `ptr` is a block of `T`'s layout that nothing else uses
        // (fresh, or taken off the free list), or dangling for a zero-size
        // `T`, which a write to does not touch memory.
        unsafe { ptr.as_ptr().write(value) };
        Self { ptr }
    }
}

impl<T> Drop for ReusedBox<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds an initialised `T` owned by this box, dropped
        // exactly once here; its block is not used after it goes back.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        let layout = Layout::new::<T>();
        if layout.size() != 0 {
            give_back(layout, self.ptr.cast());
        }
    }
}

impl<T> Deref for ReusedBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` for the box's life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for ReusedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow.
        unsafe { self.ptr.as_mut() }
    }
}

/// Moving the box moves the pointer, never the value: like `Box`.
impl<T> Unpin for ReusedBox<T> {}

impl<F: Future> Future for ReusedBox<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future stays in its block, unmoved, until the box
        // drops it in place (`drop`): pinning it is sound, as for `Box`.
        unsafe { Pin::new_unchecked(&mut **self) }.poll(cx)
    }
}

/// This thread's free blocks, by layout (a few layouts at most). Freed
/// with the thread.
struct FreeBlocks(Vec<(Layout, Vec<NonNull<u8>>)>);

impl Drop for FreeBlocks {
    fn drop(&mut self) {
        for (layout, blocks) in self.0.drain(..) {
            for b in blocks {
                // SAFETY: every kept block was allocated with `layout`
                // (`take`) and is owned by the list alone.
                unsafe { dealloc(b.as_ptr(), layout) };
            }
        }
    }
}

thread_local! {
    static FREE: RefCell<FreeBlocks> = const { RefCell::new(FreeBlocks(Vec::new())) };
}

/// A block of `layout` (non-zero size): a kept one, or a new one.
fn take(layout: Layout) -> NonNull<u8> {
    let kept = FREE
        .try_with(|f| {
            let mut f = f.borrow_mut();
            f.0.iter_mut()
                .find(|(l, _)| *l == layout)
                .and_then(|(_, blocks)| blocks.pop())
        })
        .ok()
        .flatten();
    kept.unwrap_or_else(|| {
        // SAFETY: `layout` has a non-zero size (checked by the caller).
        let p = unsafe { alloc(layout) };
        NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout))
    })
}

/// Keeps `block` (of `layout`) for the next box of its size, or frees it
/// when enough are kept (or the thread is ending).
fn give_back(layout: Layout, block: NonNull<u8>) {
    let kept = FREE.try_with(|f| {
        let mut f = f.borrow_mut();
        let i = match f.0.iter().position(|(l, _)| *l == layout) {
            Some(i) => i,
            None => {
                f.0.push((layout, Vec::new()));
                f.0.len() - 1
            }
        };
        let blocks = &mut f.0[i].1;
        if blocks.len() < KEEP {
            blocks.push(block);
            true
        } else {
            false
        }
    });
    if kept != Ok(true) {
        // SAFETY: `block` was allocated with `layout` and nothing uses it.
        unsafe { dealloc(block.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn a_freed_block_is_reused_and_values_are_dropped_once() {
        let first = ReusedBox::new([7u64; 16]);
        let addr = &*first as *const _ as usize;
        assert_eq!(first[3], 7);
        drop(first);
        let mut second = ReusedBox::new([1u64; 16]);
        assert_eq!(&*second as *const _ as usize, addr, "the block came back");
        second[0] = 9;
        assert_eq!(second[0], 9);

        let counted = Rc::new(());
        let held = ReusedBox::new(counted.clone());
        assert_eq!(Rc::strong_count(&counted), 2);
        drop(held);
        assert_eq!(Rc::strong_count(&counted), 1);

        // Zero-size values need no block.
        let unit = ReusedBox::new(());
        drop(unit);
    }

    #[test]
    fn a_future_runs_in_its_block() {
        let mut f = ReusedBox::new(async { 40 + 2 });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Ready(42));
    }

    #[test]
    fn at_most_keep_blocks_are_kept() {
        let many: Vec<_> = (0..KEEP + 10)
            .map(|i| ReusedBox::new([i as u32; 33]))
            .collect();
        drop(many);
        let kept = FREE.with(|f| {
            f.borrow()
                .0
                .iter()
                .find(|(l, _)| *l == Layout::new::<[u32; 33]>())
                .map_or(0, |(_, b)| b.len())
        });
        assert_eq!(kept, KEEP);
    }
}
