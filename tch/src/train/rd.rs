//! Reverse Distillation (Deng & Li, CVPR 2022, "Anomaly Detection via Reverse Distillation from
//! One-Class Embedding"): the trainable one-class bottleneck embedding (OCBE) and the decoder that
//! mirrors the frozen encoder, the loss they are trained on and the anomaly map.
//!
//! The model never sees images: its input is the frozen encoder's three taps (strides s, 2s, 4s;
//! channels c0, c1, c2), and it is trained to give them back.
//!
//! - OCBE (multi-scale feature fusion + one-class embedding): tap 0 through two 3×3 stride-2
//!   convolutions (c0 → c1 → c2), tap 1 through one (c1 → c2), each with batch norm and ReLU;
//!   the two and tap 2 are concatenated (3·c2 channels at stride 4s) and go through residual
//!   blocks of the encoder's kind, the first with stride 2 and a 1×1 stride-2 projection, to the
//!   embedding: 2·c2 channels at stride 8s.
//! - Decoder: three stages, each doubling the resolution with a residual block whose 3×3
//!   convolution (BasicBlock) or middle convolution (Bottleneck) is a 2×2 stride-2 transposed
//!   convolution, and whose shortcut is a 2×2 stride-2 transposed convolution with batch norm,
//!   followed by plain blocks: 2·c2 → c2 → c1 → c0 channels, giving tensors of the taps' shapes.
//!   Where a tap's size is odd the upsampled tensor is one row or column larger; it is cropped
//!   to the tap's size after the stage's first block.
//!
//! ResNets (taps `layer1`–`layer3`): exactly anomalib's `get_bottleneck_layer` (BasicBlock × 2
//! for ResNet-18/34, Bottleneck × 3 with width_per_group 64 otherwise) and `de_resnet*` (stage
//! k has as many blocks as the encoder's `layer{k+1}`; Bottleneck width_per_group as the encoder,
//! 128 for Wide-ResNet-50-2), with the same parameter names under `bottleneck.` and `decoder.`.
//! anomalib's OCBE also creates `conv4` / `bn4`, which its forward pass never uses; they are left
//! out here.
//!
//! EfficientNet-Lite (the paper has no Lite decoder; this design is anomalox's own): the same
//! OCBE and decoder with BasicBlocks (two in the OCBE, two per decoder stage, as ResNet-18) at the
//! Lite taps' channels, e.g. Lite0's `_blocks.2` / `_blocks.4` / `_blocks.10` (24 / 40 / 112
//! channels at strides 4 / 8 / 16): a 224-channel embedding at stride 32 and decoder stages
//! 224 → 112 → 40 → 24. Residual blocks rather than inverted residuals: the decoder only has to
//! reproduce features, and plain 3×3 blocks do that at these channel counts cheaply.
//!
//! Initialisation: every convolution, transposed ones included, N(0, 2 / fan_out) with fan_out
//! = out·k·k (the outputs each input value reaches), batch-norm scale 1 and shift 0 (anomalib:
//! `kaiming_normal_(mode="fan_out")` on the convolutions; its transposed convolutions keep
//! torch's default uniform init, which is not seedable apart from torch's global generator).
//!
//! Loss (the paper's eq. (2), anomalib's `ReverseDistillationLoss`): Σ_k mean over the batch of
//! 1 − cos(vec(e_k), vec(d_k)), the cosine similarity of each image's whole flattened (C·h·w)
//! encoder and decoder features at tap k. Map (eq. (3)–(4)): per tap 1 − cos(e_k, d_k) along
//! the channels at each position, bilinear upsampling to the image size (align_corners true, as
//! anomalib), summed over the taps (`Combine::Product` multiplies). The Gaussian smoothing
//! (σ = 4) is the caller's.

use tch::nn::{self, Init, ModuleT};
use tch::{Kind, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;

use super::stfpm::Combine;
use super::student::{ConvBn, ConvBnSpec, InitRng, BN_MOMENTUM};
use super::Objective;
use crate::nets::efficientnet_lite::{round_filters, round_repeats, LiteConfig, STAGES};
use crate::nets::params::{channels_last, Padding};
use crate::nets::resnet::ResNetConfig;
use crate::nets::Tap;

/// Batch-norm epsilon of the OCBE and decoder (torch's default, as anomalib).
pub const BN_EPS: f64 = 1e-5;
/// The cosine similarity's epsilon (torch's default).
const COS_EPS: f64 = 1e-8;

/// The taps of an EfficientNet-Lite (`_blocks.i`), with their channels and strides.
pub fn lite_taps(spec: &LiteConfig) -> Vec<Tap> {
    let mut taps = vec![];
    let mut total_stride = 2;
    for (s, &(repeats, _, stride, _, _, filters_out)) in STAGES.iter().enumerate() {
        let cout = round_filters(filters_out, spec.width);
        let repeats = if s == 0 || s == STAGES.len() - 1 {
            repeats
        } else {
            round_repeats(repeats, spec.depth)
        };
        for r in 0..repeats {
            total_stride *= if r == 0 { stride } else { 1 };
            taps.push(Tap {
                name: format!("_blocks.{}", taps.len()),
                channels: cout,
                stride: total_stride,
            });
        }
    }
    taps
}

/// The taps of a ResNet (`layer1` .. `layer4`).
pub fn resnet_taps(spec: &ResNetConfig) -> Vec<Tap> {
    let expansion = if spec.bottleneck { 4 } else { 1 };
    (0..4)
        .map(|i| Tap {
            name: format!("layer{}", i + 1),
            channels: (64 << i) * expansion,
            stride: 4 << i,
        })
        .collect()
}

/// The residual block of the OCBE and the decoder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BlockKind {
    /// Two 3×3 convolutions (expansion 1).
    Basic,
    /// 1×1, 3×3, 1×1 with the middle width planes · width_per_group / 64 (expansion 4).
    Bottleneck { width_per_group: i64 },
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck { .. } => 4,
        }
    }
}

/// The structure of an OCBE and decoder for three encoder taps.
#[derive(Clone, Debug, PartialEq)]
pub struct RdSpec {
    /// The taps' channels (c0, c1, c2).
    pub channels: [i64; 3],
    pub ocbe_kind: BlockKind,
    pub ocbe_blocks: usize,
    pub decoder_kind: BlockKind,
    /// Blocks of the decoder stages, deepest (stride 4s) first.
    pub decoder_blocks: [usize; 3],
}

fn three_taps(taps: &[&Tap]) -> KernelResult<[i64; 3]> {
    let ok = taps.len() == 3
        && taps[1].stride == 2 * taps[0].stride
        && taps[2].stride == 2 * taps[1].stride;
    if !ok {
        let got: Vec<(&str, i64)> = taps.iter().map(|t| (t.name.as_str(), t.stride)).collect();
        return Err(KernelError::invalid(
            "layers",
            format!(
                "expected three taps at strides s, 2s, 4s (shallowest first), got (name, stride) {got:?}"
            ),
        ));
    }
    Ok([taps[0].channels, taps[1].channels, taps[2].channels])
}

impl RdSpec {
    /// anomalib's OCBE and `de_resnet*` for taps of ResNet `spec`.
    pub fn resnet(spec: &ResNetConfig, taps: &[&Tap]) -> KernelResult<Self> {
        let channels = three_taps(taps)?;
        let (ocbe_kind, ocbe_blocks, decoder_kind) = if spec.bottleneck {
            (
                BlockKind::Bottleneck {
                    width_per_group: 64,
                },
                3,
                BlockKind::Bottleneck {
                    width_per_group: spec.width_per_group,
                },
            )
        } else {
            (BlockKind::Basic, 2, BlockKind::Basic)
        };
        Ok(RdSpec {
            channels,
            ocbe_kind,
            ocbe_blocks,
            decoder_kind,
            decoder_blocks: [spec.blocks[0], spec.blocks[1], spec.blocks[2]],
        })
    }

    /// anomalox's design for EfficientNet-Lite taps (see the module docs).
    pub fn lite(taps: &[&Tap]) -> KernelResult<Self> {
        Ok(RdSpec {
            channels: three_taps(taps)?,
            ocbe_kind: BlockKind::Basic,
            ocbe_blocks: 2,
            decoder_kind: BlockKind::Basic,
            decoder_blocks: [2, 2, 2],
        })
    }
}

// ------------------------------------------------------------------ layers

/// `root` / each dot-separated part of `dotted`.
fn at<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.clone(), |p, part| p / part)
}

fn batch_norm(p: nn::Path, channels: i64) -> nn::BatchNorm {
    nn::batch_norm2d(
        p,
        channels,
        nn::BatchNormConfig {
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
            ws_init: Init::Const(1.0),
            bs_init: Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// A transposed convolution without bias (weight (cin, cout, k, k), no padding), initialised
/// N(0, 2 / fan_out) with fan_out = cout·k·k from `InitRng`.
pub struct ConvTranspose {
    weight: Tensor,
    stride: i64,
}

impl ConvTranspose {
    pub fn new(p: nn::Path, rng: &mut InitRng, cin: i64, cout: i64, k: i64, stride: i64) -> Self {
        let fan_out = (k * k * cout) as f64;
        let shape = [cin, cout, k, k];
        let values = rng.normal(
            shape.iter().product::<i64>() as usize,
            (2.0 / fan_out).sqrt(),
        );
        // Channels-last as the activations (see `Conv`): mixed layouts make libtorch reorder the
        // weight at every forward and backward call.
        let weight = Tensor::from_slice(&values)
            .view(shape)
            .to_device(p.device());
        let weight = p.add("weight", channels_last(&weight), true);
        ConvTranspose { weight, stride }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            [0, 0],
            [0, 0],
            1,
            [1, 1],
        )
    }
}

/// A convolution or a 2×2 stride-2 transposed convolution, then batch norm.
enum Unit {
    Conv(ConvBn),
    Up(ConvTranspose, nn::BatchNorm),
}

impl Unit {
    #[allow(clippy::too_many_arguments)]
    fn conv(
        root: &nn::Path,
        rng: &mut InitRng,
        conv: &str,
        bn: &str,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
    ) -> Self {
        Unit::Conv(ConvBn::new(
            root,
            rng,
            ConvBnSpec {
                conv,
                bn,
                cin,
                cout,
                k,
                stride,
                padding: Padding::Fixed(k / 2),
                groups: 1,
                eps: BN_EPS,
                zero_scale: false,
            },
        ))
    }

    fn up(root: &nn::Path, rng: &mut InitRng, conv: &str, bn: &str, cin: i64, cout: i64) -> Self {
        let t = ConvTranspose::new(at(root, conv), rng, cin, cout, 2, 2);
        Unit::Up(t, batch_norm(at(root, bn), cout))
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Unit::Conv(c) => c.forward_t(x, train),
            Unit::Up(t, bn) => bn.forward_t(&t.forward(x), train),
        }
    }
}

/// A residual block: units with ReLU between them, plus the shortcut, then ReLU.
struct Block {
    units: Vec<Unit>,
    shortcut: Option<Unit>,
}

impl Block {
    /// torchvision's BasicBlock / Bottleneck (stride on the 3×3 convolution), `cin` → planes·e.
    fn encoder(
        p: &nn::Path,
        rng: &mut InitRng,
        kind: BlockKind,
        cin: i64,
        planes: i64,
        stride: i64,
    ) -> Self {
        let cout = planes * kind.expansion();
        let units = match kind {
            BlockKind::Basic => vec![
                Unit::conv(p, rng, "conv1", "bn1", cin, planes, 3, stride),
                Unit::conv(p, rng, "conv2", "bn2", planes, planes, 3, 1),
            ],
            BlockKind::Bottleneck { width_per_group } => {
                let width = planes * width_per_group / 64;
                vec![
                    Unit::conv(p, rng, "conv1", "bn1", cin, width, 1, 1),
                    Unit::conv(p, rng, "conv2", "bn2", width, width, 3, stride),
                    Unit::conv(p, rng, "conv3", "bn3", width, cout, 1, 1),
                ]
            }
        };
        let shortcut = (stride != 1 || cin != cout)
            .then(|| Unit::conv(p, rng, "downsample.0", "downsample.1", cin, cout, 1, stride));
        Block { units, shortcut }
    }

    /// anomalib's DecoderBasicBlock / DecoderBottleneck: with `up`, the 3×3 convolution becomes
    /// a 2×2 stride-2 transposed convolution and the shortcut a transposed one with batch norm.
    fn decoder(
        p: &nn::Path,
        rng: &mut InitRng,
        kind: BlockKind,
        cin: i64,
        planes: i64,
        up: bool,
    ) -> Self {
        let cout = planes * kind.expansion();
        let units = match kind {
            BlockKind::Basic => vec![
                if up {
                    Unit::up(p, rng, "conv1", "bn1", cin, planes)
                } else {
                    Unit::conv(p, rng, "conv1", "bn1", cin, planes, 3, 1)
                },
                Unit::conv(p, rng, "conv2", "bn2", planes, planes, 3, 1),
            ],
            BlockKind::Bottleneck { width_per_group } => {
                let width = planes * width_per_group / 64;
                vec![
                    Unit::conv(p, rng, "conv1", "bn1", cin, width, 1, 1),
                    if up {
                        Unit::up(p, rng, "conv2", "bn2", width, width)
                    } else {
                        Unit::conv(p, rng, "conv2", "bn2", width, width, 3, 1)
                    },
                    Unit::conv(p, rng, "conv3", "bn3", width, cout, 1, 1),
                ]
            }
        };
        let shortcut = if up {
            Some(Unit::up(p, rng, "upsample.0", "upsample.1", cin, cout))
        } else if cin != cout {
            Some(Unit::conv(
                p,
                rng,
                "upsample.0",
                "upsample.1",
                cin,
                cout,
                1,
                1,
            ))
        } else {
            None
        };
        Block { units, shortcut }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let (last, inner) = self.units.split_last().expect("a block has units");
        let mut h = x.shallow_clone();
        for unit in inner {
            h = unit.forward_t(&h, train).relu();
        }
        let out = last.forward_t(&h, train);
        let shortcut = match &self.shortcut {
            Some(s) => s.forward_t(x, train),
            None => x.shallow_clone(),
        };
        (out + shortcut).relu()
    }
}

// ------------------------------------------------------------------ OCBE and decoder

/// The one-class bottleneck embedding: multi-scale fusion, then the residual blocks.
struct Ocbe {
    conv1: Unit,
    conv2: Unit,
    conv3: Unit,
    layer: Vec<Block>,
}

impl Ocbe {
    fn new(root: &nn::Path, rng: &mut InitRng, spec: &RdSpec) -> Self {
        let [c0, c1, c2] = spec.channels;
        let conv1 = Unit::conv(root, rng, "conv1", "bn1", c0, c1, 3, 2);
        let conv2 = Unit::conv(root, rng, "conv2", "bn2", c1, c2, 3, 2);
        let conv3 = Unit::conv(root, rng, "conv3", "bn3", c1, c2, 3, 2);
        let kind = spec.ocbe_kind;
        let planes = 2 * c2 / kind.expansion();
        let mut cin = 3 * c2;
        let mut layer = vec![];
        for b in 0..spec.ocbe_blocks.max(1) {
            let p = root / "bn_layer" / b;
            let stride = if b == 0 { 2 } else { 1 };
            layer.push(Block::encoder(&p, rng, kind, cin, planes, stride));
            cin = planes * kind.expansion();
        }
        Ocbe {
            conv1,
            conv2,
            conv3,
            layer,
        }
    }

    fn forward_t(&self, taps: &[Tensor], train: bool) -> KernelResult<Tensor> {
        let f0 = self
            .conv2
            .forward_t(&self.conv1.forward_t(&taps[0], train).relu(), train)
            .relu();
        let f1 = self.conv3.forward_t(&taps[1], train).relu();
        let (s0, s1, s2) = (f0.size(), f1.size(), taps[2].size());
        if s0[2..] != s2[2..] || s1[2..] != s2[2..] {
            return Err(KernelError::invalid(
                "encoder",
                format!(
                    "the taps' sizes do not halve from one to the next: taps 0 and 1 reduce to {:?} and {:?}, tap 2 is {:?}",
                    &s0[2..],
                    &s1[2..],
                    &s2[2..]
                ),
            ));
        }
        let mut h = Tensor::cat(&[f0, f1, taps[2].shallow_clone()], 1);
        for block in &self.layer {
            h = block.forward_t(&h, train);
        }
        Ok(h)
    }
}

/// The decoder: three upsampling stages, deepest first.
struct Decoder {
    stages: Vec<Vec<Block>>,
}

impl Decoder {
    fn new(root: &nn::Path, rng: &mut InitRng, spec: &RdSpec) -> Self {
        let kind = spec.decoder_kind;
        let [c0, c1, c2] = spec.channels;
        let mut cin = 2 * c2;
        let mut stages = vec![];
        for (k, (&cout, &n)) in [c2, c1, c0].iter().zip(&spec.decoder_blocks).enumerate() {
            let planes = cout / kind.expansion();
            let mut blocks = vec![];
            for b in 0..n.max(1) {
                let p = root / format!("layer{}", k + 1) / b;
                blocks.push(Block::decoder(&p, rng, kind, cin, planes, b == 0));
                cin = planes * kind.expansion();
            }
            stages.push(blocks);
        }
        Decoder { stages }
    }

    /// The reconstructions at the taps' `sizes` (h, w), shallowest first.
    fn forward_t(
        &self,
        x: &Tensor,
        sizes: &[[i64; 2]],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Vec<Tensor>> {
        let mut h = x.shallow_clone();
        let mut out = vec![];
        for (stage, size) in self.stages.iter().zip(sizes.iter().rev()) {
            for (b, block) in stage.iter().enumerate() {
                intr.check()?;
                h = block.forward_t(&h, train);
                if b == 0 {
                    let got = h.size();
                    if got[2] < size[0] || got[3] < size[1] {
                        return Err(KernelError::invalid(
                            "encoder",
                            format!(
                                "a decoder stage gives {:?}, smaller than its tap's size {size:?}",
                                &got[2..]
                            ),
                        ));
                    }
                    if got[2] != size[0] || got[3] != size[1] {
                        h = h.narrow(2, 0, size[0]).narrow(3, 0, size[1]);
                    }
                }
            }
            out.push(h.shallow_clone());
        }
        out.reverse();
        Ok(out)
    }
}

/// The OCBE and decoder of one encoder.
pub struct ReverseDistillation {
    pub spec: RdSpec,
    bottleneck: Ocbe,
    decoder: Decoder,
}

impl ReverseDistillation {
    /// Parameters under `root / "bottleneck"` and `root / "decoder"`, drawn from `rng` in
    /// construction order.
    pub fn new(root: &nn::Path, spec: &RdSpec, rng: &mut InitRng) -> Self {
        let bottleneck = Ocbe::new(&(root / "bottleneck"), rng, spec);
        let decoder = Decoder::new(&(root / "decoder"), rng, spec);
        ReverseDistillation {
            spec: spec.clone(),
            bottleneck,
            decoder,
        }
    }

    /// The decoder's reconstructions of the encoder taps (each of its tap's shape).
    pub fn forward(
        &self,
        encoder: &[Tensor],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Vec<Tensor>> {
        self.check(encoder)?;
        // Channels-last: libtorch's CPU convolutions are faster in that layout for these
        // channel counts; every layer keeps it.
        let encoder: Vec<Tensor> = encoder.iter().map(channels_last).collect();
        let embedding = self.bottleneck.forward_t(&encoder, train)?;
        let sizes: Vec<[i64; 2]> = encoder
            .iter()
            .map(|t| {
                let s = t.size();
                [s[2], s[3]]
            })
            .collect();
        self.decoder.forward_t(&embedding, &sizes, train, intr)
    }

    fn check(&self, encoder: &[Tensor]) -> KernelResult<()> {
        let shapes: Vec<Vec<i64>> = encoder.iter().map(|t| t.size()).collect();
        let ok = encoder.len() == 3
            && shapes.iter().all(|s| s.len() == 4 && s[0] == shapes[0][0])
            && encoder.iter().all(|t| t.kind() == Kind::Float)
            && shapes
                .iter()
                .zip(&self.spec.channels)
                .all(|(s, &c)| s[1] == c);
        if !ok {
            return Err(KernelError::invalid(
                "encoder",
                format!(
                    "expected three float32 (B, C, h, w) taps with {:?} channels, got {shapes:?}",
                    self.spec.channels
                ),
            ));
        }
        Ok(())
    }
}

impl Objective for ReverseDistillation {
    /// `inputs`: the encoder taps, which are also the targets (`targets` is unused).
    fn loss(
        &self,
        inputs: &[Tensor],
        _targets: &[Tensor],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor> {
        let decoded = self.forward(inputs, train, intr)?;
        loss(inputs, &decoded)
    }
}

// ------------------------------------------------------------------ loss and map

fn check_pairs(encoder: &[Tensor], decoder: &[Tensor]) -> KernelResult<()> {
    if encoder.is_empty() || encoder.len() != decoder.len() {
        return Err(KernelError::invalid(
            "decoder",
            format!(
                "expected one decoder feature map per encoder tap ({}), got {}",
                encoder.len(),
                decoder.len()
            ),
        ));
    }
    for (i, (e, d)) in encoder.iter().zip(decoder).enumerate() {
        if e.size() != d.size() || e.dim() != 4 {
            return Err(KernelError::invalid(
                "decoder",
                format!(
                    "tap {i}: expected (B, C, h, w) maps of one shape, got encoder {:?} and decoder {:?}",
                    e.size(),
                    d.size()
                ),
            ));
        }
    }
    Ok(())
}

/// The training loss: Σ_k mean_batch (1 − cos(vec(e_k), vec(d_k))), a scalar tensor.
pub fn loss(encoder: &[Tensor], decoder: &[Tensor]) -> KernelResult<Tensor> {
    check_pairs(encoder, decoder)?;
    let mut total: Option<Tensor> = None;
    for (e, d) in encoder.iter().zip(decoder) {
        let b = e.size()[0];
        let cos = Tensor::cosine_similarity(&e.reshape([b, -1]), &d.reshape([b, -1]), 1, COS_EPS);
        let term = (1f64 - cos).mean(Kind::Float);
        total = Some(match total {
            None => term,
            Some(acc) => acc + term,
        });
    }
    Ok(total.expect("at least one tap"))
}

/// Anomaly maps (B, H, W) at `size` = (H, W), before smoothing.
pub fn anomaly_map(
    encoder: &[Tensor],
    decoder: &[Tensor],
    size: [i64; 2],
    combine: Combine,
) -> KernelResult<Tensor> {
    check_pairs(encoder, decoder)?;
    let mut out: Option<Tensor> = None;
    for (e, d) in encoder.iter().zip(decoder) {
        let layer = (1f64 - Tensor::cosine_similarity(e, d, 1, COS_EPS)).unsqueeze(1);
        let layer = layer.upsample_bilinear2d(size, true, None, None);
        out = Some(match (out, combine) {
            (None, _) => layer,
            (Some(acc), Combine::Product) => acc * layer,
            (Some(acc), Combine::Sum) => acc + layer,
        });
    }
    Ok(out.expect("at least one tap").squeeze_dim(1))
}
