//! Python bindings (feature `python`): argument conversion, GIL release, Ctrl-C and panic handling.
//! The kernels themselves live in the crate root modules and know nothing of Python.

pub mod metrics;
pub mod ops;
pub mod runtime;

/// The extension's own allocations use mimalloc, not the host process's glibc malloc: freeing a
/// multi-megabyte kernel buffer through glibc raises its dynamic mmap threshold for the whole
/// process, after which a PyTorch loop that allocates large temporaries can keep growing (see
/// BENCHMARKS.md, "Measurements moved out of code comments (bindings)"). Keeping our buffers off
/// glibc leaves the user's process behaving as if anomalox had not run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3 options set below: their indices in its `mi_option_e` (libmimalloc-sys names no
/// constants for them) and their defaults. An option is only set while mimalloc reports a v3
/// version and the option still reads its default, so a mimalloc whose option list moved cannot
/// have another option changed by mistake (tests check both effects).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_DEFAULT_PURGE_DELAY: std::os::raw::c_long = 1000;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
const MI_DEFAULT_ALLOW_THP: std::os::raw::c_long = 1;

/// Sets `option` to `value` unless the user set `env` or the option no longer reads `default`.
fn set_allocator_option(
    env: &str,
    option: libmimalloc_sys::mi_option_t,
    default: std::os::raw::c_long,
    value: std::os::raw::c_long,
) {
    if std::env::var_os(env).is_some() {
        return;
    }
    // SAFETY: reads the version of, and reads and sets a process-wide option of, the allocator
    // linked into this extension.
    unsafe {
        if (30000..40000).contains(&libmimalloc_sys::mi_version())
            && libmimalloc_sys::mi_option_get(option) == default
        {
            libmimalloc_sys::mi_option_set(option, value);
        }
    }
}

/// Called once when the extension module is initialised.
///
/// - Freed memory goes back to the OS at once (`purge_delay` 0) unless the user set
///   `MIMALLOC_PURGE_DELAY`. With mimalloc's default (1 s, applied only when the freeing thread
///   allocates again) a dropped buffer of hundreds of MB, such as PaDiM's Gaussian accumulator,
///   stays resident for the life of the process.
/// - mimalloc does not ask for transparent huge pages (`allow_thp` 0) unless the user set
///   `MIMALLOC_ALLOW_THP`. By default it marks its arenas `MADV_HUGEPAGE`; where the kernel's THP
///   defrag setting is `madvise` (a common default), each first touch of a 2 MB page can then
///   stall in compaction and zeroing, so large fresh outputs (such as `ops.gaussian_fit`'s
///   inverse covariances, new memory on each call) cost more than with 4 KB pages. Only this
///   allocator's own `madvise` is skipped; the process setting (`prctl`) and other libraries'
///   memory are left alone. Both effects are measured in BENCHMARKS.md.
pub fn configure_allocator() {
    set_allocator_option(
        "MIMALLOC_PURGE_DELAY",
        MI_OPTION_PURGE_DELAY,
        MI_DEFAULT_PURGE_DELAY,
        0,
    );
    set_allocator_option(
        "MIMALLOC_ALLOW_THP",
        MI_OPTION_ALLOW_THP,
        MI_DEFAULT_ALLOW_THP,
        0,
    );
}
