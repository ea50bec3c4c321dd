//! Giving freed memory back to the node. glibc keeps in its heaps what a burst of
//! connections freed, so the agent's RSS would stay at its peak for good; every
//! [`super::SWEEP_EVERY`] the agent asks it to return the free pages at the top and
//! inside its heaps (`malloc_trim`). Pages still in use are untouched; a page returned
//! and needed again costs one page fault.

/// Returns free heap pages to the kernel (off the async workers: it walks every heap).
pub(super) fn return_free_pages() {
    #[cfg(target_env = "gnu")]
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only reorganises glibc's own free lists; it takes the
        // allocator's locks like any malloc call.
        unsafe { libc::malloc_trim(0) };
    });
}
