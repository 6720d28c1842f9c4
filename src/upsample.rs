//! Resizing of anomaly maps, matching torch's `F.interpolate` on CPU.
//!
//! Bilinear follows `mode="bilinear", align_corners=False`; nearest follows torch's legacy
//! `mode="nearest"`. Index and weight tables are computed in f32 exactly as torch computes them,
//! and bilinear interpolates along the width first and then along the height, which is the order
//! torch's generic CPU kernel evaluates `(a*wx0 + b*wx1)*wy0 + (c*wx0 + d*wx1)*wy1`.

use ndarray::{Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

/// How `upsample` computes an output pixel from the input map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    Bilinear,
    Nearest,
}

impl Interpolation {
    /// `"bilinear"` or `"nearest"` (exact, lower case); `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bilinear" => Some(Interpolation::Bilinear),
            "nearest" => Some(Interpolation::Nearest),
            _ => None,
        }
    }
}

/// Output pixels per parallel task; a 224×224 map is one task, a huge map is split by rows.
const PIXELS_PER_TASK: usize = 1 << 16;

/// Resize maps (B,h,w) to (B, out_h, out_w).
///
/// Parallel over maps, and over blocks of output rows when a map is large. Memory: the output
/// plus, per task, the width-interpolated input rows that the task's output rows use.
/// Cost: O(B·out_h·out_w) plus O(B·h·out_w) for the bilinear width pass.
pub fn upsample(
    maps: ArrayView3<f32>,
    out_h: usize,
    out_w: usize,
    mode: Interpolation,
    intr: &Interrupt,
) -> KernelResult<Array3<f32>> {
    let (b, in_h, in_w) = maps.dim();
    if b == 0 || in_h == 0 || in_w == 0 {
        return Err(KernelError::invalid(
            "maps",
            format!("expected a non-empty (B, h, w) array, got shape ({b}, {in_h}, {in_w})"),
        ));
    }
    if out_h == 0 || out_w == 0 {
        return Err(KernelError::invalid(
            "size",
            format!("expected a positive output height and width, got ({out_h}, {out_w})"),
        ));
    }
    let map_len = out_h
        .checked_mul(out_w)
        .filter(|&n| {
            n.checked_mul(b)
                .is_some_and(|t| t <= isize::MAX as usize / 4)
        })
        .ok_or_else(|| {
            KernelError::invalid(
                "size",
                format!("expected an output that fits in memory, got ({b}, {out_h}, {out_w})"),
            )
        })?;
    intr.check()?;

    let rows_per_task = (PIXELS_PER_TASK / out_w).clamp(1, out_h);
    let mut out = vec![0f32; b * map_len];
    match mode {
        Interpolation::Bilinear => {
            let ty = LinearTable::new(in_h, out_h);
            let tx = LinearTable::new(in_w, out_w);
            out.par_chunks_mut(map_len)
                .zip(maps.axis_iter(Axis(0)).into_par_iter())
                .try_for_each(|(dst, src)| {
                    dst.par_chunks_mut(rows_per_task * out_w)
                        .enumerate()
                        .try_for_each(|(c, block)| {
                            intr.check()?;
                            bilinear_rows(src, &ty, &tx, c * rows_per_task, block);
                            Ok(())
                        })
                })?;
        }
        Interpolation::Nearest => {
            let iy = nearest_table(in_h, out_h);
            let ix = nearest_table(in_w, out_w);
            out.par_chunks_mut(map_len)
                .zip(maps.axis_iter(Axis(0)).into_par_iter())
                .try_for_each(|(dst, src)| {
                    dst.par_chunks_mut(rows_per_task * out_w)
                        .enumerate()
                        .try_for_each(|(c, block)| {
                            intr.check()?;
                            nearest_rows(src, &iy, &ix, c * rows_per_task, block);
                            Ok(())
                        })
                })?;
        }
    }
    Array3::from_shape_vec((b, out_h, out_w), out)
        .map_err(|e| KernelError::Numerical(format!("upsample: output shape error: {e}")))
}

/// Source indices and weights along one axis: out[d] = in[i0[d]]·w0[d] + in[i1[d]]·w1[d].
struct LinearTable {
    i0: Vec<usize>,
    i1: Vec<usize>,
    w0: Vec<f32>,
    w1: Vec<f32>,
    /// Same size in and out: torch's weights are (1, 0) on one pixel, a copy; we copy directly.
    identity: bool,
}

impl LinearTable {
    /// torch's `compute_source_index_and_lambda` for align_corners=False, in f32 like torch.
    ///
    /// torch's CPU kernels are compiled with floating-point contraction, so its source index
    /// `scale * (d + 0.5) - 0.5` is one fused multiply-add. Rounding twice instead moves a weight
    /// by up to an ulp of the source index (~1e-6 for indices in the tens), which showed as
    /// differences from torch of up to 7e-5 on maps with values of spread 3; hence `mul_add`.
    fn new(n_in: usize, n_out: usize) -> Self {
        let identity = n_in == n_out;
        let scale = n_in as f32 / n_out as f32;
        let mut t = LinearTable {
            i0: Vec::with_capacity(n_out),
            i1: Vec::with_capacity(n_out),
            w0: Vec::with_capacity(n_out),
            w1: Vec::with_capacity(n_out),
            identity,
        };
        for d in 0..n_out {
            let (i0, i1, l0, l1) = if identity {
                (d, d, 1.0, 0.0)
            } else {
                let src = scale.mul_add(d as f32 + 0.5, -0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let l1 = (src - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
                (i0, i1, 1.0 - l1, l1)
            };
            t.i0.push(i0);
            t.i1.push(i1);
            t.w0.push(l0);
            t.w1.push(l1);
        }
        t
    }
}

/// torch's legacy nearest source index: min(floor(d · (in/out)), in−1), all in f32.
fn nearest_table(n_in: usize, n_out: usize) -> Vec<usize> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|d| ((d as f32 * scale).floor() as usize).min(n_in - 1))
        .collect()
}

/// Copy input row `r` of `src` into `buf` unless it is already contiguous.
fn input_row<'a>(src: &'a ArrayView2<f32>, r: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let row = src.index_axis(Axis(0), r);
    match row.to_slice() {
        Some(s) => s,
        None => {
            buf.clear();
            buf.extend(row.iter().copied());
            buf
        }
    }
}

/// Bilinear output rows `y0..y0 + block.len()/out_w` of one map.
fn bilinear_rows(
    src: ArrayView2<f32>,
    ty: &LinearTable,
    tx: &LinearTable,
    y0: usize,
    block: &mut [f32],
) {
    let out_w = tx.i0.len();
    let rows = block.len() / out_w;
    let y1 = y0 + rows;
    // The input rows this block reads form a small sorted range; width-interpolate each once.
    let lo = ty.i0[y0..y1].iter().copied().min().unwrap_or(0);
    let hi = ty.i1[y0..y1].iter().copied().max().unwrap_or(lo).max(lo);
    let mut slot = vec![usize::MAX; hi - lo + 1];
    for y in y0..y1 {
        slot[ty.i0[y] - lo] = 0;
        slot[ty.i1[y] - lo] = 0;
    }
    let mut n_used = 0;
    for s in slot.iter_mut().filter(|s| **s == 0) {
        *s = n_used;
        n_used += 1;
    }
    let mut tmp = vec![0f32; n_used * out_w];
    let mut buf = Vec::new();
    for (k, &s) in slot.iter().enumerate() {
        if s == usize::MAX {
            continue;
        }
        let row = input_row(&src, lo + k, &mut buf);
        let t = &mut tmp[s * out_w..(s + 1) * out_w];
        if tx.identity {
            t.copy_from_slice(row);
        } else {
            for ((((o, &j0), &j1), &u0), &u1) in
                t.iter_mut().zip(&tx.i0).zip(&tx.i1).zip(&tx.w0).zip(&tx.w1)
            {
                *o = row[j0] * u0 + row[j1] * u1;
            }
        }
    }
    for (dy, out_row) in block.chunks_exact_mut(out_w).enumerate() {
        let y = y0 + dy;
        let s0 = slot[ty.i0[y] - lo];
        let t0 = &tmp[s0 * out_w..(s0 + 1) * out_w];
        if ty.identity {
            out_row.copy_from_slice(t0);
            continue;
        }
        let s1 = slot[ty.i1[y] - lo];
        let t1 = &tmp[s1 * out_w..(s1 + 1) * out_w];
        let (v0, v1) = (ty.w0[y], ty.w1[y]);
        for ((o, &a), &c) in out_row.iter_mut().zip(t0).zip(t1) {
            *o = a * v0 + c * v1;
        }
    }
}

/// Nearest output rows `y0..` of one map; repeated source rows are copied from the row above.
fn nearest_rows(src: ArrayView2<f32>, iy: &[usize], ix: &[usize], y0: usize, block: &mut [f32]) {
    let out_w = ix.len();
    let mut buf = Vec::new();
    let mut prev: Option<usize> = None;
    for dy in 0..block.len() / out_w {
        let r = iy[y0 + dy];
        if prev == Some(r) {
            let (done, rest) = block.split_at_mut(dy * out_w);
            rest[..out_w].copy_from_slice(&done[(dy - 1) * out_w..]);
            continue;
        }
        prev = Some(r);
        let row = input_row(&src, r, &mut buf);
        for (o, &j) in block[dy * out_w..(dy + 1) * out_w].iter_mut().zip(ix) {
            *o = row[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array3};
    use std::sync::atomic::AtomicBool;

    /// Deterministic pseudo-random maps with values of mixed sign and magnitude.
    fn maps(b: usize, h: usize, w: usize, seed: u64) -> Array3<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Array3::from_shape_fn((b, h, w), |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 1.5
        })
    }

    /// torch's align_corners=False bilinear, per output pixel, weights from the f32 index formula
    /// and the sum in f64.
    fn reference_bilinear(x: &Array3<f32>, oh: usize, ow: usize) -> Array3<f64> {
        let (b, h, w) = x.dim();
        let coord = |d: usize, n_in: usize, n_out: usize| -> (usize, usize, f64) {
            let scale = n_in as f32 / n_out as f32;
            // One rounding of the exact (d + 0.5)·scale − 0.5, as torch's fused multiply-add.
            let src = ((d as f64 + 0.5) * scale as f64 - 0.5) as f32;
            let src = src.max(0.0) as f64;
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (src - i0 as f64).clamp(0.0, 1.0))
        };
        Array3::from_shape_fn((b, oh, ow), |(k, y, xx)| {
            let (y0, y1, ly) = coord(y, h, oh);
            let (x0, x1, lx) = coord(xx, w, ow);
            let v = |r: usize, c: usize| x[[k, r, c]] as f64;
            (1.0 - ly) * ((1.0 - lx) * v(y0, x0) + lx * v(y0, x1))
                + ly * ((1.0 - lx) * v(y1, x0) + lx * v(y1, x1))
        })
    }

    fn reference_nearest(x: &Array3<f32>, oh: usize, ow: usize) -> Array3<f32> {
        let (b, h, w) = x.dim();
        let idx = |d: usize, n_in: usize, n_out: usize| -> usize {
            let scale = n_in as f32 / n_out as f32;
            ((d as f32 * scale).floor() as usize).min(n_in - 1)
        };
        Array3::from_shape_fn((b, oh, ow), |(k, y, xx)| {
            x[[k, idx(y, h, oh), idx(xx, w, ow)]]
        })
    }

    fn assert_close(got: &Array3<f32>, want: &Array3<f64>, tol: f64) {
        assert_eq!(got.dim(), want.dim());
        for ((idx, &g), &w) in got.indexed_iter().zip(want.iter()) {
            let err = (g as f64 - w).abs();
            assert!(
                err <= tol * (1.0 + w.abs()),
                "at {idx:?}: got {g}, want {w}"
            );
        }
    }

    fn run(x: ArrayView3<f32>, oh: usize, ow: usize, mode: Interpolation) -> Array3<f32> {
        upsample(x, oh, ow, mode, &Interrupt::never()).expect("upsample")
    }

    #[test]
    fn parse_accepts_exactly_the_two_mode_names() {
        assert_eq!(
            Interpolation::parse("bilinear"),
            Some(Interpolation::Bilinear)
        );
        assert_eq!(
            Interpolation::parse("nearest"),
            Some(Interpolation::Nearest)
        );
        assert_eq!(Interpolation::parse("Bilinear"), None);
        assert_eq!(Interpolation::parse("bicubic"), None);
        assert_eq!(Interpolation::parse(""), None);
    }

    #[test]
    fn bilinear_matches_torch_formula_for_up_and_down_sampling_and_non_square_maps() {
        let cases = [
            (3, 28, 28, 224, 224),
            (2, 7, 5, 20, 13),
            (2, 5, 9, 3, 4),
            (1, 28, 28, 17, 40),
            (2, 64, 48, 7, 5),
            (1, 3, 7, 100, 2),
            (1, 1, 6, 4, 6),
            (1, 13, 1, 13, 9),
        ];
        for (i, &(b, h, w, oh, ow)) in cases.iter().enumerate() {
            let x = maps(b, h, w, i as u64);
            let got = run(x.view(), oh, ow, Interpolation::Bilinear);
            assert_close(&got, &reference_bilinear(&x, oh, ow), 1e-6);
        }
    }

    #[test]
    fn bilinear_weights_match_torch_bit_for_bit_where_fma_matters() {
        // Weights torch 2.13 gives for 28→82, output column 1 (probed with an identity input);
        // an unfused f32 index would give lambda 0x3c47ce00 instead.
        let t = LinearTable::new(28, 82);
        assert_eq!((t.i0[1], t.i1[1]), (0, 1));
        assert_eq!(t.w1[1].to_bits(), 0x3c47ce10);
        assert_eq!(t.w0[1].to_bits(), 0x3f7ce0c8);
    }

    #[test]
    fn bilinear_with_unchanged_size_is_exact_identity() {
        let x = maps(2, 9, 14, 3);
        assert_eq!(run(x.view(), 9, 14, Interpolation::Bilinear), x);
        // One axis unchanged: that axis is copied, the other interpolated.
        let got = run(x.view(), 9, 20, Interpolation::Bilinear);
        assert_close(&got, &reference_bilinear(&x, 9, 20), 1e-6);
    }

    #[test]
    fn one_by_one_maps_broadcast_to_constant_output() {
        // Bilinear weights (1−λ, λ) of one pixel sum to the value up to f32 rounding, as in torch.
        let x = maps(3, 1, 1, 4);
        let up = run(x.view(), 5, 7, Interpolation::Bilinear);
        for k in 0..3 {
            let v = x[[k, 0, 0]];
            assert!(up
                .slice(s![k, .., ..])
                .iter()
                .all(|&u| (u - v).abs() <= 2e-7 * v.abs()));
        }
        let up = run(x.view(), 5, 7, Interpolation::Nearest);
        for k in 0..3 {
            assert!(up.slice(s![k, .., ..]).iter().all(|&u| u == x[[k, 0, 0]]));
        }
        // Down to 1×1: bilinear samples the centre (odd sizes: exactly one pixel), nearest (0, 0).
        let y = maps(2, 5, 7, 5);
        assert_eq!(
            run(y.view(), 1, 1, Interpolation::Bilinear),
            y.slice(s![.., 2..3, 3..4])
        );
        assert_eq!(
            run(y.view(), 1, 1, Interpolation::Nearest),
            y.slice(s![.., 0..1, 0..1])
        );
    }

    #[test]
    fn nearest_matches_torch_legacy_index_exactly() {
        let cases = [
            (2, 28, 28, 224, 224),
            (1, 3, 7, 7, 3),
            (2, 10, 6, 3, 33),
            (1, 7, 9, 7, 18),
            (1, 5, 5, 5, 5),
        ];
        for (i, &(b, h, w, oh, ow)) in cases.iter().enumerate() {
            let x = maps(b, h, w, 10 + i as u64);
            assert_eq!(
                run(x.view(), oh, ow, Interpolation::Nearest),
                reference_nearest(&x, oh, ow)
            );
        }
    }

    #[test]
    fn nearest_index_uses_f32_scale_like_torch() {
        // 2→82, output 41: exactly 41·2/82 = 1, but f32(2/82)·41 rounds to just below 1, and
        // torch (which computes in f32) picks source 0. A f64 formula would pick 1.
        let t = nearest_table(2, 82);
        assert_eq!(t[41], 0);
        assert_eq!(t[42], 1);
        assert_eq!(nearest_table(4, 8), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(nearest_table(8, 3), vec![0, 2, 5]);
    }

    #[test]
    fn strided_and_transposed_views_give_the_same_result_as_contiguous_copies() {
        let x = maps(3, 11, 8, 5);
        let xt = x.view().permuted_axes([0, 2, 1]);
        let xt_copy = xt.as_standard_layout().into_owned();
        let step = x.slice(s![..;2, .., ..;-2]);
        let step_copy = step.as_standard_layout().into_owned();
        for mode in [Interpolation::Bilinear, Interpolation::Nearest] {
            assert_eq!(run(xt, 30, 25, mode), run(xt_copy.view(), 30, 25, mode));
            assert_eq!(run(step, 6, 9, mode), run(step_copy.view(), 6, 9, mode));
        }
    }

    #[test]
    fn large_maps_split_by_rows_match_reference() {
        // 1 map of 600×300 output: two row blocks per map, including a block boundary that falls
        // between output rows sharing an input row.
        let x = maps(1, 37, 23, 6);
        let got = run(x.view(), 600, 300, Interpolation::Bilinear);
        assert_close(&got, &reference_bilinear(&x, 600, 300), 1e-6);
        let got = run(x.view(), 600, 300, Interpolation::Nearest);
        assert_eq!(got, reference_nearest(&x, 600, 300));
        let x = maps(1, 900, 500, 7);
        let got = run(x.view(), 250, 333, Interpolation::Bilinear);
        assert_close(&got, &reference_bilinear(&x, 250, 333), 1e-6);
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let x = maps(7, 28, 20, 8);
        let results: Vec<_> = [1, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("pool");
                pool.install(|| {
                    (
                        run(x.view(), 224, 160, Interpolation::Bilinear),
                        run(x.view(), 300, 61, Interpolation::Nearest),
                    )
                })
            })
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn empty_maps_and_zero_sizes_are_rejected_with_the_argument_name() {
        let intr = Interrupt::never();
        for shape in [(0, 4, 4), (2, 0, 4), (2, 4, 0)] {
            let x = Array3::<f32>::zeros(shape);
            let err = upsample(x.view(), 8, 8, Interpolation::Bilinear, &intr).unwrap_err();
            assert!(
                matches!(err, KernelError::InvalidArgument { arg: "maps", .. }),
                "{err:?}"
            );
        }
        let x = maps(1, 4, 4, 9);
        for (oh, ow) in [(0, 8), (8, 0)] {
            let err = upsample(x.view(), oh, ow, Interpolation::Nearest, &intr).unwrap_err();
            assert!(
                matches!(err, KernelError::InvalidArgument { arg: "size", .. }),
                "{err:?}"
            );
        }
        let err = upsample(x.view(), usize::MAX / 2, 4, Interpolation::Nearest, &intr).unwrap_err();
        assert!(
            matches!(err, KernelError::InvalidArgument { arg: "size", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_set_interrupt_flag_stops_the_kernel() {
        let flag = AtomicBool::new(true);
        let x = maps(4, 8, 8, 10);
        let err = upsample(
            x.view(),
            16,
            16,
            Interpolation::Bilinear,
            &Interrupt::new(&flag),
        )
        .unwrap_err();
        assert_eq!(err, KernelError::Interrupted);
    }
}
