//! The agent's heap: glibc gives each thread that allocates under contention a heap
//! (arena) of its own, up to eight per core, and keeps in them what a burst of
//! connections freed, scattered between what is still in use, so the agent's RSS
//! would stay near its peak. The agent caps the heaps at one per core and, on its
//! sweep (every 10 s), asks glibc to return the free pages (`malloc_trim`). Pages
//! still in use are untouched; a page returned and needed again costs one page fault.

/// Caps glibc's heaps at one per core (call before the async runtime starts its
/// threads).
pub fn one_heap_per_core() {
    #[cfg(target_env = "gnu")]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: mallopt only sets a tunable of glibc's allocator; called before any
        // thread is started.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int) };
    }
}

/// Returns free heap pages to the kernel (off the async workers: it walks every heap).
pub(crate) fn return_free_pages() {
    #[cfg(target_env = "gnu")]
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only reorganises glibc's own free lists; it takes the
        // allocator's locks like any malloc call.
        unsafe { libc::malloc_trim(0) };
    });
}
