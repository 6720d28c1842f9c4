//! Per-position multivariate Gaussian statistics (PaDiM): streaming accumulator and one-shot fit
//! of each position's mean and inverse covariance. Scoring against them is `crate::mahalanobis`;
//! the gathering of per-position blocks here is shared with it.
//!
//! Feature maps are (B, C, H, W); position p = h·W + w (row-major over H, W), which matches
//! `features.reshape(B, C, H*W)` in numpy/torch: `mean[p, c]`, `inv_cov[p, :, :]`.
//! Work is split into blocks of positions whose size depends only on the shapes; each position
//! is computed by one rayon task in a fixed order, so results are bit-identical for any number
//! of threads.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayView4};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

/// Target size of one task's gathered (positions, B, C) f32 block, about twice an L2 cache:
/// for 200 × 100 features that is 32 positions (128 B read per plane and block, two cache lines
/// rather than one, which gathers faster; figures in BENCHMARKS.md).
const GATHER_BLOCK_BYTES: usize = 4 << 20;
/// Most positions per task, which also bounds interrupt latency.
const MAX_POSITIONS_PER_BLOCK: usize = 64;
/// Fewest blocks we aim for, so that the work spreads over many threads.
const MIN_BLOCKS: usize = 48;

/// Positions per task for gathered rows of `ld` floats; a multiple of 16 (whole cache lines
/// of an NCHW plane) when possible. Depends only on the shapes, so results do not depend on
/// the thread count.
pub(crate) fn positions_per_block(hw: usize, ld: usize) -> usize {
    let mut by_cache = GATHER_BLOCK_BYTES / (ld.max(1) * 4);
    if by_cache >= 16 {
        by_cache -= by_cache % 16;
    }
    let by_balance = hw / MIN_BLOCKS;
    by_cache.min(by_balance).clamp(1, MAX_POSITIONS_PER_BLOCK)
}

/// Distance in f32 between consecutive positions of a gather buffer: `row_len` rounded up to
/// whole cache lines, and an odd number of them, so that the up to 64 rows written together
/// fall in distinct L1 sets (an 80 KB stride, B=200 and C=100, would alias them all).
pub(crate) fn gather_stride(row_len: usize) -> usize {
    let lines = row_len.div_ceil(16);
    16 * (lines | 1)
}

/// Copies positions `p0..p0+np` of `features` (B,C,H,W; any strides) into `buf` laid out
/// (np, B, C) with a distance of `gather_stride(B·C)` between positions, i.e. per position a
/// row-major B×C matrix (one row of C channels per sample).
///
/// The input is read in runs along the positions of each (b, c) plane: whole blocks when rows
/// are adjacent in memory (NCHW tensors), otherwise one run per row. Sixteen planes are read
/// side by side so that their cache misses overlap (one run at a time waits on memory at the
/// start of every run), and each step writes 16 adjacent floats. Planes are visited in memory order of an NCHW tensor (channels
/// of one sample, then the next sample), so consecutive reads are one plane apart rather than
/// one sample apart: with B·C planes of 12.5 KB that was a page-table walk per read.
/// Elements are read through raw offsets because per-element view indexing costs far more.
pub(crate) fn gather_block(features: &ArrayView4<f32>, p0: usize, np: usize, buf: &mut [f32]) {
    const GROUP: usize = 16;
    let (b_count, c_count, _, w_count) = features.dim();
    let row_len = b_count * c_count;
    let ld = gather_stride(row_len);
    assert!(buf.len() >= np * ld && p0 + np <= features.len() / row_len.max(1));
    let st = features.strides();
    let (sb, sc, sh, sw) = (st[0], st[1], st[2], st[3]);
    // Positions h·W + w are evenly spaced (by sw) across row ends when sh == W·sw.
    let rows_merge = sh == sw * w_count as isize;
    let base = features.as_ptr();
    let mut offs = [0isize; GROUP];
    let mut p = p0;
    while p < p0 + np {
        let (h, w0) = (p / w_count, p % w_count);
        let len = if rows_merge {
            p0 + np - p
        } else {
            (w_count - w0).min(p0 + np - p)
        };
        let run_off = h as isize * sh + w0 as isize * sw;
        let dst0 = (p - p0) * ld;
        // Planes j = b·C + c, in groups of GROUP consecutive j (adjacent in `buf`).
        for j0 in (0..row_len).step_by(GROUP) {
            let g = GROUP.min(row_len - j0);
            for (i, o) in offs[..g].iter_mut().enumerate() {
                let j = j0 + i;
                *o = (j / c_count) as isize * sb + (j % c_count) as isize * sc + run_off;
            }
            for k in 0..len {
                let dst = &mut buf[dst0 + k * ld + j0..][..g];
                let step = k as isize * sw;
                for (d, &o) in dst.iter_mut().zip(&offs[..g]) {
                    // SAFETY: positions p..p+len are (h, w0+k) within one row, or, when rows
                    // merge, (h', w') with h'·sh + w'·sw = run_off + k·sw; either way
                    // (b, c, h', w') is a valid index of `features`, so the offset is in bounds.
                    *d = unsafe { *base.offset(o + step) };
                }
            }
        }
        p += len;
    }
}

/// Whether every value is finite, without short-circuiting inside 1024-value chunks so that
/// the test vectorises (a NaN or infinity has all exponent bits set).
fn all_finite(values: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    values.chunks(1024).all(|ch| {
        ch.iter()
            .fold(0u32, |acc, v| acc | u32::from(v.to_bits() & EXP == EXP))
            == 0
    })
}

fn non_finite_error() -> KernelError {
    KernelError::invalid("features", "expected finite values, found NaN or infinity")
}

/// Returns an error if any element of `features` is NaN or infinite.
fn check_finite(features: &ArrayView4<f32>) -> KernelResult<()> {
    let finite = match features.as_slice_memory_order() {
        Some(s) => s.par_chunks(1 << 16).all(all_finite),
        None => features.into_par_iter().all(|v| v.is_finite()),
    };
    if finite {
        Ok(())
    } else {
        Err(non_finite_error())
    }
}

pub(crate) fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("({})", parts.join(", "))
}

fn check_eps(eps: f64) -> KernelResult<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(KernelError::invalid(
            "eps",
            format!("expected a finite value >= 0, got {eps}"),
        ))
    }
}

/// The error for an allocation of `bytes` that failed: the kernels return it instead of aborting
/// when memory is short.
fn allocation_error(arg: &'static str, bytes: usize) -> KernelError {
    KernelError::invalid(
        arg,
        format!("could not allocate {bytes} bytes for the Gaussian statistics"),
    )
}

/// A zero-filled vector for the accumulator's state, or an error naming `arg`.
fn try_zeros<T: Clone + Default>(len: usize, arg: &'static str) -> KernelResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| allocation_error(arg, len.saturating_mul(std::mem::size_of::<T>())))?;
    v.resize(len, T::default());
    Ok(v)
}

/// A zero-filled f32 output of `len` values, or an error naming `arg`. Asks the allocator for
/// zeroed memory, which fresh pages from the OS already are, so no single-threaded pass writes
/// the zeros before the parallel kernel writes the values (large outputs, such as PaDiM's
/// inverse covariances, are written once instead of twice). The accumulator's state keeps
/// `try_zeros`: zeroed memory did not reliably make its first update faster (BENCHMARKS.md).
fn try_zeroed_output(len: usize, arg: &'static str) -> KernelResult<Vec<f32>> {
    let error = || allocation_error(arg, len.saturating_mul(4));
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).map_err(|_| error())?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
    if ptr.is_null() {
        return Err(error());
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `len` f32 (so capacity
    // `len` matches it), and every value is initialised: all-zero bits are 0.0.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Copies the upper triangle of the row-major c×c matrix `m` onto its lower triangle, in
/// 16×16 tiles so that the strided writes stay in a few cache lines.
fn mirror_upper_to_lower<T: Copy>(m: &mut [T], c: usize) {
    const T_: usize = 16;
    for ib in (0..c).step_by(T_) {
        let ie = (ib + T_).min(c);
        for jb in (ib..c).step_by(T_) {
            let je = (jb + T_).min(c);
            for i in ib..ie {
                for j in jb.max(i + 1)..je {
                    m[j * c + i] = m[i * c + j];
                }
            }
        }
    }
}

/// Merges one position's batch into its running statistics (Chan et al.).
///
/// `src` is the gathered row-major (B, C) f32 block; `mu` (C) and `s` (C×C row-major; only the
/// upper triangle is read and written) are the running mean and scatter of `na` samples;
/// `coef` = na·nb/(na+nb), `mean_step` = nb/(na+nb). `x` (B·C) and `delta` (C) are scratch.
#[allow(clippy::too_many_arguments)]
fn absorb_position(
    src: &[f32],
    b_count: usize,
    coef: f64,
    mean_step: f64,
    x: &mut [f64],
    delta: &mut [f64],
    mu: &mut [f64],
    s: &mut [f64],
) {
    let c = mu.len();
    let nb = b_count as f64;
    // x: row-major B×C (one row of C channels per sample), centred on the batch mean;
    // delta = batch mean − running mean. Each channel's sum runs over the samples in order.
    delta.fill(0.0);
    for srow in src.chunks_exact(c) {
        for (acc, &sv) in delta.iter_mut().zip(srow) {
            *acc += f64::from(sv);
        }
    }
    for d in delta.iter_mut() {
        *d /= nb;
    }
    for (xrow, srow) in x.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
        for ((xv, &sv), &bm) in xrow.iter_mut().zip(srow).zip(delta.iter()) {
            *xv = f64::from(sv) - bm;
        }
    }
    for (d, &m) in delta.iter_mut().zip(mu.iter()) {
        *d -= m;
    }
    // Upper triangle of s (row-major) += Xcᵀ Xc, i.e. the lower triangle of s read as
    // column-major: the batch's centred scatter, half the flops of a full product.
    let xc = MatRef::from_row_major_slice(&x[..], b_count, c);
    triangular::matmul(
        MatMut::from_column_major_slice_mut(&mut *s, c, c),
        BlockStructure::TriangularLower,
        Accum::Add,
        xc.transpose(),
        BlockStructure::Rectangular,
        xc,
        BlockStructure::Rectangular,
        1.0f64,
        Par::Seq,
    );
    // Merge correction δδᵀ·na·nb/n on the upper triangle.
    for i in 0..c {
        let di = delta[i] * coef;
        let row = &mut s[i * c + i..(i + 1) * c];
        for (v, &dj) in row.iter_mut().zip(&delta[i..]) {
            *v += di * dj;
        }
    }
    for (m, &d) in mu.iter_mut().zip(delta.iter()) {
        *m += d * mean_step;
    }
}

/// Per-thread buffers for `invert_position`.
struct InvScratch {
    c: usize,
    fac: Vec<f64>,
    inv: Vec<f64>,
    mem: MemBuffer,
}

impl InvScratch {
    fn new(c: usize) -> Self {
        let req = StackReq::or(
            llt::factor::cholesky_in_place_scratch::<f64>(c, Par::Seq, Default::default()),
            llt::inverse::inverse_scratch::<f64>(c, Par::Seq),
        );
        InvScratch {
            c,
            fac: vec![0.0; c * c],
            inv: vec![0.0; c * c],
            mem: MemBuffer::new(req),
        }
    }
}

/// Why a covariance could not be inverted.
enum InvertError {
    /// Cholesky met a non-positive pivot at this index.
    NotPositiveDefinite(usize),
    /// The inverse has entries beyond the f32 range.
    Overflow,
}

/// Writes (s/dof + eps·I)⁻¹ as f32 into `out` (row-major c×c, exactly symmetric), reading only
/// the upper triangle of the row-major scatter `s`.
fn invert_position(
    s: &[f64],
    inv_dof: f64,
    eps: f64,
    scr: &mut InvScratch,
    out: &mut [f32],
) -> Result<(), InvertError> {
    let c = scr.c;
    // `fac` column-major: its lower triangle is the row-major upper triangle of s, contiguous.
    for j in 0..c {
        let col = &mut scr.fac[j * c..(j + 1) * c];
        col[..j].fill(0.0);
        for (f, &v) in col[j..].iter_mut().zip(&s[j * c + j..(j + 1) * c]) {
            *f = v * inv_dof;
        }
        col[j] += eps;
    }
    let mut l = MatMut::from_column_major_slice_mut(&mut scr.fac[..], c, c);
    if let Err(llt::factor::LltError::NonPositivePivot { index }) = llt::factor::cholesky_in_place(
        l.as_mut(),
        Default::default(),
        Par::Seq,
        MemStack::new(&mut scr.mem),
        Default::default(),
    ) {
        return Err(InvertError::NotPositiveDefinite(index));
    }
    llt::inverse::inverse(
        MatMut::from_column_major_slice_mut(&mut scr.inv[..], c, c),
        l.as_ref(),
        Par::Seq,
        MemStack::new(&mut scr.mem),
    );
    // faer fills the lower triangle (column-major), i.e. the row-major upper triangle of out.
    for j in 0..c {
        for (o, &v) in out[j * c + j..(j + 1) * c]
            .iter_mut()
            .zip(&scr.inv[j * c + j..(j + 1) * c])
        {
            *o = v as f32;
        }
    }
    if !out.iter().all(|v| v.is_finite()) {
        return Err(InvertError::Overflow);
    }
    mirror_upper_to_lower(out, c);
    Ok(())
}

fn invert_error(e: InvertError, p: usize, width: usize) -> KernelError {
    let (h, w) = (p / width, p % width);
    KernelError::Numerical(match e {
        InvertError::NotPositiveDefinite(pivot) => format!(
            "covariance at position {p} (h={h}, w={w}) is not positive definite (Cholesky failed \
             at pivot {pivot}); increase eps or provide more samples"
        ),
        InvertError::Overflow => format!(
            "inverse covariance at position {p} (h={h}, w={w}) overflows float32; increase eps"
        ),
    })
}

/// Returns the first error in position order (Interrupted if the flag is set), so the outcome
/// does not depend on scheduling.
fn first_error(results: Vec<KernelResult<()>>, intr: &Interrupt) -> KernelResult<()> {
    intr.check()?;
    results.into_iter().collect()
}

/// Streams batches of feature maps (B,C,H,W) and accumulates, per spatial position, the count,
/// mean and centred scatter matrix in f64 (Chan et al. pairwise merge of batch statistics).
///
/// Memory: H·W·C·(C+1)·8 bytes for the state (mean (H·W, C) and scatter (H·W, C, C), both f64);
/// each `update` reads and writes the whole scatter once, so fewer, larger batches are faster.
/// `update` costs O(H·W·B·C²) flops, `finalize` O(H·W·C³).
///
/// If `update` is interrupted, part of the positions have already absorbed the batch; the
/// accumulator is then marked invalid and later `update`/`finalize` calls return an error.
#[derive(Debug, Clone)]
pub struct GaussianAccumulator {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    /// (H·W, C), standard layout.
    mean: Array2<f64>,
    /// (H·W, C, C), standard layout, kept exactly symmetric.
    scatter: Array3<f64>,
    /// Set when an `update` stopped half-way; the state is then inconsistent.
    poisoned: bool,
}

impl GaussianAccumulator {
    /// Empty accumulator for feature maps of `channels` × `height` × `width` (all >= 1).
    ///
    /// Memory: height·width·channels·(channels+1)·8 bytes, allocated up front.
    pub fn new(channels: usize, height: usize, width: usize) -> KernelResult<Self> {
        if channels == 0 {
            return Err(KernelError::invalid("channels", "expected >= 1, got 0"));
        }
        if height == 0 {
            return Err(KernelError::invalid("height", "expected >= 1, got 0"));
        }
        if width == 0 {
            return Err(KernelError::invalid("width", "expected >= 1, got 0"));
        }
        let too_big = || {
            KernelError::invalid(
                "channels",
                format!(
                    "statistics for {channels} channels at {height}x{width} positions do not fit in memory"
                ),
            )
        };
        let hw = height.checked_mul(width).ok_or_else(too_big)?;
        let mean_len = hw.checked_mul(channels).ok_or_else(too_big)?;
        let scatter_len = mean_len.checked_mul(channels).ok_or_else(too_big)?;
        scatter_len.checked_mul(8).ok_or_else(too_big)?;
        let mean = Array2::from_shape_vec((hw, channels), try_zeros(mean_len, "channels")?)
            .map_err(|_| too_big())?;
        let scatter = Array3::from_shape_vec(
            (hw, channels, channels),
            try_zeros(scatter_len, "channels")?,
        )
        .map_err(|_| too_big())?;
        Ok(GaussianAccumulator {
            n: 0,
            c: channels,
            h: height,
            w: width,
            mean,
            scatter,
            poisoned: false,
        })
    }

    fn check_usable(&self) -> KernelResult<()> {
        if self.poisoned {
            Err(KernelError::invalid(
                "accumulator",
                "a previous update was interrupted and left the statistics incomplete; start a new accumulator",
            ))
        } else {
            Ok(())
        }
    }

    /// The end of a parallel pass over the positions (`update`, `merge`): on success the sample
    /// count becomes `n_new`; on an error some positions may already hold the new samples, so the
    /// state is inconsistent and the accumulator is poisoned.
    fn commit(&mut self, result: KernelResult<()>, n_new: usize) -> KernelResult<()> {
        match result {
            Ok(()) => {
                self.n = n_new;
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Adds a batch of feature maps (B, C, H, W), B >= 1, any strides; C, H, W must match.
    ///
    /// Per position: batch mean and centred scatter Xcᵀ·Xc in f64 (faer), then the pairwise
    /// merge M2 = M2a + M2b + δδᵀ·na·nb/n, mean = mean_a + δ·nb/n. Rejects non-finite values
    /// before touching the state. Memory: one (≤64 positions, B, C) f32 block and B·C + C f64
    /// per busy thread.
    pub fn update(&mut self, features: ArrayView4<f32>, intr: &Interrupt) -> KernelResult<()> {
        self.check_usable()?;
        let (b_count, c, h, w) = features.dim();
        if b_count == 0 {
            return Err(KernelError::invalid(
                "features",
                format!(
                    "expected a batch of at least 1 sample, got shape {}",
                    shape_str(features.shape())
                ),
            ));
        }
        if (c, h, w) != (self.c, self.h, self.w) {
            return Err(KernelError::invalid(
                "features",
                format!(
                    "expected batches of shape (B, {}, {}, {}), got {}",
                    self.c,
                    self.h,
                    self.w,
                    shape_str(features.shape())
                ),
            ));
        }
        let n_new = self
            .n
            .checked_add(b_count)
            .ok_or_else(|| KernelError::invalid("features", "sample count overflows usize"))?;
        intr.check()?;
        check_finite(&features)?;
        intr.check()?;

        let row_len = b_count * c;
        let ld = gather_stride(row_len);
        let pb = positions_per_block(h * w, ld);
        let (na, nb, n) = (self.n as f64, b_count as f64, n_new as f64);
        let coef = na * nb / n;
        let mean_step = nb / n;
        let features = &features;
        let mean = self
            .mean
            .as_slice_mut()
            .expect("mean is kept in standard layout");
        let scatter = self
            .scatter
            .as_slice_mut()
            .expect("scatter is kept in standard layout");
        let result = mean
            .par_chunks_mut(pb * c)
            .zip(scatter.par_chunks_mut(pb * c * c))
            .enumerate()
            .try_for_each_init(
                || (Vec::<f32>::new(), vec![0.0f64; row_len], vec![0.0f64; c]),
                |(buf, x, delta), (blk, (mean_blk, scat_blk))| -> KernelResult<()> {
                    let np = mean_blk.len() / c;
                    buf.resize(np * ld, 0.0);
                    gather_block(features, blk * pb, np, buf);
                    for ((src, mu), s) in buf
                        .chunks_exact(ld)
                        .zip(mean_blk.chunks_exact_mut(c))
                        .zip(scat_blk.chunks_exact_mut(c * c))
                    {
                        if intr.is_set() {
                            return Err(KernelError::Interrupted);
                        }
                        absorb_position(&src[..row_len], b_count, coef, mean_step, x, delta, mu, s);
                        mirror_upper_to_lower(s, c);
                    }
                    Ok(())
                },
            );
        self.commit(result, n_new)
    }

    /// Number of samples absorbed so far.
    pub fn n_samples(&self) -> usize {
        self.n
    }

    pub fn channels(&self) -> usize {
        self.c
    }

    pub fn height(&self) -> usize {
        self.h
    }

    pub fn width(&self) -> usize {
        self.w
    }

    /// Mean (H·W, C) f32 and inverse covariance (H·W, C, C) f32.
    ///
    /// Covariance = M2/(n−1) + eps·I, inverted through a Cholesky factorisation (faer llt) in
    /// f64, in parallel over positions. Needs n_samples >= 2 and finite eps >= 0; a covariance
    /// that is not positive definite gives `KernelError::Numerical` naming the first such
    /// position. Memory: the outputs, H·W·C·(C+1)·4 bytes, plus 2·C² f64 per thread.
    pub fn finalize(&self, eps: f64, intr: &Interrupt) -> KernelResult<(Array2<f32>, Array3<f32>)> {
        self.check_usable()?;
        if self.n < 2 {
            return Err(KernelError::invalid(
                "features",
                format!(
                    "need at least 2 samples to estimate a covariance, got {}",
                    self.n
                ),
            ));
        }
        check_eps(eps)?;
        intr.check()?;
        let c = self.c;
        let (hw, width) = (self.h * self.w, self.w);
        let inv_dof = 1.0 / (self.n as f64 - 1.0);
        let scatter = self
            .scatter
            .as_slice()
            .expect("scatter is kept in standard layout");
        let mut inv_out =
            Array3::from_shape_vec((hw, c, c), try_zeroed_output(hw * c * c, "channels")?)
                .expect("length matches the shape");
        let out = inv_out
            .as_slice_mut()
            .expect("freshly allocated array is contiguous");
        let results: Vec<KernelResult<()>> = out
            .par_chunks_mut(c * c)
            .zip(scatter.par_chunks(c * c))
            .enumerate()
            .map_init(
                || InvScratch::new(c),
                |scr, (p, (out_p, s))| -> KernelResult<()> {
                    if intr.is_set() {
                        return Err(KernelError::Interrupted);
                    }
                    invert_position(s, inv_dof, eps, scr, out_p)
                        .map_err(|e| invert_error(e, p, width))
                },
            )
            .collect();
        first_error(results, intr)?;
        Ok((self.mean.mapv(|v| v as f32), inv_out))
    }

    /// Absorbs another accumulator's statistics (the same shape): afterwards this one holds the
    /// statistics of both sample sets, as if every batch of `other` had been given to `update`.
    ///
    /// Per position, Chan et al.'s pairwise merge of (n, mean, centred scatter):
    /// δ = mean_b − mean_a, mean = mean_a + δ·n_b/n, M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n. Exact in
    /// real arithmetic; in f64 it differs from one pass over all samples by rounding only. Order
    /// does not matter beyond rounding, so partial states can be merged in any tree. Memory: none
    /// beyond a C-vector per busy thread.
    pub fn merge(&mut self, other: &GaussianAccumulator, intr: &Interrupt) -> KernelResult<()> {
        self.check_usable()?;
        other.check_usable()?;
        if (other.c, other.h, other.w) != (self.c, self.h, self.w) {
            return Err(KernelError::invalid(
                "other",
                format!(
                    "expected statistics of shape ({}, {}, {}) (C, H, W) like this accumulator, got ({}, {}, {})",
                    self.c, self.h, self.w, other.c, other.h, other.w
                ),
            ));
        }
        let n_new = self
            .n
            .checked_add(other.n)
            .ok_or_else(|| KernelError::invalid("other", "sample count overflows usize"))?;
        if other.n == 0 {
            return Ok(());
        }
        intr.check()?;
        let c = self.c;
        let (na, nb, n) = (self.n as f64, other.n as f64, n_new as f64);
        let (coef, mean_step) = (na * nb / n, nb / n);
        let mean = self
            .mean
            .as_slice_mut()
            .expect("mean is kept in standard layout");
        let scatter = self
            .scatter
            .as_slice_mut()
            .expect("scatter is kept in standard layout");
        let other_mean = other
            .mean
            .as_slice()
            .expect("mean is kept in standard layout");
        let other_scatter = other
            .scatter
            .as_slice()
            .expect("scatter is kept in standard layout");
        let result = mean
            .par_chunks_mut(c)
            .zip(scatter.par_chunks_mut(c * c))
            .zip(
                other_mean
                    .par_chunks(c)
                    .zip(other_scatter.par_chunks(c * c)),
            )
            .try_for_each_init(
                || vec![0.0f64; c],
                |delta, ((mu, s), (mu_b, s_b))| -> KernelResult<()> {
                    if intr.is_set() {
                        return Err(KernelError::Interrupted);
                    }
                    for ((d, &a), &b) in delta.iter_mut().zip(mu.iter()).zip(mu_b) {
                        *d = b - a;
                    }
                    for (i, row) in s.chunks_exact_mut(c).enumerate() {
                        let di = delta[i] * coef;
                        for ((v, &vb), &dj) in row
                            .iter_mut()
                            .zip(&s_b[i * c..(i + 1) * c])
                            .zip(delta.iter())
                        {
                            *v += vb + di * dj;
                        }
                    }
                    for (m, &d) in mu.iter_mut().zip(delta.iter()) {
                        *m += d * mean_step;
                    }
                    Ok(())
                },
            );
        self.commit(result, n_new)
    }

    /// Raw state for save/restore: mean f64 (H·W, C), scatter f64 (H·W, C, C), sample count.
    pub fn state(&self) -> (ArrayView2<'_, f64>, ArrayView3<'_, f64>, usize) {
        (self.mean.view(), self.scatter.view(), self.n)
    }

    /// Rebuilds an accumulator from `state()`; `height·width` must equal the number of positions.
    ///
    /// Values must be finite; each scatter matrix is replaced by its symmetric part (a no-op for
    /// a saved state).
    pub fn from_state(
        mean: Array2<f64>,
        scatter: Array3<f64>,
        n: usize,
        height: usize,
        width: usize,
    ) -> KernelResult<Self> {
        if height == 0 {
            return Err(KernelError::invalid("height", "expected >= 1, got 0"));
        }
        if width == 0 {
            return Err(KernelError::invalid("width", "expected >= 1, got 0"));
        }
        let (hw, c) = mean.dim();
        if c == 0 {
            return Err(KernelError::invalid(
                "mean",
                format!(
                    "expected shape (H*W, C) with C >= 1, got {}",
                    shape_str(mean.shape())
                ),
            ));
        }
        if height.checked_mul(width) != Some(hw) {
            return Err(KernelError::invalid(
                "mean",
                format!(
                    "expected {} rows (height {height} x width {width}), got shape {}",
                    height.saturating_mul(width),
                    shape_str(mean.shape())
                ),
            ));
        }
        if scatter.dim() != (hw, c, c) {
            return Err(KernelError::invalid(
                "scatter",
                format!(
                    "expected shape ({hw}, {c}, {c}) to match mean {}, got {}",
                    shape_str(mean.shape()),
                    shape_str(scatter.shape())
                ),
            ));
        }
        if !mean.iter().all(|v| v.is_finite()) {
            return Err(KernelError::invalid(
                "mean",
                "expected finite values, found NaN or infinity",
            ));
        }
        if !scatter.iter().all(|v| v.is_finite()) {
            return Err(KernelError::invalid(
                "scatter",
                "expected finite values, found NaN or infinity",
            ));
        }
        let mean = if mean.is_standard_layout() {
            mean
        } else {
            mean.as_standard_layout().into_owned()
        };
        let mut scatter = if scatter.is_standard_layout() {
            scatter
        } else {
            scatter.as_standard_layout().into_owned()
        };
        // The kernels read one triangle; keep the state exactly symmetric.
        scatter
            .as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(c * c)
            .for_each(|m| {
                for i in 0..c {
                    for j in i + 1..c {
                        let v = 0.5 * (m[i * c + j] + m[j * c + i]);
                        m[i * c + j] = v;
                        m[j * c + i] = v;
                    }
                }
            });
        Ok(GaussianAccumulator {
            n,
            c,
            h: height,
            w: width,
            mean,
            scatter,
            poisoned: false,
        })
    }
}

/// One-shot fit of a single (B, C, H, W) array (B >= 2, any strides): mean (H·W, C) and inverse
/// covariance (H·W, C, C), bit-identical to `GaussianAccumulator` new + update + finalize.
///
/// Fits and inverts each position in one pass without the f64 H·W·C² state: memory is the f32
/// outputs plus one (≤64 positions, B, C) f32 block and a few C² f64 buffers per busy thread.
/// Non-finite features are an error (reported before any numerical failure); they are found in
/// the gathered blocks rather than in a separate pass over the input.
pub fn gaussian_fit(
    features: ArrayView4<f32>,
    eps: f64,
    intr: &Interrupt,
) -> KernelResult<(Array2<f32>, Array3<f32>)> {
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
    if b_count < 2 {
        return Err(KernelError::invalid(
            "features",
            format!("need at least 2 samples to estimate a covariance, got {b_count}"),
        ));
    }
    check_eps(eps)?;
    let hw = h
        .checked_mul(w)
        .and_then(|hw| hw.checked_mul(c))
        .and_then(|v| v.checked_mul(c));
    let inv_len =
        hw.ok_or_else(|| KernelError::invalid("features", "output size overflows usize"))?;
    intr.check()?;

    let hw = h * w;
    let row_len = b_count * c;
    let ld = gather_stride(row_len);
    let pb = positions_per_block(hw, ld);
    let inv_dof = 1.0 / (b_count as f64 - 1.0);
    let mut mean_out = Array2::from_shape_vec((hw, c), try_zeroed_output(hw * c, "features")?)
        .expect("length matches the shape");
    let mut inv_out = Array3::from_shape_vec((hw, c, c), try_zeroed_output(inv_len, "features")?)
        .expect("length matches the shape");
    let features = &features;
    let non_finite = AtomicBool::new(false);
    let results: Vec<KernelResult<()>> = mean_out
        .as_slice_mut()
        .expect("freshly allocated array is contiguous")
        .par_chunks_mut(pb * c)
        .zip(
            inv_out
                .as_slice_mut()
                .expect("freshly allocated array is contiguous")
                .par_chunks_mut(pb * c * c),
        )
        .enumerate()
        .map_init(
            || {
                (
                    Vec::<f32>::new(),
                    vec![0.0f64; row_len],
                    vec![0.0f64; c],
                    vec![0.0f64; c],
                    vec![0.0f64; c * c],
                    InvScratch::new(c),
                )
            },
            |(buf, x, delta, mu, s, scr), (blk, (mean_blk, inv_blk))| -> KernelResult<()> {
                let p0 = blk * pb;
                let np = mean_blk.len() / c;
                buf.resize(np * ld, 0.0);
                gather_block(features, p0, np, buf);
                // The finiteness check runs on the gathered block, in cache, instead of in a
                // pass of its own over the input (the padding between positions is zeros).
                if !all_finite(buf) {
                    non_finite.store(true, Ordering::Relaxed);
                }
                for (k, ((src, mean_p), inv_p)) in buf
                    .chunks_exact(ld)
                    .zip(mean_blk.chunks_exact_mut(c))
                    .zip(inv_blk.chunks_exact_mut(c * c))
                    .enumerate()
                {
                    if intr.is_set() {
                        return Err(KernelError::Interrupted);
                    }
                    if non_finite.load(Ordering::Relaxed) {
                        return Err(non_finite_error());
                    }
                    // Same operations as an empty accumulator absorbing the whole batch.
                    mu.fill(0.0);
                    s.fill(0.0);
                    absorb_position(&src[..row_len], b_count, 0.0, 1.0, x, delta, mu, s);
                    for (o, &m) in mean_p.iter_mut().zip(mu.iter()) {
                        *o = m as f32;
                    }
                    invert_position(s, inv_dof, eps, scr, inv_p)
                        .map_err(|e| invert_error(e, p0 + k, w))?;
                }
                Ok(())
            },
        )
        .collect();
    intr.check()?;
    // Invalid input is reported before any numerical failure, as when it was checked up front.
    if non_finite.load(Ordering::Relaxed) {
        return Err(non_finite_error());
    }
    first_error(results, intr)?;
    Ok((mean_out, inv_out))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mahalanobis::mahalanobis;
    use ndarray::{s, Array4, Axis};
    use std::sync::atomic::AtomicBool;

    /// Deterministic pseudo-random features with some cross-channel correlation.
    pub(crate) fn features(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Array4<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64) as f32 - 0.5
        };
        let mut x = Array4::<f32>::zeros((b, c, h, w));
        for bi in 0..b {
            for hi in 0..h {
                for wi in 0..w {
                    let shared = next();
                    for ci in 0..c {
                        x[[bi, ci, hi, wi]] =
                            3.0 + ci as f32 * 0.5 + shared * (ci as f32 + 1.0) + next();
                    }
                }
            }
        }
        x
    }

    /// Naive per-position mean (HW, C) and covariance (HW, C, C) with ddof = 1, plus eps·I.
    fn naive_mean_cov(x: &Array4<f32>, eps: f64) -> (Array2<f64>, Array3<f64>) {
        let (b, c, h, w) = x.dim();
        let mut mean = Array2::<f64>::zeros((h * w, c));
        let mut cov = Array3::<f64>::zeros((h * w, c, c));
        for hi in 0..h {
            for wi in 0..w {
                let p = hi * w + wi;
                for ci in 0..c {
                    let mut sum = 0.0;
                    for bi in 0..b {
                        sum += x[[bi, ci, hi, wi]] as f64;
                    }
                    mean[[p, ci]] = sum / b as f64;
                }
                for i in 0..c {
                    for j in 0..c {
                        let mut sum = 0.0;
                        for bi in 0..b {
                            sum += (x[[bi, i, hi, wi]] as f64 - mean[[p, i]])
                                * (x[[bi, j, hi, wi]] as f64 - mean[[p, j]]);
                        }
                        cov[[p, i, j]] = sum / (b as f64 - 1.0) + if i == j { eps } else { 0.0 };
                    }
                }
            }
        }
        (mean, cov)
    }

    /// Gauss–Jordan inverse with partial pivoting.
    fn gauss_jordan(a: ArrayView2<f64>) -> Array2<f64> {
        let n = a.nrows();
        let mut m = a.to_owned();
        let mut inv = Array2::<f64>::eye(n);
        for col in 0..n {
            let piv = (col..n)
                .max_by(|&i, &j| m[[i, col]].abs().partial_cmp(&m[[j, col]].abs()).unwrap())
                .unwrap();
            for k in 0..n {
                m.swap([col, k], [piv, k]);
                inv.swap([col, k], [piv, k]);
            }
            let d = m[[col, col]];
            for k in 0..n {
                m[[col, k]] /= d;
                inv[[col, k]] /= d;
            }
            for r in 0..n {
                if r != col {
                    let f = m[[r, col]];
                    for k in 0..n {
                        m[[r, k]] -= f * m[[col, k]];
                        inv[[r, k]] -= f * inv[[col, k]];
                    }
                }
            }
        }
        inv
    }

    fn naive_inv_cov(cov: &Array3<f64>) -> Array3<f64> {
        let mut out = cov.clone();
        for p in 0..cov.shape()[0] {
            out.index_axis_mut(Axis(0), p)
                .assign(&gauss_jordan(cov.index_axis(Axis(0), p)));
        }
        out
    }

    pub(crate) fn naive_mahalanobis(
        x: &Array4<f32>,
        mean: &Array2<f32>,
        inv: &Array3<f32>,
    ) -> Array3<f64> {
        let (b, c, h, w) = x.dim();
        let mut out = Array3::<f64>::zeros((b, h, w));
        for bi in 0..b {
            for hi in 0..h {
                for wi in 0..w {
                    let p = hi * w + wi;
                    let d: Vec<f64> = (0..c)
                        .map(|ci| x[[bi, ci, hi, wi]] as f64 - mean[[p, ci]] as f64)
                        .collect();
                    let mut q = 0.0;
                    for i in 0..c {
                        for j in 0..c {
                            q += d[i] * inv[[p, i, j]] as f64 * d[j];
                        }
                    }
                    out[[bi, hi, wi]] = q.max(0.0).sqrt();
                }
            }
        }
        out
    }

    pub(crate) fn max_rel_err<D: ndarray::Dimension>(
        got: &ndarray::Array<f64, D>,
        want: &ndarray::Array<f64, D>,
    ) -> f64 {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        got.iter()
            .zip(want.iter())
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    pub(crate) fn never() -> Interrupt<'static> {
        Interrupt::never()
    }

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn fit_matches_naive_mean_and_inverse_covariance() {
        let x = features(23, 5, 3, 4, 1);
        let eps = 0.01;
        let (mean, inv) = gaussian_fit(x.view(), eps, &never()).unwrap();
        let (ref_mean, ref_cov) = naive_mean_cov(&x, eps);
        let ref_inv = naive_inv_cov(&ref_cov);
        assert_eq!(mean.dim(), (12, 5));
        assert_eq!(inv.dim(), (12, 5, 5));
        assert!(max_rel_err(&mean.mapv(f64::from), &ref_mean) < 1e-6);
        assert!(max_rel_err(&inv.mapv(f64::from), &ref_inv) < 1e-5);
        // Exactly symmetric output.
        for p in 0..12 {
            let m = inv.index_axis(Axis(0), p);
            assert_eq!(m, m.t());
        }
    }

    #[test]
    fn gaussian_fit_is_bit_identical_to_the_accumulator() {
        // One-position blocks, then 12×9 positions in blocks of 2.
        for (b, c, h, w) in [(13, 5, 3, 4), (9, 3, 12, 9)] {
            let x = features(b, c, h, w, 21);
            let mut acc = GaussianAccumulator::new(c, h, w).unwrap();
            acc.update(x.view(), &never()).unwrap();
            let (m1, i1) = acc.finalize(0.05, &never()).unwrap();
            let (m2, i2) = gaussian_fit(x.view(), 0.05, &never()).unwrap();
            assert_eq!(m1, m2);
            assert_eq!(i1, i2);
        }
    }

    #[test]
    fn accumulator_state_matches_naive_mean_and_scatter() {
        let x = features(9, 4, 2, 3, 2);
        let mut acc = GaussianAccumulator::new(4, 2, 3).unwrap();
        acc.update(x.slice(s![..4, .., .., ..]), &never()).unwrap();
        acc.update(x.slice(s![4.., .., .., ..]), &never()).unwrap();
        assert_eq!(acc.n_samples(), 9);
        let (ref_mean, ref_cov) = naive_mean_cov(&x, 0.0);
        let (mean, scatter, n) = acc.state();
        assert_eq!(n, 9);
        assert!(max_rel_err(&mean.to_owned(), &ref_mean) < 1e-12);
        assert!(max_rel_err(&(scatter.to_owned() / 8.0), &ref_cov) < 1e-12);
    }

    #[test]
    fn streaming_uneven_batches_equals_one_shot() {
        let x = features(23, 6, 4, 5, 3);
        let eps = 1e-3;
        let (m1, i1) = gaussian_fit(x.view(), eps, &never()).unwrap();
        let mut acc = GaussianAccumulator::new(6, 4, 5).unwrap();
        let mut start = 0;
        for size in [1, 7, 2, 13] {
            acc.update(x.slice(s![start..start + size, .., .., ..]), &never())
                .unwrap();
            start += size;
        }
        assert_eq!(acc.n_samples(), 23);
        let (m2, i2) = acc.finalize(eps, &never()).unwrap();
        let d_mean = max_rel_err(&m2.mapv(f64::from), &m1.mapv(f64::from));
        let d_inv = max_rel_err(&i2.mapv(f64::from), &i1.mapv(f64::from));
        assert!(d_mean < 1e-6, "mean differs by {d_mean}");
        assert!(d_inv < 1e-5, "inverse differs by {d_inv}");
    }

    #[test]
    fn strided_and_permuted_input_gives_identical_results() {
        let x = features(11, 3, 4, 5, 4);
        // Same logical (B,C,H,W) array stored as (H, B, W, C), then viewed through permuted axes.
        let stored = x
            .view()
            .permuted_axes([2, 0, 3, 1])
            .as_standard_layout()
            .into_owned();
        let permuted = stored.view().permuted_axes([1, 3, 0, 2]);
        assert_eq!(permuted, x.view());
        assert!(!permuted.is_standard_layout());
        // And a step-2 slice of a bigger array.
        let mut big = Array4::<f32>::zeros((22, 3, 8, 5));
        big.slice_mut(s![..;2, .., ..;2, ..]).assign(&x);
        let stepped = big.slice(s![..;2, .., ..;2, ..]);

        let (m, i) = gaussian_fit(x.view(), 0.0, &never()).unwrap();
        for v in [permuted, stepped] {
            let (mv, iv) = gaussian_fit(v, 0.0, &never()).unwrap();
            assert_eq!(mv, m);
            assert_eq!(iv, i);
            let d_ref = mahalanobis(x.view(), m.view(), i.view(), &never()).unwrap();
            let d = mahalanobis(v, m.view(), i.view(), &never()).unwrap();
            assert_eq!(d, d_ref);
        }
        // Negative strides (flipped batch and width axes).
        let flipped = x.slice(s![..;-1, .., .., ..;-1]);
        let flipped_copy = flipped.as_standard_layout().into_owned();
        let (mf, i_f) = gaussian_fit(flipped, 0.0, &never()).unwrap();
        let (mc, ic) = gaussian_fit(flipped_copy.view(), 0.0, &never()).unwrap();
        assert_eq!(mf, mc);
        assert_eq!(i_f, ic);
        assert_eq!(
            mahalanobis(flipped, mf.view(), i_f.view(), &never()).unwrap(),
            mahalanobis(flipped_copy.view(), mf.view(), i_f.view(), &never()).unwrap()
        );
        // Strided mean and inverse covariance too.
        let m_t = m.t().as_standard_layout().into_owned();
        let i_perm = i
            .view()
            .permuted_axes([1, 2, 0])
            .as_standard_layout()
            .into_owned();
        let d_ref = mahalanobis(x.view(), m.view(), i.view(), &never()).unwrap();
        let d = mahalanobis(
            x.view(),
            m_t.t(),
            i_perm.view().permuted_axes([2, 0, 1]),
            &never(),
        )
        .unwrap();
        assert_eq!(d, d_ref);
    }

    #[test]
    fn large_position_blocks_spanning_rows_match_naive() {
        // 50×63 positions with few channels: blocks of 64 positions, straddling rows, last partial.
        let (h, w) = (50, 63);
        let x = features(7, 3, h, w, 12);
        assert_eq!(positions_per_block(h * w, gather_stride(7 * 3)), 64);
        let mut acc = GaussianAccumulator::new(3, h, w).unwrap();
        acc.update(x.slice(s![..3, .., .., ..]), &never()).unwrap();
        acc.update(x.slice(s![3.., .., .., ..]), &never()).unwrap();
        let (mean, inv) = acc.finalize(0.01, &never()).unwrap();
        let (ref_mean, ref_cov) = naive_mean_cov(&x, 0.01);
        assert!(max_rel_err(&mean.mapv(f64::from), &ref_mean) < 1e-6);
        assert!(max_rel_err(&inv.mapv(f64::from), &naive_inv_cov(&ref_cov)) < 1e-5);
        let test = features(2, 3, h, w, 13);
        let d = mahalanobis(test.view(), mean.view(), inv.view(), &never()).unwrap();
        let err = max_rel_err(&d.mapv(f64::from), &naive_mahalanobis(&test, &mean, &inv));
        assert!(err < 1e-6, "relative error {err}");
    }

    #[test]
    fn single_channel_is_scaled_distance() {
        let x = features(10, 1, 2, 2, 8);
        let (mean, inv) = gaussian_fit(x.view(), 0.0, &never()).unwrap();
        let (ref_mean, ref_cov) = naive_mean_cov(&x, 0.0);
        for p in 0..4 {
            let want = 1.0 / ref_cov[[p, 0, 0]];
            assert!((inv[[p, 0, 0]] as f64 - want).abs() < 1e-5 * want);
            assert!((mean[[p, 0]] as f64 - ref_mean[[p, 0]]).abs() < 1e-5);
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        // 10×13 positions: blocks of 2 positions that straddle rows.
        let x = features(40, 9, 10, 13, 9);
        let run = |threads: usize| {
            pool(threads).install(|| {
                let mut acc = GaussianAccumulator::new(9, 10, 13).unwrap();
                acc.update(x.slice(s![..17, .., .., ..]), &never()).unwrap();
                acc.update(x.slice(s![17.., .., .., ..]), &never()).unwrap();
                let (m, i) = acc.finalize(0.01, &never()).unwrap();
                let d = mahalanobis(x.view(), m.view(), i.view(), &never()).unwrap();
                let (sm, ss, _) = acc.state();
                (sm.to_owned(), ss.to_owned(), m, i, d)
            })
        };
        let a = run(1);
        let b = run(3);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
        assert_eq!(a.3, b.3);
        assert_eq!(a.4, b.4);
    }

    #[test]
    fn merged_partial_states_equal_the_statistics_of_all_samples() {
        // Three shards of uneven size, merged as ((a + b) + c) and as (a + (b + c)): both equal
        // the naive mean and scatter of all 17 samples (the reference: two-pass sums in f64).
        let x = features(17, 5, 2, 3, 11);
        let shard = |lo: usize, hi: usize| {
            let mut acc = GaussianAccumulator::new(5, 2, 3).unwrap();
            acc.update(x.slice(s![lo..hi, .., .., ..]), &never())
                .unwrap();
            acc
        };
        let (ref_mean, ref_cov) = naive_mean_cov(&x, 0.0);
        let mut left = shard(0, 3);
        left.merge(&shard(3, 12), &never()).unwrap();
        left.merge(&shard(12, 17), &never()).unwrap();
        let mut right = shard(3, 12);
        right.merge(&shard(12, 17), &never()).unwrap();
        let mut tree = shard(0, 3);
        tree.merge(&right, &never()).unwrap();
        for acc in [&left, &tree] {
            let (mean, scatter, n) = acc.state();
            assert_eq!(n, 17);
            assert!(max_rel_err(&mean.to_owned(), &ref_mean) < 1e-12);
            assert!(max_rel_err(&(scatter.to_owned() / 16.0), &ref_cov) < 1e-12);
        }
        // Into an empty accumulator, and an empty one merged in: a copy, and a no-op.
        let mut empty = GaussianAccumulator::new(5, 2, 3).unwrap();
        empty.merge(&left, &never()).unwrap();
        assert_eq!(empty.state().0, left.state().0);
        assert_eq!(empty.state().1, left.state().1);
        let before = left.state().1.to_owned();
        left.merge(&GaussianAccumulator::new(5, 2, 3).unwrap(), &never())
            .unwrap();
        assert_eq!(left.state().1, before);
        assert_eq!(left.n_samples(), 17);
        let err = left
            .merge(&GaussianAccumulator::new(4, 2, 3).unwrap(), &never())
            .unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
    }

    #[test]
    fn from_state_round_trip_continues_identically() {
        let x = features(20, 4, 3, 2, 10);
        let mut acc = GaussianAccumulator::new(4, 3, 2).unwrap();
        acc.update(x.slice(s![..8, .., .., ..]), &never()).unwrap();
        let (m, s, n) = acc.state();
        let mut restored =
            GaussianAccumulator::from_state(m.to_owned(), s.to_owned(), n, 3, 2).unwrap();
        assert_eq!(
            (restored.channels(), restored.height(), restored.width()),
            (4, 3, 2)
        );
        assert_eq!(restored.n_samples(), 8);
        acc.update(x.slice(s![8.., .., .., ..]), &never()).unwrap();
        restored
            .update(x.slice(s![8.., .., .., ..]), &never())
            .unwrap();
        assert_eq!(acc.state().0, restored.state().0);
        assert_eq!(acc.state().1, restored.state().1);
        assert_eq!(
            acc.finalize(0.1, &never()).unwrap(),
            restored.finalize(0.1, &never()).unwrap()
        );
        // Non-standard-layout state is accepted too.
        let (m, s, n) = acc.state();
        let m_f = m.t().as_standard_layout().into_owned().reversed_axes();
        let r2 = GaussianAccumulator::from_state(m_f, s.to_owned(), n, 3, 2).unwrap();
        assert_eq!(
            r2.finalize(0.1, &never()).unwrap(),
            acc.finalize(0.1, &never()).unwrap()
        );
    }

    #[test]
    fn eps_regularises_a_singular_covariance() {
        // Constant features: zero covariance, singular without eps.
        let x = Array4::<f32>::from_elem((5, 3, 2, 2), 1.5);
        let err = gaussian_fit(x.view(), 0.0, &never()).unwrap_err();
        match err {
            KernelError::Numerical(msg) => {
                assert!(msg.contains("position 0"), "{msg}");
                assert!(msg.contains("not positive definite"), "{msg}");
            }
            e => panic!("expected Numerical, got {e:?}"),
        }
        let (mean, inv) = gaussian_fit(x.view(), 0.5, &never()).unwrap();
        assert!(mean.iter().all(|&v| v == 1.5));
        for p in 0..4 {
            for i in 0..3 {
                for j in 0..3 {
                    assert_eq!(inv[[p, i, j]], if i == j { 2.0 } else { 0.0 });
                }
            }
        }
    }

    #[test]
    fn all_finite_finds_every_kind_of_non_finite_value_anywhere() {
        let mut v: Vec<f32> = (0..3000).map(|i| i as f32 - 1500.0).collect();
        v.extend([f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0]);
        assert!(all_finite(&v));
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1023, 1024, 2999, v.len() - 1] {
                let mut w = v.clone();
                w[at] = bad;
                assert!(!all_finite(&w), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn gaussian_fit_reports_non_finite_features_before_a_numerical_failure() {
        // Position 0 is constant (not positive definite with eps 0); one value at the last
        // position, in the last block, is not finite.
        let mut x = features(6, 3, 8, 8, 12);
        for b in 0..6 {
            for c in 0..3 {
                x[[b, c, 0, 0]] = 0.25;
            }
        }
        assert!(matches!(
            gaussian_fit(x.view(), 0.0, &never()).unwrap_err(),
            KernelError::Numerical(_)
        ));
        for bad in [f32::NAN, f32::INFINITY] {
            let mut y = x.clone();
            y[[5, 2, 7, 7]] = bad;
            for threads in [1, 3] {
                let err =
                    pool(threads).install(|| gaussian_fit(y.view(), 0.0, &never()).unwrap_err());
                assert_eq!(arg_of(err), "features");
                // Strided (channels-last) input goes through the same check.
                let mut cl = Array4::<f32>::zeros((6, 8, 8, 3));
                cl.assign(&y.view().permuted_axes([0, 2, 3, 1]));
                let view = cl.view().permuted_axes([0, 3, 1, 2]);
                let err = pool(threads).install(|| gaussian_fit(view, 0.0, &never()).unwrap_err());
                assert_eq!(arg_of(err), "features");
            }
        }
    }

    #[test]
    fn non_pd_error_names_first_failing_position() {
        let mut x = features(6, 3, 2, 3, 11);
        // Make positions 2 and 4 constant across samples.
        for b in 0..6 {
            for c in 0..3 {
                x[[b, c, 0, 2]] = 0.25;
                x[[b, c, 1, 1]] = 0.25;
            }
        }
        for threads in [1, 3] {
            let err = pool(threads).install(|| gaussian_fit(x.view(), 0.0, &never()).unwrap_err());
            match err {
                KernelError::Numerical(msg) => {
                    assert!(msg.contains("position 2 (h=0, w=2)"), "{msg}")
                }
                e => panic!("expected Numerical, got {e:?}"),
            }
        }
    }

    #[test]
    fn inverse_beyond_f32_range_is_a_numerical_error() {
        // Variances around 1e-60: positive definite in f64, inverse ~1e60 overflows f32.
        let x = features(10, 2, 2, 2, 14).mapv(|v| (v - 3.0) * 1e-30);
        match gaussian_fit(x.view(), 0.0, &never()) {
            Err(KernelError::Numerical(msg)) => {
                assert!(
                    msg.contains("position 0") && msg.contains("overflows float32"),
                    "{msg}"
                )
            }
            r => panic!("expected Numerical, got {r:?}"),
        }
        // Enough eps makes it representable.
        let (_, inv) = gaussian_fit(x.view(), 1e-3, &never()).unwrap();
        assert!(inv.iter().all(|v| v.is_finite()));
    }

    fn arg_of(e: KernelError) -> &'static str {
        match e {
            KernelError::InvalidArgument { arg, .. } => arg,
            e => panic!("expected InvalidArgument, got {e:?}"),
        }
    }

    #[test]
    fn invalid_arguments_are_rejected() {
        let i = never();
        assert_eq!(
            arg_of(GaussianAccumulator::new(0, 2, 2).unwrap_err()),
            "channels"
        );
        assert_eq!(
            arg_of(GaussianAccumulator::new(2, 0, 2).unwrap_err()),
            "height"
        );
        assert_eq!(
            arg_of(GaussianAccumulator::new(2, 2, 0).unwrap_err()),
            "width"
        );
        assert_eq!(
            arg_of(GaussianAccumulator::new(usize::MAX, 2, 2).unwrap_err()),
            "channels"
        );

        let mut acc = GaussianAccumulator::new(3, 2, 2).unwrap();
        // n < 2
        let e = acc.finalize(0.0, &i).unwrap_err();
        assert_eq!(arg_of(e.clone()), "features");
        assert!(e.to_string().contains("at least 2 samples"), "{e}");
        acc.update(features(1, 3, 2, 2, 1).view(), &i).unwrap();
        assert_eq!(arg_of(acc.finalize(0.0, &i).unwrap_err()), "features");
        // Wrong shapes and empty batch; the state stays usable.
        let e = acc.update(features(2, 4, 2, 2, 1).view(), &i).unwrap_err();
        assert!(
            e.to_string().contains("(B, 3, 2, 2)") && e.to_string().contains("(2, 4, 2, 2)"),
            "{e}"
        );
        assert_eq!(
            arg_of(acc.update(features(2, 3, 2, 3, 1).view(), &i).unwrap_err()),
            "features"
        );
        assert_eq!(
            arg_of(
                acc.update(Array4::<f32>::zeros((0, 3, 2, 2)).view(), &i)
                    .unwrap_err()
            ),
            "features"
        );
        let mut bad = features(2, 3, 2, 2, 1);
        bad[[1, 2, 1, 0]] = f32::NAN;
        assert_eq!(arg_of(acc.update(bad.view(), &i).unwrap_err()), "features");
        assert_eq!(acc.n_samples(), 1);
        acc.update(features(3, 3, 2, 2, 2).view(), &i).unwrap();
        assert_eq!(arg_of(acc.finalize(-1.0, &i).unwrap_err()), "eps");
        assert_eq!(arg_of(acc.finalize(f64::NAN, &i).unwrap_err()), "eps");
        assert!(acc.finalize(0.0, &i).is_ok());

        // gaussian_fit
        assert_eq!(
            arg_of(gaussian_fit(features(1, 3, 2, 2, 1).view(), 0.0, &i).unwrap_err()),
            "features"
        );
        assert_eq!(
            arg_of(gaussian_fit(Array4::<f32>::zeros((4, 0, 2, 2)).view(), 0.0, &i).unwrap_err()),
            "features"
        );
        assert_eq!(
            arg_of(gaussian_fit(features(4, 3, 2, 2, 1).view(), -0.1, &i).unwrap_err()),
            "eps"
        );

        // mahalanobis shapes
        let x = features(2, 3, 2, 2, 1);
        let mean = Array2::<f32>::zeros((4, 3));
        let inv = Array3::<f32>::zeros((4, 3, 3));
        assert!(mahalanobis(x.view(), mean.view(), inv.view(), &i).is_ok());
        let e = mahalanobis(
            x.view(),
            Array2::<f32>::zeros((4, 2)).view(),
            inv.view(),
            &i,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("mean:")
                && e.to_string().contains("(4, 3)")
                && e.to_string().contains("(4, 2)"),
            "{e}"
        );
        let e = mahalanobis(
            x.view(),
            mean.view(),
            Array3::<f32>::zeros((5, 3, 3)).view(),
            &i,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("inv_cov:")
                && e.to_string().contains("(4, 3, 3)")
                && e.to_string().contains("(5, 3, 3)"),
            "{e}"
        );
        assert_eq!(
            arg_of(
                mahalanobis(features(2, 3, 3, 1, 1).view(), mean.view(), inv.view(), &i)
                    .unwrap_err()
            ),
            "mean"
        );
        assert_eq!(
            arg_of(
                mahalanobis(
                    Array4::<f32>::zeros((0, 3, 2, 2)).view(),
                    mean.view(),
                    inv.view(),
                    &i
                )
                .unwrap_err()
            ),
            "features"
        );

        // from_state
        let m = Array2::<f64>::zeros((4, 3));
        let sc = Array3::<f64>::zeros((4, 3, 3));
        assert!(GaussianAccumulator::from_state(m.clone(), sc.clone(), 0, 2, 2).is_ok());
        assert_eq!(
            arg_of(GaussianAccumulator::from_state(m.clone(), sc.clone(), 0, 3, 2).unwrap_err()),
            "mean"
        );
        assert_eq!(
            arg_of(GaussianAccumulator::from_state(m.clone(), sc.clone(), 0, 0, 2).unwrap_err()),
            "height"
        );
        assert_eq!(
            arg_of(
                GaussianAccumulator::from_state(m.clone(), Array3::zeros((4, 3, 2)), 0, 2, 2)
                    .unwrap_err()
            ),
            "scatter"
        );
        assert_eq!(
            arg_of(
                GaussianAccumulator::from_state(
                    Array2::zeros((4, 0)),
                    Array3::zeros((4, 0, 0)),
                    0,
                    2,
                    2
                )
                .unwrap_err()
            ),
            "mean"
        );
        let mut sc_nan = sc.clone();
        sc_nan[[1, 1, 1]] = f64::INFINITY;
        assert_eq!(
            arg_of(GaussianAccumulator::from_state(m, sc_nan, 0, 2, 2).unwrap_err()),
            "scatter"
        );
    }

    #[test]
    fn interrupt_stops_every_kernel_and_poisons_an_interrupted_update() {
        let flag = AtomicBool::new(true);
        let intr = Interrupt::new(&flag);
        let x = features(4, 3, 2, 2, 1);
        let mut acc = GaussianAccumulator::new(3, 2, 2).unwrap();
        acc.update(x.view(), &never()).unwrap();
        assert_eq!(
            acc.finalize(0.0, &intr).unwrap_err(),
            KernelError::Interrupted
        );
        let (mean, inv) = acc.finalize(0.0, &never()).unwrap();
        assert_eq!(
            mahalanobis(x.view(), mean.view(), inv.view(), &intr).unwrap_err(),
            KernelError::Interrupted
        );
        assert_eq!(
            gaussian_fit(x.view(), 0.0, &intr).unwrap_err(),
            KernelError::Interrupted
        );
        // An update that is interrupted before any work leaves the state intact.
        assert_eq!(
            acc.update(x.view(), &intr).unwrap_err(),
            KernelError::Interrupted
        );
        assert_eq!(acc.n_samples(), 4);
        assert!(acc.finalize(0.0, &never()).is_ok());
        // One interrupted mid-way poisons the accumulator.
        acc.poisoned = true;
        assert_eq!(
            arg_of(acc.update(x.view(), &never()).unwrap_err()),
            "accumulator"
        );
        assert_eq!(
            arg_of(acc.finalize(0.0, &never()).unwrap_err()),
            "accumulator"
        );
    }

    /// PaDiM-sized fit: 200 images × 100 channels × 56 × 56, batches of 32, on 2 threads.
    /// Run with `cargo test --release -- --ignored --nocapture padim_sized_fit_timing`.
    #[test]
    #[ignore]
    fn padim_sized_fit_timing() {
        use std::time::Instant;
        // On-CPU seconds of all threads of this process (the wall clock is unreliable on a
        // shared machine).
        fn cpu_secs() -> f64 {
            let mut ns = 0u64;
            for e in std::fs::read_dir("/proc/self/task")
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                    ns += s
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                }
            }
            ns as f64 * 1e-9
        }
        let (c, h, w) = (100, 56, 56);
        let batches: Vec<Array4<f32>> = (0..7)
            .map(|k| features(if k < 6 { 32 } else { 8 }, c, h, w, 100 + k as u64))
            .collect();
        let views: Vec<_> = batches.iter().map(|b| b.view()).collect();
        let all = ndarray::concatenate(Axis(0), &views).unwrap();
        pool(2).install(|| {
            let (t0, c0) = (Instant::now(), cpu_secs());
            let mut acc = GaussianAccumulator::new(c, h, w).unwrap();
            for b in &batches {
                acc.update(b.view(), &never()).unwrap();
            }
            let (t1, c1) = (Instant::now(), cpu_secs());
            let (mean, inv) = acc.finalize(0.01, &never()).unwrap();
            let (t2, c2) = (Instant::now(), cpu_secs());
            let (mean1, inv1) = gaussian_fit(all.view(), 0.01, &never()).unwrap();
            let (t3, c3) = (Instant::now(), cpu_secs());
            let d = mahalanobis(batches[0].view(), mean.view(), inv.view(), &never()).unwrap();
            let (t4, c4) = (Instant::now(), cpu_secs());
            assert_eq!(acc.n_samples(), 200);
            assert!(d.iter().all(|v| v.is_finite()));
            let rel = |a: &Array3<f32>, b: &Array3<f32>| {
                let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
            };
            assert!(rel(&inv, &inv1) < 1e-4);
            assert!(mean.iter().zip(&mean1).all(|(a, b)| (a - b).abs() < 1e-4));
            eprintln!(
                "200 x 100 x 56 x 56 on a 2-thread pool (wall s / on-CPU s of both threads):"
            );
            eprintln!(
                "  accumulator update, 7 batches (6x32 + 8): {:.3} / {:.3}",
                (t1 - t0).as_secs_f64(),
                c1 - c0
            );
            eprintln!(
                "  finalize:                                  {:.3} / {:.3}",
                (t2 - t1).as_secs_f64(),
                c2 - c1
            );
            eprintln!(
                "  streamed fit total:                        {:.3} / {:.3}",
                (t2 - t0).as_secs_f64(),
                c2 - c0
            );
            eprintln!(
                "  gaussian_fit one-shot (200 at once):       {:.3} / {:.3}",
                (t3 - t2).as_secs_f64(),
                c3 - c2
            );
            eprintln!(
                "  mahalanobis, 32 images:                    {:.3} / {:.3}",
                (t4 - t3).as_secs_f64(),
                c4 - c3
            );
        });
    }
}
