//! A counting global allocator for tests that bound heap use: a test
//! binary registers [`Counting`] and reads the bytes held now, the peak
//! since [`reset_peak`] and the bytes allocated in all.
//!
//! ```text
//! #[global_allocator]
//! static GLOBAL: qcowkit_tests::heap::Counting = qcowkit_tests::heap::Counting;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Forwards to the system allocator and counts bytes.
pub struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        TOTAL.fetch_add(layout.size(), Ordering::SeqCst);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Bytes held now.
pub fn current() -> usize {
    CURRENT.load(Ordering::SeqCst)
}

/// Starts a new peak at the bytes held now, which it returns.
pub fn reset_peak() -> usize {
    let now = current();
    PEAK.store(now, Ordering::SeqCst);
    now
}

/// Most bytes held at once since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::SeqCst)
}

/// Bytes allocated in all so far.
pub fn total() -> usize {
    TOTAL.load(Ordering::SeqCst)
}
