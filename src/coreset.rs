//! Greedy k-center (farthest point) coreset selection, as used by PatchCore to subsample
//! its memory bank, with an optional seeded Gaussian random projection.
//!
//! Every result is a deterministic function of the inputs and the seed: per-row work is
//! done by one task in a fixed order, block boundaries do not depend on the thread count,
//! and the argmax is a reduction over a total order, so the output is bit-identical
//! whatever the size of the current rayon pool.

use std::borrow::Cow;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;
use crate::rng::Rng;

/// Rows of features multiplied per task in the projection (fixed, so results do not
/// depend on the thread count).
const PROJECTION_BLOCK_ROWS: usize = 256;
/// Rows per task in the greedy distance update: a few hundred KiB of projected rows,
/// enough to amortise rayon's per-task cost.
const UPDATE_CHUNK_ROWS: usize = 1024;
/// Rows per task in `coverage` (each task streams every selected row once).
const COVERAGE_CHUNK_ROWS: usize = 32;
/// Mixed into the seed for the starting point, so the start is drawn from a stream
/// separate from the projection matrix and is the same with or without projection.
const START_STREAM: u64 = 0xA076_1D64_78BD_642F;

/// Greedy k-center (farthest point) selection. Returns indices in selection order (starting point first), no duplicates.
///
/// - `features`: (N, D), any strides. `size` must lie in [1, N] (the ratio-to-count
///   conversion is the caller's).
/// - `projection_dim`: `None` selects in the original space. `Some(p)` (p >= 1) first
///   projects onto p dimensions with [`random_projection`] using `seed`; it always
///   projects, even when p >= D (the greedy then runs on a random linear image of the
///   data, which is a valid but pointless choice: pass `None` to avoid it).
/// - Starting point: `Rng::new(seed ^ START_STREAM).below(N)`, a stream separate from
///   the projection's, so a seed gives the same start with or without projection.
/// - Greedy step: keep the squared distance (f32) of every point to the selected set,
///   update it with the last selected point, pick the largest; ties go to the lowest
///   index. Once every remaining distance is 0 (the rest duplicate selected points), the
///   lowest unselected indices fill the result, so it always has `size` distinct indices.
/// - Errors: InvalidArgument for empty features, `size` out of range, `projection_dim`
///   of 0, or non-finite values (in the working space); Interrupted if `intr` fires.
///
/// Memory: O(N·p) for the projected rows plus O(D·p) for the matrix (or, with `None`,
/// a copy of O(N·D) only when `features` is not contiguous row-major), plus O(N).
/// Time: O(N·D·p) for the projection plus O(size·N·p) for the greedy loop.
pub fn coreset(
    features: ArrayView2<f32>,
    size: usize,
    projection_dim: Option<usize>,
    seed: u64,
    intr: &Interrupt,
) -> KernelResult<Vec<i64>> {
    let (n, d) = features.dim();
    check_features(n, d)?;
    if size < 1 || size > n {
        return Err(KernelError::invalid(
            "size",
            format!("expected 1 <= size <= {n} (the number of rows), got {size}"),
        ));
    }
    if projection_dim == Some(0) {
        return Err(KernelError::invalid(
            "projection_dim",
            "expected None or an integer >= 1, got 0",
        ));
    }
    intr.check()?;
    let start = Rng::new(seed ^ START_STREAM).below(n);

    let (data, dim): (Cow<[f32]>, usize) = match projection_dim {
        Some(p) => (Cow::Owned(project(features, p, seed, intr)?), p),
        None => (contiguous_rows(features), d),
    };
    check_finite(&data, dim, projection_dim.is_some())?;
    greedy(&data, n, dim, size, start, intr)
}

/// Projects features (N, D) to (N, p) with a random Gaussian matrix R (D, p), entries N(0, 1/p), generated from seed in a fixed order.
///
/// Returns `features · R`, contiguous row-major. R is drawn from `Rng::new(seed)` row by
/// row (R[0,0], R[0,1], ..., R[0,p-1], R[1,0], ...), each entry `normal() / sqrt(p)`,
/// rounded to f32. Any p >= 1 is accepted, including p >= D. The product runs in fixed
/// blocks of rows, each a sequential faer matmul, so on a given machine it is
/// bit-identical for any thread count (faer picks SIMD/FMA kernels per CPU).
///
/// Memory: O(N·p) output plus O(D·p) matrix, plus one block copy per task when
/// `features` is not contiguous row-major.
pub fn random_projection(
    features: ArrayView2<f32>,
    projection_dim: usize,
    seed: u64,
    intr: &Interrupt,
) -> KernelResult<Array2<f32>> {
    let (n, d) = features.dim();
    check_features(n, d)?;
    if projection_dim == 0 {
        return Err(KernelError::invalid(
            "projection_dim",
            "expected an integer >= 1, got 0",
        ));
    }
    let out = project(features, projection_dim, seed, intr)?;
    Array2::from_shape_vec((n, projection_dim), out)
        .map_err(|e| KernelError::Numerical(format!("projection output shape: {e}")))
}

/// Max over points of the Euclidean distance to the nearest selected point (in the given space). For benchmarks/tests.
///
/// `selected` must be non-empty with every index in [0, N); repeats are allowed.
/// Computed in f32 with the same distance kernel as [`coreset`].
/// Memory: O(|selected|·D) for a contiguous copy of the selected rows (plus O(N·D) when
/// `features` is not contiguous row-major). Time: O(N·|selected|·D).
pub fn coverage(
    features: ArrayView2<f32>,
    selected: &[i64],
    intr: &Interrupt,
) -> KernelResult<f32> {
    let (n, d) = features.dim();
    check_features(n, d)?;
    if selected.is_empty() {
        return Err(KernelError::invalid(
            "selected",
            "expected at least one index, got an empty list",
        ));
    }
    let mut rows = Vec::with_capacity(selected.len());
    for &s in selected {
        match usize::try_from(s) {
            Ok(i) if i < n => rows.push(i),
            _ => {
                return Err(KernelError::invalid(
                    "selected",
                    format!("expected indices in [0, {n}), got {s}"),
                ))
            }
        }
    }
    let data = contiguous_rows(features);
    check_finite(&data, d, false)?;
    let sel: Vec<f32> = rows
        .iter()
        .flat_map(|&i| data[i * d..(i + 1) * d].iter().copied())
        .collect();

    let worst = data
        .par_chunks(COVERAGE_CHUNK_ROWS * d)
        .map(|block| {
            if intr.is_set() {
                return 0.0f32;
            }
            let mut nearest = [f32::INFINITY; COVERAGE_CHUNK_ROWS];
            // Selected rows in the outer loop: the block stays in cache while they stream.
            for srow in sel.chunks_exact(d) {
                for (m, x) in nearest.iter_mut().zip(block.chunks_exact(d)) {
                    let dist = sq_dist(x, srow);
                    if dist < *m {
                        *m = dist;
                    }
                }
            }
            let rows_here = block.len() / d;
            nearest[..rows_here].iter().copied().fold(0.0f32, f32::max)
        })
        .reduce(|| 0.0f32, f32::max);
    intr.check()?;
    Ok(worst.sqrt())
}

fn check_features(n: usize, d: usize) -> KernelResult<()> {
    if n == 0 || d == 0 {
        return Err(KernelError::invalid(
            "features",
            format!("expected a non-empty (N, D) array, got shape ({n}, {d})"),
        ));
    }
    Ok(())
}

/// The rows of `x` as one contiguous row-major slice, borrowed when already laid out so.
fn contiguous_rows<'a>(x: ArrayView2<'a, f32>) -> Cow<'a, [f32]> {
    match x.to_slice() {
        Some(s) => Cow::Borrowed(s),
        // `iter()` walks in logical (row-major) order whatever the strides.
        None => Cow::Owned(x.iter().copied().collect()),
    }
}

/// InvalidArgument naming the first row with a NaN or infinity.
fn check_finite(data: &[f32], dim: usize, projected: bool) -> KernelResult<()> {
    let bad = data
        .par_chunks(dim)
        .position_first(|row| row.iter().any(|v| !v.is_finite()));
    match bad {
        None => Ok(()),
        Some(row) => Err(KernelError::invalid(
            "features",
            format!(
                "expected finite values, got a NaN or infinity in row {row}{}",
                if projected { " (after projection)" } else { "" }
            ),
        )),
    }
}

/// Projected rows (N·p, row-major); arguments already validated.
fn project(
    features: ArrayView2<f32>,
    p: usize,
    seed: u64,
    intr: &Interrupt,
) -> KernelResult<Vec<f32>> {
    let (n, d) = features.dim();
    let (Some(out_len), Some(mat_len)) = (n.checked_mul(p), d.checked_mul(p)) else {
        return Err(KernelError::invalid(
            "projection_dim",
            format!("expected a projection that fits in memory, got {p} for shape ({n}, {d})"),
        ));
    };
    let mut r = alloc_f32(mat_len, p)?;
    let mut rng = Rng::new(seed);
    let scale = 1.0 / (p as f64).sqrt();
    r.extend((0..mat_len).map(|_| (rng.normal() * scale) as f32));
    let mut out = alloc_f32(out_len, p)?;
    out.resize(out_len, 0.0);
    intr.check()?;

    let rhs = MatRef::from_row_major_slice(&r, d, p);
    out.par_chunks_mut(PROJECTION_BLOCK_ROWS * p)
        .enumerate()
        .try_for_each(|(b, out_block)| {
            if intr.is_set() {
                return Err(KernelError::Interrupted);
            }
            let r0 = b * PROJECTION_BLOCK_ROWS;
            let rows = out_block.len() / p;
            let x = contiguous_rows(features.slice(s![r0..r0 + rows, ..]));
            let lhs = MatRef::from_row_major_slice(&x, rows, d);
            let dst = MatMut::from_row_major_slice_mut(out_block, rows, p);
            matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
            Ok(())
        })?;
    Ok(out)
}

/// An empty Vec with room for `len` floats, or InvalidArgument instead of aborting.
fn alloc_f32(len: usize, p: usize) -> KernelResult<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        KernelError::invalid(
            "projection_dim",
            format!("expected a projection that fits in memory, got {p} ({len} floats)"),
        )
    })?;
    Ok(v)
}

/// The greedy loop on contiguous rows `x` (n × dim, all finite), starting at `start`.
fn greedy(
    x: &[f32],
    n: usize,
    dim: usize,
    size: usize,
    start: usize,
    intr: &Interrupt,
) -> KernelResult<Vec<i64>> {
    let mut min_dist = vec![f32::INFINITY; n];
    let mut selected = vec![false; n];
    let mut order = Vec::with_capacity(size);
    let mut s = start;
    loop {
        order.push(s as i64);
        selected[s] = true;
        // Exactly 0 from now on (distances are >= 0), so s is never picked again.
        min_dist[s] = 0.0;
        if order.len() == size {
            return Ok(order);
        }
        intr.check()?;
        let (best, idx) =
            update_and_argmax(x, dim, &x[s * dim..(s + 1) * dim], &mut min_dist, intr);
        intr.check()?;
        if best > 0.0 {
            s = idx;
        } else {
            // Every point coincides with a selected one, and stays so: fill deterministically.
            order.extend(
                (0..n)
                    .filter(|&i| !selected[i])
                    .take(size - order.len())
                    .map(|i| i as i64),
            );
            return Ok(order);
        }
    }
}

/// `min_dist[i] = min(min_dist[i], ‖x_i − c‖²)` for all i; returns the (largest value,
/// lowest index holding it). Bails out early (with a meaningless result) if interrupted.
fn update_and_argmax(
    x: &[f32],
    dim: usize,
    c: &[f32],
    min_dist: &mut [f32],
    intr: &Interrupt,
) -> (f32, usize) {
    min_dist
        .par_chunks_mut(UPDATE_CHUNK_ROWS)
        .zip(x.par_chunks(UPDATE_CHUNK_ROWS * dim))
        .enumerate()
        .map(|(chunk, (md, rows))| {
            if intr.is_set() {
                return (f32::NEG_INFINITY, usize::MAX);
            }
            let base = chunk * UPDATE_CHUNK_ROWS;
            let mut best = (f32::NEG_INFINITY, usize::MAX);
            for (k, (m, row)) in md.iter_mut().zip(rows.chunks_exact(dim)).enumerate() {
                let dist = sq_dist(row, c);
                if dist < *m {
                    *m = dist;
                }
                // Strict: the first (lowest) index wins ties within the chunk.
                if *m > best.0 {
                    best = (*m, base + k);
                }
            }
            best
        })
        .reduce(|| (f32::NEG_INFINITY, usize::MAX), larger_then_lower_index)
}

/// Total order for the argmax reduction: larger value wins, then the lower index, so
/// the result does not depend on how rayon splits the work.
fn larger_then_lower_index(a: (f32, usize), b: (f32, usize)) -> (f32, usize) {
    if a.0 > b.0 || (a.0 == b.0 && a.1 < b.1) {
        a
    } else {
        b
    }
}

/// Squared Euclidean distance in f32, in 16 independent lanes so it vectorises (and the
/// additions are not one serial chain), summed in a fixed order.
#[inline(always)]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..L {
            let t = xa[l] - xb[l];
            acc[l] += t * t;
        }
    }
    let mut tail = 0.0f32;
    for (&u, &v) in ra.iter().zip(rb) {
        let t = u - v;
        tail += t * t;
    }
    // Pairwise tree over the lanes.
    let mut w = L;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use std::sync::atomic::AtomicBool;

    fn random_matrix(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut rng = Rng::new(seed);
        Array2::from_shape_fn((n, d), |_| rng.normal() as f32)
    }

    /// `k` cluster centres spread with sd `spread`, points at sd 1 around them.
    fn clustered(n: usize, d: usize, k: usize, spread: f64, seed: u64) -> Array2<f32> {
        let mut rng = Rng::new(seed);
        let centres: Vec<Vec<f64>> = (0..k)
            .map(|_| (0..d).map(|_| spread * rng.normal()).collect())
            .collect();
        let mut x = Array2::zeros((n, d));
        for i in 0..n {
            let c = &centres[rng.below(k)];
            for j in 0..d {
                x[[i, j]] = (c[j] + rng.normal()) as f32;
            }
        }
        x
    }

    fn start_for(seed: u64, n: usize) -> usize {
        Rng::new(seed ^ START_STREAM).below(n)
    }

    fn naive_sq_dist(x: &ArrayView2<f32>, i: usize, j: usize) -> f64 {
        (0..x.ncols())
            .map(|k| {
                let t = x[[i, k]] as f64 - x[[j, k]] as f64;
                t * t
            })
            .sum()
    }

    /// Textbook greedy k-center in f64 with the documented rules (ties -> lowest index,
    /// all-zero -> lowest unselected index).
    fn naive_greedy(x: ArrayView2<f32>, size: usize, start: usize) -> Vec<i64> {
        let n = x.nrows();
        let mut selected = vec![false; n];
        let mut order = vec![];
        let mut s = start;
        loop {
            order.push(s as i64);
            selected[s] = true;
            if order.len() == size {
                return order;
            }
            let mut best = (-1.0f64, usize::MAX);
            for (i, &done) in selected.iter().enumerate() {
                if done {
                    continue;
                }
                let nearest = order
                    .iter()
                    .map(|&j| naive_sq_dist(&x, i, j as usize))
                    .fold(f64::INFINITY, f64::min);
                if nearest > best.0 {
                    best = (nearest, i);
                }
            }
            s = if best.0 > 0.0 {
                best.1
            } else {
                (0..n).find(|&i| !selected[i]).unwrap()
            };
        }
    }

    fn naive_coverage(x: ArrayView2<f32>, selected: &[i64]) -> f64 {
        (0..x.nrows())
            .map(|i| {
                selected
                    .iter()
                    .map(|&j| naive_sq_dist(&x, i, j as usize))
                    .fold(f64::INFINITY, f64::min)
            })
            .fold(0.0, f64::max)
            .sqrt()
    }

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    fn assert_distinct(sel: &[i64], n: usize) {
        let mut seen = vec![false; n];
        for &i in sel {
            assert!((0..n as i64).contains(&i), "index {i} out of range");
            assert!(!seen[i as usize], "index {i} selected twice in {sel:?}");
            seen[i as usize] = true;
        }
    }

    #[test]
    fn greedy_without_projection_matches_naive_reference() {
        let never = Interrupt::never();
        for (n, d, size, seed) in [
            (200, 7, 50, 1u64),
            (150, 33, 150, 2),
            (300, 16, 40, 3),
            (64, 1, 20, 4),
            (2500, 20, 60, 5), // several update chunks
        ] {
            let x = random_matrix(n, d, 100 + seed);
            let got = coreset(x.view(), size, None, seed, &never).unwrap();
            let want = naive_greedy(x.view(), size, start_for(seed, n));
            assert_eq!(got, want, "n={n} d={d} size={size}");
        }
    }

    #[test]
    fn selection_starts_at_the_seeded_point_and_has_no_duplicates() {
        let x = random_matrix(500, 12, 9);
        for seed in 0..5u64 {
            for proj in [None, Some(4)] {
                let sel = coreset(x.view(), 100, proj, seed, &Interrupt::never()).unwrap();
                assert_eq!(sel.len(), 100);
                assert_eq!(sel[0], start_for(seed, 500) as i64);
                assert_distinct(&sel, 500);
            }
        }
    }

    #[test]
    fn size_one_returns_only_the_start() {
        let x = random_matrix(40, 3, 1);
        let sel = coreset(x.view(), 1, Some(2), 77, &Interrupt::never()).unwrap();
        assert_eq!(sel, vec![start_for(77, 40) as i64]);
    }

    #[test]
    fn size_equal_to_n_returns_a_permutation() {
        let x = random_matrix(97, 5, 3);
        for proj in [None, Some(3)] {
            let mut sel = coreset(x.view(), 97, proj, 8, &Interrupt::never()).unwrap();
            assert_distinct(&sel, 97);
            sel.sort();
            assert_eq!(sel, (0..97).collect::<Vec<i64>>());
        }
    }

    #[test]
    fn duplicated_rows_still_give_distinct_indices() {
        // 5 distinct points, each repeated 4 times (interleaved), so ties and exact
        // zeros both occur.
        let base = random_matrix(5, 6, 21);
        let x = Array2::from_shape_fn((20, 6), |(i, j)| base[[i % 5, j]]);
        for seed in 0..4u64 {
            for size in [3, 5, 12, 20] {
                let sel = coreset(x.view(), size, None, seed, &Interrupt::never()).unwrap();
                assert_eq!(sel, naive_greedy(x.view(), size, start_for(seed, 20)));
                assert_distinct(&sel, 20);
                // The first min(size, 5) picks cover distinct points.
                let mut classes: Vec<i64> = sel.iter().take(5).map(|i| i % 5).collect();
                classes.sort();
                classes.dedup();
                assert_eq!(classes.len(), size.min(5));
            }
        }
        // All rows identical: start, then the lowest other indices.
        let same = Array2::from_elem((6, 3), 1.5f32);
        let sel = coreset(same.view(), 4, Some(2), 5, &Interrupt::never()).unwrap();
        let s0 = start_for(5, 6) as i64;
        let rest: Vec<i64> = (0..6).filter(|&i| i != s0).take(3).collect();
        assert_eq!(sel[0], s0);
        assert_eq!(&sel[1..], &rest[..]);
    }

    #[test]
    fn strided_input_gives_the_same_result_as_contiguous() {
        let x = random_matrix(300, 21, 4);
        let mut xt = Array2::<f32>::zeros((21, 300)); // row-major
        xt.assign(&x.t());
        let strided = xt.t(); // (300, 21) view with column-major strides
        assert!(strided.as_slice().is_none());
        let never = Interrupt::never();
        for proj in [None, Some(8)] {
            assert_eq!(
                coreset(x.view(), 60, proj, 3, &never).unwrap(),
                coreset(strided, 60, proj, 3, &never).unwrap()
            );
        }
        let a = random_projection(x.view(), 8, 3, &never).unwrap();
        let b = random_projection(strided, 8, 3, &never).unwrap();
        assert_eq!(a, b);
        let sel = [3i64, 100, 250];
        assert_eq!(
            coverage(x.view(), &sel, &never).unwrap().to_bits(),
            coverage(strided, &sel, &never).unwrap().to_bits()
        );
        // Every other row of a bigger array (row stride 2·D).
        let big = random_matrix(600, 21, 5);
        let every_other = big.slice(s![..;2, ..]);
        let copy = every_other.to_owned();
        assert_eq!(
            coreset(every_other, 50, Some(5), 1, &never).unwrap(),
            coreset(copy.view(), 50, Some(5), 1, &never).unwrap()
        );
    }

    #[test]
    fn results_are_deterministic_and_identical_across_thread_counts() {
        // Enough rows for several projection blocks and update chunks.
        let x = clustered(5000, 40, 30, 4.0, 11);
        let never = Interrupt::never();
        for proj in [None, Some(12)] {
            let runs: Vec<Vec<i64>> = [1, 2, 4, 1]
                .iter()
                .map(|&t| in_pool(t, || coreset(x.view(), 300, proj, 42, &never).unwrap()))
                .collect();
            for r in &runs[1..] {
                assert_eq!(r, &runs[0], "projection {proj:?}");
            }
        }
        let projs: Vec<Array2<f32>> = [1, 2, 4]
            .iter()
            .map(|&t| in_pool(t, || random_projection(x.view(), 12, 42, &never).unwrap()))
            .collect();
        for p in &projs[1..] {
            assert!(p
                .iter()
                .zip(projs[0].iter())
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let sel: Vec<i64> = (0..5000).step_by(37).collect();
        let covs: Vec<u32> = [1, 2, 4]
            .iter()
            .map(|&t| in_pool(t, || coverage(x.view(), &sel, &never).unwrap().to_bits()))
            .collect();
        assert!(covs.iter().all(|&c| c == covs[0]));
    }

    #[test]
    fn different_seeds_give_different_starts_and_projections() {
        let x = random_matrix(1000, 8, 2);
        let never = Interrupt::never();
        let mut starts: Vec<i64> = (0..10u64)
            .map(|seed| coreset(x.view(), 2, None, seed, &never).unwrap()[0])
            .collect();
        starts.sort();
        starts.dedup();
        assert!(starts.len() >= 8, "starts {starts:?}");
        let a = random_projection(x.view(), 4, 1, &never).unwrap();
        let b = random_projection(x.view(), 4, 2, &never).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn random_projection_matches_naive_product_with_documented_matrix() {
        let (n, d, p, seed) = (70, 300, 9, 13u64);
        let x = random_matrix(n, d, 6);
        let got = random_projection(x.view(), p, seed, &Interrupt::never()).unwrap();
        assert_eq!(got.dim(), (n, p));
        let mut rng = Rng::new(seed);
        let r: Vec<f64> = (0..d * p)
            .map(|_| rng.normal() / (p as f64).sqrt())
            .collect();
        for i in 0..n {
            for j in 0..p {
                let want: f64 = (0..d)
                    .map(|k| x[[i, k]] as f64 * (r[k * p + j] as f32) as f64)
                    .sum();
                let g = got[[i, j]] as f64;
                assert!(
                    (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "({i},{j}) {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn projection_entries_have_variance_one_over_p() {
        // Projecting the identity returns the matrix itself.
        let (d, p) = (400, 50);
        let eye = Array2::from_shape_fn((d, d), |(i, j)| if i == j { 1.0f32 } else { 0.0 });
        let r = random_projection(eye.view(), p, 3, &Interrupt::never()).unwrap();
        let vals: Vec<f64> = r.iter().map(|&v| v as f64).collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / vals.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!(
            (var * p as f64 - 1.0).abs() < 0.05,
            "variance·p = {}",
            var * p as f64
        );
    }

    #[test]
    fn coverage_matches_naive_reference() {
        let never = Interrupt::never();
        for (n, d, seed) in [(100, 5, 1u64), (77, 40, 2), (33, 1, 3)] {
            let x = random_matrix(n, d, seed);
            for sel in [
                vec![0i64],
                vec![3, 3, 10, (n - 1) as i64],
                (0..n as i64).step_by(4).collect(),
            ] {
                let got = coverage(x.view(), &sel, &never).unwrap() as f64;
                let want = naive_coverage(x.view(), &sel);
                assert!((got - want).abs() <= 1e-5 * (1.0 + want), "{got} vs {want}");
            }
            let all: Vec<i64> = (0..n as i64).collect();
            assert_eq!(coverage(x.view(), &all, &never).unwrap(), 0.0);
        }
    }

    #[test]
    fn greedy_coverage_shrinks_as_size_grows() {
        // The greedy's coverage after k picks is its (k+1)-th selection distance, which
        // never increases.
        let x = random_matrix(400, 6, 8);
        let sel = coreset(x.view(), 80, None, 0, &Interrupt::never()).unwrap();
        let mut prev = f32::INFINITY;
        for k in [1, 2, 5, 10, 20, 40, 80] {
            let c = coverage(x.view(), &sel[..k], &Interrupt::never()).unwrap();
            assert!(c <= prev, "k={k}: {c} > {prev}");
            prev = c;
        }
    }

    #[test]
    fn projected_greedy_covers_clustered_data_about_as_well_as_exact_greedy() {
        let never = Interrupt::never();
        let x = clustered(3000, 64, 25, 6.0, 17);
        let exact = coreset(x.view(), 50, None, 1, &never).unwrap();
        let c_exact = coverage(x.view(), &exact, &never).unwrap();
        for p in [16, 64] {
            let proj = coreset(x.view(), 50, Some(p), 1, &never).unwrap();
            let c_proj = coverage(x.view(), &proj, &never).unwrap();
            // Soft bound: a Johnson–Lindenstrauss image keeps the greedy within a
            // small factor of the exact one on well-separated clusters.
            assert!(
                c_proj <= 1.5 * c_exact,
                "p={p}: {c_proj} vs exact {c_exact}"
            );
        }
    }

    #[test]
    fn invalid_arguments_are_rejected() {
        let never = Interrupt::never();
        let x = random_matrix(10, 3, 1);
        let arg = |r: KernelResult<Vec<i64>>| match r {
            Err(KernelError::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert_eq!(arg(coreset(x.view(), 0, None, 0, &never)), "size");
        assert_eq!(arg(coreset(x.view(), 11, None, 0, &never)), "size");
        assert_eq!(
            arg(coreset(x.view(), 5, Some(0), 0, &never)),
            "projection_dim"
        );
        let empty = Array2::<f32>::zeros((0, 3));
        assert_eq!(arg(coreset(empty.view(), 1, None, 0, &never)), "features");
        let no_cols = Array2::<f32>::zeros((4, 0));
        assert_eq!(arg(coreset(no_cols.view(), 1, None, 0, &never)), "features");
        let mut bad = x.clone();
        bad[[7, 1]] = f32::NAN;
        assert_eq!(arg(coreset(bad.view(), 3, None, 0, &never)), "features");
        assert_eq!(arg(coreset(bad.view(), 3, Some(2), 0, &never)), "features");
        bad[[7, 1]] = f32::INFINITY;
        assert_eq!(arg(coreset(bad.view(), 3, None, 0, &never)), "features");

        assert!(matches!(
            random_projection(x.view(), 0, 0, &never),
            Err(KernelError::InvalidArgument {
                arg: "projection_dim",
                ..
            })
        ));
        assert!(matches!(
            random_projection(empty.view(), 2, 0, &never),
            Err(KernelError::InvalidArgument {
                arg: "features",
                ..
            })
        ));
        assert!(matches!(
            random_projection(x.view(), usize::MAX / 2, 0, &never),
            Err(KernelError::InvalidArgument {
                arg: "projection_dim",
                ..
            })
        ));
        for sel in [&[][..], &[10][..], &[-1][..], &[0, 2, 99][..]] {
            assert!(
                matches!(
                    coverage(x.view(), sel, &never),
                    Err(KernelError::InvalidArgument {
                        arg: "selected",
                        ..
                    })
                ),
                "{sel:?}"
            );
        }
        assert!(matches!(
            coverage(empty.view(), &[0], &never),
            Err(KernelError::InvalidArgument {
                arg: "features",
                ..
            })
        ));
    }

    #[test]
    fn a_set_interrupt_flag_stops_every_kernel() {
        let flag = AtomicBool::new(true);
        let intr = Interrupt::new(&flag);
        let x = random_matrix(50, 4, 1);
        assert_eq!(
            coreset(x.view(), 10, None, 0, &intr),
            Err(KernelError::Interrupted)
        );
        assert_eq!(
            coreset(x.view(), 10, Some(2), 0, &intr),
            Err(KernelError::Interrupted)
        );
        assert_eq!(
            random_projection(x.view(), 2, 0, &intr),
            Err(KernelError::Interrupted)
        );
        assert_eq!(
            coverage(x.view(), &[1], &intr),
            Err(KernelError::Interrupted)
        );
    }

    /// Timing at PatchCore scale: 10% of 31,360 × 1,536 with p = 128 on 2 threads.
    /// Run: cargo test --release -- --ignored --nocapture timing_patchcore_scale
    #[test]
    #[ignore]
    fn timing_patchcore_scale() {
        let (n, d, p) = (31_360, 1_536, 128);
        let size = n / 10;
        let x = random_matrix(n, d, 1);
        let never = Interrupt::never();
        in_pool(2, || {
            let t0 = std::time::Instant::now();
            let projected = random_projection(x.view(), p, 0, &never).unwrap();
            let t_proj = t0.elapsed();
            let t1 = std::time::Instant::now();
            let sel = coreset(x.view(), size, Some(p), 0, &never).unwrap();
            let t_all = t1.elapsed();
            let t2 = std::time::Instant::now();
            let sel2 = coreset(projected.view(), size, None, 0, &never).unwrap();
            let t_greedy = t2.elapsed();
            assert_eq!(sel.len(), size);
            assert_eq!(sel2.len(), size);
            // On a shared machine the wall time above includes waits for the CPU; the
            // fastest of many single steps estimates the uncontended greedy time.
            let flat = projected.as_slice().unwrap();
            let mut md = vec![f32::INFINITY; n];
            let mut fastest = f64::INFINITY;
            for k in 0..200 {
                let c = &flat[(k * 97 % n) * p..][..p];
                let t = std::time::Instant::now();
                std::hint::black_box(update_and_argmax(flat, p, c, &mut md, &never));
                fastest = fastest.min(t.elapsed().as_secs_f64());
            }
            println!(
                "fastest greedy step {:.3} ms -> {:.3}s for {} steps if uncontended",
                fastest * 1e3,
                fastest * (size - 1) as f64,
                size - 1
            );
            println!(
                "coreset {n}x{d} -> {size}, p={p}, 2 threads: projection {:.3}s, \
                 greedy alone {:.3}s, coreset() total {:.3}s",
                t_proj.as_secs_f64(),
                t_greedy.as_secs_f64(),
                t_all.as_secs_f64()
            );
        });
    }
}
