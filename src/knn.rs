//! Exact blocked k-nearest-neighbour search (the hot kernel of PatchCore scoring).
//!
//! Distances come from the expansion ‖q‖² + ‖b‖² − 2·q·b with the dot products from a
//! faer gemm per (query block × bank block), so the full M×N distance matrix is never
//! built. The k winners per query are then re-scored exactly as Σ(q−b)², which removes
//! the cancellation error of the expansion from the reported distances.

use std::cmp::Ordering;

use faer::{Accum, MatMut, MatRef, Par};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

/// Distance reported by [`knn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// ‖q − b‖₂.
    Euclidean,
    /// ‖q − b‖₂².
    SqEuclidean,
}

impl Metric {
    /// Parses `"euclidean"` or `"sqeuclidean"` (exact, lower case); `None` otherwise.
    pub fn parse(name: &str) -> Option<Metric> {
        match name {
            "euclidean" => Some(Metric::Euclidean),
            "sqeuclidean" => Some(Metric::SqEuclidean),
            _ => None,
        }
    }
}

/// Query rows per gemm block.
const QUERY_BLOCK: usize = 256;
/// Bank rows per gemm block; the gemm output block is QUERY_BLOCK × BANK_BLOCK f32 (1 MiB).
const BANK_BLOCK: usize = 1024;
/// The bank is cut into segments (whole bank blocks) until there are about this many
/// tasks, so that few queries still keep many threads busy. The split depends only on
/// the problem shape, never on the thread count, so results stay thread-count independent.
const TARGET_TASKS: usize = 64;
/// Above this k a segment's candidates per query would cost too much memory to split.
const MAX_K_FOR_SEGMENTS: usize = 256;
/// Up to this k the k best are kept in a sorted insertion buffer; above it in a
/// buffer of 2k that is pruned with a selection when full (insertion would be O(k)).
const MAX_K_INSERTION: usize = 64;
/// Lane count of the candidate filter loop.
const LANES: usize = 16;
/// Index of an unfilled slot.
const NO_INDEX: usize = usize::MAX;

/// Exact k nearest bank rows of every query row.
///
/// Returns `(distances, indices)`, both `(M, k)`: per row ascending by (distance, index),
/// so ties go to the lower bank index. `queries` is `(M, D)`, `bank` is `(N, D)`, any strides.
/// Non-finite inputs are not checked (the caller does); they give unspecified results.
///
/// Memory: O((M + N)·D + QUERY_BLOCK·BANK_BLOCK per thread + M·k·segments).
/// Time: 2·M·N·D flops of gemm plus O(M·N) candidate filtering and O(M·k·D) re-scoring.
/// Deterministic and independent of the number of rayon threads.
pub fn knn(
    queries: ArrayView2<f32>,
    bank: ArrayView2<f32>,
    k: usize,
    metric: Metric,
    intr: &Interrupt,
) -> KernelResult<(Array2<f32>, Array2<i64>)> {
    let (m, d) = queries.dim();
    let (n, db) = bank.dim();
    if m == 0 {
        return Err(KernelError::invalid(
            "queries",
            format!("expected at least one query row, got an empty ({m}, {d}) array"),
        ));
    }
    if n == 0 {
        return Err(KernelError::invalid(
            "bank",
            format!("expected at least one bank row, got an empty ({n}, {db}) array"),
        ));
    }
    if db != d {
        return Err(KernelError::invalid(
            "bank",
            format!("expected as many columns as queries (D={d}), got bank with D={db}"),
        ));
    }
    if d == 0 {
        return Err(KernelError::invalid(
            "queries",
            "expected at least one feature column (D >= 1), got D=0",
        ));
    }
    if k == 0 || k > n {
        return Err(KernelError::invalid(
            "k",
            format!("expected 1 <= k <= N={n} (bank rows), got k={k}"),
        ));
    }
    intr.check()?;

    // Row-major contiguous copies, made once (O((M + N)·D)) only for strided views: gemm
    // blocks and the exact re-scoring then read plain slices.
    let (bank_owned, queries_owned);
    let bank_rows: &[f32] = match bank.as_slice() {
        Some(s) => s,
        None => {
            bank_owned = pack_rows(bank);
            &bank_owned
        }
    };
    let query_rows: &[f32] = match queries.as_slice() {
        Some(s) => s,
        None => {
            queries_owned = pack_rows(queries);
            &queries_owned
        }
    };
    let bank_norms: Vec<f32> = bank_rows.par_chunks(d).map(sq_norm).collect();
    let query_norms: Vec<f32> = query_rows.par_chunks(d).map(sq_norm).collect();
    intr.check()?;
    let n_qblocks = m.div_ceil(QUERY_BLOCK);
    let n_bblocks = n.div_ceil(BANK_BLOCK);
    let n_segments = if k > MAX_K_FOR_SEGMENTS {
        1
    } else {
        TARGET_TASKS.div_ceil(n_qblocks).clamp(1, n_bblocks)
    };
    let blocks_per_segment = n_bblocks.div_ceil(n_segments);
    let n_segments = n_bblocks.div_ceil(blocks_per_segment);

    let ctx = SearchCtx {
        query_rows,
        bank_rows,
        bank_norms: &bank_norms,
        query_norms: &query_norms,
        d,
        k,
        intr: *intr,
    };
    // Task t covers query block t / n_segments and bank segment t % n_segments; each
    // returns its k best candidates per query row (sentinels where fewer were found).
    let partial: Vec<Vec<Cand>> = (0..n_qblocks * n_segments)
        .into_par_iter()
        .map(|t| {
            let qb = t / n_segments;
            let seg = t % n_segments;
            let q0 = qb * QUERY_BLOCK;
            let q1 = (q0 + QUERY_BLOCK).min(m);
            let b0 = seg * blocks_per_segment * BANK_BLOCK;
            let b1 = ((seg + 1) * blocks_per_segment * BANK_BLOCK).min(n);
            ctx.search_block(q0, q1, b0, b1)
        })
        .collect::<KernelResult<Vec<_>>>()?;
    intr.check()?;

    // Merge the segments, re-score the winners exactly and write the rows out.
    let mut dist_out = vec![0f32; m * k];
    let mut idx_out = vec![0i64; m * k];
    dist_out
        .par_chunks_mut(QUERY_BLOCK * k)
        .zip(idx_out.par_chunks_mut(QUERY_BLOCK * k))
        .enumerate()
        .try_for_each(|(qb, (dists, idxs))| {
            if intr.is_set() {
                return Err(KernelError::Interrupted);
            }
            let mut merged: Vec<Cand> = Vec::with_capacity(n_segments * k);
            for (local, (drow, irow)) in dists.chunks_mut(k).zip(idxs.chunks_mut(k)).enumerate() {
                merged.clear();
                for seg in 0..n_segments {
                    let part = &partial[qb * n_segments + seg][local * k..(local + 1) * k];
                    merged.extend(part.iter().filter(|c| c.j != NO_INDEX));
                }
                merged.sort_unstable_by(cmp_cand);
                merged.truncate(k);
                if merged.len() < k {
                    fill_missing(&mut merged, k);
                }
                let qi = qb * QUERY_BLOCK + local;
                let q = &query_rows[qi * d..(qi + 1) * d];
                for c in merged.iter_mut() {
                    let sq = exact_sq_dist(q, &bank_rows[c.j * d..(c.j + 1) * d]);
                    c.d = match metric {
                        Metric::SqEuclidean => sq as f32,
                        Metric::Euclidean => sq.sqrt() as f32,
                    };
                }
                merged.sort_unstable_by(cmp_cand);
                for (c, (dd, ii)) in merged.iter().zip(drow.iter_mut().zip(irow.iter_mut())) {
                    *dd = c.d;
                    *ii = c.j as i64;
                }
            }
            Ok(())
        })?;

    let dists = Array2::from_shape_vec((m, k), dist_out)
        .map_err(|e| KernelError::Numerical(format!("knn output shape: {e}")))?;
    let idxs = Array2::from_shape_vec((m, k), idx_out)
        .map_err(|e| KernelError::Numerical(format!("knn output shape: {e}")))?;
    Ok((dists, idxs))
}

/// A candidate neighbour: (approximate or exact) distance and bank index.
#[derive(Clone, Copy, Debug)]
struct Cand {
    d: f32,
    j: usize,
}

/// Total order by (distance, index); NaN sorts last.
fn cmp_cand(a: &Cand, b: &Cand) -> Ordering {
    a.d.total_cmp(&b.d).then(a.j.cmp(&b.j))
}

/// Inputs shared by all search tasks.
struct SearchCtx<'a, 'i> {
    query_rows: &'a [f32],
    bank_rows: &'a [f32],
    bank_norms: &'a [f32],
    query_norms: &'a [f32],
    d: usize,
    k: usize,
    intr: Interrupt<'i>,
}

impl SearchCtx<'_, '_> {
    /// The k best (approximate distance) bank rows in `b0..b1` for queries `q0..q1`,
    /// as `(q1 - q0) * k` candidates, row by row, sorted, padded with sentinels.
    fn search_block(&self, q0: usize, q1: usize, b0: usize, b1: usize) -> KernelResult<Vec<Cand>> {
        let d = self.d;
        let mq = q1 - q0;
        let q_rows = &self.query_rows[q0 * d..q1 * d];
        let mut top = TopK::new(mq, self.k);
        // Column-major (query fastest) so the filter loop runs over contiguous queries;
        // private-gemm is also faster with this destination layout for this shape.
        let mut g = vec![0f32; mq * BANK_BLOCK.min(b1 - b0)];
        let lhs = MatRef::from_row_major_slice(q_rows, mq, d);
        let mut j0 = b0;
        while j0 < b1 {
            if self.intr.is_set() {
                return Err(KernelError::Interrupted);
            }
            let j1 = (j0 + BANK_BLOCK).min(b1);
            let nb = j1 - j0;
            let g = &mut g[..mq * nb];
            let rhs =
                MatRef::from_row_major_slice(&self.bank_rows[j0 * d..j1 * d], nb, d).transpose();
            // g = -2 q·b
            faer::linalg::matmul::matmul(
                MatMut::from_column_major_slice_mut(g, mq, nb),
                Accum::Replace,
                lhs,
                rhs,
                -2.0f32,
                Par::Seq,
            );
            filter_block(
                g,
                &self.query_norms[q0..q1],
                &self.bank_norms[j0..j1],
                j0,
                &mut top,
            );
            j0 = j1;
        }
        Ok(top.finish())
    }
}

/// `s[i0..i0 + LANES]` as a fixed-size array, so the lane loop has no bounds checks.
#[inline(always)]
fn lanes(s: &[f32], i0: usize) -> &[f32; LANES] {
    const ZERO: [f32; LANES] = [0.0; LANES];
    s[i0..i0 + LANES].try_into().unwrap_or(&ZERO)
}

/// Clamps negative round-off (and -0.0) to +0.0; NaN stays NaN so it is never selected.
#[inline(always)]
fn clamp0(x: f32) -> f32 {
    if x <= 0.0 {
        0.0
    } else {
        x
    }
}

/// The k best candidates of each of `mq` queries seen so far.
///
/// Candidates arrive in increasing bank index, so a candidate tying the current k-th
/// distance is worse by index and `d < thr` is the exact acceptance test.
struct TopK {
    k: usize,
    /// Per query: distance a candidate must beat (the k-th best so far, or +inf).
    thr: Vec<f32>,
    /// Small k: per query a sorted run of k slots. Large k: per query a buffer of up to 2k.
    buf: Vec<Cand>,
    len: Vec<usize>,
    insertion: bool,
}

impl TopK {
    fn new(mq: usize, k: usize) -> Self {
        let insertion = k <= MAX_K_INSERTION;
        let cap = if insertion { k } else { 2 * k };
        TopK {
            k,
            thr: vec![f32::INFINITY; mq],
            buf: vec![
                Cand {
                    d: f32::INFINITY,
                    j: NO_INDEX
                };
                mq * cap
            ],
            len: vec![0; mq],
            insertion,
        }
    }

    #[inline]
    fn push(&mut self, i: usize, d: f32, j: usize) {
        let k = self.k;
        if self.insertion {
            let row = &mut self.buf[i * k..(i + 1) * k];
            // Sentinels hold +inf, so this finds the slot after all entries <= d.
            let mut p = k - 1;
            while p > 0 && row[p - 1].d > d {
                row[p] = row[p - 1];
                p -= 1;
            }
            row[p] = Cand { d, j };
            self.thr[i] = row[k - 1].d;
        } else {
            let cap = 2 * k;
            let row = &mut self.buf[i * cap..(i + 1) * cap];
            row[self.len[i]] = Cand { d, j };
            self.len[i] += 1;
            if self.len[i] == cap {
                row.select_nth_unstable_by(k - 1, cmp_cand);
                self.thr[i] = row[k - 1].d;
                self.len[i] = k;
            }
        }
    }

    /// `mq * k` candidates, each row sorted by (distance, index), sentinel-padded.
    fn finish(self) -> Vec<Cand> {
        if self.insertion {
            return self.buf;
        }
        let k = self.k;
        let cap = 2 * k;
        let mut out = Vec::with_capacity(self.len.len() * k);
        for (row, &len) in self.buf.chunks_exact(cap).zip(&self.len) {
            let mut row = row[..len].to_vec();
            row.sort_unstable_by(cmp_cand);
            row.resize(
                k,
                Cand {
                    d: f32::INFINITY,
                    j: NO_INDEX,
                },
            );
            out.extend_from_slice(&row[..k]);
        }
        out
    }
}

/// Pads `merged` to `k` entries with the lowest bank indices not yet in it; only reached
/// when fewer than k distances were finite (non-finite input), so that output stays valid.
fn fill_missing(merged: &mut Vec<Cand>, k: usize) {
    let mut used: Vec<usize> = merged.iter().map(|c| c.j).collect();
    used.sort_unstable();
    let mut j = 0;
    while merged.len() < k {
        if used.binary_search(&j).is_err() {
            merged.push(Cand {
                d: f32::INFINITY,
                j,
            });
        }
        j += 1;
    }
}

/// Copies a strided 2-D view (with at least one column) into a row-major contiguous buffer.
fn pack_rows(a: ArrayView2<f32>) -> Vec<f32> {
    let (r, c) = a.dim();
    let mut out = vec![0f32; r * c];
    out.par_chunks_mut(c)
        .zip(a.outer_iter())
        .for_each(|(dst, row)| {
            for (x, &v) in dst.iter_mut().zip(row.iter()) {
                *x = v;
            }
        });
    out
}

/// Runs `$body` (a block using only safe code) compiled for AVX2 when the CPU has it.
///
/// The crate is built for baseline x86-64 (SSE2); these loops are the non-gemm hot spots.
/// Only additions, multiplications and comparisons are used (Rust never fuses them into
/// FMA), so both versions give bit-identical results.
macro_rules! avx2_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

avx2_dispatch! {
    /// Offers every entry of the gemm block `g` (column-major, `-2 q·b`) to `top`.
    fn filter_block(g: &[f32], q_norms: &[f32], bank_norms: &[f32], j0: usize, top: &mut TopK) {
        let mq = q_norms.len();
        let n_full = mq / LANES;
        for (jj, (col, &bn)) in g.chunks_exact(mq).zip(bank_norms).enumerate() {
            let j = j0 + jj;
            for c in 0..n_full {
                let i0 = c * LANES;
                let (cc, qc, tc) = (lanes(col, i0), lanes(q_norms, i0), lanes(&top.thr, i0));
                let mut ds = [0f32; LANES];
                let mut hit = false;
                for l in 0..LANES {
                    ds[l] = clamp0(qc[l] + bn + cc[l]);
                    hit |= ds[l] < tc[l];
                }
                // Rare after the first few blocks: the k-th best distance only shrinks.
                if hit {
                    for (l, &dl) in ds.iter().enumerate() {
                        if dl < top.thr[i0 + l] {
                            top.push(i0 + l, dl, j);
                        }
                    }
                }
            }
            for i in n_full * LANES..mq {
                let dl = clamp0(q_norms[i] + bn + col[i]);
                if dl < top.thr[i] {
                    top.push(i, dl, j);
                }
            }
        }
    }
}

avx2_dispatch! {
    /// ‖x‖² accumulated in f64 lanes (fixed order), rounded to f32.
    fn sq_norm(x: &[f32]) -> f32 {
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..8 {
                let v = c[l] as f64;
                acc[l] += v * v;
            }
        }
        let mut s = acc.iter().sum::<f64>();
        for &v in rest {
            s += (v as f64) * (v as f64);
        }
        s as f32
    }
}

avx2_dispatch! {
    /// Σ(q − b)² in f64 lanes (fixed order): exact 0 for identical rows, no cancellation.
    fn exact_sq_dist(q: &[f32], b: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let qc = q.chunks_exact(8);
        let bc = b.chunks_exact(8);
        let (qr, br) = (qc.remainder(), bc.remainder());
        for (x, y) in qc.zip(bc) {
            for l in 0..8 {
                let t = x[l] as f64 - y[l] as f64;
                acc[l] += t * t;
            }
        }
        let mut s = acc.iter().sum::<f64>();
        for (&x, &y) in qr.iter().zip(br) {
            let t = x as f64 - y as f64;
            s += t * t;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2, ShapeBuilder};
    use std::sync::atomic::AtomicBool;

    /// Deterministic pseudo-random data (xorshift), values in [-1, 1).
    fn rand_matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Array2::from_shape_fn((rows, cols), |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
    }

    /// Naive f64 brute force: all distances, sorted by (distance, index), first k.
    fn brute(
        q: ArrayView2<f32>,
        b: ArrayView2<f32>,
        k: usize,
        metric: Metric,
    ) -> (Vec<Vec<f64>>, Vec<Vec<i64>>) {
        let mut dists = Vec::new();
        let mut idxs = Vec::new();
        for qi in 0..q.nrows() {
            let mut all: Vec<(f64, usize)> = (0..b.nrows())
                .map(|j| {
                    let mut s = 0f64;
                    for c in 0..q.ncols() {
                        let t = q[[qi, c]] as f64 - b[[j, c]] as f64;
                        s += t * t;
                    }
                    (
                        if metric == Metric::Euclidean {
                            s.sqrt()
                        } else {
                            s
                        },
                        j,
                    )
                })
                .collect();
            all.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
            dists.push(all[..k].iter().map(|x| x.0).collect());
            idxs.push(all[..k].iter().map(|x| x.1 as i64).collect());
        }
        (dists, idxs)
    }

    fn run(
        q: ArrayView2<f32>,
        b: ArrayView2<f32>,
        k: usize,
        metric: Metric,
    ) -> (Array2<f32>, Array2<i64>) {
        knn(q, b, k, metric, &Interrupt::never()).expect("knn failed")
    }

    /// Checks against brute force. Random data has no near-ties at the k boundary, so
    /// indices must match exactly and distances to f32 rounding of the exact value.
    fn check(q: ArrayView2<f32>, b: ArrayView2<f32>, k: usize, metric: Metric) {
        let (d, i) = run(q, b, k, metric);
        assert_eq!(d.dim(), (q.nrows(), k));
        assert_eq!(i.dim(), (q.nrows(), k));
        let (rd, ri) = brute(q, b, k, metric);
        for qi in 0..q.nrows() {
            assert_eq!(i.row(qi).to_vec(), ri[qi], "indices of query {qi}");
            for c in 0..k {
                let want = rd[qi][c];
                let got = d[[qi, c]] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1e-30),
                    "query {qi} slot {c}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn matches_brute_force_on_random_data() {
        let q = rand_matrix(37, 19, 1);
        let b = rand_matrix(301, 19, 2);
        for &k in &[1, 5, 9] {
            check(q.view(), b.view(), k, Metric::SqEuclidean);
            check(q.view(), b.view(), k, Metric::Euclidean);
        }
    }

    #[test]
    fn matches_brute_force_across_several_blocks_and_segments() {
        // > QUERY_BLOCK queries and > 2 BANK_BLOCKs so that block edges, remainder lanes
        // and the segment merge are exercised.
        let q = rand_matrix(QUERY_BLOCK + 21, 7, 3);
        let b = rand_matrix(2 * BANK_BLOCK + 333, 7, 4);
        check(q.view(), b.view(), 4, Metric::SqEuclidean);
    }

    #[test]
    fn handles_non_contiguous_views() {
        // Transposed storage: (D, M) array viewed as (M, D).
        let qt = rand_matrix(23, 41, 5);
        let bt = rand_matrix(23, 150, 6);
        check(qt.t(), bt.t(), 6, Metric::Euclidean);
        // Stepped slices and a Fortran-order array.
        let big_q = rand_matrix(80, 50, 7);
        let big_b = rand_matrix(400, 50, 8);
        let qs = big_q.slice(s![..;2, ..;2]);
        let bs = big_b.slice(s![1..;3, ..;2]);
        check(qs, bs, 7, Metric::SqEuclidean);
        let mut bf = Array2::<f32>::zeros((200, 25).f());
        bf.assign(&big_b.slice(s![..200, ..25]));
        check(big_q.slice(s![.., ..25]), bf.view(), 3, Metric::Euclidean);
        // Negative strides.
        check(
            big_q.slice(s![..;-1, ..]),
            big_b.slice(s![..;-2, ..]),
            2,
            Metric::SqEuclidean,
        );
    }

    #[test]
    fn k_equal_to_one_and_to_n() {
        let q = rand_matrix(11, 9, 9);
        let b = rand_matrix(40, 9, 10);
        check(q.view(), b.view(), 1, Metric::SqEuclidean);
        check(q.view(), b.view(), 40, Metric::SqEuclidean);
        // k above the insertion-buffer limit takes the prune-by-selection path.
        let b = rand_matrix(300, 9, 11);
        check(q.view(), b.view(), MAX_K_INSERTION + 7, Metric::Euclidean);
        check(q.view(), b.view(), 300, Metric::SqEuclidean);
    }

    #[test]
    fn large_k_spanning_several_bank_blocks() {
        // k above MAX_K_FOR_SEGMENTS: a single segment with the pruned buffer over 2 blocks.
        let q = rand_matrix(13, 5, 29);
        let b = rand_matrix(BANK_BLOCK + 476, 5, 30);
        check(
            q.view(),
            b.view(),
            MAX_K_FOR_SEGMENTS + 1,
            Metric::SqEuclidean,
        );
        check(q.view(), b.view(), BANK_BLOCK + 476, Metric::Euclidean);
    }

    #[test]
    fn each_row_sorted_by_distance_then_index() {
        let q = rand_matrix(30, 4, 12);
        let b = rand_matrix(500, 4, 13);
        for &k in &[9, 100] {
            let (d, i) = run(q.view(), b.view(), k, Metric::Euclidean);
            for r in 0..q.nrows() {
                for c in 1..k {
                    let prev = (d[[r, c - 1]], i[[r, c - 1]]);
                    let cur = (d[[r, c]], i[[r, c]]);
                    assert!(
                        prev.0 < cur.0 || (prev.0 == cur.0 && prev.1 < cur.1),
                        "row {r}: {prev:?} then {cur:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn duplicate_bank_rows_tie_by_lower_index() {
        let base = rand_matrix(5, 6, 14);
        // Bank rows 0..5, then the same 5 rows twice more: indices j, j+5, j+10 tie.
        let mut b = Array2::<f32>::zeros((15, 6));
        for r in 0..15 {
            b.row_mut(r).assign(&base.row(r % 5));
        }
        let q = rand_matrix(8, 6, 15);
        for &k in &[3, 15] {
            let (d, i) = run(q.view(), b.view(), k, Metric::SqEuclidean);
            let (_, ri) = brute(q.view(), b.view(), k, Metric::SqEuclidean);
            for r in 0..8 {
                assert_eq!(i.row(r).to_vec(), ri[r]);
                for c in 1..k {
                    if d[[r, c]] == d[[r, c - 1]] {
                        assert!(i[[r, c]] > i[[r, c - 1]]);
                    }
                }
            }
        }
        // Large-k path with ties too.
        let mut b = Array2::<f32>::zeros((200, 6));
        for r in 0..200 {
            b.row_mut(r).assign(&base.row(r % 5));
        }
        let (_, i) = run(q.view(), b.view(), 100, Metric::SqEuclidean);
        let (_, ri) = brute(q.view(), b.view(), 100, Metric::SqEuclidean);
        for (r, want) in ri.iter().enumerate() {
            assert_eq!(&i.row(r).to_vec(), want);
        }
    }

    #[test]
    fn euclidean_is_sqrt_of_sqeuclidean() {
        let q = rand_matrix(20, 33, 16);
        let b = rand_matrix(90, 33, 17);
        let (d2, i2) = run(q.view(), b.view(), 5, Metric::SqEuclidean);
        let (d1, i1) = run(q.view(), b.view(), 5, Metric::Euclidean);
        assert_eq!(i1, i2);
        for (a, b) in d1.iter().zip(d2.iter()) {
            assert!(((*a as f64).powi(2) - *b as f64).abs() <= 1e-6 * (*b as f64));
        }
    }

    #[test]
    fn query_equal_to_bank_row_gives_exact_zero() {
        // Large norms make the expansion cancel badly; refinement must still give 0.
        let mut b = rand_matrix(64, 300, 18);
        b.mapv_inplace(|x| x * 100.0 + 1000.0);
        let q = b.slice(s![10..20, ..]).to_owned();
        for metric in [Metric::SqEuclidean, Metric::Euclidean] {
            let (d, i) = run(q.view(), b.view(), 3, metric);
            for r in 0..10 {
                assert_eq!(i[[r, 0]], 10 + r as i64);
                assert_eq!(d[[r, 0]], 0.0);
                assert!(d[[r, 1]] > 0.0);
            }
        }
    }

    #[test]
    fn output_is_independent_of_thread_count() {
        let q = rand_matrix(QUERY_BLOCK * 2 + 5, 33, 19);
        let b = rand_matrix(BANK_BLOCK + 1000, 33, 20);
        let pool = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        };
        for &k in &[9, 80] {
            let one = pool(1).install(|| run(q.view(), b.view(), k, Metric::Euclidean));
            let three = pool(3).install(|| run(q.view(), b.view(), k, Metric::Euclidean));
            assert_eq!(one.1, three.1);
            let bits = |a: &Array2<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one.0), bits(&three.0));
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let q = rand_matrix(4, 3, 21);
        let b = rand_matrix(6, 3, 22);
        let arg = |r: KernelResult<(Array2<f32>, Array2<i64>)>| match r {
            Err(KernelError::InvalidArgument { arg, msg }) => (arg, msg),
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let never = Interrupt::never();
        let (a, msg) = arg(knn(
            q.view(),
            rand_matrix(6, 4, 1).view(),
            1,
            Metric::Euclidean,
            &never,
        ));
        assert_eq!(a, "bank");
        assert!(msg.contains('3') && msg.contains('4'), "{msg}");
        let (a, _) = arg(knn(
            Array2::<f32>::zeros((0, 3)).view(),
            b.view(),
            1,
            Metric::Euclidean,
            &never,
        ));
        assert_eq!(a, "queries");
        let (a, _) = arg(knn(
            q.view(),
            Array2::<f32>::zeros((0, 3)).view(),
            1,
            Metric::Euclidean,
            &never,
        ));
        assert_eq!(a, "bank");
        let (a, _) = arg(knn(q.view(), b.view(), 0, Metric::Euclidean, &never));
        assert_eq!(a, "k");
        let (a, msg) = arg(knn(q.view(), b.view(), 7, Metric::Euclidean, &never));
        assert_eq!(a, "k");
        assert!(msg.contains("N=6") && msg.contains('7'), "{msg}");
        let z = Array2::<f32>::zeros((4, 0));
        let zb = Array2::<f32>::zeros((6, 0));
        let (a, _) = arg(knn(z.view(), zb.view(), 1, Metric::Euclidean, &never));
        assert_eq!(a, "queries");
    }

    #[test]
    fn stops_when_interrupted() {
        let flag = AtomicBool::new(true);
        let q = rand_matrix(4, 3, 23);
        let b = rand_matrix(6, 3, 24);
        let r = knn(
            q.view(),
            b.view(),
            2,
            Metric::Euclidean,
            &Interrupt::new(&flag),
        );
        assert_eq!(r.unwrap_err(), KernelError::Interrupted);
    }

    #[test]
    fn non_finite_input_does_not_panic() {
        // Not validated here (the Python layer does), but must not panic or emit bad indices.
        let q = rand_matrix(3, 4, 25);
        let mut b = rand_matrix(5, 4, 26);
        b[[1, 0]] = f32::NAN;
        b[[3, 2]] = f32::INFINITY;
        let (_, i) = run(q.view(), b.view(), 5, Metric::Euclidean);
        for r in 0..3 {
            let mut row = i.row(r).to_vec();
            row.sort();
            assert_eq!(row, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn metric_parse_accepts_known_names_only() {
        assert_eq!(Metric::parse("euclidean"), Some(Metric::Euclidean));
        assert_eq!(Metric::parse("sqeuclidean"), Some(Metric::SqEuclidean));
        assert_eq!(Metric::parse("cosine"), None);
        assert_eq!(Metric::parse(""), None);
    }

    /// Timing: `cargo test --release knn::tests::timing -- --ignored --nocapture`.
    /// Sizes via KNN_M, KNN_N, KNN_D, KNN_K, KNN_THREADS (default 2048 8192 1536 9 2).
    #[test]
    #[ignore]
    fn timing() {
        let env = |name: &str, dflt: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(dflt)
        };
        let (m, n, d, k, t) = (
            env("KNN_M", 2048),
            env("KNN_N", 8192),
            env("KNN_D", 1536),
            env("KNN_K", 9),
            env("KNN_THREADS", 2),
        );
        let q = rand_matrix(m, d, 27);
        let b = rand_matrix(n, d, 28);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap();
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let start = std::time::Instant::now();
            let r = pool.install(|| run(q.view(), b.view(), k, Metric::Euclidean));
            best = best.min(start.elapsed().as_secs_f64());
            assert_eq!(r.0.dim(), (m, k));
        }
        let gflops = 2.0 * (m * n * d) as f64 / best / 1e9;
        println!("knn M={m} N={n} D={d} k={k} threads={t}: {best:.3} s, {gflops:.1} GFLOP/s");
    }
}
