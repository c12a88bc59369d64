//! Process-wide memory settings, applied by each binary before it allocates much.
//!
//! Owns: turning transparent huge pages (THP) off for the process. mimalloc asks the
//! kernel for huge pages on its arenas (`MADV_HUGEPAGE`), so each first touch of a
//! 2 MiB region made the kernel zero all 2 MiB on the hot path: `clear_page_erms` under
//! `do_huge_pmd_anonymous_page` was 10% of the leader's CPU in a 3-node publish run, and
//! runs landed in a slow mode (~80 k acked/s instead of ~105 k) more often with it.
//! Latency-sensitive servers commonly run without THP for the same reason.
//! Must not: fail a start: a kernel without the setting leaves the default (the caller
//! logs the error once its logging is up).

/// Turns transparent huge pages off for this process and its children (the flag is kept
/// across `fork` and `exec`). Existing mappings are affected too: the kernel checks the
/// flag at each page fault.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}
