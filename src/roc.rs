//! Threshold-sweep metrics of binary scores: ROC curve, AUROC, average precision and F1-max,
//! equal to scikit-learn's `roc_curve(drop_intermediate=False)`, `roc_auc_score`,
//! `average_precision_score` and the F1 of `precision_recall_curve`.
//!
//! One sort of the scores (descending), then one sweep: every distinct score value is a threshold
//! ("anomalous when score >= t"), and tied scores enter together, as in scikit-learn. Counts are
//! kept as integers, so the curve points are exact ratios and the AUROC is one rounded division.
//!
//! Samples become records `order key of the score << 32 | label`, generated on the fly from the
//! inputs and sorted by the bucket sort of `crate::record_sort` (no buffer of all records is ever
//! built). The sweep runs in parallel over group-aligned chunks with integer prefix counts.
//! Results do not depend on the thread count: the records end fully sorted (key, then label) and
//! every chunking depends on the data only.

use std::ops::Range;

use ndarray::{s, ArrayView1};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;
use crate::record_sort::{
    chunk_len, fill_records, key_score, sample_range, sort_records, Records, Spread, BATCH,
    FINITE_KEYS,
};

/// Scores sampled to guess the score range of the sort's intervals.
const SAMPLE: usize = 1 << 16;

/// Records per task of the parallel sweep (rounded up to the next group boundary).
const SWEEP_CHUNK: usize = 1 << 16;

/// Chunks of about `SWEEP_CHUNK` sorted records, each starting at a new key (a group boundary).
fn group_ranges(recs: &[u64]) -> Vec<Range<usize>> {
    let mut starts = vec![0];
    let mut pos = SWEEP_CHUNK;
    while pos < recs.len() {
        let key = recs[pos - 1] >> 32;
        while pos < recs.len() && recs[pos] >> 32 == key {
            pos += 1;
        }
        if pos < recs.len() {
            starts.push(pos);
        }
        pos += SWEEP_CHUNK;
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, &s)| s..starts.get(i + 1).copied().unwrap_or(recs.len()))
        .collect()
}

/// One threshold of the sweep: the counts of positives and negatives with score >= `threshold`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Step {
    threshold: f32,
    tp: u64,
    fp: u64,
}

/// Validated inputs sorted by descending score, and the class totals.
struct Sorted {
    records: Vec<u64>,
    positives: u64,
    negatives: u64,
}

/// What the input checks call the inputs in their messages: the scores' and the labels' argument
/// names and the unit one score is for. The metrics are the same for image scores and for the
/// flattened pixels of anomaly maps; the caller says which, so errors name its own arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputNames {
    pub scores: &'static str,
    pub labels: &'static str,
    pub unit: &'static str,
}

impl InputNames {
    /// Image-level metrics: `scores`, `labels`, one score per sample.
    pub const SAMPLES: InputNames = InputNames {
        scores: "scores",
        labels: "labels",
        unit: "samples",
    };
    /// Pixel-level metrics: `maps`, `masks`, one score per pixel.
    pub const PIXELS: InputNames = InputNames {
        scores: "maps",
        labels: "masks",
        unit: "pixels",
    };
}

fn validate(
    scores: &ArrayView1<f32>,
    labels: &ArrayView1<bool>,
    names: InputNames,
) -> KernelResult<()> {
    let InputNames {
        scores: s_name,
        labels: l_name,
        ..
    } = names;
    if scores.len() != labels.len() {
        return Err(KernelError::invalid(
            l_name,
            format!(
                "expected as many {l_name} as {s_name}, got {} {l_name} for {} {s_name}",
                labels.len(),
                scores.len()
            ),
        ));
    }
    if scores.is_empty() {
        return Err(KernelError::invalid(
            s_name,
            format!("expected a non-empty array, got 0 {s_name}"),
        ));
    }
    Ok(())
}

/// Scores and labels read as records `key << 32 | label`, in chunks of the flat index.
struct ScoreRecords<'a, 'b> {
    scores: ArrayView1<'a, f32>,
    labels: ArrayView1<'b, bool>,
    chunk: usize,
}

impl Records for ScoreRecords<'_, '_> {
    fn len(&self) -> usize {
        self.scores.len()
    }
    fn n_chunks(&self) -> usize {
        self.scores.len().div_ceil(self.chunk)
    }
    fn emit(&self, chunk: usize, _exact: bool, mut sink: impl FnMut(&[u64])) {
        let r = chunk * self.chunk..((chunk + 1) * self.chunk).min(self.scores.len());
        let (sc, lb) = (self.scores.slice(s![r.clone()]), self.labels.slice(s![r]));
        // Strided inputs are packed first (one chunk at a time).
        let (sc_own, lb_own): (Vec<f32>, Vec<bool>);
        let sc = match sc.as_slice() {
            Some(x) => x,
            None => {
                sc_own = sc.iter().copied().collect();
                &sc_own
            }
        };
        let lb = match lb.as_slice() {
            Some(x) => x,
            None => {
                lb_own = lb.iter().copied().collect();
                &lb_own
            }
        };
        let mut buf = [0u64; BATCH];
        for (s, l) in sc.chunks(BATCH).zip(lb.chunks(BATCH)) {
            let out = &mut buf[..s.len()];
            // Non-finite scores were refused before any record is read.
            fill_records(out, s, |i| l[i] as u64);
            sink(out);
        }
    }
}

fn sorted(
    scores: ArrayView1<f32>,
    labels: ArrayView1<bool>,
    names: InputNames,
) -> KernelResult<Sorted> {
    validate(&scores, &labels, names)?;
    let src = ScoreRecords {
        scores,
        labels,
        chunk: chunk_len(scores.len()),
    };
    // One pass for the class counts, the key range and finiteness (NaN and infinities have
    // keys at both ends of the u32 range).
    let (positives, key_lo, key_hi) = (0..src.n_chunks())
        .into_par_iter()
        .map(|c| {
            let (mut pos, mut lo, mut hi) = (0u64, u32::MAX, 0u32);
            src.emit(c, true, |batch| {
                for &r in batch {
                    pos += r & 1;
                    let k = (r >> 32) as u32;
                    lo = lo.min(k);
                    hi = hi.max(k);
                }
            });
            (pos, lo, hi)
        })
        .reduce(
            || (0, u32::MAX, 0),
            |a, b| (a.0 + b.0, a.1.min(b.1), a.2.max(b.2)),
        );
    if key_lo < FINITE_KEYS.start || key_hi >= FINITE_KEYS.end {
        crate::validate::ensure_finite(&scores, names.scores)?; // names the first bad value
    }
    let negatives = scores.len() as u64 - positives;
    if positives == 0 || negatives == 0 {
        return Err(KernelError::invalid(
            names.labels,
            format!(
                "need both normal (0) and anomalous (1) {}, got {negatives} normal and {positives} anomalous",
                names.unit
            ),
        ));
    }
    // Intervals from robust quantiles of an evenly strided sample of the scores.
    let stride = (scores.len() / SAMPLE).max(1);
    let mut sample: Vec<f32> = scores.iter().step_by(stride).copied().collect();
    let spread = match sample_range(&mut sample) {
        Some((lo, hi)) => Spread::Scores(lo, hi),
        None => Spread::Keys(key_lo, key_hi),
    };
    let records = sort_records(&src, spread, None, &Interrupt::never())?;
    Ok(Sorted {
        records,
        positives,
        negatives,
    })
}

/// Sweeps the distinct scores from the highest down in parallel chunks: for each chunk, `fold`
/// gets a fresh accumulator and is called with (previous step, step) at each threshold; the
/// per-chunk accumulators come back in threshold order.
fn sweep<A: Send>(
    s: &Sorted,
    init: impl Fn() -> A + Sync,
    fold: impl Fn(&mut A, Step, Step) + Sync,
) -> Vec<A> {
    let recs = &s.records;
    let ranges = group_ranges(recs);
    let tps: Vec<u64> = ranges
        .par_iter()
        .map(|r| recs[r.clone()].iter().map(|&x| x & 1).sum())
        .collect();
    let mut starts = Vec::with_capacity(ranges.len());
    let (mut tp, mut fp) = (0u64, 0u64);
    for (r, &t) in ranges.iter().zip(&tps) {
        starts.push((tp, fp));
        tp += t;
        fp += r.len() as u64 - t;
    }
    ranges
        .into_par_iter()
        .zip(starts)
        .map(|(range, (tp0, fp0))| {
            let mut acc = init();
            let mut prev = Step {
                threshold: f32::INFINITY,
                tp: tp0,
                fp: fp0,
            };
            let chunk = &recs[range];
            let mut i = 0;
            while i < chunk.len() {
                let key = chunk[i] >> 32;
                let mut cur = prev;
                while i < chunk.len() && chunk[i] >> 32 == key {
                    if chunk[i] & 1 == 1 {
                        cur.tp += 1;
                    } else {
                        cur.fp += 1;
                    }
                    i += 1;
                }
                cur.threshold = key_score(key as u32);
                fold(&mut acc, prev, cur);
                prev = cur;
            }
            acc
        })
        .collect()
}

/// Area under the ROC curve (trapezoids between distinct thresholds), as `roc_auc_score`.
///
/// O(n) memory (16 bytes per sample) and one parallel sort. The area is accumulated exactly in
/// integers (twice the area times P·N) and divided once.
pub fn auroc(scores: ArrayView1<f32>, labels: ArrayView1<bool>) -> KernelResult<f64> {
    auroc_named(scores, labels, InputNames::SAMPLES)
}

/// [`auroc`] whose errors call the inputs by `names` (pixel AUROC passes
/// [`InputNames::PIXELS`]).
pub fn auroc_named(
    scores: ArrayView1<f32>,
    labels: ArrayView1<bool>,
    names: InputNames,
) -> KernelResult<f64> {
    let s = sorted(scores, labels, names)?;
    let parts = sweep(
        &s,
        || 0u128,
        |acc, prev, cur| {
            // Trapezoid of width (fp - prev.fp) and heights prev.tp, tp (in counts).
            *acc += (cur.fp - prev.fp) as u128 * (cur.tp + prev.tp) as u128;
        },
    );
    let twice_area: u128 = parts.iter().sum();
    Ok(twice_area as f64 / (2.0 * s.positives as f64 * s.negatives as f64))
}

/// Average precision Σ (Rₖ − Rₖ₋₁)·Pₖ over distinct thresholds, as `average_precision_score`
/// (step-wise, no interpolation).
pub fn aupr(scores: ArrayView1<f32>, labels: ArrayView1<bool>) -> KernelResult<f64> {
    let s = sorted(scores, labels, InputNames::SAMPLES)?;
    let p = s.positives as f64;
    let parts = sweep(
        &s,
        || 0.0f64,
        |acc, prev, cur| {
            if cur.tp > prev.tp {
                *acc +=
                    ((cur.tp - prev.tp) as f64 / p) * (cur.tp as f64 / (cur.tp + cur.fp) as f64);
            }
        },
    );
    Ok(parts.iter().sum())
}

/// Best F1 over the thresholds "score >= t", and that threshold.
///
/// F1(t) = 2·TP / (TP + FP + P); candidates are compared exactly in integers, and among equal F1
/// the lowest threshold wins (what `argmax` over `precision_recall_curve`'s ascending thresholds,
/// and anomalib's F1Max, pick).
pub fn f1_max(scores: ArrayView1<f32>, labels: ArrayView1<bool>) -> KernelResult<(f64, f32)> {
    let s = sorted(scores, labels, InputNames::SAMPLES)?;
    let p = s.positives;
    // Best ratio tp / (tp + fp + p) as (numerator, denominator, threshold); `>=` keeps the lower
    // threshold on ties, within a chunk and across chunks (chunks come in descending threshold
    // order).
    let better = |a: (u64, u64, f32), b: (u64, u64, f32)| {
        b.0 as u128 * a.1 as u128 >= a.0 as u128 * b.1 as u128
    };
    let parts = sweep(
        &s,
        || (0u64, 1u64, f32::INFINITY),
        |best, _, cur| {
            let cand = (cur.tp, cur.tp + cur.fp + p, cur.threshold);
            if better(*best, cand) {
                *best = cand;
            }
        },
    );
    let best = parts.into_iter().fold((0u64, 1u64, f32::INFINITY), |a, b| {
        if better(a, b) {
            b
        } else {
            a
        }
    });
    Ok((2.0 * best.0 as f64 / best.1 as f64, best.2))
}

/// ROC curve: false and true positive rates at every distinct score, from the highest down,
/// after a first point (0, 0) at threshold +inf. Equal to scikit-learn's
/// `roc_curve(labels, scores, drop_intermediate=False)`.
pub fn roc_curve(
    scores: ArrayView1<f32>,
    labels: ArrayView1<bool>,
) -> KernelResult<(Vec<f64>, Vec<f64>, Vec<f32>)> {
    let s = sorted(scores, labels, InputNames::SAMPLES)?;
    let (p, n) = (s.positives as f64, s.negatives as f64);
    let parts = sweep(
        &s,
        || (vec![], vec![], vec![]),
        |(f, t, th): &mut (Vec<f64>, Vec<f64>, Vec<f32>), _, cur| {
            f.push(cur.fp as f64 / n);
            t.push(cur.tp as f64 / p);
            th.push(cur.threshold);
        },
    );
    let (mut fpr, mut tpr, mut thr) = (vec![0.0], vec![0.0], vec![f32::INFINITY]);
    for (f, t, th) in parts {
        fpr.extend(f);
        tpr.extend(t);
        thr.extend(th);
    }
    Ok((fpr, tpr, thr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Lcg;
    use ndarray::Array1;

    /// Scores with many ties (a few levels) and labels correlated with them.
    fn data(n: usize, levels: u64, seed: u64) -> (Array1<f32>, Array1<bool>) {
        let mut g = Lcg(seed);
        let scores: Array1<f32> = (0..n)
            .map(|_| (g.next() % levels) as f32 / levels as f32 * 2.0 - 1.0)
            .collect();
        let labels: Array1<bool> = scores.iter().map(|&s| g.unit() < 0.3 + 0.3 * s).collect();
        (scores, labels)
    }

    /// AUROC as the probability that a positive outscores a negative, ties counted one half.
    fn naive_auroc(s: &Array1<f32>, l: &Array1<bool>) -> f64 {
        let (mut num, mut pairs) = (0.0f64, 0.0f64);
        for i in 0..s.len() {
            for j in 0..s.len() {
                if l[i] && !l[j] {
                    pairs += 1.0;
                    num += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        num / pairs
    }

    /// (threshold, tp, fp) for every distinct score, by direct counting.
    fn naive_steps(s: &Array1<f32>, l: &Array1<bool>) -> Vec<(f32, usize, usize)> {
        let mut t: Vec<f32> = s.to_vec();
        t.sort_by(|a, b| b.total_cmp(a));
        t.dedup();
        t.iter()
            .map(|&th| {
                let tp = s.iter().zip(l).filter(|(&v, &y)| v >= th && y).count();
                let fp = s.iter().zip(l).filter(|(&v, &y)| v >= th && !y).count();
                (th, tp, fp)
            })
            .collect()
    }

    #[test]
    fn auroc_equals_pair_counting_with_ties() {
        for (n, levels, seed) in [(50, 3, 1), (300, 7, 2), (500, 1000, 3), (2, 1, 4)] {
            let (mut s, mut l) = data(n, levels, seed);
            l[0] = true;
            l[1] = false;
            if levels == 1 {
                s.fill(0.5);
            }
            let got = auroc(s.view(), l.view()).unwrap();
            assert!((got - naive_auroc(&s, &l)).abs() < 1e-12, "n={n}: {got}");
        }
    }

    #[test]
    fn auroc_is_one_half_when_all_scores_tie_and_one_when_separated() {
        let l = Array1::from(vec![true, false, true, false]);
        assert_eq!(
            auroc(Array1::from_elem(4, 1.0f32).view(), l.view()).unwrap(),
            0.5
        );
        let s = Array1::from(vec![2.0f32, 1.0, 3.0, -1.0]);
        assert_eq!(auroc(s.view(), l.view()).unwrap(), 1.0);
        assert_eq!(auroc((-&s).view(), l.view()).unwrap(), 0.0);
    }

    #[test]
    fn roc_curve_lists_every_distinct_threshold_from_plus_infinity() {
        let (s, l) = data(400, 9, 7);
        let (fpr, tpr, thr) = roc_curve(s.view(), l.view()).unwrap();
        let steps = naive_steps(&s, &l);
        let (p, n) = (
            l.iter().filter(|&&y| y).count() as f64,
            l.iter().filter(|&&y| !y).count() as f64,
        );
        assert_eq!(thr.len(), steps.len() + 1);
        assert_eq!((fpr[0], tpr[0], thr[0]), (0.0, 0.0, f32::INFINITY));
        for (k, &(th, tp, fp)) in steps.iter().enumerate() {
            assert_eq!(thr[k + 1], th);
            assert_eq!(tpr[k + 1], tp as f64 / p);
            assert_eq!(fpr[k + 1], fp as f64 / n);
        }
        assert_eq!((*fpr.last().unwrap(), *tpr.last().unwrap()), (1.0, 1.0));
    }

    #[test]
    fn aupr_is_stepwise_average_precision() {
        for (n, levels, seed) in [(60, 4, 11), (700, 50, 12), (900, 100_000, 13)] {
            let (s, l) = data(n, levels, seed);
            let p = l.iter().filter(|&&y| y).count() as f64;
            let mut prev_r = 0.0;
            let mut want = 0.0;
            for (_, tp, fp) in naive_steps(&s, &l) {
                let r = tp as f64 / p;
                want += (r - prev_r) * (tp as f64 / (tp + fp) as f64);
                prev_r = r;
            }
            let got = aupr(s.view(), l.view()).unwrap();
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // Known value: sklearn average_precision_score([0,0,1,1], [0.1,0.4,0.35,0.8]) = 0.8333...
        let s = Array1::from(vec![0.1f32, 0.4, 0.35, 0.8]);
        let l = Array1::from(vec![false, false, true, true]);
        assert!((aupr(s.view(), l.view()).unwrap() - 5.0 / 6.0).abs() < 1e-15);
    }

    #[test]
    fn f1_max_is_the_best_threshold_and_prefers_the_lowest_on_ties() {
        let (s, l) = data(800, 30, 21);
        let p = l.iter().filter(|&&y| y).count();
        let best = naive_steps(&s, &l)
            .into_iter()
            .map(|(th, tp, fp)| (2.0 * tp as f64 / (tp + fp + p) as f64, th))
            .fold((f64::MIN, 0.0f32), |b, c| if c.0 >= b.0 { c } else { b });
        let (f1, th) = f1_max(s.view(), l.view()).unwrap();
        assert!((f1 - best.0).abs() < 1e-12);
        assert_eq!(th, best.1);
        // Thresholds 3 (TP 1, FP 0: F1 2/3) and 1 (TP 2, FP 2: F1 2/3) tie: the lower one wins.
        let s = Array1::from(vec![3.0f32, 2.0, 1.0, 1.0]);
        let l = Array1::from(vec![true, false, true, false]);
        let (f1, th) = f1_max(s.view(), l.view()).unwrap();
        assert!((f1 - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(th, 1.0);
    }

    #[test]
    fn strided_inputs_and_signed_zeros_are_handled() {
        let s = Array1::from(vec![0.0f32, 9.0, -0.0, 9.0, 1.0, 9.0, -2.0, 9.0]);
        let l = Array1::from(vec![true, false, false, true, true, false, false, true]);
        let (ss, ls) = (s.slice(ndarray::s![..;2]), l.slice(ndarray::s![..;2]));
        let (owned_s, owned_l) = (ss.to_owned(), ls.to_owned());
        assert_eq!(auroc(ss, ls).unwrap(), naive_auroc(&owned_s, &owned_l));
        // 0.0 and -0.0 are one threshold.
        let (_, _, thr) = roc_curve(ss, ls).unwrap();
        assert_eq!(thr, vec![f32::INFINITY, 1.0, 0.0, -2.0]);
    }

    #[test]
    fn group_ranges_cut_only_between_distinct_scores() {
        let recs: Vec<u64> = (0..500_000u64)
            .map(|i| ((i / 70_001) << 32) | (i & 1))
            .collect();
        let ranges = group_ranges(&recs);
        assert_eq!(ranges.first().unwrap().start, 0);
        assert_eq!(ranges.last().unwrap().end, recs.len());
        for w in ranges.windows(2) {
            assert_eq!(w[0].end, w[1].start);
            assert_ne!(recs[w[1].start - 1] >> 32, recs[w[1].start] >> 32);
        }
    }

    /// Mann-Whitney AUROC with mid-ranks: an independent O(n log n) reference for large inputs.
    fn rank_auroc(s: &[f32], l: &[bool]) -> f64 {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[a].partial_cmp(&s[b]).unwrap());
        let mut rank = vec![0.0f64; s.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j < idx.len() && s[idx[j]] == s[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..j] {
                rank[k] = (i + j + 1) as f64 / 2.0;
            }
            i = j;
        }
        let p = l.iter().filter(|&&y| y).count() as f64;
        let n = s.len() as f64 - p;
        let r: f64 = (0..s.len()).filter(|&k| l[k]).map(|k| rank[k]).sum();
        (r - p * (p + 1.0) / 2.0) / (p * n)
    }

    #[test]
    fn large_inputs_swept_in_parallel_chunks_match_references_and_thread_counts() {
        let (s, l) = data(700_000, 50_000, 31);
        let got = auroc(s.view(), l.view()).unwrap();
        assert!((got - rank_auroc(s.as_slice().unwrap(), l.as_slice().unwrap())).abs() < 1e-10);
        let run = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| {
                    (
                        auroc(s.view(), l.view()).unwrap(),
                        aupr(s.view(), l.view()).unwrap(),
                        f1_max(s.view(), l.view()).unwrap(),
                        roc_curve(s.view(), l.view()).unwrap(),
                    )
                })
        };
        let (one, three) = (run(1), run(3));
        assert_eq!(one, three);
        let (fpr, tpr, thr) = &one.3;
        assert_eq!(thr.len(), {
            let mut t = s.to_vec();
            t.sort_by(|a, b| b.total_cmp(a));
            t.dedup();
            t.len() + 1
        });
        assert!(fpr.windows(2).all(|w| w[0] <= w[1]) && tpr.windows(2).all(|w| w[0] <= w[1]));
        assert!(thr.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_argument_named() {
        let s = Array1::from(vec![0.1f32, 0.2, 0.3]);
        let one_class = Array1::from(vec![true, true, true]);
        let err = auroc(s.view(), one_class.view()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("labels: need both normal (0) and anomalous (1) samples"),
            "{err}"
        );
        let short = Array1::from(vec![true, false]);
        assert!(aupr(s.view(), short.view())
            .unwrap_err()
            .to_string()
            .contains("2 labels for 3 scores"));
        let e: Array1<f32> = Array1::zeros(0);
        let el: Array1<bool> = Array1::from(vec![]);
        assert!(f1_max(e.view(), el.view())
            .unwrap_err()
            .to_string()
            .starts_with("scores: expected a non-empty"));
        let nan = Array1::from(vec![0.1f32, f32::NAN, 0.3]);
        let l = Array1::from(vec![true, false, true]);
        assert!(roc_curve(nan.view(), l.view())
            .unwrap_err()
            .to_string()
            .contains("scores: expected finite"));
    }

    #[test]
    fn auroc_named_errors_use_the_callers_names() {
        let one_class = Array1::from(vec![false, false, false]);
        let s = Array1::from(vec![0.1f32, 0.2, 0.3]);
        let err = auroc_named(s.view(), one_class.view(), InputNames::PIXELS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "masks: need both normal (0) and anomalous (1) pixels, got 3 normal and 0 anomalous"
        );
        let nan = Array1::from(vec![0.1f32, f32::NAN, 0.3]);
        let l = Array1::from(vec![true, false, true]);
        let err = auroc_named(nan.view(), l.view(), InputNames::PIXELS).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("maps: expected finite values, found NaN"));
        let err = auroc(s.view(), one_class.view()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "labels: need both normal (0) and anomalous (1) samples, got 3 normal and 0 anomalous"
        );
    }
}
