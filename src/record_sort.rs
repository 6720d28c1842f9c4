//! The record sort behind the threshold-sweep metrics (`crate::roc`) and AUPRO (`crate::aupro`).
//!
//! Samples become 8-byte records `order key of the score << 32 | payload` (payload 0 = negative),
//! generated on the fly from the caller's inputs (a [`Records`] source) and sorted ascending, that
//! is by descending score, then payload. A two-level bucket sort: one parallel
//! most-significant-digit pass places them into up to 4096 key intervals (this pass can keep
//! only the first intervals, as AUPRO needs), then each interval is sorted in cache by a
//! counting pass on the next key bits. This is several times faster than a comparison sort of
//! millions of pixels, and no buffer of all records is ever built. The result does not depend on
//! the thread count: the records end fully sorted and every chunking depends on the data only.

use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

/// Below this many records a plain comparison sort beats the bucket passes.
const SMALL_SORT: usize = 1 << 13;

/// Records per task of the bucket pass (at least; see `chunk_len`).
const SORT_CHUNK: usize = 1 << 16;

/// At most about this many tasks (so per-task histograms stay small for huge inputs).
const MAX_CHUNKS: usize = 1 << 10;

/// Key intervals of the first bucket pass: about one per `PER_BUCKET` records, within
/// `MIN_BUCKETS..=MAX_BUCKETS` (more intervals mean more scattered write streams).
const MIN_BUCKETS: usize = 1 << 8;
const MAX_BUCKETS: usize = 1 << 12;
const PER_BUCKET: usize = 1 << 11;

/// Intervals larger than this are sorted by a parallel bucket sort of their own.
const PAR_BUCKET: usize = 1 << 17;

/// `desc_key` of the finite floats: +inf and NaNs map below, -inf and negative NaNs above.
pub(crate) const FINITE_KEYS: std::ops::Range<u32> = 0x0080_0000..0xff80_0000;

/// Order-preserving u32 key of a finite f32, in *descending* score order (the larger score gets
/// the smaller key). -0.0 and +0.0 map to the same key, as `==` (and numpy's ties) treat them.
#[inline]
pub(crate) fn desc_key(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits(); // -0.0 + 0.0 == +0.0
    let asc = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    !asc
}

/// Inverse of [`desc_key`].
#[inline]
pub(crate) fn key_score(key: u32) -> f32 {
    let asc = !key;
    let bits = if asc & 0x8000_0000 != 0 {
        asc & 0x7fff_ffff
    } else {
        !asc
    };
    f32::from_bits(bits)
}

/// Records per chunk for `n` records: at least `SORT_CHUNK`, at most about `MAX_CHUNKS` chunks.
pub(crate) fn chunk_len(n: usize) -> usize {
    SORT_CHUNK.max(n.div_ceil(MAX_CHUNKS))
}

/// A source of records for [`sort_records`], read chunk by chunk, twice (count, then place).
pub(crate) trait Records: Sync {
    /// Total number of records.
    fn len(&self) -> usize;
    fn n_chunks(&self) -> usize;
    /// Calls `sink` with batches holding every record of `chunk`, in the same order on every
    /// call. With `exact = false` (counting pass) only the key and whether the payload is 0
    /// must be right. Batches (a stack buffer of `BATCH` records, or records already in
    /// memory) keep both the producer and the consumer loops tight and vectorisable.
    fn emit(&self, chunk: usize, exact: bool, sink: impl FnMut(&[u64]));
}

/// Records per batch handed from a source to the sort.
pub(crate) const BATCH: usize = 2048;

/// Fills `out` with records `key(score) << 32 | payload(i)` and says whether a score was NaN or
/// infinite. One call per batch; written so that it vectorises.
#[inline]
pub(crate) fn fill_records(
    out: &mut [u64],
    scores: &[f32],
    payload: impl Fn(usize) -> u64,
) -> bool {
    let mut bad = false;
    for (i, (r, &s)) in out.iter_mut().zip(scores).enumerate() {
        let k = desc_key(s);
        bad |= !FINITE_KEYS.contains(&k);
        *r = ((k as u64) << 32) | payload(i);
    }
    bad
}

/// Records already in memory.
pub(crate) struct SliceRecords<'a>(pub &'a [u64]);

impl Records for SliceRecords<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn n_chunks(&self) -> usize {
        self.0.len().div_ceil(chunk_len(self.0.len()))
    }
    fn emit(&self, chunk: usize, _exact: bool, mut sink: impl FnMut(&[u64])) {
        let c = chunk_len(self.0.len());
        sink(&self.0[chunk * c..((chunk + 1) * c).min(self.0.len())]);
    }
}

/// Smallest and largest key (upper word) of `records`; `(u32::MAX, 0)` when empty.
fn key_range(records: &[u64]) -> (u32, u32) {
    records.iter().fold((u32::MAX, 0u32), |(lo, hi), &r| {
        let k = (r >> 32) as u32;
        (lo.min(k), hi.max(k))
    })
}

/// Wrapper that lets the parallel scatter write disjoint slots of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut u64);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method (not the field) so that closures capture the Sync wrapper, not the raw pointer.
    fn get(self) -> *mut u64 {
        self.0
    }
}

/// How the first pass cuts records into intervals: a guess of where the keys lie. Records outside
/// the guess go to the first or last interval, so a bad guess costs time, never correctness.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Spread {
    /// Equal intervals of the key range `lo..=hi` (exact ranges of narrow sets of records).
    Keys(u32, u32),
    /// Equal intervals of the score range `lo..=hi`: much better balanced than key intervals for
    /// real score distributions (keys spread each power of two evenly, so scores near 0 or of
    /// both signs crowd into few key intervals). Typically robust quantiles of a sample. Scores
    /// below `lo` get an interval of their own, the last one, which a prefix sort can drop
    /// whole: AUPRO passes a guess of the score where the FPR passes its limit as `lo`.
    Scores(f32, f32),
}

/// Score intervals are looked up by the key's top bits: 2^18 bins of 1/512 of a power of two
/// each (a lookup is cheaper than decoding the score for every record).
const TABLE_SHIFT: u32 = 14;

/// `Spread` resolved for `buckets` intervals; both map keys to intervals monotonically.
enum Bucketing {
    Keys {
        lo: u32,
        shift: u32,
    },
    /// `table[(key >> TABLE_SHIFT) - base]` (clamped to the table) is the interval; the last
    /// entry, for keys past the range, is the last interval.
    Table {
        base: u32,
        table: Vec<u16>,
    },
}

impl Bucketing {
    fn new(spread: Spread, buckets: usize) -> Self {
        if let Spread::Scores(lo, hi) = spread {
            let scale = (buckets - 1) as f64 / (hi as f64 - lo as f64);
            if lo.is_finite() && hi.is_finite() && hi > lo && scale.is_finite() {
                // One entry per key bin from the bin of `hi` to that of `lo`, each holding the
                // interval of the bin's highest score (monotone in the key, like the scores),
                // then the last interval for everything below.
                let (base, end) = (desc_key(hi) >> TABLE_SHIFT, desc_key(lo) >> TABLE_SHIFT);
                let mut table: Vec<u16> = (base..=end)
                    .map(|bin| {
                        let top = key_score(bin << TABLE_SHIFT) as f64;
                        let b = ((hi as f64 - top) * scale).max(0.0) as usize;
                        b.min(buckets - 2) as u16
                    })
                    .collect();
                table.push((buckets - 1) as u16);
                return Bucketing::Table { base, table };
            }
        }
        let (lo, hi) = match spread {
            Spread::Keys(lo, hi) => (lo, hi.max(lo)),
            Spread::Scores(lo, hi) => (desc_key(hi), desc_key(lo).max(desc_key(hi))),
        };
        let mut shift = 0;
        while ((hi - lo) as u64) >> shift >= buckets as u64 {
            shift += 1;
        }
        Bucketing::Keys { lo, shift }
    }
}

/// Robust range of a sample of scores: its 0.1% and 99.9% quantiles (finite values only), so
/// that a few outliers do not stretch the intervals. `None` for an empty sample.
pub(crate) fn sample_range(sample: &mut Vec<f32>) -> Option<(f32, f32)> {
    sample.retain(|v| v.is_finite());
    let m = sample.len();
    if m == 0 {
        return None;
    }
    let (a, b) = (m / 1000, m - 1 - m / 1000);
    let lo = *sample.select_nth_unstable_by(a, f32::total_cmp).1;
    let hi = *sample.select_nth_unstable_by(b, f32::total_cmp).1;
    Some((lo, hi))
}

fn source_changed() -> KernelError {
    KernelError::Numerical("internal error: sort records changed between passes".into())
}

/// The records of `src` sorted ascending as u64 (by descending score, then payload); only a
/// prefix of them when `needed_negatives` is given.
///
/// `spread` guesses where the keys lie, to cut them into intervals; records outside it are
/// placed in the first or last interval (still sorted right, only more slowly). With
/// `needed_negatives = Some(k)` the result is a prefix of the full sort, made of whole key
/// intervals, holding at least `k` records of payload 0 (or everything when there are fewer):
/// every record whose key is at most that of the k-th negative is in it, which is all a sweep
/// that stops at its k-th negative needs (AUPRO's FPR limit). Memory: the output (8 bytes per
/// kept record), 2 × (up to 4096) counters per chunk and a scratch interval per thread.
pub(crate) fn sort_records(
    src: &impl Records,
    spread: Spread,
    needed_negatives: Option<u64>,
    intr: &Interrupt,
) -> KernelResult<Vec<u64>> {
    sort_planned(
        src,
        &Plan::new(spread, src.len()),
        None,
        needed_negatives,
        intr,
    )
}

/// Per-interval counts of one chunk of records: all of them, and those of payload 0.
pub(crate) struct Hist {
    all: Vec<u32>,
    neg: Vec<u32>,
}

/// How a sort of `n` records cuts keys into intervals, fixed before any record is read, so that
/// a caller that reads its inputs anyway (AUPRO labels every mask) can count them on the way.
pub(crate) struct Plan {
    buckets: usize,
    bucketing: Bucketing,
    single_key: bool,
}

impl Plan {
    pub(crate) fn new(spread: Spread, n: usize) -> Self {
        let buckets = (n / PER_BUCKET)
            .next_power_of_two()
            .clamp(MIN_BUCKETS, MAX_BUCKETS);
        Plan {
            buckets,
            bucketing: Bucketing::new(spread, buckets),
            single_key: matches!(spread, Spread::Keys(lo, hi) if lo >= hi),
        }
    }

    pub(crate) fn empty_hist(&self) -> Hist {
        Hist {
            all: vec![0; self.buckets],
            neg: vec![0; self.buckets],
        }
    }

    /// Counts the records of `scores` into `hist` without building them (one increment per
    /// score); says whether a score was NaN or infinite. The positives among them are then
    /// named with [`Plan::count_positive`], and [`Plan::finish_counts`] completes `hist`.
    pub(crate) fn count_scores(&self, scores: &[f32], hist: &mut Hist) -> bool {
        match &self.bucketing {
            Bucketing::Keys { lo, shift } => {
                count_scores_with(keys_fn(*lo, *shift, self.buckets), scores, hist)
            }
            Bucketing::Table { base, table } => {
                count_scores_with(table_fn(*base, table), scores, hist)
            }
        }
    }

    /// Marks one score counted by [`Plan::count_scores`] as a positive (payload not 0).
    pub(crate) fn count_positive(&self, score: f32, hist: &mut Hist) {
        let r = (desc_key(score) as u64) << 32;
        let b = match &self.bucketing {
            Bucketing::Keys { lo, shift } => keys_fn(*lo, *shift, self.buckets)(r),
            Bucketing::Table { base, table } => table_fn(*base, table)(r),
        };
        hist.neg[b] += 1; // positives until `finish_counts`
    }

    /// Negatives = all − positives, once a chunk's scores and positives are counted.
    pub(crate) fn finish_counts(&self, hist: &mut Hist) {
        for (n, &a) in hist.neg.iter_mut().zip(&hist.all) {
            *n = a - *n;
        }
    }
}

fn count_scores_with(bucket: impl Fn(u64) -> usize, scores: &[f32], hist: &mut Hist) -> bool {
    let all = &mut hist.all[..];
    let mut bad = false;
    for &s in scores {
        let k = desc_key(s);
        bad |= !FINITE_KEYS.contains(&k);
        all[bucket((k as u64) << 32)] += 1;
    }
    bad
}

/// Interval functions, one monomorphic closure per kind so the loops keep their parameters in
/// registers. Larger keys (lower scores) never go to a lower interval.
fn keys_fn(lo: u32, shift: u32, buckets: usize) -> impl Fn(u64) -> usize + Copy + Send + Sync {
    move |r: u64| ((((r >> 32) as u32).saturating_sub(lo) >> shift) as usize).min(buckets - 1)
}

fn table_fn(base: u32, table: &[u16]) -> impl Fn(u64) -> usize + Copy + Send + Sync + '_ {
    let last = table.len() - 1;
    move |r: u64| {
        let bin = ((r >> (32 + TABLE_SHIFT)) as u32).saturating_sub(base) as usize;
        table[bin.min(last)] as usize
    }
}

fn count_with(bucket: impl Fn(u64) -> usize, batch: &[u64], hist: &mut Hist) {
    let (all, neg) = (&mut hist.all[..], &mut hist.neg[..]);
    for &r in batch {
        let b = bucket(r);
        all[b] += 1;
        neg[b] += (r as u32 == 0) as u32;
    }
}

/// [`sort_records`] with its plan, and optionally the counts of every chunk of `src` already
/// made with `plan.count` (the counting pass over `src` is then skipped).
pub(crate) fn sort_planned(
    src: &impl Records,
    plan: &Plan,
    hists: Option<Vec<Hist>>,
    needed_negatives: Option<u64>,
    intr: &Interrupt,
) -> KernelResult<Vec<u64>> {
    let n = src.len();
    if n <= SMALL_SORT || plan.single_key {
        let mut out = Vec::with_capacity(n);
        for c in 0..src.n_chunks() {
            src.emit(c, true, |batch| out.extend_from_slice(batch));
        }
        out.sort_unstable();
        return Ok(out);
    }
    let b = plan.buckets;
    match &plan.bucketing {
        Bucketing::Keys { lo, shift } => bucket_sort(
            src,
            b,
            keys_fn(*lo, *shift, b),
            hists,
            needed_negatives,
            intr,
        ),
        Bucketing::Table { base, table } => bucket_sort(
            src,
            b,
            table_fn(*base, table),
            hists,
            needed_negatives,
            intr,
        ),
    }
}

/// The passes of [`sort_records`] for one interval function `bucket` (monotone in the key).
fn bucket_sort(
    src: &impl Records,
    buckets: usize,
    bucket: impl Fn(u64) -> usize + Copy + Send + Sync,
    hists: Option<Vec<Hist>>,
    needed_negatives: Option<u64>,
    intr: &Interrupt,
) -> KernelResult<Vec<u64>> {
    let hists: Vec<Hist> = match hists {
        Some(h) => {
            let fits = |x: &Hist| x.all.len() == buckets && x.neg.len() == buckets;
            if h.len() != src.n_chunks() || !h.iter().all(fits) {
                return Err(source_changed());
            }
            h
        }
        // Counting pass, per chunk: records per interval, and negatives per interval.
        None => (0..src.n_chunks())
            .into_par_iter()
            .map(|c| {
                let mut hist = Hist {
                    all: vec![0; buckets],
                    neg: vec![0; buckets],
                };
                if !intr.is_set() {
                    src.emit(c, false, |batch| count_with(bucket, batch, &mut hist));
                }
                hist
            })
            .collect(),
    };
    intr.check()?;
    let mut totals = vec![0usize; buckets];
    for h in &hists {
        for (t, &c) in totals.iter_mut().zip(&h.all) {
            *t += c as usize;
        }
    }
    let mut last = buckets - 1;
    if let Some(k) = needed_negatives {
        let mut negatives = 0u64;
        for b in 0..buckets {
            negatives += hists.iter().map(|h| h.neg[b] as u64).sum::<u64>();
            if negatives >= k {
                last = b;
                break;
            }
        }
    }
    let kept: usize = totals[..=last].iter().sum();
    // Start of each (interval, chunk) run: intervals in order, chunks in order within one.
    let mut offsets = vec![vec![0usize; last + 1]; hists.len()];
    let mut pos = 0usize;
    for b in 0..=last {
        for (off, h) in offsets.iter_mut().zip(&hists) {
            off[b] = pos;
            pos += h.all[b] as usize;
        }
    }
    // The interval function is monotone in the key, so the kept intervals are exactly the
    // records with key <= max_key: a cheap test that drops the rest before any bookkeeping.
    let max_key = if bucket(u64::MAX) <= last {
        u32::MAX
    } else {
        let (mut lo, mut hi) = (0u32, u32::MAX); // bucket(lo) <= last < bucket(hi), or lo = 0
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if bucket((mid as u64) << 32) <= last {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    let first_kept = bucket(0) <= last;
    // Not zero-filled: the scatter writes every slot once (checked below before use).
    let mut out: Vec<u64> = Vec::with_capacity(kept);
    let dst = SendPtr(out.as_mut_ptr());
    let consistent = (0..src.n_chunks())
        .into_par_iter()
        .zip(offsets.into_par_iter())
        .map(|(c, mut off)| {
            let mut left: Vec<u32> = hists[c].all[..=last].to_vec();
            let mut ok = true;
            let mut buf = [0u64; BATCH];
            if !intr.is_set() && first_kept {
                src.emit(c, true, |batch| {
                    // Local slices, so the loop keeps them in registers across the raw stores.
                    let (left, off, out) = (&mut left[..], &mut off[..], dst.get());
                    for part in batch.chunks(BATCH) {
                        // Branch-free compaction of the kept records.
                        let mut n = 0;
                        for &r in part {
                            buf[n] = r;
                            n += ((r >> 32) as u32 <= max_key) as usize;
                        }
                        for &r in &buf[..n] {
                            let b = bucket(r);
                            if b > last || left[b] == 0 {
                                ok = false;
                                return;
                            }
                            left[b] -= 1;
                            // SAFETY: the (interval, chunk) runs partition 0..kept; this task
                            // owns the runs of chunk `c` and writes each at most its length.
                            unsafe { *out.add(off[b]) = r };
                            off[b] += 1;
                        }
                    }
                });
            }
            ok && (intr.is_set() || left.iter().all(|&l| l == 0))
        })
        .reduce(|| true, |a, b| a && b);
    intr.check()?;
    if !consistent {
        return Err(source_changed());
    }
    // SAFETY: every chunk wrote exactly its counted records of intervals 0..=last (`left` all
    // zero), and the (interval, chunk) runs tile 0..kept.
    unsafe { out.set_len(kept) };
    // Second level: every interval sorted in cache, in parallel.
    let mut slices: Vec<&mut [u64]> = Vec::with_capacity(last + 1);
    let mut rest = &mut out[..];
    for &t in &totals[..=last] {
        let (head, tail) = rest.split_at_mut(t);
        if t > 1 {
            slices.push(head);
        }
        rest = tail;
    }
    slices.into_par_iter().try_for_each_init(
        || (Vec::new(), Vec::new()),
        |(scratch, counts), s| sort_interval(s, scratch, counts, intr),
    )?;
    Ok(out)
}

/// Sorts one key interval: a counting pass on the next ~log2(len) key bits, then comparison
/// sorts of the (mostly single-record) sub-intervals. Huge intervals recurse in parallel.
fn sort_interval(
    s: &mut [u64],
    scratch: &mut Vec<u64>,
    counts: &mut Vec<u32>,
    intr: &Interrupt,
) -> KernelResult<()> {
    intr.check()?;
    if s.len() <= 32 {
        s.sort_unstable();
        return Ok(());
    }
    let (lo, hi) = key_range(s);
    if lo == hi {
        s.sort_unstable(); // one score: order by payload
        return Ok(());
    }
    if s.len() > PAR_BUCKET {
        let sorted = sort_records(&SliceRecords(s), Spread::Keys(lo, hi), None, intr)?;
        s.copy_from_slice(&sorted);
        return Ok(());
    }
    // About one sub-interval per record: most hold zero, one or two records.
    let bits = (usize::BITS - s.len().leading_zeros()).min(16);
    let span = (hi - lo) as u64;
    let mut shift = 0;
    while span >> shift >= 1u64 << bits {
        shift += 1;
    }
    let sub = |r: u64| (((r >> 32) as u32 - lo) >> shift) as usize;
    let nb = (span >> shift) as usize + 1;
    counts.clear();
    counts.resize(nb, 0);
    for &r in s.iter() {
        counts[sub(r)] += 1;
    }
    let mut acc = 0u32;
    for c in counts.iter_mut() {
        let v = *c;
        *c = acc; // start of sub-interval
        acc += v;
    }
    scratch.clear();
    scratch.reserve(s.len());
    let spare = &mut scratch.spare_capacity_mut()[..s.len()];
    for &r in s.iter() {
        let b = sub(r);
        spare[counts[b] as usize].write(r);
        counts[b] += 1; // ends as the end of sub-interval b
    }
    // SAFETY: the sub-interval starts are the prefix sums of their counts, so the writes above
    // filled every slot of 0..len exactly once.
    unsafe { scratch.set_len(s.len()) };
    s.copy_from_slice(scratch);
    let mut start = 0usize;
    for &end in counts.iter() {
        let end = end as usize;
        match end - start {
            0 | 1 => {}
            2..=16 => insertion_sort(&mut s[start..end]),
            _ => s[start..end].sort_unstable(),
        }
        start = end;
    }
    Ok(())
}

/// For the many tiny sub-intervals, cheaper than a general sort call.
fn insertion_sort(s: &mut [u64]) {
    for i in 1..s.len() {
        let v = s[i];
        let mut j = i;
        while j > 0 && s[j - 1] > v {
            s[j] = s[j - 1];
            j -= 1;
        }
        s[j] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Lcg;

    /// Records of skewed, tied and widely spread scores, payload 0 or 1.
    fn records(n: usize, seed: u64) -> Vec<u64> {
        let mut g = Lcg(seed);
        (0..n)
            .map(|i| {
                let s = match i % 5 {
                    0 => (g.unit() - 0.5) * 1e6,
                    1 => (g.unit() - 0.5) * 1e-30,
                    2 => (g.next() % 5) as f32,
                    3 => 0.25 + g.unit() * 1e-6,
                    _ => -(g.unit()),
                };
                ((desc_key(s) as u64) << 32) | (g.next() % 2)
            })
            .collect()
    }

    fn keys(recs: &[u64]) -> Spread {
        let (lo, hi) = key_range(recs);
        Spread::Keys(lo, hi)
    }

    #[test]
    fn bucket_sort_orders_like_a_comparison_sort() {
        for (n, seed) in [(100, 1), (SMALL_SORT + 1, 2), (300_000, 3)] {
            let recs = records(n, seed);
            let mut want = recs.clone();
            want.sort();
            let mut sample: Vec<f32> = recs.iter().map(|r| key_score((r >> 32) as u32)).collect();
            let (lo, hi) = sample_range(&mut sample).unwrap();
            for spread in [
                keys(&recs),
                Spread::Scores(lo, hi),
                Spread::Scores(-1.0, 1.0),
            ] {
                let got = sort_records(&SliceRecords(&recs), spread, None, &Interrupt::never());
                assert_eq!(got.unwrap(), want, "{spread:?}");
            }
            let scores: Vec<f32> = want.iter().map(|r| key_score((r >> 32) as u32)).collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]));
        }
        // One huge bucket: nearly all keys equal but one outlier.
        let mut recs: Vec<u64> = (0..200_000u64)
            .map(|i| ((desc_key(1.0) as u64) << 32) | (i % 7))
            .collect();
        recs[5] = (desc_key(-1e30) as u64) << 32;
        let got = sort_records(&SliceRecords(&recs), keys(&recs), None, &Interrupt::never());
        let got2 = sort_records(
            &SliceRecords(&recs),
            Spread::Scores(-1e30, 1.0),
            None,
            &Interrupt::never(),
        );
        recs.sort();
        assert_eq!(got.unwrap(), recs);
        assert_eq!(got2.unwrap(), recs);
    }

    #[test]
    fn bucket_sort_is_right_when_the_range_guess_is_wrong() {
        let recs = records(200_000, 4);
        let mut want = recs.clone();
        want.sort();
        let (lo, hi) = key_range(&recs);
        let mid = lo / 2 + hi / 2;
        for guess in [
            Spread::Keys(mid, mid + 1000),
            Spread::Keys(lo + 10, hi - 10),
            Spread::Keys(0, 5),
            Spread::Scores(0.1, 0.2),
            Spread::Scores(1e6, 2e6),
            Spread::Scores(0.5, 0.5),
            Spread::Scores(f32::NAN, 1.0),
            Spread::Scores(-f32::MAX, f32::MAX),
        ] {
            let got = sort_records(&SliceRecords(&recs), guess, None, &Interrupt::never()).unwrap();
            assert_eq!(got, want);
            let got =
                sort_records(&SliceRecords(&recs), guess, Some(1000), &Interrupt::never()).unwrap();
            assert_eq!(got[..], want[..got.len()]);
        }
    }

    #[test]
    fn bucket_sort_prefix_holds_every_record_up_to_the_kth_negative() {
        let recs = records(400_000, 9);
        let mut full = recs.clone();
        full.sort();
        for k in [1u64, 17, 5_000, 150_000] {
            let got = sort_records(
                &SliceRecords(&recs),
                keys(&recs),
                Some(k),
                &Interrupt::never(),
            )
            .unwrap();
            assert_eq!(got[..], full[..got.len()], "a prefix of the full sort");
            let kth = full
                .iter()
                .filter(|&&r| r as u32 == 0)
                .nth(k as usize - 1)
                .unwrap()
                >> 32;
            assert!(got.len() == full.len() || got.last().unwrap() >> 32 >= kth);
            assert!(
                full[got.len()..].iter().all(|&r| r >> 32 > kth),
                "nothing at or above the k-th negative left out"
            );
        }
        // More negatives asked for than exist: everything.
        let got = sort_records(
            &SliceRecords(&recs),
            keys(&recs),
            Some(u64::MAX),
            &Interrupt::never(),
        )
        .unwrap();
        assert_eq!(got, full);
    }

    #[test]
    fn key_roundtrips_and_orders_descending() {
        let vals = [
            f32::MAX,
            1e10,
            1.5,
            1.0,
            1e-40,
            0.0,
            -1e-40,
            -1.0,
            -3e38,
            f32::MIN,
        ];
        for w in vals.windows(2) {
            assert!(desc_key(w[0]) < desc_key(w[1]));
        }
        for v in vals {
            assert_eq!(key_score(desc_key(v)), v);
        }
        assert_eq!(desc_key(-0.0), desc_key(0.0));
    }
}
