//! `anomalox._core` functions behind `anomalox.ops`. The Python layer has already converted
//! tensors to numpy views, checked dtypes and ranks and resolved `n_threads`; here we validate
//! values and sizes, run the kernel off the GIL and hand the result back without a copy.

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyReadonlyArray4, PyReadwriteArray2,
};
use pyo3::prelude::*;

use crate::py::runtime::{argument_error, run, to_py_err};
use crate::validate::ensure_finite;
use crate::{
    blur, coreset as coreset_k, gaussian, knn as knn_k, mahalanobis as mahalanobis_k,
    stitch as stitch_k, upsample as upsample_k,
};

type Pair<'py, A, B> = (Bound<'py, A>, Bound<'py, B>);

#[pyfunction]
#[pyo3(signature = (queries, bank, k, metric, n_threads, check_finite=true))]
pub fn knn<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    bank: PyReadonlyArray2<'py, f32>,
    k: usize,
    metric: &str,
    n_threads: usize,
    check_finite: bool,
) -> PyResult<Pair<'py, PyArray2<f32>, PyArray2<i64>>> {
    let metric = knn_k::Metric::parse(metric).ok_or_else(|| {
        argument_error(
            "metric",
            format!("expected 'euclidean' or 'sqeuclidean', got {metric:?}"),
        )
    })?;
    let (q, b) = (queries.as_array(), bank.as_array());
    let (dist, idx) = run(py, n_threads, |intr| {
        if check_finite {
            ensure_finite(&q, "queries")?;
            ensure_finite(&b, "bank")?;
        }
        knn_k::knn(q, b, k, metric, intr)
    })?;
    Ok((dist.into_pyarray(py), idx.into_pyarray(py)))
}

#[pyfunction]
#[pyo3(signature = (features, size, projection_dim, seed, n_threads))]
pub fn coreset<'py>(
    py: Python<'py>,
    features: PyReadonlyArray2<'py, f32>,
    size: usize,
    projection_dim: Option<usize>,
    seed: u64,
    n_threads: usize,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let x = features.as_array();
    let selected = run(py, n_threads, |intr| {
        ensure_finite(&x, "features")?;
        coreset_k::coreset(x, size, projection_dim, seed, intr)
    })?;
    Ok(selected.into_pyarray(py))
}

/// `coreset` without projection on a writable C-contiguous array used as the working copy
/// (its rows come back reordered).
#[pyfunction]
#[pyo3(signature = (features, size, seed, n_threads))]
pub fn coreset_in_place<'py>(
    py: Python<'py>,
    mut features: PyReadwriteArray2<'py, f32>,
    size: usize,
    seed: u64,
    n_threads: usize,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let (n, d) = features.as_array().dim();
    let rows = features.as_slice_mut().map_err(|_| {
        argument_error("features", "expected a C-contiguous array to work in place")
    })?;
    let selected = run(py, n_threads, |intr| {
        coreset_k::coreset_in_place(rows, n, d, size, seed, intr)
    })?;
    Ok(selected.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (features, indices, n_threads))]
pub fn coreset_coverage(
    py: Python<'_>,
    features: PyReadonlyArray2<'_, f32>,
    indices: PyReadonlyArray1<'_, i64>,
    n_threads: usize,
) -> PyResult<f32> {
    let x = features.as_array();
    let selected = indices.as_array().to_vec();
    run(py, n_threads, |intr| {
        ensure_finite(&x, "features")?;
        coreset_k::coverage(x, &selected, intr)
    })
}

#[pyfunction]
#[pyo3(signature = (features, eps, n_threads))]
pub fn gaussian_fit<'py>(
    py: Python<'py>,
    features: PyReadonlyArray4<'py, f32>,
    eps: f64,
    n_threads: usize,
) -> PyResult<Pair<'py, PyArray2<f32>, PyArray3<f32>>> {
    let x = features.as_array();
    // The kernel checks finiteness itself, before touching any state.
    let (mean, inv_cov) = run(py, n_threads, |intr| gaussian::gaussian_fit(x, eps, intr))?;
    Ok((mean.into_pyarray(py), inv_cov.into_pyarray(py)))
}

#[pyfunction]
#[pyo3(signature = (features, mean, inv_cov, n_threads))]
pub fn mahalanobis<'py>(
    py: Python<'py>,
    features: PyReadonlyArray4<'py, f32>,
    mean: PyReadonlyArray2<'py, f32>,
    inv_cov: PyReadonlyArray3<'py, f32>,
    n_threads: usize,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let (x, mu, prec) = (features.as_array(), mean.as_array(), inv_cov.as_array());
    let maps = run(py, n_threads, |intr| {
        ensure_finite(&x, "features")?;
        mahalanobis_k::mahalanobis(x, mu, prec, intr)
    })?;
    Ok(maps.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (maps, height, width, mode, n_threads))]
pub fn upsample<'py>(
    py: Python<'py>,
    maps: PyReadonlyArray3<'py, f32>,
    height: usize,
    width: usize,
    mode: &str,
    n_threads: usize,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let mode = upsample_k::Interpolation::parse(mode).ok_or_else(|| {
        argument_error(
            "mode",
            format!("expected 'bilinear' or 'nearest', got {mode:?}"),
        )
    })?;
    let m = maps.as_array();
    let out = run(py, n_threads, |intr| {
        ensure_finite(&m, "maps")?;
        upsample_k::upsample(m, height, width, mode, intr)
    })?;
    Ok(out.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (maps, sigma, n_threads))]
pub fn gaussian_blur<'py>(
    py: Python<'py>,
    maps: PyReadonlyArray3<'py, f32>,
    sigma: f64,
    n_threads: usize,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let m = maps.as_array();
    let out = run(py, n_threads, |intr| {
        ensure_finite(&m, "maps")?;
        blur::gaussian_blur(m, sigma, intr)
    })?;
    Ok(out.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (tiles, offsets, image_index, n_images, height, width, n_threads))]
#[allow(clippy::too_many_arguments)]
pub fn stitch<'py>(
    py: Python<'py>,
    tiles: PyReadonlyArray3<'py, f32>,
    offsets: PyReadonlyArray2<'py, i64>,
    image_index: Option<PyReadonlyArray1<'py, i64>>,
    n_images: usize,
    height: usize,
    width: usize,
    n_threads: usize,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let (t, off) = (tiles.as_array(), offsets.as_array());
    let idx = image_index.as_ref().map(|i| i.as_array());
    let out = run(py, n_threads, |intr| {
        ensure_finite(&t, "tiles")?;
        stitch_k::stitch(t, off, idx, n_images, height, width, intr)
    })?;
    Ok(out.into_pyarray(py))
}

/// Streaming per-position Gaussian statistics (see `crate::gaussian::GaussianAccumulator`).
#[pyclass(module = "anomalox._core")]
pub struct GaussianAccumulator {
    inner: gaussian::GaussianAccumulator,
}

#[pymethods]
impl GaussianAccumulator {
    #[new]
    fn new(channels: usize, height: usize, width: usize) -> PyResult<Self> {
        let inner =
            gaussian::GaussianAccumulator::new(channels, height, width).map_err(to_py_err)?;
        Ok(GaussianAccumulator { inner })
    }

    #[pyo3(signature = (features, n_threads))]
    fn update(
        &mut self,
        py: Python<'_>,
        features: PyReadonlyArray4<'_, f32>,
        n_threads: usize,
    ) -> PyResult<()> {
        let x = features.as_array();
        let inner = &mut self.inner;
        run(py, n_threads, |intr| inner.update(x, intr))
    }

    #[pyo3(signature = (eps, n_threads))]
    fn finalize<'py>(
        &self,
        py: Python<'py>,
        eps: f64,
        n_threads: usize,
    ) -> PyResult<Pair<'py, PyArray2<f32>, PyArray3<f32>>> {
        let inner = &self.inner;
        let (mean, inv_cov) = run(py, n_threads, |intr| inner.finalize(eps, intr))?;
        Ok((mean.into_pyarray(py), inv_cov.into_pyarray(py)))
    }

    /// Copies of the raw state: mean f64 (H·W, C), centred scatter f64 (H·W, C, C), count.
    fn state<'py>(
        &self,
        py: Python<'py>,
    ) -> (Bound<'py, PyArray2<f64>>, Bound<'py, PyArray3<f64>>, usize) {
        let (mean, scatter, n) = self.inner.state();
        (
            mean.to_owned().into_pyarray(py),
            scatter.to_owned().into_pyarray(py),
            n,
        )
    }

    /// An accumulator rebuilt from `state()` on a `height` × `width` grid.
    #[staticmethod]
    #[pyo3(signature = (mean, scatter, n, height, width))]
    fn from_state(
        mean: PyReadonlyArray2<'_, f64>,
        scatter: PyReadonlyArray3<'_, f64>,
        n: usize,
        height: usize,
        width: usize,
    ) -> PyResult<Self> {
        let inner = gaussian::GaussianAccumulator::from_state(
            mean.as_array().to_owned(),
            scatter.as_array().to_owned(),
            n,
            height,
            width,
        )
        .map_err(to_py_err)?;
        Ok(GaussianAccumulator { inner })
    }

    /// Absorb `other`'s statistics (Chan et al.'s pairwise merge; see the kernel).
    #[pyo3(signature = (other, n_threads))]
    fn merge(
        &mut self,
        py: Python<'_>,
        other: PyRef<'_, GaussianAccumulator>,
        n_threads: usize,
    ) -> PyResult<()> {
        let inner = &mut self.inner;
        let other = &other.inner;
        run(py, n_threads, |intr| inner.merge(other, intr))
    }

    #[getter]
    fn n_samples(&self) -> usize {
        self.inner.n_samples()
    }

    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        (
            self.inner.channels(),
            self.inner.height(),
            self.inner.width(),
        )
    }
}

/// Deliberately panic inside a pool worker, to test that panics surface as `InternalError`.
#[pyfunction]
#[pyo3(signature = (n_threads))]
pub fn _debug_panic(py: Python<'_>, n_threads: usize) -> PyResult<()> {
    run(py, n_threads, |_| {
        use rayon::prelude::*;
        let total: usize = (0..64usize)
            .into_par_iter()
            .map(|i| {
                if i == 37 {
                    panic!("deliberate test panic in worker {i}")
                } else {
                    i
                }
            })
            .sum();
        Ok(total).map(|_| ())
    })
}
