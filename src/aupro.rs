//! Per-region overlap (PRO) curve and its normalised area (AUPRO), as defined by the MVTec AD
//! evaluation script (Bergmann et al.): ground-truth regions are the 8-connected components of
//! each mask; at a threshold t the PRO is the mean over all regions of the test set of the
//! fraction of the region's pixels with score >= t, and the FPR is the fraction of all normal
//! pixels with score >= t. AUPRO is the trapezoid area under PRO(FPR) from 0 up to the FPR limit
//! (PRO interpolated linearly at the limit), divided by the limit.
//!
//! The whole curve comes from ONE sort of all pixels: each pixel becomes an 8-byte record
//! (order key of its score, global region id or 0 for normal), records are sorted by the
//! two-level bucket sort of `crate::record_sort`, and a single sweep adds 1/(region size) to the PRO sum
//! for anomalous pixels and 1 to the false positive count for normal pixels, closing a curve
//! point at each distinct score. No per-threshold copy is made. Memory: 8 bytes per sorted
//! record plus 8 per defect pixel (each mask is labelled once, its defect pixels kept as a
//! sparse list). For AUPRO only the pixels above the score where the FPR passes the limit are
//! sorted and written (a little more than `limit` of the normal pixels, from a guess made on a
//! 1/49 sample of the pixels; when the guess is too high, the pixels below it are sorted too),
//! so the result is always the one the full sort gives. The maps are read twice: once while
//! labelling the masks and counting, once to place the kept pixels.
//!
//! The PRO sum is kept as (whole regions passed, an integer) + (float sum of the partial
//! overlaps), so it reaches exactly 1 and perfect maps score exactly 1.
//!
//! anomalib 2.7's `AUPRO` computes the same curve (global sort, cumulative sums in float32),
//! clips it at the limit with the same interpolation and also divides by the limit; it differs
//! only by float32 rounding, and by returning 0 instead of an error when there is no region or
//! no normal pixel.

use ndarray::{s, Array2, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;
use crate::record_sort::{
    chunk_len, fill_records, key_score, sample_range, sort_planned, Hist, Plan, Records, Spread,
    BATCH,
};
use crate::validate::ensure_finite;

/// Every SAMPLE_STEP-th row and column of each map is read to guess the score range and, for
/// AUPRO, the score where the FPR passes its limit.
const SAMPLE_STEP: usize = 7;

/// Fewer sampled normal pixels than this: no guess of AUPRO's cut (small inputs).
const MIN_SAMPLE: usize = 1000;

/// Records swept between two interrupt polls.
const SWEEP_POLL: usize = 1 << 20;

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        let grand = parent[parent[x as usize] as usize];
        parent[x as usize] = grand; // path halving
        x = grand;
    }
    x
}

/// Connected components of `mask` with 8-connectivity: labels 1..=n numbered in raster order of
/// each component's first pixel (as `scipy.ndimage.label` with a 3×3 structure of ones), 0 for
/// background.
///
/// Two-pass union-find: O(H·W) time, 4 bytes per pixel for the labels plus one u32 per
/// provisional label. Any strides. Assumes H·W < 2³².
pub fn label_components(mask: ArrayView2<bool>) -> (Array2<u32>, usize) {
    let (lab, n) = label_raw(mask);
    let labels = Array2::from_shape_vec(mask.dim(), lab).expect("h*w labels were allocated");
    (labels, n)
}

/// [`label_components`] as a row-major Vec.
fn label_raw(mask: ArrayView2<bool>) -> (Vec<u32>, usize) {
    let (h, w) = mask.dim();
    let owned: Vec<bool>;
    let m = match mask.as_slice() {
        Some(m) => m,
        None => {
            owned = mask.iter().copied().collect();
            &owned
        }
    };
    let mut lab = vec![0u32; h * w];
    // parent[0] is the background; provisional labels are created in raster order and always
    // merged into the smaller one, so a root is the first label its component received.
    let mut parent: Vec<u32> = vec![0];
    for (r, row) in m.chunks_exact(w.max(1)).enumerate() {
        let mut c = 0;
        while c < w {
            // Defects are a small part of most masks: skip background 8 pixels at a time.
            if c + 8 <= w && row[c..c + 8] == [false; 8] {
                c += 8;
                continue;
            }
            if !row[c] {
                c += 1;
                continue;
            }
            let i = r * w + c;
            let mut current = 0u32;
            let mut visit = |n: u32, parent: &mut Vec<u32>| {
                if n == 0 {
                    return;
                }
                if current == 0 {
                    current = n;
                } else {
                    let (a, b) = (find(parent, current), find(parent, n));
                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                    parent[hi as usize] = lo;
                    current = lo;
                }
            };
            if c > 0 {
                visit(lab[i - 1], &mut parent);
            }
            if r > 0 {
                let up = i - w;
                if c > 0 {
                    visit(lab[up - 1], &mut parent);
                }
                visit(lab[up], &mut parent);
                if c + 1 < w {
                    visit(lab[up + 1], &mut parent);
                }
            }
            if current == 0 {
                current = parent.len() as u32;
                parent.push(current);
            }
            lab[i] = current;
            c += 1;
        }
    }
    // Final numbering: roots in increasing provisional order = raster order of first pixels.
    let mut final_label = vec![0u32; parent.len()];
    let mut n = 0u32;
    for l in 1..parent.len() as u32 {
        let root = find(&mut parent, l);
        final_label[l as usize] = if root == l {
            n += 1;
            n
        } else {
            final_label[root as usize]
        };
    }
    if final_label.len() > 1 {
        for v in lab.iter_mut().filter(|v| **v != 0) {
            *v = final_label[*v as usize];
        }
    }
    (lab, n as usize)
}

/// Shapes and sizes (not values) of the inputs.
fn validate(maps: &ArrayView3<f32>, masks: &ArrayView3<bool>) -> KernelResult<()> {
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
    if maps.is_empty() {
        return Err(KernelError::invalid(
            "maps",
            format!(
                "expected a non-empty (N, H, W) array, got shape {:?}",
                maps.shape()
            ),
        ));
    }
    let (_, h, w) = maps.dim();
    if (h as u64) * (w as u64) >= u32::MAX as u64 {
        return Err(KernelError::invalid(
            "maps",
            format!("expected maps of fewer than 2^32 pixels, got {h}×{w}"),
        ));
    }
    Ok(())
}

/// Pixels as sort records `key << 32 | global region id` (0 for normal pixels), produced image
/// by image: records are filled with payload 0 (a vectorised loop over the map), then the few
/// defect pixels, kept as a sparse list when the masks were labelled, get their region id.
struct PixelRecords<'a> {
    maps: ArrayView3<'a, f32>,
    /// Per image, its defect pixels in raster order: (flat index in the image, local label).
    defects: Vec<Vec<(u32, u32)>>,
    /// Global id of image i's region 1, minus one.
    offsets: Vec<u32>,
    images_per_chunk: usize,
}

impl PixelRecords<'_> {
    fn emit_image(&self, i: usize, exact: bool, sink: &mut impl FnMut(&[u64])) {
        let off = self.offsets[i] as u64;
        // The maps were checked for NaN and infinities by the labelling pass.
        image_records(
            self.maps.index_axis(Axis(0), i),
            &self.defects[i],
            // A counting pass only needs to know that a pixel is a defect.
            |label| if exact { off + label as u64 } else { 1 },
            sink,
        );
    }
}

/// The records of one map, in batches: keys with payload 0 (a vectorised loop over the map),
/// then `payload(label)` for the listed defect pixels. Says whether a score was not finite.
fn image_records(
    map: ArrayView2<f32>,
    defects: &[(u32, u32)],
    payload: impl Fn(u32) -> u64,
    mut sink: impl FnMut(&[u64]),
) -> bool {
    // A strided map is packed first.
    let map_own: Vec<f32>;
    let m = match map.as_slice() {
        Some(m) => m,
        None => {
            map_own = map.iter().copied().collect();
            &map_own
        }
    };
    let mut next = 0; // first defect pixel not yet placed
    let mut buf = [0u64; BATCH];
    let mut bad = false;
    for (start, ms) in (0..).step_by(BATCH).zip(m.chunks(BATCH)) {
        let out = &mut buf[..ms.len()];
        bad |= fill_records(out, ms, |_| 0);
        let end = start + ms.len();
        while next < defects.len() && (defects[next].0 as usize) < end {
            let (j, label) = defects[next];
            out[j as usize - start] |= payload(label);
            next += 1;
        }
        sink(out);
    }
    bad
}

/// The regions of one mask: their sizes, and the defect pixels in raster order as (flat index,
/// label 1..=n).
fn regions(mask: ArrayView2<bool>) -> (Vec<u32>, Vec<(u32, u32)>) {
    let (mut sizes, mut defects) = (vec![], vec![]);
    if mask.iter().any(|&a| a) {
        let (lab, n) = label_raw(mask);
        sizes = vec![0u32; n];
        for (j, &l) in lab.iter().enumerate().filter(|(_, &l)| l > 0) {
            sizes[l as usize - 1] += 1;
            defects.push((j as u32, l));
        }
    }
    (sizes, defects)
}

impl Records for PixelRecords<'_> {
    fn len(&self) -> usize {
        self.maps.len()
    }
    fn n_chunks(&self) -> usize {
        self.maps.len_of(Axis(0)).div_ceil(self.images_per_chunk)
    }
    fn emit(&self, chunk: usize, exact: bool, mut sink: impl FnMut(&[u64])) {
        let b = self.maps.len_of(Axis(0));
        for i in chunk * self.images_per_chunk..((chunk + 1) * self.images_per_chunk).min(b) {
            self.emit_image(i, exact, &mut sink);
        }
    }
}

/// The sorted pixel records (or the prefix of them that the FPR limit needs), and the regions.
struct Prepared {
    records: Vec<u64>,
    /// Pixels of each region, indexed by global region id (index 0 unused).
    size: Vec<u32>,
    /// 1 / size of each region, indexed by global region id (index 0 unused).
    inv_size: Vec<f64>,
    n_regions: usize,
    n_normal: u64,
}

/// Labels the masks and sorts all pixels by descending score. With `fpr_limit`, only the sorted
/// prefix that a sweep stopping just past that FPR needs is produced.
fn prepare(
    maps: ArrayView3<f32>,
    masks: ArrayView3<bool>,
    fpr_limit: Option<f64>,
    intr: &Interrupt,
) -> KernelResult<Prepared> {
    validate(&maps, &masks)?;
    let (b, h, w) = maps.dim();
    let hw = h * w;
    // A sample of the pixels (every SAMPLE_STEP-th row and column of every image): its score
    // range guides the bucket sort (scores outside it are still sorted right, only more
    // slowly), and with an FPR limit its normal scores guess where the FPR passes the limit.
    let samples: Vec<(Vec<f32>, Vec<f32>)> = (0..b)
        .into_par_iter()
        .map(|i| {
            let (mut sample, mut normal_sample) = (vec![], vec![]);
            let sampled = maps.slice(s![i, ..;SAMPLE_STEP, ..;SAMPLE_STEP]);
            let sampled_mask = masks.slice(s![i, ..;SAMPLE_STEP, ..;SAMPLE_STEP]);
            for (&v, &a) in sampled.iter().zip(sampled_mask.iter()) {
                if v.is_finite() {
                    sample.push(v);
                    if !a && fpr_limit.is_some() {
                        normal_sample.push(v);
                    }
                }
            }
            (sample, normal_sample)
        })
        .collect();
    let (mut sample, mut normal_sample) = (vec![], vec![]);
    for (all, normal) in samples {
        sample.extend(all);
        normal_sample.extend(normal);
    }
    let (lo, hi) = sample_range(&mut sample).unwrap_or((f32::MIN, f32::MAX));
    let spread = fpr_limit.and_then(|limit| guess_spread(normal_sample, hi, limit));
    let plan = Plan::new(spread.unwrap_or(Spread::Scores(lo, hi)), b * hw);
    // Per chunk of images, in parallel: label each mask (region sizes and defect pixels) and,
    // while the map is read anyway, count its pixels into the sort's intervals.
    let images_per_chunk = chunk_len(b * hw).div_ceil(hw).max(1);
    #[allow(clippy::type_complexity)]
    let per_chunk: Vec<(Vec<(Vec<u32>, Vec<(u32, u32)>)>, Hist, bool)> = (0..b
        .div_ceil(images_per_chunk))
        .into_par_iter()
        .map(|c| {
            intr.check()?;
            let (mut images, mut hist, mut bad) = (vec![], plan.empty_hist(), false);
            for i in c * images_per_chunk..((c + 1) * images_per_chunk).min(b) {
                let (sizes, defects) = regions(masks.index_axis(Axis(0), i));
                let map = maps.index_axis(Axis(0), i);
                let map_own: Vec<f32>;
                let m = match map.as_slice() {
                    Some(m) => m,
                    None => {
                        map_own = map.iter().copied().collect();
                        &map_own
                    }
                };
                bad |= plan.count_scores(m, &mut hist);
                for &(j, _) in &defects {
                    plan.count_positive(m[j as usize], &mut hist);
                }
                images.push((sizes, defects));
            }
            plan.finish_counts(&mut hist);
            Ok((images, hist, bad))
        })
        .collect::<KernelResult<_>>()?;
    if per_chunk.iter().any(|x| x.2) {
        ensure_finite(&maps, "maps")?; // names the first bad value
    }
    let mut hists = Vec::with_capacity(per_chunk.len());
    let mut per_image = Vec::with_capacity(b);
    for (images, hist, _) in per_chunk {
        hists.push(hist);
        per_image.extend(images);
    }
    let n_regions: usize = per_image.iter().map(|x| x.0.len()).sum();
    if n_regions >= u32::MAX as usize {
        return Err(KernelError::invalid(
            "masks",
            format!("expected fewer than 2^32 regions, got {n_regions}"),
        ));
    }
    let n_anomalous: u64 = per_image
        .iter()
        .flat_map(|x| x.0.iter())
        .map(|&s| s as u64)
        .sum();
    let n_normal = (b * hw) as u64 - n_anomalous;
    if n_regions == 0 || n_normal == 0 {
        return Err(KernelError::invalid(
            "masks",
            format!(
                "need both normal (0) and anomalous (1) pixels, got {n_normal} normal and {n_anomalous} anomalous"
            ),
        ));
    }
    let mut offsets = Vec::with_capacity(b);
    let mut acc = 0u32;
    for x in &per_image {
        offsets.push(acc);
        acc += x.0.len() as u32;
    }
    let mut defects = Vec::with_capacity(b);
    let mut size: Vec<u32> = vec![0];
    for (sizes, image_defects) in per_image {
        size.extend(sizes);
        defects.push(image_defects);
    }
    let inv_size: Vec<f64> = size
        .iter()
        .map(|&s| if s > 0 { 1.0 / s as f64 } else { 0.0 })
        .collect();
    let src = PixelRecords {
        maps,
        defects,
        offsets,
        images_per_chunk,
    };
    // The sweep for an FPR limit stops at the first normal count whose FPR exceeds it.
    let needed = fpr_limit
        .map(|limit| first_count_above(limit, n_normal))
        .filter(|&k| k <= n_normal);
    let records = sort_planned(&src, &plan, Some(hists), needed, intr)?;
    Ok(Prepared {
        records,
        size,
        inv_size,
        n_regions,
        n_normal,
    })
}

/// For AUPRO: the intervals of the bucket sort, from a guess of the score where the FPR passes
/// `limit` made on the sampled normal pixels, up to `high`. Pixels below the guess fall into the
/// last interval, which the prefix sort drops when at least `k` normal pixels lie above it,
/// and sorts like any other when the guess was too high: the result is exact either way. The
/// guess aims at an FPR a little above the limit (by 1% plus 5 standard deviations of the
/// sampled FPR: 0.317 for the default limit on 100 maps of 224²); with it, about a third of
/// the pixels are sorted and the rest is never written anywhere.
fn guess_spread(mut sample: Vec<f32>, high: f32, limit: f64) -> Option<Spread> {
    let m = sample.len();
    // Margin: 5 binomial standard deviations of the sampled FPR (the sample is spatially
    // correlated, hence the generous factor) plus 1%.
    let target = limit + 0.01 + 5.0 * (limit * (1.0 - limit) / m.max(1) as f64).sqrt();
    if m < MIN_SAMPLE || target >= 0.9 {
        return None;
    }
    let rank = ((target * m as f64) as usize).min(m - 1);
    let guess = *sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a)).1;
    (high > guess).then_some(Spread::Scores(guess, high))
}

/// Smallest count k with `k / n > limit` in f64, as the sweep computes the FPR (n + 1 if none).
fn first_count_above(limit: f64, n: u64) -> u64 {
    let above = |k: u64| k as f64 / n as f64 > limit;
    let mut k = ((limit * n as f64).floor().max(0.0) as u64).min(n + 1);
    while k > 0 && above(k - 1) {
        k -= 1;
    }
    while k <= n && !above(k) {
        k += 1;
    }
    k
}

/// Calls `f(fp, overlap, key)` at each distinct score from the highest down, until it returns
/// false: `fp` normal pixels and a summed overlap of `overlap` regions (PRO · regions) lie at
/// or above the score of `key`. Sequential (the sums are order-dependent), polling `intr`.
fn sweep(
    p: &Prepared,
    intr: &Interrupt,
    mut f: impl FnMut(u64, f64, u32) -> bool,
) -> KernelResult<()> {
    let recs = &p.records;
    let mut overlap = Overlap::new(p);
    let mut fp = 0u64;
    let mut next_poll = SWEEP_POLL;
    let mut i = 0;
    while i < recs.len() {
        if i >= next_poll {
            intr.check()?;
            next_poll = i + SWEEP_POLL;
        }
        let key = recs[i] >> 32;
        while i < recs.len() && recs[i] >> 32 == key {
            match recs[i] as u32 as usize {
                0 => fp += 1,
                region => overlap.add(region),
            }
            i += 1;
        }
        if !f(fp, overlap.value(), key as u32) {
            break;
        }
    }
    Ok(())
}

/// The PRO curve: (FPR, PRO, threshold) at threshold +inf (the point (0, 0)) and then at every
/// distinct score from the highest down; the last point is (1, 1).
///
/// One global radix sort of all N·H·W pixels; memory 16 bytes per pixel plus the returned curve
/// (20 bytes per distinct score). Errors when shapes differ, maps hold NaN/inf, or the masks have
/// no anomalous or no normal pixel.
pub fn pro_curve(
    maps: ArrayView3<f32>,
    masks: ArrayView3<bool>,
    intr: &Interrupt,
) -> KernelResult<(Vec<f64>, Vec<f64>, Vec<f32>)> {
    let p = prepare(maps, masks, None, intr)?;
    let (n_normal, n_regions) = (p.n_normal as f64, p.n_regions as f64);
    let (mut fpr, mut pro, mut thr) = (vec![0.0], vec![0.0], vec![f32::INFINITY]);
    sweep(&p, intr, |fp, overlap, key| {
        fpr.push(fp as f64 / n_normal);
        pro.push(overlap / n_regions);
        thr.push(key_score(key));
        true
    })?;
    Ok((fpr, pro, thr))
}

/// Area under the PRO curve for FPR in [0, `fpr_limit`], divided by `fpr_limit` (so in [0, 1]).
///
/// Trapezoid rule over the curve points, PRO interpolated linearly at the limit, as the MVTec AD
/// evaluation's `trapezoid(..., x_max=limit) / limit`. Same cost as [`pro_curve`], but the curve
/// is integrated on the fly and the sweep stops at the limit.
pub fn aupro(
    maps: ArrayView3<f32>,
    masks: ArrayView3<bool>,
    fpr_limit: f64,
    intr: &Interrupt,
) -> KernelResult<f64> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(KernelError::invalid(
            "fpr_limit",
            format!("expected a value in (0, 1], got {fpr_limit}"),
        ));
    }
    let p = prepare(maps, masks, Some(fpr_limit), intr)?;
    let (n_normal, n_regions) = (p.n_normal as f64, p.n_regions as f64);
    // The first point past the limit is the first with `k` normal pixels (k > n_normal when the
    // limit is 1).
    let k = first_count_above(fpr_limit, p.n_normal);
    let mut overlap = Overlap::new(&p);
    // Trapezoids in count units: a group of tied scores with g normal pixels adds
    // (O_before + O_after)·g. Within a group normal pixels come first (payload 0 sorts first),
    // so each of them adds 2·O_before as it passes, and each defect pixel after them adds its
    // overlap increment times g. Scaled once at the end: O(1) float work per pixel.
    let (mut closed, mut group) = (0.0f64, 0.0f64); // finished groups, current group
    let (mut fp, mut group_normals, mut key) = (0u64, 0u64, u64::MAX);
    let recs = &p.records;
    for (i, &r) in recs.iter().enumerate() {
        if i % SWEEP_POLL == SWEEP_POLL - 1 {
            intr.check()?;
        }
        if r >> 32 != key {
            key = r >> 32;
            closed += group;
            (group, group_normals) = (0.0, 0);
        }
        let region = r as u32 as usize;
        if region == 0 {
            if fp + 1 == k {
                // This group is the first point past the limit: the previous point is where
                // it started. Find where it ends, then close the area at the limit.
                let (fp_prev, o_prev) = (fp - group_normals, overlap.value());
                let mut fp_end = fp_prev;
                for &q in recs[i - group_normals as usize..].iter() {
                    if q >> 32 != key {
                        break;
                    }
                    match q as u32 as usize {
                        0 => fp_end += 1,
                        region => overlap.add(region),
                    }
                }
                let (prev_f, f) = (fp_prev as f64 / n_normal, fp_end as f64 / n_normal);
                let (prev_p, r) = (o_prev / n_regions, overlap.value() / n_regions);
                let r_lim = prev_p + (r - prev_p) * (fpr_limit - prev_f) / (f - prev_f);
                let area = closed / (2.0 * n_normal * n_regions)
                    + 0.5 * (prev_p + r_lim) * (fpr_limit - prev_f);
                return Ok(area / fpr_limit);
            }
            fp += 1;
            group_normals += 1;
            group += 2.0 * overlap.value();
        } else {
            let before = overlap.value();
            overlap.add(region);
            group += (overlap.value() - before) * group_normals as f64;
        }
    }
    // No point past the limit (limit 1): the whole curve.
    Ok((closed + group) / (2.0 * n_normal * n_regions) / fpr_limit)
}

/// The summed overlap of the regions (PRO × regions) as defect pixels pass, kept as (regions
/// entirely passed, an integer) + (float sum of the partial overlaps): the integer part keeps
/// full regions exact, so perfect maps reach exactly 1 and the float part is reset to exactly
/// 0 once every region is complete.
struct Overlap<'a> {
    p: &'a Prepared,
    seen: Vec<u32>,
    complete: usize,
    partial: f64,
    value: f64,
}

impl<'a> Overlap<'a> {
    fn new(p: &'a Prepared) -> Self {
        Overlap {
            p,
            seen: vec![0; p.size.len()],
            complete: 0,
            partial: 0.0,
            value: 0.0,
        }
    }

    #[inline]
    fn add(&mut self, region: usize) {
        let p = self.p;
        self.seen[region] += 1;
        if self.seen[region] == p.size[region] {
            self.complete += 1;
            self.partial -= (p.size[region] - 1) as f64 * p.inv_size[region];
            if self.complete == p.n_regions {
                self.partial = 0.0;
            }
        } else {
            self.partial += p.inv_size[region];
        }
        self.value = (self.complete as f64 + self.partial).clamp(0.0, p.n_regions as f64);
    }

    #[inline]
    fn value(&self) -> f64 {
        self.value
    }
}

/// PRO at one threshold: the mean over all ground-truth regions of the fraction of the region's
/// pixels with score >= `threshold`.
///
/// Labels each mask (in parallel over images), no sort; normal pixels do not enter. Errors when
/// shapes differ, maps hold NaN/inf, the threshold is NaN, or there is no anomalous pixel.
pub fn pro_at_threshold(
    maps: ArrayView3<f32>,
    masks: ArrayView3<bool>,
    threshold: f32,
    intr: &Interrupt,
) -> KernelResult<f64> {
    if threshold.is_nan() {
        return Err(KernelError::invalid(
            "threshold",
            "expected a number, got NaN",
        ));
    }
    validate(&maps, &masks)?;
    ensure_finite(&maps, "maps")?;
    // (Σ over the image's regions of the overlap fraction, number of regions), per image.
    let per_image: Vec<(f64, usize)> = (0..maps.len_of(Axis(0)))
        .into_par_iter()
        .map(|i| {
            intr.check()?;
            let (lab, n) = label_components(masks.index_axis(Axis(0), i));
            let (mut hit, mut size) = (vec![0u32; n + 1], vec![0u32; n + 1]);
            for (&s, &l) in maps.index_axis(Axis(0), i).iter().zip(lab.iter()) {
                size[l as usize] += 1;
                hit[l as usize] += (s >= threshold) as u32;
            }
            let sum = (1..=n).map(|r| hit[r] as f64 / size[r] as f64).sum::<f64>();
            Ok((sum, n))
        })
        .collect::<KernelResult<_>>()?;
    let n_regions: usize = per_image.iter().map(|x| x.1).sum();
    if n_regions == 0 {
        return Err(KernelError::invalid(
            "masks",
            "need at least one anomalous (1) pixel, got none",
        ));
    }
    Ok(per_image.iter().map(|x| x.0).sum::<f64>() / n_regions as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Lcg;
    use ndarray::Array3;
    use std::sync::atomic::AtomicBool;

    /// Flood-fill labelling (8-neighbours), numbering components in raster order.
    fn naive_label(mask: &ArrayView2<bool>) -> (Array2<u32>, usize) {
        let (h, w) = mask.dim();
        let mut lab = Array2::<u32>::zeros((h, w));
        let mut n = 0;
        for r in 0..h {
            for c in 0..w {
                if mask[[r, c]] && lab[[r, c]] == 0 {
                    n += 1;
                    let mut stack = vec![(r, c)];
                    lab[[r, c]] = n;
                    while let Some((y, x)) = stack.pop() {
                        for dy in -1i64..=1 {
                            for dx in -1i64..=1 {
                                let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                                if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
                                    continue;
                                }
                                let (yy, xx) = (yy as usize, xx as usize);
                                if mask[[yy, xx]] && lab[[yy, xx]] == 0 {
                                    lab[[yy, xx]] = n;
                                    stack.push((yy, xx));
                                }
                            }
                        }
                    }
                }
            }
        }
        (lab, n as usize)
    }

    /// Random blob masks (some images without any anomaly) and maps with ties (few levels).
    fn data(b: usize, h: usize, w: usize, levels: u64, seed: u64) -> (Array3<f32>, Array3<bool>) {
        let mut g = Lcg(seed);
        let mut masks = Array3::<bool>::from_elem((b, h, w), false);
        for i in 0..b {
            if i % 3 == 2 {
                continue;
            }
            for _ in 0..(1 + g.next() % 4) {
                let (cy, cx, r) = (g.next() % h as u64, g.next() % w as u64, 1 + g.next() % 4);
                for y in 0..h {
                    for x in 0..w {
                        let (dy, dx) = (y as i64 - cy as i64, x as i64 - cx as i64);
                        if dy * dy + dx * dx <= (r * r) as i64 {
                            masks[[i, y, x]] = true;
                        }
                    }
                }
            }
        }
        let mut maps = Array3::<f32>::zeros((b, h, w));
        for ((m, &a), _) in maps.iter_mut().zip(masks.iter()).zip(0..) {
            let noise = (g.next() % levels) as f32 / levels as f32;
            *m = noise + if a { 0.3 } else { 0.0 };
        }
        (maps, masks)
    }

    /// The curve by brute force: for every distinct threshold, count each region's pixels above.
    fn naive_curve(maps: &Array3<f32>, masks: &Array3<bool>) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
        let mut regions: Vec<Vec<f32>> = vec![];
        let mut normal: Vec<f32> = vec![];
        for i in 0..maps.dim().0 {
            let (lab, n) = naive_label(&masks.index_axis(Axis(0), i));
            let mut per = vec![vec![]; n];
            for (&s, &l) in maps.index_axis(Axis(0), i).iter().zip(lab.iter()) {
                if l == 0 {
                    normal.push(s)
                } else {
                    per[l as usize - 1].push(s)
                }
            }
            regions.extend(per);
        }
        let mut thr: Vec<f32> = maps.iter().copied().collect();
        thr.sort_by(|a, b| b.total_cmp(a));
        thr.dedup();
        let (mut fpr, mut pro) = (vec![0.0], vec![0.0]);
        for &t in &thr {
            fpr.push(normal.iter().filter(|&&s| s >= t).count() as f64 / normal.len() as f64);
            let o: f64 = regions
                .iter()
                .map(|r| r.iter().filter(|&&s| s >= t).count() as f64 / r.len() as f64)
                .sum();
            pro.push(o / regions.len() as f64);
        }
        thr.insert(0, f32::INFINITY);
        (fpr, pro, thr)
    }

    /// MVTec AD's `trapezoid(x, y, x_max) / x_max`.
    fn naive_aupro(fpr: &[f64], pro: &[f64], limit: f64) -> f64 {
        let mut area = 0.0;
        for k in 1..fpr.len() {
            if fpr[k] <= limit {
                area += 0.5 * (pro[k] + pro[k - 1]) * (fpr[k] - fpr[k - 1]);
            }
        }
        if !fpr.contains(&limit) {
            let ins = fpr.iter().position(|&f| f > limit).unwrap();
            let y = pro[ins - 1]
                + (pro[ins] - pro[ins - 1]) * (limit - fpr[ins - 1]) / (fpr[ins] - fpr[ins - 1]);
            area += 0.5 * (y + pro[ins - 1]) * (limit - fpr[ins - 1]);
        }
        area / limit
    }

    #[test]
    fn labels_match_flood_fill_with_8_connectivity() {
        let mut g = Lcg(3);
        for (h, w, density) in [
            (1, 1, 50),
            (1, 17, 50),
            (13, 1, 50),
            (31, 29, 35),
            (40, 40, 55),
            (64, 48, 70),
        ] {
            let mask = Array2::from_shape_fn((h, w), |_| g.next() % 100 < density);
            let (got, n) = label_components(mask.view());
            let (want, m) = naive_label(&mask.view());
            assert_eq!(n, m);
            assert_eq!(got, want, "{h}x{w}");
            // Transposed (strided) view.
            let (got_t, n_t) = label_components(mask.t());
            assert_eq!((got_t, n_t), naive_label(&mask.t()));
        }
    }

    #[test]
    fn diagonal_neighbours_form_one_region_and_u_shapes_merge() {
        let mask = ndarray::arr2(&[
            [true, false, false],
            [false, true, false],
            [false, false, true],
        ]);
        assert_eq!(label_components(mask.view()).1, 1);
        // A U shape whose arms meet only at the bottom: provisional labels must merge.
        let u = ndarray::arr2(&[
            [true, false, true, false, true],
            [true, false, true, false, true],
            [true, true, true, true, true],
        ]);
        let (lab, n) = label_components(u.view());
        assert_eq!(n, 1);
        assert!(lab.iter().zip(u.iter()).all(|(&l, &m)| (l == 1) == m));
        let none = Array2::<bool>::from_elem((4, 4), false);
        assert_eq!(label_components(none.view()).1, 0);
    }

    #[test]
    fn pro_curve_equals_per_threshold_counting() {
        for (b, h, w, levels, seed) in [(5, 12, 10, 7, 1), (4, 16, 16, 1000, 2), (2, 9, 11, 3, 3)] {
            let (maps, masks) = data(b, h, w, levels, seed);
            let (fpr, pro, thr) =
                pro_curve(maps.view(), masks.view(), &Interrupt::never()).unwrap();
            let (f2, p2, t2) = naive_curve(&maps, &masks);
            assert_eq!(thr, t2);
            assert_eq!(fpr, f2);
            assert_eq!(pro.len(), p2.len());
            for (a, b) in pro.iter().zip(&p2) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
            assert_eq!((*fpr.last().unwrap(), *pro.last().unwrap()), (1.0, 1.0));
        }
    }

    #[test]
    fn aupro_equals_mvtec_trapezoid_over_the_naive_curve() {
        for (b, h, w, levels, seed) in [(6, 14, 12, 5, 4), (3, 20, 20, 100_000, 5)] {
            let (maps, masks) = data(b, h, w, levels, seed);
            let (f, p, _) = naive_curve(&maps, &masks);
            for limit in [0.01, 0.05, 0.3, 0.77, 1.0] {
                let got = aupro(maps.view(), masks.view(), limit, &Interrupt::never()).unwrap();
                let want = naive_aupro(&f, &p, limit);
                assert!((got - want).abs() < 1e-12, "limit {limit}: {got} vs {want}");
            }
            // A limit that falls exactly on a curve point.
            let limit = f.iter().copied().find(|&x| x > 0.1).unwrap();
            let got = aupro(maps.view(), masks.view(), limit, &Interrupt::never()).unwrap();
            assert!((got - naive_aupro(&f, &p, limit)).abs() < 1e-12);
        }
    }

    #[test]
    fn aupro_from_a_sorted_prefix_equals_the_integral_of_the_full_curve() {
        // Large enough for the bucket sort and its early cut at the FPR limit.
        let intr = Interrupt::never();
        let (maps, masks) = data(12, 40, 40, 200, 14);
        let (f, p, _) = naive_curve(&maps, &masks);
        assert_eq!(pro_curve(maps.view(), masks.view(), &intr).unwrap().0, f);
        for limit in [0.3, 0.02] {
            let got = aupro(maps.view(), masks.view(), limit, &intr).unwrap();
            assert!((got - naive_aupro(&f, &p, limit)).abs() < 1e-12);
        }
        let (maps, masks) = data(12, 40, 40, 1 << 24, 15);
        let (f, p, _) = pro_curve(maps.view(), masks.view(), &intr).unwrap();
        for limit in [1e-4, 0.05, 0.3, 0.9, 1.0] {
            let got = aupro(maps.view(), masks.view(), limit, &intr).unwrap();
            assert!(
                (got - naive_aupro(&f, &p, limit)).abs() < 1e-12,
                "limit {limit}"
            );
        }
    }

    #[test]
    fn outliers_missed_by_the_range_sample_are_still_sorted_right() {
        let intr = Interrupt::never();
        let (mut maps, masks) = data(12, 40, 40, 300, 16);
        // Pixels off the sampled rows and columns, far outside the sampled range.
        maps[[3, 1, 2]] = 1e30;
        maps[[5, 8, 9]] = -1e30;
        maps[[7, 22, 3]] = 5e3;
        let (f, p, _) = naive_curve(&maps, &masks);
        assert_eq!(pro_curve(maps.view(), masks.view(), &intr).unwrap().0, f);
        for limit in [0.001, 0.3] {
            let got = aupro(maps.view(), masks.view(), limit, &intr).unwrap();
            assert!((got - naive_aupro(&f, &p, limit)).abs() < 1e-12);
        }
        maps[[6, 3, 3]] = f32::INFINITY;
        let err = aupro(maps.view(), masks.view(), 0.3, &intr).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("maps: expected finite values, found inf"),
            "{err}"
        );
    }

    #[test]
    fn aupro_is_exact_whether_the_sampled_guess_holds_or_fails() {
        let intr = Interrupt::never();
        // 12 maps of 84×84: 12·12·12 sampled pixels, enough to guess the cut.
        let (maps, masks) = data(12, 84, 84, 150, 21);
        let (f, p, _) = naive_curve(&maps, &masks);
        for limit in [0.02, 0.3, 0.6] {
            let got = aupro(maps.view(), masks.view(), limit, &intr).unwrap();
            assert!(
                (got - naive_aupro(&f, &p, limit)).abs() < 1e-12,
                "limit {limit}"
            );
        }
        // Sampled positions (rows and columns multiple of SAMPLE_STEP) score far higher than
        // the rest: the guessed cut is too high, and the pixels below it get sorted as well.
        let mut skewed = maps.clone();
        for ((_, y, x), v) in skewed.indexed_iter_mut() {
            if y % SAMPLE_STEP == 0 && x % SAMPLE_STEP == 0 {
                *v += 10.0;
            }
        }
        let (f, p, _) = naive_curve(&skewed, &masks);
        let got = aupro(skewed.view(), masks.view(), 0.3, &intr).unwrap();
        assert!((got - naive_aupro(&f, &p, 0.3)).abs() < 1e-12);
    }

    #[test]
    fn first_count_above_is_the_first_fpr_past_the_limit() {
        for n in [1u64, 3, 10, 1000, 12_345_677] {
            for limit in [1e-9, 0.1, 0.3, 0.5, 0.7, 1.0 / 3.0, 1.0] {
                let k = first_count_above(limit, n);
                assert!(k == n + 1 || k as f64 / n as f64 > limit);
                assert!(k == 0 || (k - 1) as f64 / n as f64 <= limit);
            }
        }
    }

    #[test]
    fn perfect_and_inverted_maps_give_one_and_zero() {
        let (_, masks) = data(4, 10, 10, 2, 9);
        let perfect = masks.mapv(|m| if m { 1.0f32 } else { 0.0 });
        assert_eq!(
            aupro(perfect.view(), masks.view(), 0.3, &Interrupt::never()).unwrap(),
            1.0
        );
        let inverted = masks.mapv(|m| if m { 0.0f32 } else { 1.0 });
        assert_eq!(
            aupro(inverted.view(), masks.view(), 0.3, &Interrupt::never()).unwrap(),
            0.0
        );
    }

    #[test]
    fn strided_inputs_give_the_same_result_as_contiguous_copies() {
        let (maps, masks) = data(4, 12, 15, 50, 6);
        let mut tm = maps.clone();
        tm.swap_axes(1, 2);
        let mut tk = masks.clone();
        tk.swap_axes(1, 2);
        let (ctm, ctk) = (
            tm.as_standard_layout().to_owned(),
            tk.as_standard_layout().to_owned(),
        );
        let intr = Interrupt::never();
        assert_eq!(
            aupro(tm.view(), tk.view(), 0.3, &intr),
            aupro(ctm.view(), ctk.view(), 0.3, &intr)
        );
        let (sm, sk) = (
            maps.slice(s![..;2, .., 1..]),
            masks.slice(s![..;2, .., 1..]),
        );
        let (f, p, _) = naive_curve(&sm.to_owned(), &sk.to_owned());
        assert!((aupro(sm, sk, 0.3, &intr).unwrap() - naive_aupro(&f, &p, 0.3)).abs() < 1e-12);
    }

    #[test]
    fn pro_at_threshold_matches_the_curve_at_its_thresholds() {
        let (maps, masks) = data(5, 12, 12, 9, 8);
        let (_, pro, thr) = pro_curve(maps.view(), masks.view(), &Interrupt::never()).unwrap();
        for k in 1..thr.len() {
            let got =
                pro_at_threshold(maps.view(), masks.view(), thr[k], &Interrupt::never()).unwrap();
            assert!((got - pro[k]).abs() < 1e-12);
        }
        let above = pro_at_threshold(
            maps.view(),
            masks.view(),
            f32::INFINITY,
            &Interrupt::never(),
        )
        .unwrap();
        assert_eq!(above, 0.0);
        // Works without normal pixels too.
        let all = Array3::from_elem((1, 3, 3), true);
        let m = Array3::from_shape_fn((1, 3, 3), |(_, y, x)| (y * 3 + x) as f32);
        assert_eq!(
            pro_at_threshold(m.view(), all.view(), 4.0, &Interrupt::never()).unwrap(),
            5.0 / 9.0
        );
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (maps, masks) = data(12, 40, 40, 100_000, 10);
        let run = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| pro_curve(maps.view(), masks.view(), &Interrupt::never()).unwrap())
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_argument_named() {
        let intr = Interrupt::never();
        let (maps, masks) = data(3, 8, 8, 5, 1);
        let err = aupro(maps.view(), masks.slice(s![.., 1.., ..]), 0.3, &intr).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("masks: expected the shape of maps [3, 8, 8], got [3, 7, 8]"),
            "{err}"
        );
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            let err = aupro(maps.view(), masks.view(), bad, &intr).unwrap_err();
            assert!(err
                .to_string()
                .starts_with("fpr_limit: expected a value in (0, 1]"));
        }
        let none = Array3::from_elem((3, 8, 8), false);
        let err = pro_curve(maps.view(), none.view(), &intr).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("masks: need both normal (0) and anomalous (1) pixels"),
            "{err}"
        );
        let all = Array3::from_elem((3, 8, 8), true);
        assert!(aupro(maps.view(), all.view(), 0.3, &intr).is_err());
        assert!(pro_at_threshold(maps.view(), none.view(), 0.5, &intr).is_err());
        assert!(pro_at_threshold(maps.view(), masks.view(), f32::NAN, &intr).is_err());
        let mut nan = maps.clone();
        nan[[1, 2, 3]] = f32::NAN;
        assert!(aupro(nan.view(), masks.view(), 0.3, &intr)
            .unwrap_err()
            .to_string()
            .starts_with("maps: expected finite"));
        let empty = Array3::<f32>::zeros((0, 8, 8));
        let empty_m = Array3::<bool>::from_elem((0, 8, 8), false);
        assert!(pro_curve(empty.view(), empty_m.view(), &intr)
            .unwrap_err()
            .to_string()
            .starts_with("maps: expected a non-empty"));
    }

    #[test]
    fn a_set_interrupt_flag_stops_the_kernel() {
        let (maps, masks) = data(3, 8, 8, 5, 1);
        let flag = AtomicBool::new(true);
        let err = aupro(maps.view(), masks.view(), 0.3, &Interrupt::new(&flag)).unwrap_err();
        assert_eq!(err, KernelError::Interrupted);
    }
}
