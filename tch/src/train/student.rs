//! Trainable versions of the backbones (`crate::nets`): the same structures and parameter names,
//! held in a `tch::nn::VarStore`, with batch norm that uses the batch's statistics in training and
//! its running statistics otherwise.
//!
//! Every parameter of the whole network is created (so the store doubles as a checkpoint the
//! inference networks load), but a forward pass stops after the deepest tap asked for: layers
//! past it get no gradient and are never updated.
//!
//! Initialisation follows timm, which builds anomalib's students: convolutions
//! N(0, 2 / fan_out) with fan_out = k·k·out / groups (timm's `_init_weight_goog`; for ResNets
//! torch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, the same value), batch-norm
//! scale 1 and shift 0, and in ResNets the last batch norm of each residual block at scale 0
//! (timm's `zero_init_last`, on by default). The normal draws come from `InitRng`, seeded per
//! network, not from libtorch's generator: that one is global to the process (shared with the
//! caller's torch and any other thread), so the weights would depend on what else draws from it.

use tch::nn::{self, Init, ModuleT};
use tch::Tensor;

use crate::nets::efficientnet_lite::{
    round_filters, round_repeats, LiteConfig, BN_EPS as LITE_EPS, HEAD_CHANNELS, STAGES,
    STEM_CHANNELS,
};
use crate::nets::params::{channels_last, tf_same_padding, Padding};
use crate::nets::resnet::{ResNetConfig, BN_EPS as RESNET_EPS};
use crate::nets::Tap;
use anomalox::error::KernelResult;
use anomalox::interrupt::Interrupt;

/// The batch-norm momentum (PyTorch's convention: the weight of the new batch), torch's and
/// timm's default.
pub const BN_MOMENTUM: f64 = 0.1;

/// The random numbers of the initial weights: SplitMix64 (Steele, Lea & Flood 2014) for uniform
/// 64-bit words, Box–Muller for normals. The same seed gives the same weights on every platform.
pub struct InitRng(u64);

impl InitRng {
    pub fn new(seed: u64) -> Self {
        InitRng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): 53 random bits, offset by half a step so 0 never occurs.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` draws of U(−bound, bound) as float32.
    pub fn uniform_symmetric(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * self.uniform() - 1.0) * bound) as f32)
            .collect()
    }

    /// One draw of U(0, 1).
    pub fn unit(&mut self) -> f64 {
        self.uniform()
    }

    /// One uniform integer in 0..n (n ≥ 1).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.uniform() * n as f64) as u64).min(n - 1)
    }

    /// A uniformly random permutation of 0..n (Fisher–Yates, Durstenfeld's in-place form).
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut out: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = ((self.uniform() * (i + 1) as f64) as usize).min(i);
            out.swap(i, j);
        }
        out
    }

    /// `n` draws of N(0, std²) as float32.
    pub fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let (u1, u2) = (self.uniform(), self.uniform());
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let theta = 2.0 * std::f64::consts::PI * u2;
            out.push((r * theta.cos()) as f32);
            out.push((r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

/// Values of U(−1/√fan_in, 1/√fan_in) shaped `shape` on `p`'s device (torch's default init of
/// `Conv2d` and `Linear` weights and biases).
pub fn torch_default(rng: &mut InitRng, shape: &[i64], fan_in: i64, p: &nn::Path) -> Tensor {
    let n = shape.iter().product::<i64>() as usize;
    let values = rng.uniform_symmetric(n, 1.0 / (fan_in as f64).sqrt());
    Tensor::from_slice(&values)
        .view(shape)
        .to_device(p.device())
}

/// A convolution without bias; TensorFlow "SAME" padding is computed from each input's size.
pub struct Conv {
    weight: Tensor,
    stride: i64,
    padding: Padding,
    groups: i64,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: nn::Path,
        rng: &mut InitRng,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: Padding,
        groups: i64,
    ) -> Self {
        let fan_out = (k * k * cout / groups) as f64;
        let shape = [cout, cin / groups, k, k];
        let values = rng.normal(
            shape.iter().product::<i64>() as usize,
            (2.0 / fan_out).sqrt(),
        );
        // Stored channels-last, as the activations are: libtorch's CPU convolutions (forward and
        // backward) run faster when input and weight share that layout than with NCHW weights,
        // which they would reorder at every call.
        let weight = Tensor::from_slice(&values)
            .view(shape)
            .to_device(p.device());
        let weight = p.add("weight", channels_last(&weight), true);
        Conv {
            weight,
            stride,
            padding,
            groups,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = [self.stride, self.stride];
        match self.padding {
            Padding::Fixed(p) => {
                x.conv2d(&self.weight, None::<Tensor>, s, [p, p], [1, 1], self.groups)
            }
            Padding::TfSame => {
                let k = self.weight.size()[2];
                let size = x.size();
                let (top, bottom) = tf_same_padding(size[2], k, self.stride);
                let (left, right) = tf_same_padding(size[3], k, self.stride);
                if top == bottom && left == right {
                    x.conv2d(
                        &self.weight,
                        None::<Tensor>,
                        s,
                        [top, left],
                        [1, 1],
                        self.groups,
                    )
                } else {
                    x.constant_pad_nd([left, right, top, bottom]).conv2d(
                        &self.weight,
                        None::<Tensor>,
                        s,
                        [0, 0],
                        [1, 1],
                        self.groups,
                    )
                }
            }
        }
    }
}

/// `root` / each dot-separated part of `dotted` (a tch path component may not contain a dot).
fn at<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.clone(), |p, part| p / part)
}

/// A convolution and the batch norm after it (separate: the statistics change while training).
pub struct ConvBn {
    conv: Conv,
    bn: nn::BatchNorm,
}

/// Where a `ConvBn` lives and its structure.
pub struct ConvBnSpec<'a> {
    pub conv: &'a str,
    pub bn: &'a str,
    pub cin: i64,
    pub cout: i64,
    pub k: i64,
    pub stride: i64,
    pub padding: Padding,
    pub groups: i64,
    pub eps: f64,
    /// Batch-norm scale initialised to 0 instead of 1 (the last norm of a residual branch).
    pub zero_scale: bool,
}

impl ConvBn {
    pub fn new(root: &nn::Path, rng: &mut InitRng, s: ConvBnSpec<'_>) -> Self {
        let conv = Conv::new(
            at(root, s.conv),
            rng,
            s.cin,
            s.cout,
            s.k,
            s.stride,
            s.padding,
            s.groups,
        );
        let bn = nn::batch_norm2d(
            at(root, s.bn),
            s.cout,
            nn::BatchNormConfig {
                eps: s.eps,
                momentum: BN_MOMENTUM,
                ws_init: Init::Const(if s.zero_scale { 0.0 } else { 1.0 }),
                bs_init: Init::Const(0.0),
                ..Default::default()
            },
        );
        ConvBn { conv, bn }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(x), train)
    }
}

/// A network whose forward pass returns its taps up to a given one, in training or eval mode.
pub trait Trainable: Send {
    fn taps(&self) -> &[Tap];

    /// The outputs of taps `0..=last`, in forward order (the caller picks the ones it wants).
    fn forward_taps(
        &self,
        x: &Tensor,
        last: usize,
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Vec<Tensor>>;
}

// ------------------------------------------------------------------ EfficientNet-Lite

struct MBConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

impl MBConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        root: &nn::Path,
        rng: &mut InitRng,
        i: usize,
        k: i64,
        stride: i64,
        expansion: i64,
        cin: i64,
        cout: i64,
    ) -> Self {
        let p = root / "_blocks" / i;
        let mid = cin * expansion;
        let unit = |conv, bn, cin, cout, k, stride, groups| ConvBnSpec {
            conv,
            bn,
            cin,
            cout,
            k,
            stride,
            padding: Padding::TfSame,
            groups,
            eps: LITE_EPS,
            zero_scale: false,
        };
        let expand = (expansion != 1).then(|| {
            ConvBn::new(
                &p,
                &mut *rng,
                unit("_expand_conv", "_bn0", cin, mid, 1, 1, 1),
            )
        });
        let depthwise = ConvBn::new(
            &p,
            rng,
            unit("_depthwise_conv", "_bn1", mid, mid, k, stride, mid),
        );
        let project = ConvBn::new(&p, rng, unit("_project_conv", "_bn2", mid, cout, 1, 1, 1));
        MBConv {
            expand,
            depthwise,
            project,
            skip: stride == 1 && cin == cout,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = match &self.expand {
            Some(e) => e.forward_t(x, train).relu6(),
            None => x.shallow_clone(),
        };
        let h = self.depthwise.forward_t(&h, train).relu6();
        let out = self.project.forward_t(&h, train);
        if self.skip {
            out + x
        } else {
            out
        }
    }
}

/// EfficientNet-Lite with the parameter names of `crate::nets::efficientnet_lite` (no classifier).
pub struct LiteNet {
    stem: ConvBn,
    blocks: Vec<MBConv>,
    taps: Vec<Tap>,
}

impl LiteNet {
    pub fn new(root: &nn::Path, spec: &LiteConfig, rng: &mut InitRng) -> Self {
        let stem = ConvBn::new(
            root,
            rng,
            ConvBnSpec {
                conv: "_conv_stem",
                bn: "_bn0",
                cin: 3,
                cout: STEM_CHANNELS,
                k: 3,
                stride: 2,
                padding: Padding::TfSame,
                groups: 1,
                eps: LITE_EPS,
                zero_scale: false,
            },
        );
        let (mut blocks, mut taps) = (vec![], vec![]);
        let (mut total_stride, mut cin) = (2, STEM_CHANNELS);
        for (s, &(repeats, k, stride, expansion, _, filters_out)) in STAGES.iter().enumerate() {
            let cout = round_filters(filters_out, spec.width);
            let repeats = if s == 0 || s == STAGES.len() - 1 {
                repeats
            } else {
                round_repeats(repeats, spec.depth)
            };
            for r in 0..repeats {
                let stride = if r == 0 { stride } else { 1 };
                let i = blocks.len();
                blocks.push(MBConv::new(root, rng, i, k, stride, expansion, cin, cout));
                total_stride *= stride;
                taps.push(Tap {
                    name: format!("_blocks.{i}"),
                    channels: cout,
                    stride: total_stride,
                });
                cin = cout;
            }
        }
        // The head is never run by a tap, but the inference network loads it.
        let _head = ConvBn::new(
            root,
            rng,
            ConvBnSpec {
                conv: "_conv_head",
                bn: "_bn1",
                cin,
                cout: HEAD_CHANNELS,
                k: 1,
                stride: 1,
                padding: Padding::TfSame,
                groups: 1,
                eps: LITE_EPS,
                zero_scale: false,
            },
        );
        LiteNet { stem, blocks, taps }
    }
}

impl Trainable for LiteNet {
    fn taps(&self) -> &[Tap] {
        &self.taps
    }

    fn forward_taps(
        &self,
        x: &Tensor,
        last: usize,
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Vec<Tensor>> {
        let mut h = self.stem.forward_t(x, train).relu6();
        let mut out = Vec::with_capacity(last + 1);
        for block in self.blocks.iter().take(last + 1) {
            intr.check()?;
            h = block.forward_t(&h, train);
            out.push(h.shallow_clone());
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------ ResNet

struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        p: &nn::Path,
        rng: &mut InitRng,
        spec: &ResNetConfig,
        cin: i64,
        planes: i64,
        stride: i64,
    ) -> (Self, i64) {
        let unit = |conv, bn, cin, cout, k, stride, pad, zero_scale| ConvBnSpec {
            conv,
            bn,
            cin,
            cout,
            k,
            stride,
            padding: Padding::Fixed(pad),
            groups: 1,
            eps: RESNET_EPS,
            zero_scale,
        };
        let (convs, cout) = if spec.bottleneck {
            let width = planes * spec.width_per_group / 64;
            let cout = planes * 4;
            let convs = vec![
                ConvBn::new(p, rng, unit("conv1", "bn1", cin, width, 1, 1, 0, false)),
                ConvBn::new(
                    p,
                    rng,
                    unit("conv2", "bn2", width, width, 3, stride, 1, false),
                ),
                ConvBn::new(p, rng, unit("conv3", "bn3", width, cout, 1, 1, 0, true)),
            ];
            (convs, cout)
        } else {
            let convs = vec![
                ConvBn::new(
                    p,
                    rng,
                    unit("conv1", "bn1", cin, planes, 3, stride, 1, false),
                ),
                ConvBn::new(p, rng, unit("conv2", "bn2", planes, planes, 3, 1, 1, true)),
            ];
            (convs, planes)
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            ConvBn::new(
                p,
                rng,
                unit(
                    "downsample.0",
                    "downsample.1",
                    cin,
                    cout,
                    1,
                    stride,
                    0,
                    false,
                ),
            )
        });
        (Block { convs, downsample }, cout)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut h = x.shallow_clone();
        for conv in inner {
            h = conv.forward_t(&h, train).relu();
        }
        let out = last.forward_t(&h, train);
        let shortcut = match &self.downsample {
            Some(down) => down.forward_t(x, train),
            None => x.shallow_clone(),
        };
        (out + shortcut).relu()
    }
}

/// ResNet with torchvision's parameter names (no classifier).
pub struct ResNetNet {
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
    taps: Vec<Tap>,
}

impl ResNetNet {
    pub fn new(root: &nn::Path, spec: &ResNetConfig, rng: &mut InitRng) -> Self {
        let stem = ConvBn::new(
            root,
            rng,
            ConvBnSpec {
                conv: "conv1",
                bn: "bn1",
                cin: 3,
                cout: 64,
                k: 7,
                stride: 2,
                padding: Padding::Fixed(3),
                groups: 1,
                eps: RESNET_EPS,
                zero_scale: false,
            },
        );
        let (mut cin, mut layers, mut taps) = (64, vec![], vec![]);
        for (i, &n) in spec.blocks.iter().enumerate() {
            let planes = 64 << i;
            let stride = if i == 0 { 1 } else { 2 };
            let mut blocks = vec![];
            for b in 0..n {
                let p = root / format!("layer{}", i + 1) / b;
                let (block, cout) =
                    Block::new(&p, rng, spec, cin, planes, if b == 0 { stride } else { 1 });
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
        ResNetNet { stem, layers, taps }
    }
}

impl Trainable for ResNetNet {
    fn taps(&self) -> &[Tap] {
        &self.taps
    }

    fn forward_taps(
        &self,
        x: &Tensor,
        last: usize,
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Vec<Tensor>> {
        let mut h =
            self.stem
                .forward_t(x, train)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut out = Vec::with_capacity(last + 1);
        for layer in self.layers.iter().take(last + 1) {
            for block in layer {
                intr.check()?;
                h = block.forward_t(&h, train);
            }
            out.push(h.shallow_clone());
        }
        Ok(out)
    }
}
