//! anomalox: kernels for visual anomaly detection, and (feature `python`) their Python bindings.
//!
//! Every kernel module is plain Rust (ndarray, rayon, faer) and is tested with `cargo test`
//! without Python. This file only declares the modules and registers the bindings. Nothing here
//! links libtorch: the tch backbones are the separate crate `anomalox-tch` (tch/).

pub mod aupro;
pub mod blur;
pub mod coreset;
pub mod error;
pub mod gaussian;
pub mod interrupt;
pub mod knn;
pub mod mahalanobis;
pub mod pixel_stream;
pub mod record_sort;
pub mod rng;
pub mod roc;
pub mod stitch;
pub mod upsample;
pub mod validate;

#[cfg(feature = "python")]
pub mod py;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    use pyo3::prelude::*;
    py::configure_allocator();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(py::ops::knn, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::coreset, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::coreset_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::coreset_coverage, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::gaussian_fit, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::mahalanobis, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::upsample, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::gaussian_blur, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::stitch, m)?)?;
    m.add_function(wrap_pyfunction!(py::ops::_debug_panic, m)?)?;
    m.add_class::<py::ops::GaussianAccumulator>()?;
    m.add_function(wrap_pyfunction!(py::metrics::auroc, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::pixel_auroc, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::aupr, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::f1_max, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::roc_curve, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::pro_curve, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::aupro, m)?)?;
    m.add_function(wrap_pyfunction!(py::metrics::pro_at_threshold, m)?)?;
    m.add_class::<py::metrics::PixelMetricsAccumulator>()?;
    Ok(())
}
