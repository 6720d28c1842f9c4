//! Stitching of per-tile anomaly maps back into whole-image maps, averaging where tiles overlap.
//!
//! Each output pixel is the mean of the values of the tiles that cover it; sums are accumulated
//! in f64 in tile order, so the result does not depend on the thread count.

use ndarray::{Array3, ArrayView1, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::interrupt::Interrupt;

/// Output pixels per parallel task; a 1024×1024 map is 16 tasks.
const PIXELS_PER_TASK: usize = 1 << 16;

/// Stitch tiles (T, th, tw) at top-left `offsets` (T, 2) (row, col) into (n_images, height, width).
///
/// Tile `t` goes to image `image_index[t]` (all to image 0 when `image_index` is `None`). Every
/// tile must lie inside the output and every output pixel must be covered by at least one tile;
/// otherwise the error names `offsets` (or `image_index`) and the offending tile or pixel.
///
/// Parallel over images and blocks of output rows. Memory: the f32 output plus, per task, an f64
/// sum and a u32 count for its block of rows (at most `PIXELS_PER_TASK` pixels).
/// Cost: O(T·th·tw + n_images·height·width).
pub fn stitch(
    tiles: ArrayView3<f32>,
    offsets: ArrayView2<i64>,
    image_index: Option<ArrayView1<i64>>,
    n_images: usize,
    height: usize,
    width: usize,
    intr: &Interrupt,
) -> KernelResult<Array3<f32>> {
    let (t, th, tw) = tiles.dim();
    if t == 0 || th == 0 || tw == 0 {
        return Err(KernelError::invalid(
            "tiles",
            format!("expected a non-empty (T, th, tw) array, got shape ({t}, {th}, {tw})"),
        ));
    }
    if offsets.dim() != (t, 2) {
        let (r, c) = offsets.dim();
        return Err(KernelError::invalid(
            "offsets",
            format!("expected shape ({t}, 2) (row, col) for {t} tiles, got ({r}, {c})"),
        ));
    }
    if n_images == 0 || height == 0 || width == 0 {
        return Err(KernelError::invalid(
            "size",
            format!("expected a positive number of images, height and width, got ({n_images}, {height}, {width})"),
        ));
    }
    let map_len = height
        .checked_mul(width)
        .filter(|&n| {
            n.checked_mul(n_images)
                .is_some_and(|total| total <= isize::MAX as usize / 4)
        })
        .ok_or_else(|| {
            KernelError::invalid(
                "size",
                format!(
                    "expected an output that fits in memory, got ({n_images}, {height}, {width})"
                ),
            )
        })?;
    if let Some(idx) = image_index.as_ref().filter(|idx| idx.len() != t) {
        return Err(KernelError::invalid(
            "image_index",
            format!("expected {t} entries, one per tile, got {}", idx.len()),
        ));
    }

    // Tiles of each image, in tile order, with their top-left corners as usize.
    let mut per_image: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); n_images];
    for (i, off) in offsets.axis_iter(Axis(0)).enumerate() {
        let (row, col) = (off[0], off[1]);
        let fits = |o: i64, extent: usize, limit: usize| {
            usize::try_from(o)
                .ok()
                .filter(|&o| o.checked_add(extent).is_some_and(|end| end <= limit))
        };
        let (Some(r), Some(c)) = (fits(row, th, height), fits(col, tw, width)) else {
            return Err(KernelError::invalid(
                "offsets",
                format!(
                    "expected tiles of size ({th}, {tw}) inside the ({height}, {width}) output, \
                     got offset ({row}, {col}) for tile {i}"
                ),
            ));
        };
        let k = image_index.as_ref().map_or(0, |idx| idx[i]);
        let image = usize::try_from(k)
            .ok()
            .filter(|&k| k < n_images)
            .ok_or_else(|| {
                KernelError::invalid(
                    "image_index",
                    format!("expected image indices in [0, {n_images}), got {k} for tile {i}"),
                )
            })?;
        per_image[image].push((i, r, c));
    }
    intr.check()?;

    let rows_per_task = (PIXELS_PER_TASK / width).clamp(1, height);
    let mut out = vec![0f32; n_images * map_len];
    // Each block reports the flat index of its first uncovered pixel, if any.
    let uncovered = out
        .par_chunks_mut(map_len)
        .zip(per_image.par_iter())
        .enumerate()
        .flat_map(|(image, (dst, placed))| {
            dst.par_chunks_mut(rows_per_task * width)
                .enumerate()
                .map(move |(block, rows)| {
                    intr.check()?;
                    let first_row = block * rows_per_task;
                    let gap = stitch_rows(tiles, placed, first_row, width, rows);
                    Ok(gap.map(|p| image * map_len + first_row * width + p))
                })
        })
        .collect::<KernelResult<Vec<Option<usize>>>>()?
        .into_iter()
        .flatten()
        .min();
    if let Some(p) = uncovered {
        let (image, pixel) = (p / map_len, p % map_len);
        let (row, col) = (pixel / width, pixel % width);
        return Err(KernelError::invalid(
            "offsets",
            format!(
                "expected tiles covering every output pixel, got none covering pixel \
                 (row {row}, col {col}) of image {image}"
            ),
        ));
    }
    Array3::from_shape_vec((n_images, height, width), out)
        .map_err(|e| KernelError::Numerical(format!("stitch: output shape error: {e}")))
}

/// Average the tiles in `placed` over the output rows `first_row..` held in `dst` (whole rows of
/// `width`); the offset within `dst` of the first pixel no tile covers, if any.
fn stitch_rows(
    tiles: ArrayView3<f32>,
    placed: &[(usize, usize, usize)],
    first_row: usize,
    width: usize,
    dst: &mut [f32],
) -> Option<usize> {
    let n_rows = dst.len() / width;
    let end_row = first_row + n_rows;
    let (th, tw) = (tiles.dim().1, tiles.dim().2);
    let mut sum = vec![0f64; dst.len()];
    let mut count = vec![0u32; dst.len()];
    for &(t, r0, c0) in placed {
        let (lo, hi) = (r0.max(first_row), (r0 + th).min(end_row));
        if lo >= hi {
            continue;
        }
        let tile = tiles.index_axis(Axis(0), t);
        for r in lo..hi {
            let start = (r - first_row) * width + c0;
            let sums = &mut sum[start..start + tw];
            let counts = &mut count[start..start + tw];
            for ((s, n), &v) in sums.iter_mut().zip(counts.iter_mut()).zip(tile.row(r - r0)) {
                *s += f64::from(v);
                *n += 1;
            }
        }
    }
    let mut gap = None;
    for (i, ((d, &s), &n)) in dst.iter_mut().zip(&sum).zip(&count).enumerate() {
        if n == 0 {
            gap.get_or_insert(i);
        } else {
            *d = (s / f64::from(n)) as f32;
        }
    }
    gap
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array1, Array2};
    use std::sync::atomic::AtomicBool;

    /// The definition: sum and count per pixel over all tiles, then divide.
    fn naive(
        tiles: &Array3<f32>,
        offsets: &Array2<i64>,
        image_index: Option<&Array1<i64>>,
        n: usize,
        h: usize,
        w: usize,
    ) -> Array3<f32> {
        let mut sum = Array3::<f64>::zeros((n, h, w));
        let mut count = Array3::<f64>::zeros((n, h, w));
        let (t, th, tw) = tiles.dim();
        for k in 0..t {
            let img = image_index.map_or(0, |idx| idx[k] as usize);
            let (r0, c0) = (offsets[[k, 0]] as usize, offsets[[k, 1]] as usize);
            for i in 0..th {
                for j in 0..tw {
                    sum[[img, r0 + i, c0 + j]] += f64::from(tiles[[k, i, j]]);
                    count[[img, r0 + i, c0 + j]] += 1.0;
                }
            }
        }
        (sum / count).mapv(|v| v as f32)
    }

    fn values(t: usize, th: usize, tw: usize, seed: u32) -> Array3<f32> {
        Array3::from_shape_fn((t, th, tw), |(a, b, c)| {
            let x = (a * 7919 + b * 104_729 + c * 1_299_709) as u32 ^ seed;
            (x.wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32 * 4.0 - 1.0
        })
    }

    fn offsets_of(pairs: &[(i64, i64)]) -> Array2<i64> {
        Array2::from_shape_fn((pairs.len(), 2), |(i, j)| {
            if j == 0 {
                pairs[i].0
            } else {
                pairs[i].1
            }
        })
    }

    fn run(
        tiles: ArrayView3<f32>,
        offsets: &Array2<i64>,
        idx: Option<&Array1<i64>>,
        n: usize,
        h: usize,
        w: usize,
    ) -> KernelResult<Array3<f32>> {
        stitch(
            tiles,
            offsets.view(),
            idx.map(|a| a.view()),
            n,
            h,
            w,
            &Interrupt::never(),
        )
    }

    #[test]
    fn uneven_overlaps_match_the_naive_mean() {
        // 3 columns of tiles over width 10 with tile width 4: overlaps of 1 and 2 pixels.
        // Rows at 0, 3 and 4 over height 8: overlaps of 1 and 3 rows.
        let pairs = [
            (0, 0),
            (0, 3),
            (0, 6),
            (3, 0),
            (3, 3),
            (3, 6),
            (4, 0),
            (4, 3),
            (4, 6),
        ];
        let off = offsets_of(&pairs);
        let tiles = values(pairs.len(), 4, 4, 1);
        let got = run(tiles.view(), &off, None, 1, 8, 10).unwrap();
        assert_eq!(got, naive(&tiles, &off, None, 1, 8, 10));
    }

    #[test]
    fn a_single_tile_covering_the_output_is_copied() {
        let tiles = values(1, 5, 7, 2);
        let got = run(tiles.view(), &offsets_of(&[(0, 0)]), None, 1, 5, 7).unwrap();
        assert_eq!(got, tiles);
    }

    #[test]
    fn tiles_flush_with_the_border_and_several_images() {
        let pairs = [
            (0, 0),
            (0, 2),
            (1, 0),
            (1, 2),
            (0, 0),
            (1, 2),
            (0, 2),
            (1, 0),
        ];
        let idx = Array1::from(vec![0, 0, 0, 0, 1, 1, 1, 1]);
        let off = offsets_of(&pairs);
        let tiles = values(pairs.len(), 3, 4, 3);
        let got = run(tiles.view(), &off, Some(&idx), 2, 4, 6).unwrap();
        assert_eq!(got, naive(&tiles, &off, Some(&idx), 2, 4, 6));
    }

    #[test]
    fn strided_and_transposed_tiles_give_the_same_result_as_contiguous_copies() {
        let pairs = [(0, 0), (0, 5), (4, 0), (4, 5)];
        let off = offsets_of(&pairs);
        let wide = values(4, 6, 12, 4);
        let strided = wide.slice(s![.., .., ..;2]);
        let transposed = values(4, 6, 6, 5).permuted_axes([0, 2, 1]);
        for view in [strided, transposed.view()] {
            let got = run(view, &off, None, 1, 10, 11).unwrap();
            assert_eq!(
                got,
                run(view.to_owned().view(), &off, None, 1, 10, 11).unwrap()
            );
            assert_eq!(got, naive(&view.to_owned(), &off, None, 1, 10, 11));
        }
    }

    #[test]
    fn large_outputs_split_by_rows_match_the_naive_mean() {
        // 300 rows of 400 pixels is several row blocks; tiles straddle block borders.
        let mut pairs = Vec::new();
        for r in (0..=236).step_by(59) {
            for c in (0..=336).step_by(48) {
                pairs.push((r, c));
            }
        }
        pairs.push((236, 336));
        let off = offsets_of(&pairs);
        let tiles = values(pairs.len(), 64, 64, 6);
        let got = run(tiles.view(), &off, None, 1, 300, 400).unwrap();
        assert_eq!(got, naive(&tiles, &off, None, 1, 300, 400));
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let pairs: Vec<(i64, i64)> = (0..40).map(|k| ((k % 5) * 37, (k / 5) * 41)).collect();
        let off = offsets_of(&pairs);
        let tiles = values(pairs.len(), 96, 80, 7);
        let results: Vec<Array3<f32>> = [1, 3, 8]
            .iter()
            .map(|&n| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap();
                pool.install(|| run(tiles.view(), &off, None, 1, 244, 367).unwrap())
            })
            .collect();
        assert_eq!(results[0], naive(&tiles, &off, None, 1, 244, 367));
        assert!(results.iter().all(|r| r == &results[0]));
    }

    #[test]
    fn uncovered_pixels_are_reported_naming_offsets() {
        let tiles = values(2, 3, 3, 8);
        let err = run(tiles.view(), &offsets_of(&[(0, 0), (0, 4)]), None, 1, 3, 7).unwrap_err();
        assert_eq!(
            err.to_string(),
            "offsets: expected tiles covering every output pixel, got none covering pixel \
             (row 0, col 3) of image 0"
        );
        // An image with no tile at all.
        let idx = Array1::from(vec![0, 0]);
        let err = run(
            tiles.view(),
            &offsets_of(&[(0, 0), (0, 0)]),
            Some(&idx),
            2,
            3,
            3,
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("(row 0, col 0) of image 1"));
    }

    #[test]
    fn bad_arguments_are_rejected_with_their_names() {
        let tiles = values(2, 3, 3, 9);
        let off = offsets_of(&[(0, 0), (0, 1)]);
        let msg = |r: KernelResult<Array3<f32>>| r.unwrap_err().to_string();
        assert!(
            msg(run(tiles.view(), &offsets_of(&[(0, 0)]), None, 1, 3, 4))
                .starts_with("offsets: expected shape (2, 2)")
        );
        assert!(msg(run(tiles.view(), &offsets_of(&[(0, 0), (0, 2)]), None, 1, 3, 4))
            .starts_with("offsets: expected tiles of size (3, 3) inside the (3, 4) output, got offset (0, 2) for tile 1"));
        assert!(msg(run(
            tiles.view(),
            &offsets_of(&[(-1, 0), (0, 1)]),
            None,
            1,
            3,
            4
        ))
        .contains("got offset (-1, 0) for tile 0"));
        assert!(msg(run(tiles.view(), &off, None, 1, 0, 4)).starts_with("size:"));
        let idx = Array1::from(vec![0, 2]);
        assert!(msg(run(tiles.view(), &off, Some(&idx), 2, 3, 4))
            .starts_with("image_index: expected image indices in [0, 2), got 2 for tile 1"));
        let short = Array1::from(vec![0]);
        assert!(msg(run(tiles.view(), &off, Some(&short), 1, 3, 4))
            .starts_with("image_index: expected 2 entries"));
        let empty = Array3::<f32>::zeros((0, 3, 3));
        let none = Array2::<i64>::zeros((0, 2));
        assert!(msg(run(empty.view(), &none, None, 1, 3, 4)).starts_with("tiles:"));
    }

    #[test]
    fn a_set_interrupt_flag_stops_the_kernel() {
        let flag = AtomicBool::new(true);
        let tiles = values(1, 4, 4, 10);
        let err = stitch(
            tiles.view(),
            offsets_of(&[(0, 0)]).view(),
            None,
            1,
            4,
            4,
            &Interrupt::new(&flag),
        )
        .unwrap_err();
        assert_eq!(err, KernelError::Interrupted);
    }
}
