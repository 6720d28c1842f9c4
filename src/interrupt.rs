//! Cooperative cancellation: kernels poll a flag between blocks of work so a
//! Ctrl-C seen by the Python thread stops them within a fraction of a second.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{KernelError, KernelResult};

/// A view of a cancellation flag; `Interrupt::never()` for callers that do not cancel.
#[derive(Clone, Copy)]
pub struct Interrupt<'a> {
    flag: Option<&'a AtomicBool>,
}

impl<'a> Interrupt<'a> {
    pub fn never() -> Self {
        Interrupt { flag: None }
    }

    pub fn new(flag: &'a AtomicBool) -> Self {
        Interrupt { flag: Some(flag) }
    }

    pub fn is_set(&self) -> bool {
        self.flag.is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// `Err(Interrupted)` once the flag is set; call it between blocks of work.
    pub fn check(&self) -> KernelResult<()> {
        if self.is_set() {
            Err(KernelError::Interrupted)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_a_set_flag() {
        let flag = AtomicBool::new(false);
        let intr = Interrupt::new(&flag);
        assert!(intr.check().is_ok());
        flag.store(true, Ordering::Relaxed);
        assert_eq!(intr.check(), Err(KernelError::Interrupted));
        assert!(Interrupt::never().check().is_ok());
    }
}
