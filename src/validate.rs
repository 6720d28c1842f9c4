//! Input checks shared by the kernels' entry points.

use ndarray::{ArrayView, Dimension};
use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};

/// `Err` naming `arg` and the first offending flat position if any value is NaN or infinite.
pub fn ensure_finite<D: Dimension>(x: &ArrayView<f32, D>, arg: &'static str) -> KernelResult<()> {
    const CHUNK: usize = 1 << 16;
    let bad = match x.as_slice_memory_order() {
        Some(s) => s
            .par_chunks(CHUNK)
            .enumerate()
            .filter_map(|(c, chunk)| {
                chunk
                    .iter()
                    .position(|v| !v.is_finite())
                    .map(|i| c * CHUNK + i)
            })
            .min(),
        None => x.iter().position(|v| !v.is_finite()),
    };
    match bad {
        None => Ok(()),
        Some(i) => {
            let value = match x.as_slice_memory_order() {
                Some(s) => s[i],
                None => x.iter().nth(i).copied().unwrap_or(f32::NAN),
            };
            Err(KernelError::invalid(
                arg,
                format!("expected finite values, found {value} (memory-order element {i})"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn finite_input_passes_and_nan_or_inf_is_named() {
        let mut a = Array2::<f32>::zeros((300, 400));
        assert!(ensure_finite(&a.view(), "x").is_ok());
        a[[200, 3]] = f32::INFINITY;
        let err = ensure_finite(&a.view(), "x").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("x: expected finite values, found inf"));
        a[[200, 3]] = 0.0;
        a[[5, 7]] = f32::NAN;
        assert!(ensure_finite(&a.t(), "bank")
            .unwrap_err()
            .to_string()
            .contains("NaN"));
    }
}
