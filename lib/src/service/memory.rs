//! Giving memory back to the operating system after large messages.
//!
//! glibc's `malloc` raises its mmap threshold each time a large block is
//! freed (up to 32 MiB), so later large blocks come from the heap, whose
//! freed pages are rarely returned: one 20 MB message left a worker at
//! 100–280 MB for the rest of its life (`bench/src/bin/big_messages.rs`).
//! A fixed threshold keeps large blocks on their own mappings, unmapped as
//! soon as they are freed, and a periodic trim returns freed heap pages.
//! (mimalloc, measured the same way, held more: 15 MB idle, 240–300 MB
//! after the same messages.)

/// Blocks at least this large get their own mapping (glibc's initial
/// default, kept fixed instead of growing).
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Call once at start, before any other thread exists.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::fix_mmap_threshold(MMAP_THRESHOLD);
}

/// Returns freed heap pages to the operating system; cheap when there is
/// little to return. Any thread, any time.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    pub(super) fn fix_mmap_threshold(bytes: i32) {
        // SAFETY: mallopt only sets an allocator parameter. glibc marks it
        // MT-Unsafe (init), so it is called from `service::main` before the
        // async runtime starts any thread. Setting M_MMAP_THRESHOLD also
        // turns off glibc's dynamic adjustment of it, which is the point.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
        if ok != 1 {
            tracing::debug!(
                "mallopt(M_MMAP_THRESHOLD) was refused; memory is returned by trim only"
            );
        }
    }

    pub(super) fn trim() {
        // SAFETY: malloc_trim is MT-Safe and touches only free memory.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
