//! The backbone networks, in plain tch (no Python): EfficientNet-Lite and the ResNets, built from
//! a family's structural parameters and a state_dict, with forward passes that stop at the deepest
//! requested tap. `cargo test` runs them against libtorch alone; the bindings are in `crate::py`.

pub mod efficientnet_lite;
pub mod params;
pub mod resnet;

use tch::Tensor;

use anomalox::error::KernelResult;
use anomalox::interrupt::Interrupt;

/// A named intermediate output: its channels and its stride relative to the input.
pub struct Tap {
    pub name: String,
    pub channels: i64,
    pub stride: i64,
}

/// A network whose forward pass reports its taps as it reaches them.
pub trait Backbone: Send {
    /// Taps in forward order.
    fn taps(&self) -> &[Tap];

    /// Run the network on `x` (B, 3, H, W) up to and including tap `last`, calling `emit(i, t)` for
    /// every tap `i <= last` as it is reached, and stop there. Returns the last tap's output.
    fn forward(
        &self,
        x: &Tensor,
        last: usize,
        intr: &Interrupt,
        emit: &mut dyn FnMut(usize, &Tensor),
    ) -> KernelResult<Tensor>;

    /// Class scores (B, classes), or None without a classifier.
    fn logits(&self, x: &Tensor, intr: &Interrupt) -> KernelResult<Option<Tensor>>;
}

#[cfg(test)]
mod tests;
