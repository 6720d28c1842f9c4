//! anomalox-tch: the backbones of anomalox run by libtorch inside Rust (tch), the training engine
//! of its trained detectors (`train`), and (feature
//! `python`) their Python extension `anomalox_tch._tch`, which `anomalox.Backbone` loads when it
//! is installed with the torch it was built against.
//!
//! The networks (`nets`) are plain tch and are tested with `cargo test` against libtorch alone;
//! the bindings (`py`) go through `anomalox::py::runtime::run` like the core's.

pub mod nets;
pub mod train;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_head;
#[cfg(feature = "python")]
mod py_train;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _tch(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    use pyo3::prelude::*;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("__torch_version__", env!("ANOMALOX_TORCH_VERSION"))?;
    m.add_function(wrap_pyfunction!(py::libtorch_num_threads, m)?)?;
    m.add_class::<py::BackboneModel>()?;
    m.add_class::<py_train::StfpmStudent>()?;
    m.add_function(wrap_pyfunction!(py_train::stfpm_loss, m)?)?;
    m.add_function(wrap_pyfunction!(py_train::stfpm_map, m)?)?;
    m.add_class::<py_head::HeadModel>()?;
    m.add_function(wrap_pyfunction!(py_head::rd_loss, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::rd_map, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::fre_loss, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::fre_map, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::fastflow_flow, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::fastflow_loss, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::fastflow_map, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::ssn_loss, m)?)?;
    m.add_function(wrap_pyfunction!(py_head::ssn_perlin_masks, m)?)?;
    Ok(())
}
