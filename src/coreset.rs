//! Greedy k-center (farthest point) coreset selection, as used by PatchCore to subsample
//! its memory bank, with an optional seeded Gaussian random projection (which decides the
//! assignments, while the picks measure distances in the original space; see [`coreset`]).
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
/// A point the new pick took over: (position, projected squared distance, pick key).
type Move = (usize, f32, f32);

/// Smallest projection for which the pick measures distances in the original space (see
/// [`coreset`]); below it the projected distances decide the pick as well.
const MIN_DIM_FOR_ORIGINAL_PICK: usize = 32;
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
///   index. Once every remaining distance (pick key, below) is 0 (the rest duplicate
///   selected points), the lowest unselected indices fill the result, so it always has
///   `size` distinct indices.
/// - With a projection of at least MIN_DIM_FOR_ORIGINAL_PICK (32) dimensions the projected
///   distances decide each point's *assigned* selected
///   point (its nearest in the projected space), and the pick is the point farthest from
///   its assigned point in the **original** space (exact f32 squared distance, computed
///   once each time a point changes assignment). The largest such distance bounds the
///   original-space coverage from above, and picking it removes the worst bound, whereas
///   picking by projected distance can leave points whose distance the projection
///   under-states; the cost is a few exact distances per point in all (coverage and time
///   on the PatchCore-sized set: BENCHMARKS.md). Below 32 dimensions too many assignments
///   are wrong for the original-space pick to help (it covers worse), so the projected
///   distances also decide the pick.
/// - Errors: InvalidArgument for empty features, `size` out of range, `projection_dim`
///   of 0, or non-finite values (in the working space); Interrupted if `intr` fires.
///
/// Memory: O(N·p) for the projected rows plus O(D·p) for the matrix (or, with `None`,
/// one working copy of the O(N·D) rows, which the greedy loop reorders), plus
/// O(size·p) for the selected rows and O(N) per-point state. With a projection the
/// original rows are read in place (copied once if `features` is not contiguous row-major).
/// Time: O(N·D·p) for the projection plus at most O(size·N·p) for the greedy loop,
/// usually far less: triangle-inequality pruning skips the points that the new pick
/// cannot get closer to (see `greedy_pruned`), with results identical to the plain loop;
/// with the original-space pick, O(D) more per change of a point's assigned point.
pub fn coreset(
    features: ArrayView2<f32>,
    size: usize,
    projection_dim: Option<usize>,
    seed: u64,
    intr: &Interrupt,
) -> KernelResult<Vec<i64>> {
    let (n, d) = features.dim();
    check_features(n, d)?;
    check_size(size, n)?;
    if projection_dim == Some(0) {
        return Err(KernelError::invalid(
            "projection_dim",
            "expected None or an integer >= 1, got 0",
        ));
    }
    intr.check()?;
    let start = Rng::new(seed ^ START_STREAM).below(n);

    match projection_dim {
        Some(p) => {
            let mut rows = project(features, p, seed, intr)?;
            check_finite(&rows, p, true)?;
            let original = contiguous_rows(features);
            let exact = (p >= MIN_DIM_FOR_ORIGINAL_PICK).then_some(Original {
                rows: &original,
                dim: d,
            });
            greedy_pruned(&mut rows, n, p, size, start, exact, intr).map(|(order, _)| order)
        }
        None => {
            // The loop reorders its working copy: the input rows are copied.
            let mut rows = contiguous_rows(features).into_owned();
            check_finite(&rows, d, false)?;
            greedy_pruned(&mut rows, n, d, size, start, None, intr).map(|(order, _)| order)
        }
    }
}

/// The original rows (N × dim, row-major, input order) when the selection runs on a
/// projection: the pick rule measures each point's distance to its assigned selected point
/// in this space (see [`coreset`]).
#[derive(Clone, Copy)]
pub(crate) struct Original<'a> {
    pub(crate) rows: &'a [f32],
    pub(crate) dim: usize,
}

impl Original<'_> {
    /// Squared distance between input rows `i` and `j`.
    #[inline]
    fn sq_dist(self, i: usize, j: usize) -> f32 {
        let d = self.dim;
        sq_dist(
            &self.rows[i * d..(i + 1) * d],
            &self.rows[j * d..(j + 1) * d],
        )
    }
}

/// [`coreset`] without projection, using `features` (N·D floats, row-major) as the working
/// copy instead of allocating one: the same indices as `coreset(x, size, None, seed)`, and on
/// return the rows of `features` are reordered (their contents are unspecified).
///
/// For callers that own a large selection space and no longer need it (PatchCore fitting
/// on millions of projected patches): peak memory is the caller's buffer plus O(N)
/// per-point state and O(size·D) for the selected rows.
pub fn coreset_in_place(
    features: &mut [f32],
    n: usize,
    d: usize,
    size: usize,
    seed: u64,
    intr: &Interrupt,
) -> KernelResult<Vec<i64>> {
    check_features(n, d)?;
    if n.checked_mul(d) != Some(features.len()) {
        return Err(KernelError::invalid(
            "features",
            format!("expected {n} x {d} floats, got {}", features.len()),
        ));
    }
    check_size(size, n)?;
    intr.check()?;
    let start = Rng::new(seed ^ START_STREAM).below(n);
    check_finite(features, d, false)?;
    greedy_pruned(features, n, d, size, start, None, intr).map(|(order, _)| order)
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

fn check_size(size: usize, n: usize) -> KernelResult<()> {
    if size < 1 || size > n {
        return Err(KernelError::invalid(
            "size",
            format!("expected 1 <= size <= {n} (the number of rows), got {size}"),
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

/// The greedy loop with triangle-inequality pruning on contiguous rows (n × dim, all
/// finite), starting at `start`; `rows` is the working copy and comes back reordered.
/// Returns the selection and the total number of point–centre distances computed after
/// the first pick (for benchmarks).
///
/// Why: the plain loop streams all N·p floats per pick, so it is memory-bound at
/// O(size·N·p). Here every point remembers the selected point its `min_dist` came from
/// (its centre) and every centre the largest `min_dist` among its points (its squared
/// radius r²). A new pick z can lower `min_dist[x]` only if d(z,x) < d(c,x) <= r for x's
/// centre c, and d(z,x) >= d(z,c) − d(c,x), so that needs d(z,c) < 2r: clusters with
/// d(z,c)² > 4r² (plus a rounding margin) are skipped without reading their rows.
///
/// Layout: scanning a cluster whose points are scattered over the whole array is
/// latency-bound (several times slower per row than the plain loop's stream), so the
/// rows live in a working copy grouped by cluster, and everything per point is indexed
/// by position in that copy (`id` maps back to the input index). New clusters are made
/// of points taken from nearby clusters, so grouping decays slowly; the copy is regrouped
/// once REGROUP_FRACTION of N has moved since the last time (O(N·p), like one plain step).
///
/// Exactness: the points that are scanned get exactly the plain loop's update (same
/// `sq_dist` on the same row values, same argument order, same strict `<`), and a
/// skipped point is one whose computed distance to z provably cannot be below its
/// `min_dist` (see [`PruneMargin`]), so `min_dist` is bit-identical to the plain loop's
/// after every pick. The argmax is the same total order (larger value, then lower input
/// index) taken over per-cluster maxima, and every point is in exactly one cluster, so
/// the picks are identical too.
///
/// Determinism: each point's value depends only on the picks; moved points are gathered
/// in task order, and task boundaries do not depend on the thread count.
///
/// `exact`: with the original rows of a projection, every point also keeps `key`, the
/// original-space squared distance to its centre (computed when it moves), and the pick is
/// the largest key instead of the largest `min_dist` (see [`coreset`]). Moves, and so the
/// clusters and the pruning, still follow `min_dist` alone; each cluster keeps its largest
/// key beside its radius. Without `exact`, `key` is `min_dist`.
///
/// Memory: the working copy `rows` (O(N·p): the projection, a copy of the input rows, or,
/// through [`coreset_in_place`], the caller's buffer), regrouped in place,
/// O(N) per-point state and member lists, O(size·p) for a contiguous copy of the centres'
/// rows. Time per pick: O(size·p) for the centre distances, O(1) per member of a
/// cluster that could not be skipped, and O(p) per such member not skipped by the same
/// test applied with its own min_dist. No gain on data without structure (e.g. i.i.d.
/// Gaussian in 128 dimensions, where nearly every point stays in reach).
pub(crate) fn greedy_pruned(
    rows: &mut [f32],
    n: usize,
    dim: usize,
    size: usize,
    start: usize,
    exact: Option<Original>,
    intr: &Interrupt,
) -> KernelResult<(Vec<i64>, u64)> {
    let margin = PruneMargin::new(dim);
    // Per position in `rows`: input index, min_dist, pick key, cluster. `pos_of` inverts `id`.
    let mut id: Vec<usize> = (0..n).collect();
    let mut pos_of: Vec<usize> = (0..n).collect();
    let mut min_dist = vec![f32::INFINITY; n];
    let mut key = vec![f32::INFINITY; n];
    let mut owner = vec![0usize; n];
    let mut selected = vec![false; n];
    let mut order = Vec::with_capacity(size);
    // Cluster k is centred on the k-th pick: its row (copied contiguously so the centre
    // distances stream), its members (positions, ascending), their max min_dist (its
    // squared radius) and their (max key, lowest input index holding it).
    let mut members: Vec<Vec<usize>> = Vec::with_capacity(size);
    let mut radius: Vec<f32> = Vec::with_capacity(size);
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(size);
    let mut centre_rows: Vec<f32> = Vec::with_capacity(size.saturating_mul(dim));
    // Per-pick scratch, reused: which clusters lost points.
    let mut touched: Vec<bool> = Vec::with_capacity(size);
    let mut moved_since_regroup = 0usize;
    let mut scanned = 0u64;
    let (mut window_scanned, mut window_picks) = (0u64, 0usize);
    let mut s = start;
    loop {
        order.push(s as i64);
        selected[s] = true;
        let sp = pos_of[s];
        // Exactly 0 from now on (distances are >= 0), so s is never picked again.
        min_dist[sp] = 0.0;
        key[sp] = 0.0;
        if order.len() == size {
            return Ok((order, scanned));
        }
        intr.check()?;
        let z: Vec<f32> = rows[sp * dim..(sp + 1) * dim].to_vec();
        if members.is_empty() {
            // First pick: every point gets its distance to it, as in the plain loop
            // (positions are still input indices here).
            best.push(update_and_argmax(
                rows,
                dim,
                &z,
                &mut min_dist,
                &mut key,
                exact,
                s,
                intr,
            ));
            radius.push(min_dist.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            members.push((0..n).collect());
            window_scanned += n as u64;
        } else {
            let new_id = members.len();
            let c0 = owner[sp];
            owner[sp] = new_id;

            // Which clusters may hold a point that z is closer to than its centre, with
            // their centre's squared distance to z.
            let mut active: Vec<(usize, f32)> = centre_rows
                .par_chunks(CENTRE_CHUNK_ROWS * dim)
                .zip(radius.par_chunks(CENTRE_CHUNK_ROWS))
                .enumerate()
                .flat_map_iter(|(b, (crows, radii))| {
                    let z = &z;
                    crows.chunks_exact(dim).zip(radii).enumerate().filter_map(
                        move |(k, (c, &r2))| {
                            // r² = 0: every member sits on a picked point, none can move.
                            let d2 = sq_dist(c, z);
                            (r2 > 0.0 && margin.may_reach(d2, r2))
                                .then_some((b * CENTRE_CHUNK_ROWS + k, d2))
                        },
                    )
                })
                .collect();
            // z's own cluster always qualifies (d(z,c0)² is z's old min_dist <= r²);
            // kept explicitly so that z is always taken out of it below.
            if let Err(i) = active.binary_search_by_key(&c0, |a| a.0) {
                let d2 = sq_dist(&centre_rows[c0 * dim..(c0 + 1) * dim], &z);
                active.insert(i, (c0, d2));
            }

            // Scan the members of those clusters, in tasks of about UPDATE_CHUNK_ROWS
            // points (small clusters grouped), each listing the points z is closer to.
            // The same test per point, with the point's own min_dist in place of r²,
            // skips reading the rows of points close to their centre (most of them).
            let tasks = scan_tasks(&active, &members);
            let moved: Vec<(Vec<Move>, u64)> = tasks
                .par_iter()
                .map(|task| {
                    let mut out = Vec::new();
                    let mut computed = 0u64;
                    if intr.is_set() {
                        return (out, computed);
                    }
                    for &(piece, d2) in task {
                        for &p in piece {
                            if !margin.may_reach(d2, min_dist[p]) {
                                continue;
                            }
                            computed += 1;
                            let dist = sq_dist(&rows[p * dim..(p + 1) * dim], &z);
                            if dist < min_dist[p] {
                                let k = exact.map_or(dist, |o| o.sq_dist(id[p], s));
                                out.push((p, dist, k));
                            }
                        }
                    }
                    (out, computed)
                })
                .collect();
            let step_scanned = moved.iter().map(|m| m.1).sum::<u64>();
            scanned += step_scanned;
            window_scanned += step_scanned;
            intr.check()?;

            // Apply the moves; the new cluster is z plus the moved points.
            touched.clear();
            touched.resize(new_id, false);
            touched[c0] = true;
            let mut mine = vec![sp];
            for &(p, dist, k) in moved.iter().flat_map(|m| &m.0) {
                min_dist[p] = dist;
                key[p] = k;
                touched[owner[p]] = true;
                owner[p] = new_id;
                mine.push(p);
            }
            mine.sort_unstable();
            moved_since_regroup += mine.len();
            // Clusters that lost points drop them and recompute their max (it can only
            // shrink, which tightens later pruning).
            members
                .par_iter_mut()
                .zip(radius.par_iter_mut())
                .zip(best.par_iter_mut())
                .enumerate()
                .filter(|(c, _)| touched[*c])
                .for_each(|(c, ((m, r), b))| {
                    m.retain(|&p| owner[p] == c);
                    (*r, *b) = cluster_maxima(m, &min_dist, &key, &id);
                });
            let (r, b) = cluster_maxima(&mine, &min_dist, &key, &id);
            radius.push(r);
            best.push(b);
            members.push(mine);
        }
        centre_rows.extend_from_slice(&z);

        if moved_since_regroup as f64 >= REGROUP_FRACTION * n as f64 {
            intr.check()?;
            regroup(
                rows,
                dim,
                &mut members,
                &mut id,
                &mut pos_of,
                [&mut min_dist, &mut key],
                &mut owner,
            );
            moved_since_regroup = 0;
        }
        intr.check()?;

        let (top, idx) = best
            .iter()
            .copied()
            .fold((f32::NEG_INFINITY, usize::MAX), larger_then_lower_index);
        if top > 0.0 {
            s = idx;
        } else {
            // Every point coincides with a selected one, and stays so: fill deterministically.
            fill_unselected(&mut order, &selected, size);
            return Ok((order, scanned));
        }
        // Data without structure (nearly every point stays in reach) gains nothing from
        // pruning and pays its bookkeeping: once enough picks show that, finish plainly.
        window_picks += 1;
        if window_picks == FALLBACK_WINDOW {
            let busy = window_scanned as f64 > FALLBACK_FRACTION * (FALLBACK_WINDOW * n) as f64;
            if busy && order.len() >= FALLBACK_MIN_PICKS {
                let before = order.len();
                let order = finish_plain(
                    rows,
                    dim,
                    &pos_of,
                    [&min_dist, &key],
                    exact,
                    selected,
                    order,
                    s,
                    size,
                    intr,
                )?;
                let plain = (order.len() - before).saturating_sub(1) as u64 * n as u64;
                return Ok((order, scanned + plain));
            }
            window_scanned = 0;
            window_picks = 0;
        }
    }
}

/// Completes `order` to `size` with the unselected points in index order: once every point
/// coincides with a selected one no pick can cover more, and this keeps the result deterministic.
fn fill_unselected(order: &mut Vec<i64>, selected: &[bool], size: usize) {
    let missing = size - order.len();
    order.extend(
        (0..selected.len())
            .filter(|&i| !selected[i])
            .take(missing)
            .map(|i| i as i64),
    );
}

/// Picks per window over which the scanned fraction is measured, the least picks made
/// before giving up on pruning, and the fraction of N scanned per pick that counts as
/// "nothing pruned".
const FALLBACK_WINDOW: usize = 64;
const FALLBACK_MIN_PICKS: usize = 512;
const FALLBACK_FRACTION: f64 = 0.85;

/// The rest of the selection with the plain loop, from pick `s` on. The rows and
/// `min_dist` go back to input order first, so exact ties resolve to the lower input
/// index as they do in the plain loop: the result is the same as never pruning.
#[allow(clippy::too_many_arguments)]
fn finish_plain(
    x: &mut [f32],
    dim: usize,
    pos_of: &[usize],
    [min_dist, key]: [&[f32]; 2],
    exact: Option<Original>,
    mut selected: Vec<bool>,
    mut order: Vec<i64>,
    mut s: usize,
    size: usize,
    intr: &Interrupt,
) -> KernelResult<Vec<i64>> {
    // Input index i sits at position pos_of[i].
    permute_rows(x, dim, pos_of);
    let mut md: Vec<f32> = pos_of.iter().map(|&p| min_dist[p]).collect();
    let mut kd: Vec<f32> = pos_of.iter().map(|&p| key[p]).collect();
    loop {
        order.push(s as i64);
        selected[s] = true;
        md[s] = 0.0;
        kd[s] = 0.0;
        if order.len() == size {
            return Ok(order);
        }
        intr.check()?;
        let z = x[s * dim..(s + 1) * dim].to_vec();
        let (top, idx) = update_and_argmax(x, dim, &z, &mut md, &mut kd, exact, s, intr);
        intr.check()?;
        if top > 0.0 {
            s = idx;
        } else {
            fill_unselected(&mut order, &selected, size);
            return Ok(order);
        }
    }
}

/// Regroup once this fraction of N has changed cluster since the last regrouping.
const REGROUP_FRACTION: f64 = 0.25;

/// Reorders the working rows (and every per-position array) so that each cluster's
/// members occupy one contiguous range, in cluster order. Values are moved, not
/// recomputed, so results are unaffected.
fn regroup(
    rows: &mut [f32],
    dim: usize,
    members: &mut [Vec<usize>],
    id: &mut Vec<usize>,
    pos_of: &mut [usize],
    values: [&mut Vec<f32>; 2],
    owner: &mut Vec<usize>,
) {
    // New position j takes the row at old position src[j].
    let src: Vec<usize> = members.iter().flatten().copied().collect();
    let mut next = 0;
    for m in members.iter_mut() {
        let len = m.len();
        m.clear();
        m.extend(next..next + len);
        next += len;
    }
    permute_rows(rows, dim, &src);
    *id = src.iter().map(|&p| id[p]).collect();
    for v in values {
        *v = src.iter().map(|&p| v[p]).collect();
    }
    *owner = src.iter().map(|&p| owner[p]).collect();
    for (p, &i) in id.iter().enumerate() {
        pos_of[i] = p;
    }
}

/// Reorders the rows (`dim` floats each) of `rows` in place so that new row j is old row
/// `src[j]`; `src` must be a permutation of 0..N. Each cycle of the permutation is followed
/// once with one spare row, so no second N-row buffer is needed (the working copy can be
/// most of the memory a selection uses): O(N·dim) moves, O(N) flags.
fn permute_rows(rows: &mut [f32], dim: usize, src: &[usize]) {
    let mut done = vec![false; src.len()];
    let mut spare = vec![0.0f32; dim];
    for start in 0..src.len() {
        if done[start] {
            continue;
        }
        done[start] = true;
        if src[start] == start {
            continue;
        }
        spare.copy_from_slice(&rows[start * dim..(start + 1) * dim]);
        let mut j = start;
        loop {
            let from = src[j];
            if from == start {
                rows[j * dim..(j + 1) * dim].copy_from_slice(&spare);
                break;
            }
            // Row `from` is still the old one: cycle positions are overwritten in order.
            rows.copy_within(from * dim..(from + 1) * dim, j * dim);
            done[from] = true;
            j = from;
        }
    }
}

/// Centres per task when computing the new pick's distance to every centre.
const CENTRE_CHUNK_ROWS: usize = 256;

/// The members of the `active` clusters cut into tasks of about UPDATE_CHUNK_ROWS points:
/// big clusters are split, consecutive small ones grouped (rayon's per-task cost would
/// dominate thousands of tiny clusters). Depends only on the cluster sizes.
/// Each piece carries its centre's squared distance to the pick.
fn scan_tasks<'a>(
    active: &[(usize, f32)],
    members: &'a [Vec<usize>],
) -> Vec<Vec<(&'a [usize], f32)>> {
    let mut tasks = Vec::new();
    let mut cur: Vec<(&[usize], f32)> = Vec::new();
    let mut cur_len = 0;
    for &(c, d2) in active {
        for piece in members[c].chunks(UPDATE_CHUNK_ROWS) {
            if cur_len + piece.len() > UPDATE_CHUNK_ROWS && !cur.is_empty() {
                tasks.push(std::mem::take(&mut cur));
                cur_len = 0;
            }
            cur_len += piece.len();
            cur.push((piece, d2));
        }
    }
    if !cur.is_empty() {
        tasks.push(cur);
    }
    tasks
}

/// Over the positions `points`, in one pass: the largest `min_dist` (the cluster's squared
/// radius) and the (largest `key`, lowest input index holding it).
fn cluster_maxima(
    points: &[usize],
    min_dist: &[f32],
    key: &[f32],
    id: &[usize],
) -> (f32, (f32, usize)) {
    points.iter().fold(
        (f32::NEG_INFINITY, (f32::NEG_INFINITY, usize::MAX)),
        |(r, best), &p| {
            (
                r.max(min_dist[p]),
                larger_then_lower_index(best, (key[p], id[p])),
            )
        },
    )
}

/// The pruning test with a margin for f32 rounding, so it never skips a point that the
/// plain loop would update.
///
/// Used per cluster (with r² the cluster's largest min_dist) and per point (with r² the
/// point's own min_dist, i.e. m itself); the argument below covers both.
///
/// `sq_dist` sums non-negative terms (each with two roundings) along chains of at most
/// dim/16 + 20 additions, so its result is within a relative error
/// e = (dim/16 + 22)·u of the exact squared distance (u = 2⁻²⁴); we use the far larger
/// e = 4·(dim + 20)·u. Let z be the pick, c a centre, r² its computed squared radius and
/// x a member, with computed m = sq_dist(x, c) <= r². Skipping needs
/// sq_dist(x, z) >= m. If sq_dist(z, c) > 4·r²·(1 + 8e), then in exact terms
/// d(z,c) > 2r·(1 + 3.5e), d(c,x) <= r·(1 + 0.6e), so
/// d(z,x) >= d(z,c) − d(c,x) > r·(1 + 6e), hence sq_dist(x, z) >= d(z,x)²·(1 − e) > r² >= m.
/// The test is done in f64 (no overflow of 4r², no extra rounding), with an absolute term
/// far above the error from f32 underflow (at most ~dim·2⁻¹⁴⁹). Overflow to +inf only errs
/// towards scanning (an infinite r² never prunes).
#[derive(Clone, Copy)]
struct PruneMargin {
    rel: f64,
}

impl PruneMargin {
    const ABS: f64 = 1e-30;

    fn new(dim: usize) -> Self {
        let e = 4.0 * (dim as f64 + 20.0) * (f32::EPSILON as f64 / 2.0);
        PruneMargin {
            rel: 4.0 * (1.0 + 8.0 * e),
        }
    }

    /// Whether a cluster of squared radius `r2` whose centre is at computed squared
    /// distance `d2` from the pick may hold a point the pick is closer to.
    #[inline]
    fn may_reach(self, d2: f32, r2: f32) -> bool {
        (d2 as f64) <= self.rel * (r2 as f64) + Self::ABS
    }
}

/// `min_dist[i] = min(min_dist[i], ‖x_i − c‖²)` for all i (rows in input order), and
/// `key[i]` the new value where it fell (with `exact`: the original-space squared distance
/// from i to row `ci`, the input index of c); returns the (largest key, lowest index
/// holding it). Bails out early (with a meaningless result) if interrupted. The plain
/// loop's step, used for the first pick.
#[allow(clippy::too_many_arguments)]
fn update_and_argmax(
    x: &[f32],
    dim: usize,
    c: &[f32],
    min_dist: &mut [f32],
    key: &mut [f32],
    exact: Option<Original>,
    ci: usize,
    intr: &Interrupt,
) -> (f32, usize) {
    min_dist
        .par_chunks_mut(UPDATE_CHUNK_ROWS)
        .zip(key.par_chunks_mut(UPDATE_CHUNK_ROWS))
        .zip(x.par_chunks(UPDATE_CHUNK_ROWS * dim))
        .enumerate()
        .map(|(chunk, ((md, kd), rows))| {
            if intr.is_set() {
                return (f32::NEG_INFINITY, usize::MAX);
            }
            let base = chunk * UPDATE_CHUNK_ROWS;
            let mut best = (f32::NEG_INFINITY, usize::MAX);
            for (k, ((m, kv), row)) in md
                .iter_mut()
                .zip(kd.iter_mut())
                .zip(rows.chunks_exact(dim))
                .enumerate()
            {
                let dist = sq_dist(row, c);
                if dist < *m {
                    *m = dist;
                    *kv = exact.map_or(dist, |o| o.sq_dist(base + k, ci));
                }
                // Strict: the first (lowest) index wins ties within the chunk.
                if *kv > best.0 {
                    best = (*kv, base + k);
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

    /// The unpruned loop (the kernel before triangle-inequality pruning): the pruned one
    /// must return exactly the same indices, since it must leave `min_dist` bit-identical.
    fn greedy_plain(
        x: &[f32],
        n: usize,
        dim: usize,
        size: usize,
        start: usize,
        exact: Option<Original>,
    ) -> Vec<i64> {
        let never = Interrupt::never();
        let mut min_dist = vec![f32::INFINITY; n];
        let mut key = vec![f32::INFINITY; n];
        let mut selected = vec![false; n];
        let mut order = Vec::with_capacity(size);
        let mut s = start;
        loop {
            order.push(s as i64);
            selected[s] = true;
            min_dist[s] = 0.0;
            key[s] = 0.0;
            if order.len() == size {
                return order;
            }
            let z = &x[s * dim..(s + 1) * dim];
            let (best, idx) =
                update_and_argmax(x, dim, z, &mut min_dist, &mut key, exact, s, &never);
            if best > 0.0 {
                s = idx;
            } else {
                fill_unselected(&mut order, &selected, size);
                return order;
            }
        }
    }

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

    /// `coreset` against the plain loop on the same working space, on 1 and 3 threads.
    /// Returns the fraction of point-centre distances the pruned loop computed.
    fn assert_same_as_plain(
        x: ArrayView2<f32>,
        size: usize,
        proj: Option<usize>,
        seed: u64,
    ) -> f64 {
        let never = Interrupt::never();
        let n = x.nrows();
        let work = match proj {
            Some(p) => random_projection(x, p, seed, &never).unwrap(),
            None => x.to_owned(),
        };
        let dim = work.ncols();
        let flat = work.as_slice().unwrap();
        let start = start_for(seed, n);
        let xs = x.to_owned();
        let original = Original {
            rows: xs.as_slice().unwrap(),
            dim: x.ncols(),
        };
        // `coreset` picks by original-space distance when it projects to enough dimensions.
        let exact = proj
            .filter(|&p| p >= MIN_DIM_FOR_ORIGINAL_PICK)
            .map(|_| original);
        let want = greedy_plain(flat, n, dim, size, start, exact);
        for threads in [1, 3] {
            let got = in_pool(threads, || coreset(x, size, proj, seed, &never).unwrap());
            assert_eq!(
                got, want,
                "n={n} size={size} proj={proj:?} seed={seed} threads={threads}"
            );
        }
        // In place there are no original rows: the pick follows the working rows alone.
        let want_working = greedy_plain(flat, n, dim, size, start, None);
        let mut scratch = flat.to_vec();
        let in_place = coreset_in_place(&mut scratch, n, dim, size, seed, &never).unwrap();
        assert_eq!(
            in_place, want_working,
            "in place: n={n} size={size} proj={proj:?} seed={seed}"
        );
        // The pruned loop on a fresh copy of the working rows, with a given pick rule.
        let pruned = |exact: Option<Original>| {
            greedy_pruned(&mut flat.to_vec(), n, dim, size, start, exact, &never).unwrap()
        };
        if proj.is_some() {
            // The original-space pick rule, pruned and plain, whatever the dimension.
            let with_original = greedy_plain(flat, n, dim, size, start, Some(original));
            assert_eq!(
                pruned(Some(original)).0,
                with_original,
                "original-space pick: n={n} size={size} proj={proj:?}"
            );
            // That rule on the working rows themselves is the plain rule.
            let on_itself = Original { rows: flat, dim };
            assert_eq!(
                pruned(Some(on_itself)).0,
                want_working,
                "exact = working rows: n={n} size={size}"
            );
        }
        let (_, scanned) = pruned(exact);
        scanned as f64 / (n as f64 * (size as f64 - 1.0).max(1.0))
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
    fn permute_rows_in_place_equals_a_gather() {
        let (n, dim) = (257, 3);
        let x: Vec<f32> = (0..n * dim).map(|v| v as f32).collect();
        // Two fixed points, a 2-cycle, and a shuffle of the rest (long cycles).
        let mut src: Vec<usize> = vec![0, 1, 3, 2];
        let mut rest: Vec<usize> = (4..n).collect();
        let mut rng = Rng::new(5);
        for i in (1..rest.len()).rev() {
            rest.swap(i, rng.below(i + 1));
        }
        src.extend(rest);
        let want: Vec<f32> = src
            .iter()
            .flat_map(|&p| x[p * dim..(p + 1) * dim].to_vec())
            .collect();
        let mut got = x.clone();
        permute_rows(&mut got, dim, &src);
        assert_eq!(got, want);
    }

    #[test]
    fn coreset_in_place_checks_its_buffer_length() {
        let mut buf = vec![0.0f32; 10];
        let err = coreset_in_place(&mut buf, 3, 4, 1, 0, &Interrupt::never()).unwrap_err();
        assert!(
            err.to_string().contains("expected 3 x 4 floats, got 10"),
            "{err}"
        );
        let mut bad = vec![0.0f32, f32::NAN, 1.0, 2.0];
        let err = coreset_in_place(&mut bad, 2, 2, 1, 0, &Interrupt::never()).unwrap_err();
        assert!(err.to_string().contains("row 0"), "{err}");
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
    fn pruned_greedy_matches_plain_on_gaussian_data() {
        for (n, d, size, proj, seed) in [
            (3000, 16, 300, None, 1u64),
            (5000, 64, 500, Some(8), 2),
            (20_000, 32, 400, None, 3),
            (50_000, 24, 200, Some(12), 4),
            // 128-dim i.i.d. data: nothing prunes, so the loop switches to the plain one
            // after FALLBACK_MIN_PICKS picks; the result must not change.
            (6000, 128, 900, None, 5),
        ] {
            let x = random_matrix(n, d, 300 + seed);
            assert_same_as_plain(x.view(), size, proj, seed);
        }
    }

    #[test]
    fn pruned_greedy_matches_plain_on_clustered_data_and_prunes() {
        for (n, d, k, size, proj, seed) in [
            (8000, 32, 40, 800, None, 5u64),
            (20_000, 128, 100, 1000, Some(16), 6),
            (12_000, 96, 60, 600, Some(48), 8),
            (50_000, 16, 200, 2000, None, 7),
        ] {
            let x = clustered(n, d, k, 6.0, 400 + seed);
            let frac = assert_same_as_plain(x.view(), size, proj, seed);
            // Not a correctness requirement, but the point of the pruning.
            assert!(frac < 0.5, "n={n}: scanned fraction {frac}");
        }
    }

    #[test]
    fn pruned_greedy_matches_plain_with_duplicates_ties_and_degenerate_data() {
        // Many exact duplicates (each of 300 points 20 times, shuffled order), so that
        // ties in min_dist and all-zero tails both occur.
        let base = clustered(300, 10, 12, 5.0, 8);
        let mut rng = Rng::new(9);
        let x = Array2::from_shape_fn((6000, 10), |_| 0.0f32);
        let mut x = x;
        for i in 0..6000 {
            let b = rng.below(300);
            x.row_mut(i).assign(&base.row(b));
        }
        for size in [50, 300, 301, 1000] {
            assert_same_as_plain(x.view(), size, None, 10);
            assert_same_as_plain(x.view(), size, Some(4), 11);
        }
        // Integer grid: many exactly equal distances (ties decided by the lowest index).
        let grid = Array2::from_shape_fn((4096, 3), |(i, j)| ((i >> (4 * j)) & 15) as f32);
        for size in [10, 200, 4096] {
            assert_same_as_plain(grid.view(), size, None, 12);
        }
        // Tiny and huge scales, one dimension, constant data.
        let tiny = random_matrix(2000, 5, 13).mapv(|v| v * 1e-18);
        assert_same_as_plain(tiny.view(), 300, None, 14);
        let huge = random_matrix(2000, 5, 15).mapv(|v| v * 1e18);
        assert_same_as_plain(huge.view(), 300, None, 16);
        let line = random_matrix(10_000, 1, 17);
        assert_same_as_plain(line.view(), 2000, None, 18);
        let same = Array2::from_elem((500, 4), -2.5f32);
        assert_same_as_plain(same.view(), 100, None, 19);
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
    fn picking_by_original_distance_covers_better_than_by_projected_distance() {
        // Same projection, same start: `coreset` (from MIN_DIM_FOR_ORIGINAL_PICK dimensions on,
        // pick = farthest from its assigned point in the original space) against the greedy on
        // the projected rows alone. With few dimensions the original-space pick covers this set
        // worse (most assignments are wrong and every pick mends one point), hence the
        // threshold (figures in BENCHMARKS.md).
        let never = Interrupt::never();
        let x = clustered(4000, 96, 40, 4.0, 23);
        for (p, seed) in [(4, 1), (16, 3), (32, 4), (64, 5)] {
            let hybrid = coreset(x.view(), 120, Some(p), seed, &never).unwrap();
            let mut projected = random_projection(x.view(), p, seed, &never).unwrap();
            let n = x.nrows();
            let work = projected.as_slice_mut().unwrap();
            let plain = coreset_in_place(work, n, p, 120, seed, &never).unwrap();
            if p < MIN_DIM_FOR_ORIGINAL_PICK {
                assert_eq!(
                    hybrid, plain,
                    "p={p}: below the threshold the pick is projected"
                );
                continue;
            }
            assert_eq!(hybrid[0], plain[0], "same start");
            let c_hybrid = coverage(x.view(), &hybrid, &never).unwrap();
            let c_plain = coverage(x.view(), &plain, &never).unwrap();
            assert!(c_hybrid < c_plain, "p={p}: {c_hybrid} vs {c_plain}");
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
            let mut key = vec![f32::INFINITY; n];
            let mut fastest = f64::INFINITY;
            for k in 0..200 {
                let ci = k * 97 % n;
                let c = &flat[ci * p..][..p];
                let t = std::time::Instant::now();
                std::hint::black_box(update_and_argmax(
                    flat, p, c, &mut md, &mut key, None, ci, &never,
                ));
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
