//! `anomalox._core` functions behind `anomalox.metrics`. The Python layer has already converted
//! labels and masks to bool arrays (checking that they hold only 0 and 1), scores and maps to
//! float32, checked ranks and matching shapes, and resolved `n_threads`; here we run the kernels
//! off the GIL and hand the curves back without a copy.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray3};
use pyo3::prelude::*;

use crate::aupro as aupro_k;
use crate::pixel_stream;
use crate::py::runtime::run;
use crate::roc::{self, InputNames};

/// (false positive rate, true positive rate or PRO, thresholds).
type Curve<'py> = (
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f32>>,
);

fn curve(py: Python<'_>, (x, y, t): (Vec<f64>, Vec<f64>, Vec<f32>)) -> Curve<'_> {
    (x.into_pyarray(py), y.into_pyarray(py), t.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (scores, labels, n_threads))]
pub fn auroc(
    py: Python<'_>,
    scores: PyReadonlyArray1<'_, f32>,
    labels: PyReadonlyArray1<'_, bool>,
    n_threads: usize,
) -> PyResult<f64> {
    let (s, l) = (scores.as_array(), labels.as_array());
    run(py, n_threads, |_| roc::auroc(s, l))
}

/// AUROC over all pixels: the kernel of `auroc`, with errors naming `maps`, `masks` and pixels.
#[pyfunction]
#[pyo3(signature = (maps, masks, n_threads))]
pub fn pixel_auroc(
    py: Python<'_>,
    maps: PyReadonlyArray1<'_, f32>,
    masks: PyReadonlyArray1<'_, bool>,
    n_threads: usize,
) -> PyResult<f64> {
    let (m, k) = (maps.as_array(), masks.as_array());
    run(py, n_threads, |_| {
        roc::auroc_named(m, k, InputNames::PIXELS)
    })
}

#[pyfunction]
#[pyo3(signature = (scores, labels, n_threads))]
pub fn aupr(
    py: Python<'_>,
    scores: PyReadonlyArray1<'_, f32>,
    labels: PyReadonlyArray1<'_, bool>,
    n_threads: usize,
) -> PyResult<f64> {
    let (s, l) = (scores.as_array(), labels.as_array());
    run(py, n_threads, |_| roc::aupr(s, l))
}

#[pyfunction]
#[pyo3(signature = (scores, labels, n_threads))]
pub fn f1_max(
    py: Python<'_>,
    scores: PyReadonlyArray1<'_, f32>,
    labels: PyReadonlyArray1<'_, bool>,
    n_threads: usize,
) -> PyResult<(f64, f32)> {
    let (s, l) = (scores.as_array(), labels.as_array());
    run(py, n_threads, |_| roc::f1_max(s, l))
}

#[pyfunction]
#[pyo3(signature = (scores, labels, n_threads))]
pub fn roc_curve<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray1<'py, f32>,
    labels: PyReadonlyArray1<'py, bool>,
    n_threads: usize,
) -> PyResult<Curve<'py>> {
    let (s, l) = (scores.as_array(), labels.as_array());
    let out = run(py, n_threads, |_| roc::roc_curve(s, l))?;
    Ok(curve(py, out))
}

#[pyfunction]
#[pyo3(signature = (maps, masks, n_threads))]
pub fn pro_curve<'py>(
    py: Python<'py>,
    maps: PyReadonlyArray3<'py, f32>,
    masks: PyReadonlyArray3<'py, bool>,
    n_threads: usize,
) -> PyResult<Curve<'py>> {
    let (m, k) = (maps.as_array(), masks.as_array());
    let out = run(py, n_threads, |intr| aupro_k::pro_curve(m, k, intr))?;
    Ok(curve(py, out))
}

#[pyfunction]
#[pyo3(signature = (maps, masks, fpr_limit, n_threads))]
pub fn aupro(
    py: Python<'_>,
    maps: PyReadonlyArray3<'_, f32>,
    masks: PyReadonlyArray3<'_, bool>,
    fpr_limit: f64,
    n_threads: usize,
) -> PyResult<f64> {
    let (m, k) = (maps.as_array(), masks.as_array());
    run(py, n_threads, |intr| aupro_k::aupro(m, k, fpr_limit, intr))
}

#[pyfunction]
#[pyo3(signature = (maps, masks, threshold, n_threads))]
pub fn pro_at_threshold(
    py: Python<'_>,
    maps: PyReadonlyArray3<'_, f32>,
    masks: PyReadonlyArray3<'_, bool>,
    threshold: f32,
    n_threads: usize,
) -> PyResult<f64> {
    let (m, k) = (maps.as_array(), masks.as_array());
    run(py, n_threads, |intr| {
        aupro_k::pro_at_threshold(m, k, threshold, intr)
    })
}

/// Streaming pixel AUROC and AUPRO (see `crate::pixel_stream::PixelMetricsAccumulator`).
#[pyclass(module = "anomalox._core")]
pub struct PixelMetricsAccumulator {
    inner: pixel_stream::PixelMetricsAccumulator,
}

#[pymethods]
impl PixelMetricsAccumulator {
    #[new]
    fn new() -> Self {
        PixelMetricsAccumulator {
            inner: pixel_stream::PixelMetricsAccumulator::new(),
        }
    }

    #[pyo3(signature = (maps, masks, n_threads))]
    fn update(
        &mut self,
        py: Python<'_>,
        maps: PyReadonlyArray3<'_, f32>,
        masks: PyReadonlyArray3<'_, bool>,
        n_threads: usize,
    ) -> PyResult<()> {
        let (m, k) = (maps.as_array(), masks.as_array());
        let inner = &mut self.inner;
        run(py, n_threads, |intr| inner.update(m, k, intr))
    }

    #[pyo3(signature = (n_threads))]
    fn pixel_auroc(&self, py: Python<'_>, n_threads: usize) -> PyResult<f64> {
        let inner = &self.inner;
        run(py, n_threads, |_| inner.auroc())
    }

    #[pyo3(signature = (fpr_limit, n_threads))]
    fn aupro(&self, py: Python<'_>, fpr_limit: f64, n_threads: usize) -> PyResult<f64> {
        let inner = &self.inner;
        run(py, n_threads, |_| inner.aupro(fpr_limit))
    }

    #[pyo3(signature = (n_threads))]
    fn pro_curve<'py>(&self, py: Python<'py>, n_threads: usize) -> PyResult<Curve<'py>> {
        let inner = &self.inner;
        let out = run(py, n_threads, |_| inner.pro_curve())?;
        Ok(curve(py, out))
    }

    /// Bounds on |binned − exact| of (pixel AUROC, AUPRO at `fpr_limit`).
    #[pyo3(signature = (fpr_limit, n_threads))]
    fn error_bounds(
        &self,
        py: Python<'_>,
        fpr_limit: f64,
        n_threads: usize,
    ) -> PyResult<(f64, f64)> {
        let inner = &self.inner;
        run(py, n_threads, |_| {
            Ok((
                inner.auroc_error_bound()?,
                inner.aupro_error_bound(fpr_limit)?,
            ))
        })
    }

    #[getter]
    fn n_images(&self) -> u64 {
        self.inner.n_images()
    }

    #[getter]
    fn n_regions(&self) -> u64 {
        self.inner.n_regions()
    }

    #[getter]
    fn n_pixels(&self) -> (u64, u64) {
        self.inner.n_pixels()
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }
}
