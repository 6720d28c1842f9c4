//! Python bindings (feature `python`): argument conversion, GIL release, Ctrl-C and panic handling.
//! The kernels themselves live in the crate root modules and know nothing of Python.

pub mod ops;
pub mod runtime;
