//! ResNet-18/34/50 and Wide-ResNet-50-2 with torchvision's parameter names, tapped after each of
//! `layer1` .. `layer4`.

use tch::Tensor;

use super::params::{classify, ConvBn, Linear, Padding, StateDict};
use super::{Backbone, Tap};
use anomalox::error::KernelResult;
use anomalox::interrupt::Interrupt;

/// torchvision's batch-norm epsilon.
pub(crate) const BN_EPS: f64 = 1e-5;

/// One ResNet, with torchvision's structural parameters.
pub struct ResNetConfig {
    /// Bottleneck blocks (1x1, 3x3, 1x1; ResNet-50 and wider) instead of BasicBlocks (two 3x3).
    pub bottleneck: bool,
    /// Blocks in each of `layer1` .. `layer4`.
    pub blocks: [usize; 4],
    /// Channels of a bottleneck's 3x3 convolution per 64 output planes (torchvision's `width_per_group`).
    pub width_per_group: i64,
}

/// A folded convolution + batch norm with symmetric zero padding `pad`.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    sd: &mut StateDict,
    conv: &str,
    bn: &str,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    pad: i64,
) -> ConvBn {
    ConvBn::load(
        sd,
        conv,
        bn,
        cin,
        cout,
        k,
        stride,
        Padding::Fixed(pad),
        1,
        BN_EPS,
    )
}

/// A BasicBlock (two 3x3) or a Bottleneck (1x1, 3x3 with the stride, 1x1), with its shortcut.
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn load(
        sd: &mut StateDict,
        p: &str,
        spec: &ResNetConfig,
        cin: i64,
        planes: i64,
        stride: i64,
    ) -> (Self, i64) {
        let (convs, cout) = if spec.bottleneck {
            let width = planes * spec.width_per_group / 64;
            let cout = planes * 4;
            let convs = vec![
                conv_bn(
                    sd,
                    &format!("{p}.conv1"),
                    &format!("{p}.bn1"),
                    cin,
                    width,
                    1,
                    1,
                    0,
                ),
                conv_bn(
                    sd,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    width,
                    width,
                    3,
                    stride,
                    1,
                ),
                conv_bn(
                    sd,
                    &format!("{p}.conv3"),
                    &format!("{p}.bn3"),
                    width,
                    cout,
                    1,
                    1,
                    0,
                ),
            ];
            (convs, cout)
        } else {
            let convs = vec![
                conv_bn(
                    sd,
                    &format!("{p}.conv1"),
                    &format!("{p}.bn1"),
                    cin,
                    planes,
                    3,
                    stride,
                    1,
                ),
                conv_bn(
                    sd,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    planes,
                    planes,
                    3,
                    1,
                    1,
                ),
            ];
            (convs, planes)
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            conv_bn(
                sd,
                &format!("{p}.downsample.0"),
                &format!("{p}.downsample.1"),
                cin,
                cout,
                1,
                stride,
                0,
            )
        });
        (Block { convs, downsample }, cout)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut h = inner[0].forward_relu(x);
        for conv in &inner[1..] {
            h = conv.forward_relu(&h);
        }
        let mut out = last.forward(&h);
        drop(h);
        let _ = match &self.downsample {
            Some(down) => out.g_add_(&down.forward(x)),
            None => out.g_add_(x),
        };
        let _ = out.relu_();
        out
    }
}

pub struct ResNet {
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
    fc: Option<Linear>,
    taps: Vec<Tap>,
}

impl ResNet {
    pub fn load(spec: &ResNetConfig, sd: &mut StateDict) -> Self {
        let stem = conv_bn(sd, "conv1", "bn1", 3, 64, 7, 2, 3);
        let mut cin = 64;
        let mut layers = vec![];
        let mut taps = vec![];
        for (i, &n) in spec.blocks.iter().enumerate() {
            let planes = 64 << i;
            let stride = if i == 0 { 1 } else { 2 };
            let mut blocks = vec![];
            for b in 0..n {
                let (block, cout) = Block::load(
                    sd,
                    &format!("layer{}.{b}", i + 1),
                    spec,
                    cin,
                    planes,
                    if b == 0 { stride } else { 1 },
                );
                blocks.push(block);
                cin = cout;
            }
            layers.push(blocks);
            taps.push(Tap {
                name: format!("layer{}", i + 1),
                channels: cin,
                stride: 4 << i,
            });
        }
        let fc = sd.take_linear("fc", cin);
        ResNet {
            stem,
            layers,
            fc,
            taps,
        }
    }
}

impl Backbone for ResNet {
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
        let mut h = self
            .stem
            .forward_relu(x)
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for (i, layer) in self.layers.iter().enumerate().take(last + 1) {
            for block in layer {
                intr.check()?;
                h = block.forward(&h);
            }
            emit(i, &h);
        }
        Ok(h)
    }

    fn logits(&self, x: &Tensor, intr: &Interrupt) -> KernelResult<Option<Tensor>> {
        let Some(fc) = &self.fc else { return Ok(None) };
        let h = self.forward(x, self.taps.len() - 1, intr, &mut |_, _| {})?;
        Ok(Some(classify(&h, fc)))
    }
}
