//! Pixel AUROC, PRO curve and AUPRO from batches of (maps, masks), without keeping the maps.
//!
//! Each pixel's score goes into a bin: the top 24 bits of its order-preserving u32 key (sign,
//! exponent and 15 mantissa bits), i.e. bins 2⁻¹⁵ ≈ 3·10⁻⁵ of the score wide in relative terms,
//! whatever the score range (nothing to know in advance). Per bin the accumulator keeps the count
//! of normal pixels, the count of defect pixels and the summed overlap of the ground-truth
//! regions (Σ over the bin's defect pixels of 1 / (size of the pixel's region)); regions are the
//! 8-connected components of each image's mask, labelled per image as in `crate::aupro`, so their
//! sizes are complete within one update. Bins live in 4096-bin pages allocated when first hit:
//! 96 KiB per page, a few MiB for the scores of real maps (at most 384 MiB if the scores cover
//! every exponent of f32).
//!
//! The curves are swept over the bins from the highest score down: each non-empty bin is one
//! threshold ("score >= the smallest score in the bin"). Every such point is a point of the exact
//! curve of `crate::roc::auroc_named` / `crate::aupro::aupro` (the pixels above the threshold are
//! the same); only the points between two bin edges are dropped, so scores closer than a bin
//! count as tied. The difference to the exact AUROC is therefore at most ½·Σ_k Δfpr_k·Δtpr_k
//! over the bins k (≤ half the largest fraction of normal pixels in one bin), and the same holds
//! for the PRO area divided by the FPR limit (plus the height of the bin that holds the limit).
//! [`PixelMetricsAccumulator::auroc_error_bound`] and
//! [`PixelMetricsAccumulator::aupro_error_bound`] compute these bounds for the data seen: below
//! 1e-3 once the normal pixels spread over a few thousand bins (scores spanning a few percent of
//! their value); scores crowded into a few bins (all within 0.1% of one value) can exceed it. Scores that use at most 15 mantissa bits (a grid such
//! as k/64) give the exact results.
//!
//! Results do not depend on the thread count or on how the images are split into batches: counts
//! are integers, and the overlap sums are added image by image in input order.

use ndarray::{ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::aupro::label_components;
use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;
use crate::record_sort::{desc_key, key_score, FINITE_KEYS};
use crate::validate::ensure_finite;

/// Low key bits dropped: the bin of a score is `desc_key(score) >> BIN_SHIFT`.
pub const BIN_SHIFT: u32 = 8;
const PAGE_BITS: u32 = 12;
const PAGE: usize = 1 << PAGE_BITS;
const N_PAGES: usize = 1 << (32 - BIN_SHIFT - PAGE_BITS);

/// Counts of one page of bins.
#[derive(Clone)]
struct Page {
    normal: Vec<u64>,
    defect: Vec<u64>,
    overlap: Vec<f64>,
}

impl Page {
    fn new() -> Box<Page> {
        Box::new(Page {
            normal: vec![0; PAGE],
            defect: vec![0; PAGE],
            overlap: vec![0.0; PAGE],
        })
    }
}

/// Bins of the scores, in pages allocated on first use.
#[derive(Clone)]
struct Bins {
    pages: Vec<Option<Box<Page>>>,
}

impl Bins {
    fn new() -> Self {
        Bins {
            pages: vec![None; N_PAGES],
        }
    }

    #[inline]
    fn page(&mut self, bin: u32) -> &mut Page {
        self.pages[(bin >> PAGE_BITS) as usize].get_or_insert_with(Page::new)
    }

    fn merge_normal(&mut self, other: &Bins) {
        for (p, page) in other.pages.iter().enumerate() {
            if let Some(page) = page {
                let mine = self.pages[p].get_or_insert_with(Page::new);
                for (a, b) in mine.normal.iter_mut().zip(&page.normal) {
                    *a += b;
                }
            }
        }
    }

    /// Non-empty bins from the highest score down: (bin, normal, defect, overlap).
    fn iter(&self) -> impl Iterator<Item = (u32, u64, u64, f64)> + '_ {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().flat_map(move |page| {
                (0..PAGE).filter_map(move |j| {
                    let (n, d) = (page.normal[j], page.defect[j]);
                    (n + d > 0).then(|| (((p << PAGE_BITS) | j) as u32, n, d, page.overlap[j]))
                })
            })
        })
    }
}

/// One image's defect pixels: (bin, count, summed overlap) sorted by bin, and its region count.
struct ImageDefects {
    bins: Vec<(u32, u64, f64)>,
    n_regions: u64,
}

fn image_defects(map: ArrayView2<f32>, mask: ArrayView2<bool>) -> ImageDefects {
    if !mask.iter().any(|&a| a) {
        return ImageDefects {
            bins: vec![],
            n_regions: 0,
        };
    }
    let (labels, n) = label_components(mask);
    let mut size = vec![0u64; n + 1];
    let mut pixels: Vec<(u32, u32)> = vec![]; // (bin, label)
    for (&l, &s) in labels.iter().zip(map.iter()) {
        if l > 0 {
            size[l as usize] += 1;
            pixels.push((desc_key(s) >> BIN_SHIFT, l));
        }
    }
    pixels.sort_unstable();
    let mut bins: Vec<(u32, u64, f64)> = vec![];
    let mut i = 0;
    while i < pixels.len() {
        let (bin, label) = pixels[i];
        let mut j = i;
        while j < pixels.len() && pixels[j] == (bin, label) {
            j += 1;
        }
        let (count, part) = ((j - i) as u64, (j - i) as f64 / size[label as usize] as f64);
        match bins.last_mut() {
            Some(last) if last.0 == bin => {
                last.1 += count;
                last.2 += part;
            }
            _ => bins.push((bin, count, part)),
        }
        i = j;
    }
    ImageDefects {
        bins,
        n_regions: n as u64,
    }
}

/// Streaming pixel metrics: feed batches with [`update`](Self::update), read
/// [`auroc`](Self::auroc), [`pro_curve`](Self::pro_curve) or [`aupro`](Self::aupro) at any time.
#[derive(Clone)]
pub struct PixelMetricsAccumulator {
    bins: Bins,
    n_normal: u64,
    n_defect: u64,
    n_regions: u64,
    n_images: u64,
}

impl Default for PixelMetricsAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl PixelMetricsAccumulator {
    pub fn new() -> Self {
        PixelMetricsAccumulator {
            bins: Bins::new(),
            n_normal: 0,
            n_defect: 0,
            n_regions: 0,
            n_images: 0,
        }
    }

    pub fn n_images(&self) -> u64 {
        self.n_images
    }

    pub fn n_regions(&self) -> u64 {
        self.n_regions
    }

    /// (normal, defect) pixels seen.
    pub fn n_pixels(&self) -> (u64, u64) {
        (self.n_normal, self.n_defect)
    }

    /// Bytes held by the bins (the pages allocated so far).
    pub fn nbytes(&self) -> usize {
        let pages = self.bins.pages.iter().filter(|p| p.is_some()).count();
        pages * PAGE * 24 + N_PAGES * std::mem::size_of::<Option<Box<Page>>>()
    }

    /// Adds a batch of (N, H, W) maps and their masks. All or nothing: on an error (shapes
    /// differ, a map holds NaN or infinity) the accumulator is unchanged. Sizes may differ from
    /// one batch to the next. Memory besides the bins: 8 bytes per defect pixel of the batch.
    pub fn update(
        &mut self,
        maps: ArrayView3<f32>,
        masks: ArrayView3<bool>,
        intr: &Interrupt,
    ) -> KernelResult<()> {
        if maps.dim() != masks.dim() {
            return Err(KernelError::invalid(
                "masks",
                format!(
                    "expected the shape of maps {:?}, got {:?}",
                    maps.shape(),
                    masks.shape()
                ),
            ));
        }
        let b = maps.len_of(Axis(0));
        if b == 0 {
            return Ok(());
        }
        let (_, h, w) = maps.dim();
        if (h as u64) * (w as u64) >= u32::MAX as u64 {
            return Err(KernelError::invalid(
                "maps",
                format!("expected maps of fewer than 2^32 pixels, got {h}×{w}"),
            ));
        }
        // Normal pixels: one partial histogram per group of images (integer counts, merged in
        // any order); defect pixels: a sorted summary per image, merged in image order.
        let per_group = b.div_ceil(rayon::current_num_threads().max(1));
        #[allow(clippy::type_complexity)]
        let groups: Vec<(Bins, Vec<ImageDefects>, u64, bool)> = (0..b.div_ceil(per_group))
            .into_par_iter()
            .map(|g| {
                let (mut bins, mut defects, mut normal, mut bad) =
                    (Bins::new(), vec![], 0u64, false);
                for i in g * per_group..((g + 1) * per_group).min(b) {
                    intr.check()?;
                    let (map, mask) = (maps.index_axis(Axis(0), i), masks.index_axis(Axis(0), i));
                    for (&s, &a) in map.iter().zip(mask.iter()) {
                        let key = desc_key(s);
                        bad |= !FINITE_KEYS.contains(&key);
                        if !a {
                            let bin = key >> BIN_SHIFT;
                            bins.page(bin).normal[(bin as usize) & (PAGE - 1)] += 1;
                            normal += 1;
                        }
                    }
                    defects.push(image_defects(map, mask));
                }
                Ok((bins, defects, normal, bad))
            })
            .collect::<KernelResult<_>>()?;
        if groups.iter().any(|g| g.3) {
            ensure_finite(&maps, "maps")?; // names the first bad value
        }
        for (bins, defects, normal, _) in groups {
            self.bins.merge_normal(&bins);
            self.n_normal += normal;
            for image in defects {
                self.n_regions += image.n_regions;
                for (bin, count, overlap) in image.bins {
                    let page = self.bins.page(bin);
                    let j = (bin as usize) & (PAGE - 1);
                    page.defect[j] += count;
                    page.overlap[j] += overlap;
                    self.n_defect += count;
                }
            }
        }
        self.n_images += b as u64;
        Ok(())
    }

    fn need_both(&self, anomalous: u64) -> KernelResult<()> {
        if anomalous == 0 || self.n_normal == 0 {
            return Err(KernelError::invalid(
                "masks",
                format!(
                    "need both normal (0) and anomalous (1) pixels, got {} normal and {} anomalous",
                    self.n_normal, self.n_defect
                ),
            ));
        }
        Ok(())
    }

    /// Pixel AUROC (trapezoids between the bins' thresholds, counted exactly in integers).
    pub fn auroc(&self) -> KernelResult<f64> {
        self.need_both(self.n_defect)?;
        let (mut area, mut fp, mut tp) = (0u128, 0u64, 0u64);
        for (_, n, d, _) in self.bins.iter() {
            area += n as u128 * (2 * tp + d) as u128;
            fp += n;
            tp += d;
        }
        debug_assert_eq!((fp, tp), (self.n_normal, self.n_defect));
        Ok(area as f64 / (2.0 * self.n_normal as f64 * self.n_defect as f64))
    }

    /// Bound on |binned − exact| pixel AUROC: ½·Σ over bins of Δfpr·Δtpr.
    pub fn auroc_error_bound(&self) -> KernelResult<f64> {
        self.need_both(self.n_defect)?;
        let sum: u128 = self
            .bins
            .iter()
            .map(|(_, n, d, _)| n as u128 * d as u128)
            .sum();
        Ok(sum as f64 / (2.0 * self.n_normal as f64 * self.n_defect as f64))
    }

    /// The PRO curve: (FPR, PRO, threshold) at +inf (the point (0, 0)) and then at each non-empty
    /// bin from the highest score down; the threshold is the bin's lowest possible score. The
    /// last point is (1, 1).
    pub fn pro_curve(&self) -> KernelResult<(Vec<f64>, Vec<f64>, Vec<f32>)> {
        self.need_both(self.n_regions)?;
        let (n_normal, n_regions) = (self.n_normal as f64, self.n_regions as f64);
        let (mut fpr, mut pro, mut thr) = (vec![0.0], vec![0.0], vec![f32::INFINITY]);
        let (mut fp, mut overlap) = (0u64, 0.0f64);
        let mut left = self.n_defect;
        for (bin, n, d, o) in self.bins.iter() {
            fp += n;
            overlap += o;
            left -= d;
            fpr.push(fp as f64 / n_normal);
            // Once every defect pixel has passed, every region is complete: exactly 1.
            pro.push(if left == 0 {
                1.0
            } else {
                (overlap / n_regions).min(1.0)
            });
            thr.push(key_score((bin << BIN_SHIFT) | ((1 << BIN_SHIFT) - 1)));
        }
        Ok((fpr, pro, thr))
    }

    /// Area under the PRO curve for FPR in [0, `fpr_limit`], divided by `fpr_limit`, PRO
    /// interpolated linearly at the limit (as `crate::aupro::aupro`).
    pub fn aupro(&self, fpr_limit: f64) -> KernelResult<f64> {
        if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
            return Err(KernelError::invalid(
                "fpr_limit",
                format!("expected a value in (0, 1], got {fpr_limit}"),
            ));
        }
        let (fpr, pro, _) = self.pro_curve()?;
        Ok(area_to(&fpr, &pro, fpr_limit) / fpr_limit)
    }

    /// Bound on |binned − exact| AUPRO: within a bin both curves stay in the box between its
    /// two points, so ½·Δfpr·Δpro per bin below the limit, the whole box height for the part of
    /// the bin that holds the limit, divided by the limit.
    pub fn aupro_error_bound(&self, fpr_limit: f64) -> KernelResult<f64> {
        self.aupro(fpr_limit)?; // the same checks
        let (fpr, pro, _) = self.pro_curve()?;
        let mut bound = 0.0;
        for k in 1..fpr.len() {
            let (dx, dy) = (fpr[k] - fpr[k - 1], pro[k] - pro[k - 1]);
            if fpr[k] > fpr_limit {
                bound += (fpr_limit - fpr[k - 1]) * dy;
                break;
            }
            bound += 0.5 * dx * dy;
        }
        Ok(bound / fpr_limit)
    }
}

/// Trapezoid area under y(x) for x in [0, limit], y interpolated linearly at the first point
/// past the limit.
fn area_to(x: &[f64], y: &[f64], limit: f64) -> f64 {
    let mut area = 0.0;
    for k in 1..x.len() {
        let (x0, y0, x1, y1) = (x[k - 1], y[k - 1], x[k], y[k]);
        if x1 > limit {
            let y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
            return area + 0.5 * (y0 + y_lim) * (limit - x0);
        }
        area += 0.5 * (y0 + y1) * (x1 - x0);
    }
    area
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aupro::{aupro, pro_curve};
    use crate::rng::Lcg;
    use crate::roc::{auroc_named, InputNames};
    use ndarray::{s, Array3};
    use std::sync::atomic::AtomicBool;

    /// Maps with scores from `score(rng, defect)` and masks of a few random rectangles per image
    /// (every other image has none).
    fn data(
        b: usize,
        h: usize,
        w: usize,
        seed: u64,
        score: impl Fn(&mut Lcg, bool) -> f32,
    ) -> (Array3<f32>, Array3<bool>) {
        let mut rng = Lcg(seed);
        let mut masks = Array3::from_elem((b, h, w), false);
        for i in (0..b).step_by(2) {
            for _ in 0..1 + rng.next() % 3 {
                let (y, x) = ((rng.next() as usize) % h, (rng.next() as usize) % w);
                let (dy, dx) = (1 + (rng.next() as usize) % 9, 1 + (rng.next() as usize) % 9);
                masks
                    .slice_mut(s![i, y..(y + dy).min(h), x..(x + dx).min(w)])
                    .fill(true);
            }
        }
        let maps = Array3::from_shape_fn((b, h, w), |(i, y, x)| score(&mut rng, masks[[i, y, x]]));
        (maps, masks)
    }

    fn streamed(maps: &Array3<f32>, masks: &Array3<bool>, batch: usize) -> PixelMetricsAccumulator {
        let mut acc = PixelMetricsAccumulator::new();
        let b = maps.len_of(Axis(0));
        for start in (0..b).step_by(batch) {
            let r = start..(start + batch).min(b);
            acc.update(
                maps.slice(s![r.clone(), .., ..]),
                masks.slice(s![r, .., ..]),
                &Interrupt::never(),
            )
            .unwrap();
        }
        acc
    }

    fn exact(maps: &Array3<f32>, masks: &Array3<bool>, limit: f64) -> (f64, f64) {
        let flat_maps = maps.view().into_shape_with_order(maps.len()).unwrap();
        let flat_masks = masks.view().into_shape_with_order(masks.len()).unwrap();
        (
            auroc_named(flat_maps, flat_masks, InputNames::PIXELS).unwrap(),
            aupro(maps.view(), masks.view(), limit, &Interrupt::never()).unwrap(),
        )
    }

    #[test]
    fn scores_on_a_coarse_grid_give_the_exact_metrics() {
        // Scores k/64 (+ 0.3) lie far apart: one distinct score per bin, every exact point kept.
        let (maps, masks) = data(12, 24, 20, 7, |rng, d| {
            (rng.next() % 64) as f32 / 64.0 + if d { 0.3 } else { 0.0 }
        });
        let acc = streamed(&maps, &masks, 5);
        for limit in [0.05, 0.3, 1.0] {
            let (auroc, aupro_exact) = exact(&maps, &masks, limit);
            assert_eq!(acc.auroc().unwrap(), auroc);
            assert!((acc.aupro(limit).unwrap() - aupro_exact).abs() < 1e-12);
        }
        let (f, p, t) = acc.pro_curve().unwrap();
        let (fe, pe, te) = pro_curve(maps.view(), masks.view(), &Interrupt::never()).unwrap();
        assert_eq!(f, fe);
        for (a, b) in p.iter().zip(&pe) {
            assert!((a - b).abs() < 1e-12);
        }
        // A threshold is its bin's lowest score: at or below the exact one, in the same bin.
        for (&a, &b) in t.iter().zip(&te).skip(1) {
            assert!(a <= b && desc_key(a) >> BIN_SHIFT == desc_key(b) >> BIN_SHIFT);
        }
    }

    #[test]
    fn continuous_scores_are_within_the_documented_tolerance() {
        type Score = fn(&mut Lcg, bool) -> f32;
        let cases: [(&str, Score); 3] = [
            ("uniform, shifted defects", |rng, d| {
                rng.unit() + if d { 0.4 } else { 0.0 }
            }),
            ("overlapping", |rng, d| {
                rng.unit() * if d { 1.2 } else { 1.0 }
            }),
            // Every score within 0.15 of 2.5: about 1200 bins hold all the pixels.
            ("clustered", |rng, d| {
                2.5 + 0.1 * (rng.unit() + if d { 0.5 } else { 0.0 })
            }),
        ];
        for (name, score) in cases {
            let (maps, masks) = data(16, 40, 32, 11, score);
            let acc = streamed(&maps, &masks, 3);
            let bound = acc.auroc_error_bound().unwrap();
            for limit in [0.05, 0.3, 1.0] {
                let (auroc, aupro_exact) = exact(&maps, &masks, limit);
                let (da, dp) = (
                    (acc.auroc().unwrap() - auroc).abs(),
                    (acc.aupro(limit).unwrap() - aupro_exact).abs(),
                );
                let pro_bound = acc.aupro_error_bound(limit).unwrap();
                assert!(da <= bound + 1e-12, "{name}: {da} > bound {bound}");
                assert!(dp <= pro_bound + 1e-12, "{name}: {dp} > bound {pro_bound}");
                assert!(da <= 1e-3 && dp <= 1e-3, "{name} limit {limit}: {da} {dp}");
            }
        }
    }

    #[test]
    fn batching_and_threads_do_not_change_the_results() {
        let (maps, masks) = data(10, 16, 16, 3, |rng, d| rng.unit() + d as u8 as f32 * 0.2);
        let whole = streamed(&maps, &masks, 10);
        let result = |a: &PixelMetricsAccumulator| {
            (
                a.auroc().unwrap(),
                a.aupro(0.3).unwrap(),
                a.pro_curve().unwrap(),
            )
        };
        assert_eq!(result(&streamed(&maps, &masks, 1)), result(&whole));
        let run = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| streamed(&maps, &masks, 4))
        };
        assert_eq!(result(&run(1)), result(&run(3)));
        assert_eq!(result(&run(3)), result(&whole));
        assert_eq!(whole.n_images(), 10);
        assert!(whole.nbytes() < 64 << 20);
    }

    #[test]
    fn bad_inputs_are_refused_and_leave_the_accumulator_unchanged() {
        let intr = Interrupt::never();
        let (maps, masks) = data(3, 8, 8, 5, |rng, _| rng.unit());
        let mut acc = PixelMetricsAccumulator::new();
        let err = acc
            .update(maps.view(), masks.slice(s![.., 1.., ..]), &intr)
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("masks: expected the shape of maps [3, 8, 8], got [3, 7, 8]"));
        let mut nan = maps.clone();
        nan[[1, 2, 3]] = f32::NAN;
        let err = acc.update(nan.view(), masks.view(), &intr).unwrap_err();
        assert!(
            err.to_string().starts_with("maps: expected finite"),
            "{err}"
        );
        assert_eq!(acc.n_images(), 0);
        assert!(acc
            .auroc()
            .unwrap_err()
            .to_string()
            .starts_with("masks: need both normal (0) and anomalous (1) pixels, got 0 normal"));
        acc.update(maps.view(), masks.view(), &intr).unwrap();
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(acc
                .aupro(bad)
                .unwrap_err()
                .to_string()
                .starts_with("fpr_limit: expected a value in (0, 1]"));
        }
        let flag = AtomicBool::new(true);
        let err = acc
            .update(maps.view(), masks.view(), &Interrupt::new(&flag))
            .unwrap_err();
        assert_eq!(err, KernelError::Interrupted);
        assert_eq!(acc.n_images(), 3);
    }
}
