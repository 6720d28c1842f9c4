//! Gaussian smoothing of anomaly maps, equal to `scipy.ndimage.gaussian_filter(map, sigma,
//! mode="reflect", truncate=4.0)` on a float32 map.
//!
//! scipy filters axis 0 and then axis 1 with the 1-D kernel, accumulating each output in f64 as
//! `x[0]·w[0] + Σ_{k=r..1} (x[-k] + x[k])·w[k]` (its symmetric-kernel path) and storing the axis-0
//! result as float32 before the axis-1 pass. We do the same operations in the same order, so the
//! results agree to rounding of the kernel weights.

use ndarray::{Array3, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

/// Largest kernel radius accepted (sigma up to about 16384): far beyond any map size, where the
/// blur is already a constant, and small enough that the kernel and line buffers stay modest.
pub const MAX_RADIUS: usize = 1 << 16;

/// Output pixels per parallel task; a 224×224 map is one task, a huge map is split by rows.
const PIXELS_PER_TASK: usize = 1 << 16;

/// Kernel radius for `sigma`, like scipy's `int(truncate * sd + 0.5)` with truncate = 4; `None`
/// when it exceeds `MAX_RADIUS` or sigma is not a positive finite number.
fn radius(sigma: f64) -> Option<usize> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return None;
    }
    let r = 4.0 * sigma + 0.5;
    (r < (MAX_RADIUS + 1) as f64).then_some(r as usize)
}

/// Normalised 1-D Gaussian kernel of length 2r+1, r = int(4σ + 0.5), as scipy builds it.
///
/// Weights are exp(−x²/(2σ²)) for x = −r..=r divided by their sum. A sigma that is not positive
/// and finite gives the identity kernel `[1.0]`; a radius above `MAX_RADIUS` is clamped to it
/// (`gaussian_blur` rejects both).
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return vec![1.0];
    }
    let r = radius(sigma).unwrap_or(MAX_RADIUS) as i64;
    let c = -0.5 / (sigma * sigma);
    let mut w: Vec<f64> = (-r..=r).map(|x| (c * (x * x) as f64).exp()).collect();
    let sum = numpy_pairwise_sum(&w);
    for v in &mut w {
        *v /= sum;
    }
    w
}

/// numpy's pairwise summation (what `phi_x.sum()` computes), so the normalisation matches scipy's.
fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |s, &v| s + v)
    } else if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        for block in a[8..full].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[full..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

/// scipy's "reflect" (half-sample symmetric) extension of index `i` into 0..n, periodic with 2n.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m >= n {
        2 * n - 1 - m
    } else {
        m
    }
}

/// Separable Gaussian blur of each map, equal to scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=4.0) to 1e-5.
///
/// Parallel over maps and over blocks of rows; each row is filtered along axis 0 and then along
/// axis 1 straight away, so there is no intermediate map. Memory: the output, a contiguous copy
/// of the input only when `maps` is not in standard layout, and O(w + r) per task.
/// Cost: O(B·h·w·r) for radius r = int(4σ + 0.5).
pub fn gaussian_blur(
    maps: ArrayView3<f32>,
    sigma: f64,
    intr: &Interrupt,
) -> KernelResult<Array3<f32>> {
    let (b, h, w) = maps.dim();
    if b == 0 || h == 0 || w == 0 {
        return Err(KernelError::invalid(
            "maps",
            format!("expected a non-empty (B, h, w) array, got shape ({b}, {h}, {w})"),
        ));
    }
    let r = radius(sigma).ok_or_else(|| {
        KernelError::invalid(
            "sigma",
            format!(
                "expected a finite number > 0 and below {} (radius at most {MAX_RADIUS}), got {sigma}",
                ((MAX_RADIUS + 1) as f64 - 0.5) / 4.0
            ),
        )
    })?;
    intr.check()?;
    if r == 0 {
        // The kernel is [1.0]: scipy returns the input unchanged.
        return Ok(maps.as_standard_layout().into_owned());
    }
    let kernel = gaussian_kernel(sigma);
    // fw[0] is the centre weight, fw[k] the weight at offsets ±k.
    let fw = &kernel[r..];
    let map_len = h * w;

    let owned;
    let flat: &[f32] = match maps.as_slice() {
        Some(s) => s,
        None => {
            let mut v = vec![0f32; b * map_len];
            v.par_chunks_mut(map_len)
                .zip(maps.axis_iter(Axis(0)).into_par_iter())
                .for_each(|(dst, src)| {
                    for (o, &x) in dst.iter_mut().zip(src.iter()) {
                        *o = x;
                    }
                });
            owned = v;
            &owned
        }
    };

    let rows_per_task = (PIXELS_PER_TASK / w).clamp(1, h);
    let mut out = vec![0f32; b * map_len];
    out.par_chunks_mut(map_len)
        .zip(flat.par_chunks(map_len))
        .try_for_each(|(dst, src)| {
            dst.par_chunks_mut(rows_per_task * w)
                .enumerate()
                .try_for_each(|(c, block)| blur_rows(src, h, w, fw, c * rows_per_task, block, intr))
        })?;
    Array3::from_shape_vec((b, h, w), out)
        .map_err(|e| KernelError::Numerical(format!("gaussian_blur: output shape error: {e}")))
}

/// Blur output rows `y0..y0 + block.len()/w` of one contiguous h×w map.
fn blur_rows(
    src: &[f32],
    h: usize,
    w: usize,
    fw: &[f64],
    y0: usize,
    block: &mut [f32],
    intr: &Interrupt,
) -> KernelResult<()> {
    let r = fw.len() - 1;
    let row = |i: usize| &src[i * w..(i + 1) * w];
    // Padded line for the axis-1 pass; the padding positions' sources are fixed, so map them once.
    let mut line = vec![0f64; w + 2 * r];
    let left: Vec<usize> = (0..r).map(|p| reflect(-1 - p as isize, w)).collect();
    let right: Vec<usize> = (0..r).map(|p| reflect((w + p) as isize, w)).collect();
    let mut acc = vec![0f64; w];
    for (dy, out_row) in block.chunks_exact_mut(w).enumerate() {
        intr.check()?;
        let i = (y0 + dy) as isize;
        // Axis 0: whole-row multiply-adds over the 2r+1 input rows around row i.
        for (a, &v) in acc.iter_mut().zip(row(i as usize)) {
            *a = v as f64 * fw[0];
        }
        add_symmetric_taps(&mut acc, fw, |k| {
            (
                row(reflect(i - k as isize, h)),
                row(reflect(i + k as isize, h)),
            )
        });
        // scipy stores the axis-0 result as float32 before filtering axis 1.
        let (pad_l, rest) = line.split_at_mut(r);
        let (mid, pad_r) = rest.split_at_mut(w);
        for (l, &a) in mid.iter_mut().zip(&acc) {
            *l = a as f32 as f64;
        }
        for (p, &s) in left.iter().enumerate() {
            pad_l[r - 1 - p] = mid[s];
        }
        for (p, &s) in right.iter().enumerate() {
            pad_r[p] = mid[s];
        }
        // Axis 1: for each tap, one contiguous pass over the row.
        for (a, &v) in acc.iter_mut().zip(&line[r..r + w]) {
            *a = v * fw[0];
        }
        add_symmetric_taps(&mut acc, fw, |k| {
            (&line[r - k..r - k + w], &line[r + k..r + k + w])
        });
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = a as f32;
        }
    }
    Ok(())
}

/// acc[x] += (u_k[x] + d_k[x])·fw[k] for k = r, r−1, …, 1 in that order, where
/// `(u_k, d_k) = lines(k)` are the lines at offsets −k and +k.
///
/// Taps go four per sweep so `acc` is loaded and stored once per four taps; each element still
/// sees the additions in scipy's order.
#[inline]
fn add_symmetric_taps<'a, T, F>(acc: &mut [f64], fw: &[f64], lines: F)
where
    T: Copy + Into<f64> + 'a,
    F: Fn(usize) -> (&'a [T], &'a [T]),
{
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { add_symmetric_taps_avx2(acc, fw, lines) };
            return;
        }
    }
    add_symmetric_taps_body(acc, fw, lines)
}

/// The same loop compiled for AVX2: four f64 lanes instead of two. Same operations in the same
/// order (no FMA contraction), so results are bit-identical to the baseline build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_symmetric_taps_avx2<'a, T, F>(acc: &mut [f64], fw: &[f64], lines: F)
where
    T: Copy + Into<f64> + 'a,
    F: Fn(usize) -> (&'a [T], &'a [T]),
{
    add_symmetric_taps_body(acc, fw, lines)
}

#[inline(always)]
fn add_symmetric_taps_body<'a, T, F>(acc: &mut [f64], fw: &[f64], lines: F)
where
    T: Copy + Into<f64> + 'a,
    F: Fn(usize) -> (&'a [T], &'a [T]),
{
    let n = acc.len();
    let mut k = fw.len() - 1;
    while k >= 4 {
        let (u0, d0) = lines(k);
        let (u1, d1) = lines(k - 1);
        let (u2, d2) = lines(k - 2);
        let (u3, d3) = lines(k - 3);
        let (u0, d0, u1, d1) = (&u0[..n], &d0[..n], &u1[..n], &d1[..n]);
        let (u2, d2, u3, d3) = (&u2[..n], &d2[..n], &u3[..n], &d3[..n]);
        let (w0, w1, w2, w3) = (fw[k], fw[k - 1], fw[k - 2], fw[k - 3]);
        for x in 0..n {
            let mut a = acc[x];
            a += (u0[x].into() + d0[x].into()) * w0;
            a += (u1[x].into() + d1[x].into()) * w1;
            a += (u2[x].into() + d2[x].into()) * w2;
            a += (u3[x].into() + d3[x].into()) * w3;
            acc[x] = a;
        }
        k -= 4;
    }
    while k >= 1 {
        let (u, d) = lines(k);
        let wk = fw[k];
        for ((a, &p), &q) in acc.iter_mut().zip(u).zip(d) {
            *a += (p.into() + q.into()) * wk;
        }
        k -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array3};
    use std::sync::atomic::AtomicBool;

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

    /// Direct 2-D correlation in f64 with the weights from the formula and the periodic
    /// half-sample reflection written out independently.
    fn reference(x: &Array3<f32>, sigma: f64) -> Array3<f64> {
        let (b, h, w) = x.dim();
        let r = (4.0 * sigma + 0.5).floor() as i64;
        let raw: Vec<f64> = (-r..=r)
            .map(|t| (-((t * t) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let total: f64 = raw.iter().sum();
        let g: Vec<f64> = raw.iter().map(|v| v / total).collect();
        let refl = |i: i64, n: usize| -> usize {
            let n = n as i64;
            let m = ((i % (2 * n)) + 2 * n) % (2 * n);
            (if m < n { m } else { 2 * n - 1 - m }) as usize
        };
        Array3::from_shape_fn((b, h, w), |(k, i, j)| {
            let mut s = 0.0;
            for (a, ga) in g.iter().enumerate() {
                for (c, gc) in g.iter().enumerate() {
                    let (p, q) = (
                        refl(i as i64 + a as i64 - r, h),
                        refl(j as i64 + c as i64 - r, w),
                    );
                    s += ga * gc * x[[k, p, q]] as f64;
                }
            }
            s
        })
    }

    fn assert_close(got: &Array3<f32>, want: &Array3<f64>) {
        assert_eq!(got.dim(), want.dim());
        for ((idx, &g), &w) in got.indexed_iter().zip(want.iter()) {
            let err = (g as f64 - w).abs();
            assert!(
                err <= 1e-5 * (1.0 + w.abs()),
                "at {idx:?}: got {g}, want {w}"
            );
        }
    }

    fn blur(x: ArrayView3<f32>, sigma: f64) -> Array3<f32> {
        gaussian_blur(x, sigma, &Interrupt::never()).expect("gaussian_blur")
    }

    #[test]
    fn kernel_has_scipy_radius_and_sums_to_one() {
        for (sigma, r) in [
            (4.0, 16),
            (1.0, 4),
            (0.5, 2),
            (0.3, 1),
            (0.12, 0),
            (2.6, 10),
            (0.375, 2),
        ] {
            let k = gaussian_kernel(sigma);
            assert_eq!(k.len(), 2 * r + 1, "sigma {sigma}");
            assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-14);
            assert!(
                k.iter().zip(k.iter().rev()).all(|(a, b)| a == b),
                "symmetric"
            );
            let c = k[r];
            for (x, &v) in k.iter().enumerate() {
                let d = x as f64 - r as f64;
                assert!((v / c - (-d * d / (2.0 * sigma * sigma)).exp()).abs() < 1e-14);
            }
        }
        assert_eq!(gaussian_kernel(0.0), vec![1.0]);
        assert_eq!(gaussian_kernel(f64::NAN), vec![1.0]);
    }

    #[test]
    fn pairwise_sum_matches_plain_sum_closely_for_all_lengths() {
        for n in [1, 7, 8, 9, 33, 128, 129, 300] {
            let a: Vec<f64> = (0..n).map(|i| 1.0 / (1.0 + i as f64)).collect();
            let plain: f64 = a.iter().sum();
            assert!((numpy_pairwise_sum(&a) - plain).abs() < 1e-13 * plain);
        }
    }

    #[test]
    fn reflect_repeats_with_period_two_n() {
        let got: Vec<usize> = (-8..12).map(|i| reflect(i, 4)).collect();
        // a b c d d c b a | a b c d | d c b a a b c d
        let want = [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3];
        assert_eq!(got, want);
        assert!((-5..5).all(|i| reflect(i, 1) == 0));
    }

    #[test]
    fn blur_matches_direct_2d_reference_on_square_and_non_square_maps() {
        for (i, &(b, h, w, sigma)) in [
            (2, 28, 28, 4.0),
            (2, 17, 40, 1.5),
            (1, 40, 9, 2.0),
            (3, 12, 12, 0.7),
            (1, 30, 31, 0.2),
        ]
        .iter()
        .enumerate()
        {
            let x = maps(b, h, w, i as u64);
            assert_close(&blur(x.view(), sigma), &reference(&x, sigma));
        }
    }

    #[test]
    fn radius_larger_than_the_map_uses_repeated_reflection() {
        for (i, &(b, h, w, sigma)) in [
            (1, 5, 3, 4.0),
            (2, 7, 11, 6.0),
            (1, 2, 9, 3.0),
            (1, 1, 6, 2.0),
        ]
        .iter()
        .enumerate()
        {
            let x = maps(b, h, w, 20 + i as u64);
            assert_close(&blur(x.view(), sigma), &reference(&x, sigma));
        }
    }

    #[test]
    fn one_by_one_maps_and_constant_maps_are_unchanged() {
        let x = maps(3, 1, 1, 30);
        let got = blur(x.view(), 4.0);
        for (g, v) in got.iter().zip(x.iter()) {
            assert!((g - v).abs() <= 1e-6 * v.abs());
        }
        let c = Array3::from_elem((1, 10, 7), 2.5f32);
        assert!(blur(c.view(), 3.0).iter().all(|&v| (v - 2.5).abs() < 1e-6));
    }

    #[test]
    fn tiny_sigma_with_radius_zero_is_identity() {
        let x = maps(2, 6, 5, 31);
        assert_eq!(blur(x.view(), 0.1), x);
        assert_eq!(blur(x.view(), 1e-300), x);
    }

    #[test]
    fn strided_and_transposed_views_give_the_same_result_as_contiguous_copies() {
        let x = maps(3, 19, 13, 32);
        let xt = x.view().permuted_axes([0, 2, 1]);
        assert_eq!(blur(xt, 2.0), blur(xt.as_standard_layout().view(), 2.0));
        let step = x.slice(s![..;2, ..;-1, 1..;2]);
        assert_eq!(blur(step, 1.3), blur(step.as_standard_layout().view(), 1.3));
        assert_close(&blur(xt, 2.0), &reference(&xt.to_owned(), 2.0));
    }

    #[test]
    fn large_maps_split_into_row_blocks_match_reference_rows() {
        // 300×400 output splits into row blocks of 163 rows; check rows on both sides of the cut.
        let x = maps(1, 300, 400, 33);
        let got = blur(x.view(), 1.0);
        let want = reference(&x.slice(s![.., 150..180, ..]).to_owned(), 1.0);
        // The reference on a slice differs near the slice's own edges; compare its interior.
        let inner = got.slice(s![.., 155..175, ..]);
        let want_inner = want.slice(s![.., 5..25, ..]);
        for (&g, &w) in inner.iter().zip(want_inner.iter()) {
            assert!((g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()));
        }
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let x = maps(5, 60, 45, 34);
        let big = maps(1, 400, 300, 35);
        let results: Vec<_> = [1, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("pool");
                pool.install(|| (blur(x.view(), 4.0), blur(big.view(), 2.0)))
            })
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn bad_sigma_and_empty_maps_are_rejected_with_the_argument_name() {
        let intr = Interrupt::never();
        let x = maps(1, 4, 4, 36);
        for sigma in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 20000.0] {
            let err = gaussian_blur(x.view(), sigma, &intr).unwrap_err();
            assert!(
                matches!(err, KernelError::InvalidArgument { arg: "sigma", .. }),
                "{sigma}: {err:?}"
            );
        }
        for shape in [(0, 4, 4), (1, 0, 4), (1, 4, 0)] {
            let e = Array3::<f32>::zeros(shape);
            let err = gaussian_blur(e.view(), 1.0, &intr).unwrap_err();
            assert!(
                matches!(err, KernelError::InvalidArgument { arg: "maps", .. }),
                "{err:?}"
            );
        }
    }

    /// Timing of the anomaly-map post-processing: 100 maps 28×28 → 224×224 bilinear, then
    /// sigma-4 blur, on 2 threads. Run with
    /// `cargo test --release -- --ignored --nocapture timing_upsample_and_blur`.
    #[test]
    #[ignore]
    fn timing_upsample_and_blur_100_maps_on_two_threads() {
        use crate::upsample::{upsample, Interpolation};
        use std::time::Instant;
        let x = maps(100, 28, 28, 40);
        let intr = Interrupt::never();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        pool.install(|| {
            let (mut up_t, mut blur_t) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..7 {
                let t = Instant::now();
                let up =
                    upsample(x.view(), 224, 224, Interpolation::Bilinear, &intr).expect("upsample");
                let t1 = Instant::now();
                let out = gaussian_blur(up.view(), 4.0, &intr).expect("blur");
                let t2 = Instant::now();
                assert_eq!(out.dim(), (100, 224, 224));
                up_t = up_t.min((t1 - t).as_secs_f64());
                blur_t = blur_t.min((t2 - t1).as_secs_f64());
            }
            println!(
                "best of 7: upsample {:.2} ms, blur {:.2} ms, total {:.2} ms",
                up_t * 1e3,
                blur_t * 1e3,
                (up_t + blur_t) * 1e3
            );
        });
    }

    #[test]
    fn a_set_interrupt_flag_stops_the_kernel() {
        let flag = AtomicBool::new(true);
        let x = maps(4, 8, 8, 37);
        assert_eq!(
            gaussian_blur(x.view(), 1.0, &Interrupt::new(&flag)),
            Err(KernelError::Interrupted)
        );
    }
}
