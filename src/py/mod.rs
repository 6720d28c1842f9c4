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
