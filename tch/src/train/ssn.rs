//! SuperSimpleNet (Rolih, Fučka & Skočaj, ICPR 2024, "SuperSimpleNet: Unifying Unsupervised and
//! Supervised Learning for Fast and Reliable Surface Defect Detection"), unsupervised mode, as
//! anomalib 2.7.0's `SupersimplenetModel` (`adapt_cls_features=False`, `stop_grad=True`):
//!
//! - features f (B, C, H, W): every tap upsampled bilinearly (align_corners false) to twice the
//!   first tap's grid, concatenated along the channels, then a 3×3 average with stride 1 and zero
//!   padding 1 counted in the mean (`AvgPool2d(3, 1, 1)`);
//! - adaptor a = 1×1 convolution C → C of f;
//! - training: the batch is doubled; each of its 2B items gets a Perlin mask m (below) and
//!   Gaussian noise ε ~ N(0, σ²) (σ = 0.015): seg = a + ε·m, cls = f + ε·m, label = max m;
//! - segmentation head: 1×1 conv C → 1024, batch norm, LeakyReLU(0.2), 1×1 conv 1024 → 1 without
//!   bias: the map logits M (B, 1, H, W);
//! - classification head on cat(cls, M̄) with M̄ = M without gradient: 5×5 conv (C + 1) → 128 with
//!   zero padding 2, batch norm, ReLU → D; the score logit is a linear layer 258 → 1 of
//!   (max D, mean D, max M̄, mean M̄) (global max and mean per channel);
//! - loss = focal(M, m) + truncated L1(M, m) + focal(score, label), with torchvision's
//!   `sigmoid_focal_loss` (α off, γ = 4, mean) and the truncated L1 mean(max(M + ½, 0)) over the
//!   positions with m = 0 plus mean(max(½ − M, 0)) over those with m = 1 (each 0 when empty);
//! - inference: seg = a, cls = f; the map is M (anomalib upsamples it, smooths it with a Gaussian
//!   of σ 4 and applies a sigmoid), the score the logit (anomalib: its sigmoid).
//!
//! Perlin masks (anomalib's `AnomalyGenerator.generate_perlin` and `generate_perlin_noise`): on
//! the grid (P, Q) of the next powers of two of (H, W), lattice scales sx = 2^u, sy = 2^v with u, v
//! uniform in 0..=5 (at most P and Q here: anomalib's code fails on smaller grids), unit gradients
//! at uniform angles on the (sx + 1) × (sy + 1) lattice; noise(p) = √2 · lerp(lerp(n00, n10, t_x),
//! lerp(n01, n11, t_x), t_y) with n the gradients' dot products with the offsets to the cell's corners
//! and t = 6f⁵ − 15f⁴ + 10f³ of the position f within its cell; rescaled to [−1, 1] when no value
//! passes the threshold; resized bilinearly to (H, W); m = noise > threshold (0.2); and with
//! probability ½ the mask is emptied (a clean item).
//!
//! Initialisation as anomalib's `init_weights`: convolution and linear weights xavier-normal, batch
//! norms' scale 1 and shift 0, the biases torch's default U(−1/√fan_in, 1/√fan_in); all from the
//! detector's seeded generator. The adaptor's variables are in group 1 of the `VarStore` (their own
//! learning rate and weight decay), the heads' in group 0. Each training step's random numbers
//! (masks and noise, from an `InitRng` seeded by the seed and the step, drawn on the CPU) depend on
//! the seed and the step only: libtorch's global generator is never used, and CPU and GPU fits get
//! the same masks and noise.

use std::cell::Cell;

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;

use super::student::{torch_default, InitRng};
use super::Objective;

const SEG_HIDDEN: i64 = 1024;
const CLS_HIDDEN: i64 = 128;
const CLS_KERNEL: i64 = 5;
const LEAKY_SLOPE: f64 = 0.2;
const TRUNCATION: f64 = 0.5;
const FOCAL_GAMMA: f64 = 4.0;
const BN_EPS: f64 = 1e-5;

/// What a SuperSimpleNet is built for.
#[derive(Clone, Debug, PartialEq)]
pub struct SsnSpec {
    /// The taps' channels.
    pub channels: Vec<i64>,
    /// The first tap's grid (h, w) at the fitted size; the features' grid is (2h, 2w) (other
    /// sizes are scored too).
    pub grid: [i64; 2],
    /// σ of the feature-space noise.
    pub noise_std: f64,
    /// The Perlin threshold.
    pub perlin_threshold: f64,
}

impl SsnSpec {
    pub fn new(
        channels: Vec<i64>,
        grid: [i64; 2],
        noise_std: f64,
        perlin_threshold: f64,
    ) -> KernelResult<Self> {
        if channels.is_empty() || channels.iter().any(|&c| c < 1) || grid[0] < 1 || grid[1] < 1 {
            return Err(KernelError::invalid(
                "layers",
                format!("expected at least one tap with channels on a non-empty grid, got {channels:?} on {grid:?}"),
            ));
        }
        if !(noise_std.is_finite() && noise_std > 0.0) {
            return Err(KernelError::invalid(
                "noise_std",
                format!("expected a positive finite standard deviation, got {noise_std}"),
            ));
        }
        if !(perlin_threshold.is_finite() && perlin_threshold > -1.0 && perlin_threshold < 1.0) {
            return Err(KernelError::invalid(
                "perlin_threshold",
                format!("expected a threshold in (-1, 1), got {perlin_threshold}"),
            ));
        }
        Ok(SsnSpec {
            channels,
            grid,
            noise_std,
            perlin_threshold,
        })
    }

    /// C, the concatenated features' channels.
    pub fn dim(&self) -> i64 {
        self.channels.iter().sum()
    }
}

fn next_pow2(n: i64) -> i64 {
    let mut p = 1;
    while p < n {
        p *= 2;
    }
    p
}

fn fade(t: f64) -> f64 {
    t * t * t * (t * (6.0 * t - 15.0) + 10.0)
}

/// Perlin noise on a (p, q) grid (both powers of two) with lattice scales (sx, sy) and the
/// lattice's gradient angles `angles` ((sx + 1) · (sy + 1), row-major); row-major values.
pub fn perlin_noise(p: i64, q: i64, sx: i64, sy: i64, angles: &[f64]) -> Vec<f32> {
    let grad = |i: i64, j: i64| {
        let a = angles[(i * (sy + 1) + j) as usize];
        (a.cos(), a.sin())
    };
    let mut out = Vec::with_capacity((p * q) as usize);
    for i in 0..p {
        let x = (i * sx) as f64 / p as f64;
        let (ci, fx) = (x.floor() as i64, x - x.floor());
        for j in 0..q {
            let y = (j * sy) as f64 / q as f64;
            let (cj, fy) = (y.floor() as i64, y - y.floor());
            let dot = |g: (f64, f64), dx: f64, dy: f64| g.0 * dx + g.1 * dy;
            let n00 = dot(grad(ci, cj), fx, fy);
            let n10 = dot(grad(ci + 1, cj), fx - 1.0, fy);
            let n01 = dot(grad(ci, cj + 1), fx, fy - 1.0);
            let n11 = dot(grad(ci + 1, cj + 1), fx - 1.0, fy - 1.0);
            let (tx, ty) = (fade(fx), fade(fy));
            let a = n00 + tx * (n10 - n00);
            let b = n01 + tx * (n11 - n01);
            out.push((std::f64::consts::SQRT_2 * (a + ty * (b - a))) as f32);
        }
    }
    out
}

/// `n` Perlin masks (n, 1, h, w) as float32 0 / 1, drawn from `rng`.
pub fn perlin_masks(rng: &mut InitRng, n: i64, h: i64, w: i64, threshold: f64) -> Tensor {
    let (p, q) = (next_pow2(h), next_pow2(w));
    let mut masks = vec![];
    for _ in 0..n {
        let sx = (1i64 << rng.below(6)).min(p);
        let sy = (1i64 << rng.below(6)).min(q);
        let angles: Vec<f64> = (0..(sx + 1) * (sy + 1))
            .map(|_| 2.0 * std::f64::consts::PI * rng.unit())
            .collect();
        let mut noise = perlin_noise(p, q, sx, sy, &angles);
        if !noise.iter().any(|&v| v as f64 > threshold) {
            let lo = noise.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = noise.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let span = (hi - lo).max(f32::MIN_POSITIVE);
            for v in &mut noise {
                *v = (*v - lo) / span * 2.0 - 1.0;
            }
        }
        let mut t = Tensor::from_slice(&noise).view([1, 1, p, q]);
        if (p, q) != (h, w) {
            t = t.upsample_bilinear2d([h, w], false, None, None);
        }
        let mut mask = t.gt(threshold).to_kind(Kind::Float);
        if rng.unit() > 0.5 {
            mask = mask.zeros_like();
        }
        masks.push(mask);
    }
    Tensor::cat(&masks, 0)
}

/// torchvision's `sigmoid_focal_loss(x, t, alpha=-1, gamma, reduction="mean")`.
pub fn focal_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let p = logits.sigmoid();
    let ce = logits.binary_cross_entropy_with_logits::<Tensor>(
        targets,
        None,
        None,
        tch::Reduction::None,
    );
    let p_t: Tensor = &p * targets + (1.0 - &p) * (1.0 - targets);
    let weight = (p_t.neg() + 1.0).pow_tensor_scalar(FOCAL_GAMMA);
    (ce * weight).mean(Kind::Float)
}

/// The truncated L1: mean(max(M + ½, 0)) where m = 0 plus mean(max(½ − M, 0)) where m > 0.
pub fn truncated_l1(map: &Tensor, mask: &Tensor) -> Tensor {
    let normal = mask.eq(0.0).to_kind(Kind::Float);
    let anomalous = mask.gt(0.0).to_kind(Kind::Float);
    let part = |values: Tensor, weight: &Tensor| {
        let count = weight.sum(Kind::Float);
        // 0 when there is no such position (the clamp keeps the division finite).
        (values.clamp_min(0.0) * weight).sum(Kind::Float) / count.clamp_min(1.0)
    };
    part(map + TRUNCATION, &normal) + part(TRUNCATION - map, &anomalous)
}

fn xavier_normal(rng: &mut InitRng, shape: &[i64], p: &nn::Path) -> Tensor {
    let receptive: i64 = shape[2..].iter().product();
    let (fan_in, fan_out) = (shape[1] * receptive, shape[0] * receptive);
    let n = shape.iter().product::<i64>() as usize;
    let values = rng.normal(n, (2.0 / (fan_in + fan_out) as f64).sqrt());
    Tensor::from_slice(&values)
        .view(shape)
        .to_device(p.device())
}

fn batch_norm(p: nn::Path, channels: i64) -> nn::BatchNorm {
    nn::batch_norm2d(
        p,
        channels,
        nn::BatchNormConfig {
            cudnn_enabled: true,
            eps: BN_EPS,
            momentum: super::student::BN_MOMENTUM,
            affine: true,
            ws_init: Init::Const(1.0),
            bs_init: Init::Const(0.0),
        },
    )
}

/// The adaptor and the two heads.
pub struct SuperSimpleNet {
    pub spec: SsnSpec,
    seed: u64,
    /// The current training step's seed (set by `begin_step`).
    step_seed: Cell<u64>,
    adaptor_w: Tensor,
    adaptor_b: Tensor,
    seg_w1: Tensor,
    seg_b1: Tensor,
    seg_bn: nn::BatchNorm,
    seg_w2: Tensor,
    cls_w: Tensor,
    cls_b: Tensor,
    cls_bn: nn::BatchNorm,
    fc_w: Tensor,
    fc_b: Tensor,
}

impl SuperSimpleNet {
    /// Variables `adaptor.*` (group 1) and `segdec.*` (group 0) under `root`, drawn from
    /// `InitRng::new(seed)`.
    pub fn new(root: &nn::Path, spec: &SsnSpec, seed: u64) -> Self {
        let mut rng = InitRng::new(seed);
        let c = spec.dim();
        let adaptor = root.set_group(1) / "adaptor";
        let seg = root / "segdec";
        let adaptor_w = xavier_normal(&mut rng, &[c, c, 1, 1], &adaptor);
        let adaptor_b = torch_default(&mut rng, &[c], c, &adaptor);
        let seg_w1 = xavier_normal(&mut rng, &[SEG_HIDDEN, c, 1, 1], &seg);
        let seg_b1 = torch_default(&mut rng, &[SEG_HIDDEN], c, &seg);
        let seg_w2 = xavier_normal(&mut rng, &[1, SEG_HIDDEN, 1, 1], &seg);
        let k2 = CLS_KERNEL * CLS_KERNEL;
        let cls_w = xavier_normal(&mut rng, &[CLS_HIDDEN, c + 1, CLS_KERNEL, CLS_KERNEL], &seg);
        let cls_b = torch_default(&mut rng, &[CLS_HIDDEN], (c + 1) * k2, &seg);
        let fc_in = 2 * CLS_HIDDEN + 2;
        let fc_w = xavier_normal(&mut rng, &[1, fc_in], &seg);
        let fc_b = torch_default(&mut rng, &[1], fc_in, &seg);
        SuperSimpleNet {
            spec: spec.clone(),
            seed,
            step_seed: Cell::new(seed),
            adaptor_w: adaptor.add("weight", adaptor_w, true),
            adaptor_b: adaptor.add("bias", adaptor_b, true),
            seg_w1: seg.add("seg_conv1_weight", seg_w1, true),
            seg_b1: seg.add("seg_conv1_bias", seg_b1, true),
            seg_bn: batch_norm(&seg / "seg_bn", SEG_HIDDEN),
            seg_w2: seg.add("seg_conv2_weight", seg_w2, true),
            cls_w: seg.add("cls_conv_weight", cls_w, true),
            cls_b: seg.add("cls_conv_bias", cls_b, true),
            cls_bn: batch_norm(&seg / "cls_bn", CLS_HIDDEN),
            fc_w: seg.add("fc_weight", fc_w, true),
            fc_b: seg.add("fc_bias", fc_b, true),
        }
    }

    /// f (B, C, H, W) of the taps `feats`.
    pub fn features(&self, feats: &[Tensor]) -> KernelResult<Tensor> {
        let spec = &self.spec;
        let first = feats.first().map(|t| t.size());
        let ok = feats.len() == spec.channels.len()
            && feats.iter().zip(&spec.channels).all(|(t, &c)| {
                let s = t.size();
                s.len() == 4
                    && s[1] == c
                    && t.kind() == Kind::Float
                    && Some(s[0]) == first.as_ref().map(|f| f[0])
            });
        let Some(first) = first.filter(|_| ok) else {
            return Err(KernelError::invalid(
                "features",
                format!(
                    "expected float32 taps of {:?} channels, got {:?}",
                    spec.channels,
                    feats.iter().map(|t| t.size()).collect::<Vec<_>>()
                ),
            ));
        };
        // The heads are convolutional: any grid (the spec's is the fitted one, for the record).
        let out = [2 * first[2], 2 * first[3]];
        let up: Vec<Tensor> = feats
            .iter()
            .map(|t| t.upsample_bilinear2d(out, false, None, None))
            .collect();
        Ok(Tensor::cat(&up, 1).avg_pool2d([3, 3], [1, 1], [1, 1], false, true, None::<i64>))
    }

    /// a, the adapted features.
    pub fn adapt(&self, f: &Tensor) -> Tensor {
        f.conv2d(
            &self.adaptor_w,
            Some(&self.adaptor_b),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        )
    }

    /// (map logits (B, 1, H, W), score logits (B)).
    pub fn heads(&self, seg: &Tensor, cls: &Tensor, train: bool) -> (Tensor, Tensor) {
        let h = seg.conv2d(&self.seg_w1, Some(&self.seg_b1), [1, 1], [0, 0], [1, 1], 1);
        let h = h.apply_t(&self.seg_bn, train);
        // LeakyReLU(0.2) as one kernel: PReLU with a fixed slope (no gradient reaches it).
        let h = h.prelu(&Tensor::from_slice(&[LEAKY_SLOPE as f32]).to_device(h.device()));
        let map = h.conv2d(&self.seg_w2, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let frozen = map.detach();
        let pad = CLS_KERNEL / 2;
        let d = Tensor::cat(&[cls.shallow_clone(), frozen.shallow_clone()], 1)
            .conv2d(
                &self.cls_w,
                Some(&self.cls_b),
                [1, 1],
                [pad, pad],
                [1, 1],
                1,
            )
            .apply_t(&self.cls_bn, train)
            .relu();
        let dims = [2i64, 3].as_slice();
        let pooled = Tensor::cat(
            &[
                d.amax(dims, false),
                d.mean_dim(dims, false, Kind::Float),
                frozen.amax(dims, false),
                frozen.mean_dim(dims, false, Kind::Float),
            ],
            1,
        );
        let score = pooled.linear(&self.fc_w, Some(&self.fc_b)).squeeze_dim(1);
        (map, score)
    }

    /// (map logits (B, H, W), score logits (B)) of the taps, in evaluation mode.
    pub fn predict(&self, feats: &[Tensor]) -> KernelResult<(Tensor, Tensor)> {
        let f = self.features(feats)?;
        let a = self.adapt(&f);
        let (map, score) = self.heads(&a, &f, false);
        Ok((map.squeeze_dim(1), score))
    }

    /// The training step's (seg, cls, masks, labels) from f and a: the doubled batch with
    /// Perlin-masked noise.
    fn synthesise(&self, f: &Tensor, a: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
        let s = f.size();
        let n = 2 * s[0];
        let mut rng = InitRng::new(self.step_seed.get());
        // Drawn on the CPU (the same numbers on every device), moved once.
        let cpu_masks = perlin_masks(&mut rng, n, s[2], s[3], self.spec.perlin_threshold);
        let f2 = Tensor::cat(&[f, f], 0);
        let a2 = Tensor::cat(&[a, a], 0);
        // ε·m: the noise is drawn only where the mask is 1 (item, position, then channel order);
        // elsewhere it would be multiplied by 0.
        let (c, hw) = (s[1] as usize, (s[2] * s[3]) as usize);
        let flat = Vec::<f32>::try_from(cpu_masks.view([-1])).expect("float masks");
        let masks = cpu_masks.to_device(f.device());
        let mut values = vec![0f32; n as usize * c * hw];
        for item in 0..n as usize {
            for pos in 0..hw {
                if flat[item * hw + pos] > 0.0 {
                    for (ch, v) in rng.normal(c, self.spec.noise_std).into_iter().enumerate() {
                        values[(item * c + ch) * hw + pos] = v;
                    }
                }
            }
        }
        let noise = Tensor::from_slice(&values)
            .view(a2.size().as_slice())
            .to_device(f.device());
        let labels = masks.amax([1i64, 2, 3].as_slice(), false);
        (a2 + &noise, f2 + noise, masks, labels)
    }
}

/// SplitMix64's finaliser of (seed, step): the step's seed.
fn step_seed(seed: u64, step: usize) -> u64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The loss of map and score logits against masks and labels.
pub fn loss(map: &Tensor, score: &Tensor, masks: &Tensor, labels: &Tensor) -> KernelResult<Tensor> {
    if map.size() != masks.size()
        || score.size() != labels.size()
        || map.size()[0] != score.size()[0]
    {
        return Err(KernelError::invalid(
            "masks",
            format!(
                "expected masks shaped as the maps and labels as the scores, got {:?} / {:?} and {:?} / {:?}",
                map.size(),
                masks.size(),
                score.size(),
                labels.size()
            ),
        ));
    }
    Ok(focal_loss(map, masks) + truncated_l1(map, masks) + focal_loss(score, labels))
}

impl Objective for SuperSimpleNet {
    /// `inputs`: the taps' features (`targets` is unused). Training synthesises anomalies; the
    /// evaluation loss is that of the clean features (every mask and label 0).
    fn loss(
        &self,
        inputs: &[Tensor],
        _targets: &[Tensor],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor> {
        intr.check()?;
        let f = self.features(inputs)?;
        let a = self.adapt(&f);
        let (seg, cls, masks, labels) = if train {
            self.synthesise(&f, &a)
        } else {
            let s = f.size();
            let masks = Tensor::zeros([s[0], 1, s[2], s[3]], (Kind::Float, f.device()));
            let labels = Tensor::zeros([s[0]], (Kind::Float, f.device()));
            (a, f, masks, labels)
        };
        let (map, score) = self.heads(&seg, &cls, train);
        loss(&map, &score, &masks, &labels)
    }

    fn begin_step(&self, step: usize) {
        self.step_seed.set(step_seed(self.seed, step));
    }
}

#[cfg(test)]
mod tests {
    //! References: Perlin noise from its definition at lattice points and inside a cell, the
    //! losses from their formulas on small tensors, AdamW's groups and the multistep schedule from
    //! the update rule; against plain PyTorch in tests/test_supersimplenet.py.

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::train::{OptimConfig, Optimiser, Schedule, Trainer};

    #[test]
    fn perlin_noise_is_zero_on_the_lattice_and_smooth_between() {
        let (sx, sy) = (2, 4);
        let mut rng = InitRng::new(3);
        let angles: Vec<f64> = (0..(sx + 1) * (sy + 1))
            .map(|_| 6.28 * rng.unit())
            .collect();
        let v = perlin_noise(16, 16, sx, sy, &angles);
        // lattice points (i a multiple of 16 / sx, j of 16 / sy): all four dots are taken at the
        // cell's own corner with a zero offset
        for i in [0, 8] {
            for j in [0, 4, 8, 12] {
                assert!(v[i * 16 + j].abs() < 1e-6);
            }
        }
        // the centre of cell (0, 0): f = (½, ½), fade ½
        let g = |i: usize, j: usize| {
            (
                angles[i * (sy as usize + 1) + j].cos(),
                angles[i * (sy as usize + 1) + j].sin(),
            )
        };
        let d = |g: (f64, f64), x: f64, y: f64| g.0 * x + g.1 * y;
        let n = [
            d(g(0, 0), 0.5, 0.5),
            d(g(1, 0), -0.5, 0.5),
            d(g(0, 1), 0.5, -0.5),
            d(g(1, 1), -0.5, -0.5),
        ];
        let want = std::f64::consts::SQRT_2 * 0.25 * n.iter().sum::<f64>();
        assert!((v[4 * 16 + 2] as f64 - want).abs() < 1e-6);
        // off-centre in cell (1, 0): i = 10 (x = 1.25, f_x = ¼), j = 3 (y = 0.75, f_y = ¾): the
        // weights differ along the two axes, so a swap of t_x / t_y or of the lattice axes shows
        let (fx, fy) = (0.25, 0.75);
        let n = [
            d(g(1, 0), fx, fy),
            d(g(2, 0), fx - 1.0, fy),
            d(g(1, 1), fx, fy - 1.0),
            d(g(2, 1), fx - 1.0, fy - 1.0),
        ];
        let (tx, ty) = (fade(fx), fade(fy));
        let (a, b) = (n[0] + tx * (n[1] - n[0]), n[2] + tx * (n[3] - n[2]));
        let want = std::f64::consts::SQRT_2 * (a + ty * (b - a));
        assert!(
            (v[10 * 16 + 3] as f64 - want).abs() < 1e-6,
            "{} vs {want}",
            v[10 * 16 + 3]
        );
        assert!(v.iter().all(|x| x.abs() <= 1.5));
    }

    #[test]
    fn perlin_masks_are_binary_seeded_and_half_empty() {
        let a = perlin_masks(&mut InitRng::new(1), 200, 12, 20, 0.2);
        let b = perlin_masks(&mut InitRng::new(1), 200, 12, 20, 0.2);
        assert_eq!(a.size(), [200, 1, 12, 20]);
        assert!(a.equal(&b));
        let ones = a.eq(1.0).sum(Kind::Int64).int64_value(&[]);
        let zeros = a.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(ones + zeros, 200 * 12 * 20);
        let empty = a
            .amax([1i64, 2, 3].as_slice(), false)
            .eq(0.0)
            .sum(Kind::Int64)
            .int64_value(&[]);
        // each emptied with probability ½ (and none empty otherwise: rescaling guarantees a
        // value above the threshold before resizing): 100 ± 3σ
        assert!((70..=130).contains(&empty), "{empty}");
    }

    #[test]
    fn losses_follow_their_formulas() {
        let x = Tensor::from_slice(&[-2.0f32, 0.3, 1.5, -0.1]).view([1, 1, 2, 2]);
        let m = Tensor::from_slice(&[0.0f32, 1.0, 1.0, 0.0]).view([1, 1, 2, 2]);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let focal = |v: f64, t: f64| {
            let p = sig(v);
            let ce = -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
            let pt = p * t + (1.0 - p) * (1.0 - t);
            ce * (1.0 - pt).powi(4)
        };
        let want = (focal(-2.0, 0.0) + focal(0.3, 1.0) + focal(1.5, 1.0) + focal(-0.1, 0.0)) / 4.0;
        assert!((focal_loss(&x, &m).double_value(&[]) - want).abs() < 1e-6);
        let want = ((-2.0f64 + 0.5).max(0.0) + (-0.1f64 + 0.5).max(0.0)) / 2.0
            + ((0.5f64 - 0.3).max(0.0) + (0.5f64 - 1.5).max(0.0)) / 2.0;
        assert!((truncated_l1(&x, &m).double_value(&[]) - want).abs() < 1e-6);
        // no anomalous position: that half is 0
        let z = m.zeros_like();
        let want = ((-2.0f64 + 0.5).max(0.0) + 0.8 + 2.0 + 0.4) / 4.0;
        assert!((truncated_l1(&x, &z).double_value(&[]) - want).abs() < 1e-6);
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        let spec = SsnSpec::new(vec![6, 4], [4, 4], 0.5, 0.2).unwrap();
        tch::manual_seed(0);
        let a = Tensor::randn([8, 6, 4, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 4, 2, 2], (Kind::Float, Device::Cpu));
        let run = || {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = SuperSimpleNet::new(&vs.root(), &spec, 7);
            let mut trainer = Trainer::new(vs, model);
            trainer.set_group(1, 1e-3, 1e-2).unwrap();
            trainer
                .configure(OptimConfig {
                    optimiser: Optimiser::AdamW {
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                    },
                    learning_rate: 2e-3,
                    weight_decay: 1e-5,
                    grad_clip_norm: None,
                    schedule: Schedule::MultiStep,
                    total_steps: 60,
                })
                .unwrap();
            let order: Vec<i64> = (0..8).collect();
            let mut losses = vec![];
            for _ in 0..30 {
                let l = trainer
                    .epoch(
                        &[a.shallow_clone(), b.shallow_clone()],
                        &[],
                        &order,
                        4,
                        None,
                        &Interrupt::never(),
                    )
                    .unwrap();
                losses.push(l.iter().sum::<f64>() / l.len() as f64);
            }
            (losses, trainer.vs.variables()["segdec.fc_weight"].copy())
        };
        let (la, wa) = run();
        let (lb, wb) = run();
        let early: f64 = la[..5].iter().sum::<f64>() / 5.0;
        let late: f64 = la[25..].iter().sum::<f64>() / 5.0;
        assert!(late < early, "{la:?}");
        assert_eq!(la, lb);
        assert!(wa.equal(&wb));
    }

    /// Two scalar variables, one per group, and the objective Σ c·v (gradient c).
    struct Linear {
        vars: Vec<Tensor>,
        coef: Vec<f64>,
    }

    impl Objective for Linear {
        fn loss(&self, _: &[Tensor], _: &[Tensor], _: bool, _: &Interrupt) -> KernelResult<Tensor> {
            let terms: Vec<Tensor> = self
                .vars
                .iter()
                .zip(&self.coef)
                .map(|(v, &c)| v * c)
                .collect();
            Ok(Tensor::stack(&terms, 0).sum(Kind::Float))
        }
    }

    #[test]
    fn adamw_groups_and_the_schedule_follow_the_update_rule() {
        // AdamW's step: v ← v·(1 − lr·wd), then v ← v − lr·m̂ / (√v̂ + eps); with a constant gradient
        // g, m̂ = g and v̂ = g² at every step, so the second part is lr·g / (|g| + eps).
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let a = root.var("a", &[1], Init::Const(1.0));
        let b = root.set_group(1).var("b", &[1], Init::Const(1.0));
        let objective = Linear {
            vars: vec![a, b],
            coef: vec![2.0, -3.0],
        };
        let mut trainer = Trainer::new(vs, objective);
        assert!(trainer.set_group(2, 1.0, 0.0).is_err());
        trainer.set_group(1, 0.05, 0.5).unwrap();
        trainer
            .configure(OptimConfig {
                optimiser: Optimiser::AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                learning_rate: 0.1,
                weight_decay: 0.2,
                grad_clip_norm: None,
                schedule: Schedule::MultiStep,
                total_steps: 10,
            })
            .unwrap();
        let (mut wa, mut wb) = (1.0f64, 1.0f64);
        let x = Tensor::zeros([1, 1], (Kind::Float, Device::Cpu));
        for step in 0..10 {
            trainer
                .epoch(
                    &[x.shallow_clone()],
                    &[],
                    &[0],
                    1,
                    None,
                    &Interrupt::never(),
                )
                .unwrap();
            let factor = [1.0, 0.4, 0.16][(step >= 8) as usize + (step >= 9) as usize];
            let (la, lb) = (0.1 * factor, 0.05 * factor);
            wa = wa * (1.0 - la * 0.2) - la * 2.0 / (2.0 + 1e-8);
            wb = wb * (1.0 - lb * 0.5) + lb * 3.0 / (3.0 + 1e-8);
            let vars = trainer.vs.variables();
            let (ga, gb) = (vars["a"].double_value(&[0]), vars["b"].double_value(&[0]));
            assert!((ga - wa).abs() < 1e-5, "step {step}: a {ga} vs {wa}");
            assert!((gb - wb).abs() < 1e-5, "step {step}: b {gb} vs {wb}");
        }
    }

    #[test]
    fn multistep_schedule_decays_at_80_and_90_percent() {
        let config = OptimConfig {
            optimiser: Optimiser::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            learning_rate: 1.0,
            weight_decay: 0.0,
            grad_clip_norm: None,
            schedule: Schedule::MultiStep,
            total_steps: 100,
        };
        assert_eq!(config.learning_rate_at(79), 1.0);
        assert!((config.learning_rate_at(80) - 0.4).abs() < 1e-12);
        assert!((config.learning_rate_at(89) - 0.4).abs() < 1e-12);
        assert!((config.learning_rate_at(90) - 0.16).abs() < 1e-12);
    }
}
