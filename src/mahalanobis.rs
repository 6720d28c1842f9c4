//! Mahalanobis scoring against per-position Gaussian statistics (PaDiM): the distance of every
//! feature vector to the mean and inverse covariance of its position, as fitted by
//! `crate::gaussian`.
//!
//! Feature maps are (B, C, H, W); position p = h·W + w, so `mean[p, c]` and `inv_cov[p, :, :]`.
//! Positions are read in blocks gathered as in the fit (`crate::gaussian::gather_block`), whose
//! size depends only on the shapes; each position is computed by one rayon task in a fixed order,
//! so results are bit-identical for any number of threads.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use ndarray::{Array3, ArrayView2, ArrayView3, ArrayView4, Axis};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::gaussian::{gather_block, gather_stride, positions_per_block, shape_str};
use crate::interrupt::Interrupt;

/// Dot product in a fixed order: eight interleaved partial sums (so that it vectorises instead of
/// waiting on one chain of additions), added up in order, then the remainder.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Mahalanobis distance map (B, H, W): sqrt((x−μ_p)ᵀ Σ_p⁻¹ (x−μ_p)) at every position p = h·W + w.
///
/// `mean` is (H·W, C) and `inv_cov` (H·W, C, C), as returned by `finalize`; any strides.
/// Computed in f64 per position (Δ·Σ⁻¹ with faer, then a row-wise dot with Δ), clamped at 0
/// before the square root. Non-finite inputs give non-finite distances. Cost O(H·W·B·C²);
/// memory: the output plus one (≤64 positions, B, C) f32 block and C² + 2·B·C f64 per busy
/// thread (no full transposed copy of the features).
pub fn mahalanobis(
    features: ArrayView4<f32>,
    mean: ArrayView2<f32>,
    inv_cov: ArrayView3<f32>,
    intr: &Interrupt,
) -> KernelResult<Array3<f32>> {
    let (b_count, c, h, w) = features.dim();
    if b_count == 0 || c == 0 || h == 0 || w == 0 {
        return Err(KernelError::invalid(
            "features",
            format!(
                "expected a non-empty (B, C, H, W) array, got shape {}",
                shape_str(features.shape())
            ),
        ));
    }
    let hw = h * w;
    if mean.dim() != (hw, c) {
        return Err(KernelError::invalid(
            "mean",
            format!(
                "expected shape ({hw}, {c}) to match features {} (H*W, C), got {}",
                shape_str(features.shape()),
                shape_str(mean.shape())
            ),
        ));
    }
    if inv_cov.dim() != (hw, c, c) {
        return Err(KernelError::invalid(
            "inv_cov",
            format!(
                "expected shape ({hw}, {c}, {c}) to match features {} (H*W, C, C), got {}",
                shape_str(features.shape()),
                shape_str(inv_cov.shape())
            ),
        ));
    }
    intr.check()?;

    let row_len = b_count * c;
    let ld = gather_stride(row_len);
    let pb = positions_per_block(hw, ld);
    let n_blocks = hw.div_ceil(pb);
    let features = &features;
    let blocks: Vec<KernelResult<Vec<f32>>> = (0..n_blocks)
        .into_par_iter()
        .map_init(
            || {
                (
                    Vec::<f32>::new(),
                    vec![0.0f64; row_len],
                    vec![0.0f64; c * c],
                    vec![0.0f64; row_len],
                    vec![0.0f64; b_count],
                )
            },
            |(buf, delta, sigma, t, d2), blk| -> KernelResult<Vec<f32>> {
                let p0 = blk * pb;
                let np = pb.min(hw - p0);
                buf.resize(np * ld, 0.0);
                gather_block(features, p0, np, buf);
                // Distances for this block, laid out (np, B).
                let mut dist = Vec::with_capacity(np * b_count);
                for (k, src) in buf.chunks_exact(ld).enumerate() {
                    if intr.is_set() {
                        return Err(KernelError::Interrupted);
                    }
                    let src = &src[..row_len];
                    let p = p0 + k;
                    // delta: row-major B×C, x − μ_p in f64.
                    let mu_p = mean.row(p);
                    for (drow, srow) in delta.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
                        for ((dv, &sv), &m) in drow.iter_mut().zip(srow).zip(mu_p.iter()) {
                            *dv = f64::from(sv) - f64::from(m);
                        }
                    }
                    for (dst, &v) in sigma.iter_mut().zip(inv_cov.index_axis(Axis(0), p).iter()) {
                        *dst = f64::from(v);
                    }
                    // t = Δ Σ⁻¹ (B × C, row-major).
                    matmul(
                        MatMut::from_row_major_slice_mut(&mut t[..], b_count, c),
                        Accum::Replace,
                        MatRef::from_row_major_slice(&delta[..], b_count, c),
                        MatRef::from_row_major_slice(&sigma[..], c, c),
                        1.0f64,
                        Par::Seq,
                    );
                    // Row-wise dot of t and Δ for every sample, in a fixed order.
                    for ((acc, trow), drow) in
                        d2.iter_mut().zip(t.chunks_exact(c)).zip(delta.chunks_exact(c))
                    {
                        *acc = dot(trow, drow);
                    }
                    // Features were checked finite, so a NaN/Inf here comes from mean or
                    // inv_cov; `max(0.0)` would turn a NaN into a silent 0 ("no anomaly").
                    if d2.iter().any(|v| !v.is_finite()) {
                        return Err(KernelError::invalid(
                            "mean/inv_cov",
                            format!(
                                "expected finite statistics, but the distance at position {p} is not finite \
                                 (mean or inv_cov holds NaN/Inf there, or values that overflow)"
                            ),
                        ));
                    }
                    dist.extend(d2.iter().map(|&v| v.max(0.0).sqrt() as f32));
                }
                Ok(dist)
            },
        )
        .collect();
    intr.check()?;
    let mut out = Array3::<f32>::zeros((b_count, h, w));
    let o = out
        .as_slice_mut()
        .expect("freshly allocated array is contiguous");
    for (blk, res) in blocks.into_iter().enumerate() {
        let dist = res?;
        let p0 = blk * pb;
        for (k, drow) in dist.chunks_exact(b_count).enumerate() {
            for (b, &d) in drow.iter().enumerate() {
                o[b * hw + p0 + k] = d;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gaussian::gaussian_fit;
    use crate::gaussian::tests::{features, max_rel_err, naive_mahalanobis, never};
    use ndarray::{s, Array2, Array4};
    use std::sync::atomic::AtomicBool;

    #[test]
    fn mahalanobis_refuses_non_finite_statistics_instead_of_returning_zero() {
        let x = Array4::from_shape_fn((3, 2, 1, 2), |(b, c, _, w)| (b * 2 + c + w) as f32 * 0.5);
        let mean = Array2::<f32>::zeros((2, 2));
        let mut inv = Array3::<f32>::zeros((2, 2, 2));
        for p in 0..2 {
            inv[[p, 0, 0]] = 1.0;
            inv[[p, 1, 1]] = 1.0;
        }
        let flag = AtomicBool::new(false);
        let intr = Interrupt::new(&flag);
        assert!(mahalanobis(x.view(), mean.view(), inv.view(), &intr).is_ok());
        let mut bad_mean = mean.clone();
        bad_mean[[1, 0]] = f32::NAN;
        let err = mahalanobis(x.view(), bad_mean.view(), inv.view(), &intr).unwrap_err();
        assert!(err.to_string().contains("position 1"), "{err}");
        let mut bad_inv = inv.clone();
        bad_inv[[0, 1, 0]] = f32::INFINITY;
        assert!(mahalanobis(x.view(), mean.view(), bad_inv.view(), &intr).is_err());
    }

    #[test]
    fn dot_equals_the_plain_sum_for_every_remainder() {
        for n in 0..27 {
            let a: Vec<f64> = (0..n).map(|i| 0.5 + i as f64).collect();
            let b: Vec<f64> = (0..n).map(|i| 1.0 - 0.25 * i as f64).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "n={n}"
            );
        }
    }

    #[test]
    fn mahalanobis_matches_naive() {
        let train = features(30, 7, 3, 3, 5);
        let test = features(4, 7, 3, 3, 6).mapv(|v| v * 1.5);
        let (mean, inv) = gaussian_fit(train.view(), 0.01, &never()).unwrap();
        let d = mahalanobis(test.view(), mean.view(), inv.view(), &never()).unwrap();
        assert_eq!(d.dim(), (4, 3, 3));
        let want = naive_mahalanobis(&test, &mean, &inv);
        let err = max_rel_err(&d.mapv(f64::from), &want);
        assert!(err < 1e-6, "relative error {err}");
        assert!(d.iter().all(|&v| v > 0.0));
        // A single image (B = 1) gives the same distances as inside the batch.
        let one = mahalanobis(
            test.slice(s![2..3, .., .., ..]),
            mean.view(),
            inv.view(),
            &never(),
        )
        .unwrap();
        for (a, b) in one.iter().zip(d.index_axis(Axis(0), 2).iter()) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn mahalanobis_of_the_mean_is_zero() {
        let train = features(12, 4, 2, 3, 7);
        let (mean, inv) = gaussian_fit(train.view(), 0.01, &never()).unwrap();
        // Feature maps equal to the per-position mean.
        let mut x = Array4::<f32>::zeros((2, 4, 2, 3));
        for b in 0..2 {
            for c in 0..4 {
                for h in 0..2 {
                    for w in 0..3 {
                        x[[b, c, h, w]] = mean[[h * 3 + w, c]];
                    }
                }
            }
        }
        let d = mahalanobis(x.view(), mean.view(), inv.view(), &never()).unwrap();
        assert!(d.iter().all(|&v| v == 0.0));
    }
}
