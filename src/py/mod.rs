//! Python bindings (feature `python`): argument conversion, GIL release, Ctrl-C and panic handling.
//! The kernels themselves live in the crate root modules and know nothing of Python.

pub mod backbone;
pub mod metrics;
pub mod ops;
pub mod runtime;

/// The extension's own allocations use mimalloc, not the host process's glibc malloc: freeing a
/// multi-megabyte kernel buffer through glibc raises its dynamic mmap threshold for the whole
/// process, after which a PyTorch loop that allocates ~32 MB temporaries grew by gigabytes (seen
/// with anomalib's KCenterGreedy run after `ops.coreset`). Keeping our buffers off glibc leaves the
/// user's process behaving as if anomalox had not run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index in its v3 `mi_option_e`; libmimalloc-sys names no
/// constant for it) and that option's default, checked before setting it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_DEFAULT_PURGE_DELAY: std::os::raw::c_long = 1000;

/// Freed memory goes back to the OS at once (`purge_delay` 0) unless the user set
/// `MIMALLOC_PURGE_DELAY`. With mimalloc's default (1 s, applied only when the freeing thread
/// allocates again) a dropped buffer of hundreds of MB, such as PaDiM's Gaussian accumulator,
/// stayed resident for the life of the process. Kernel timings were unchanged by it (measured).
/// Nothing is set unless the option still reads its default, so a mimalloc whose option list
/// moved cannot have another option changed by mistake (a test checks that the memory comes back).
pub fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reads and sets a process-wide option of the allocator linked into this extension.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}
