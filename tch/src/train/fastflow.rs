//! FastFlow (Yu et al., 2021, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
//! Normalizing Flows"): per tap, a 2-D normalizing flow maps the frozen backbone's features of good
//! images to a standard normal; what the flow gives a low likelihood is anomalous.
//!
//! Per tap, features f (B, C, h, w):
//! - x = LayerNorm over (C, h, w) with an elementwise affine of shape (C, h, w), eps 1e-5 (anomalib
//!   2.7.0's `FastflowModel` for CNN backbones);
//! - z = the composition of `steps` coupling blocks (FrEIA's `AllInOneBlock` with anomalib's
//!   settings: affine clamping 2, hard permutation, SOFTPLUS global affine initialised to 1, no GIN,
//!   no Householder), each with x = (x₁, x₂) split at c₁ = C − ⌊C/2⌋ channels:
//!   - a = 0.1 · subnet(x₁), the subnet conv(k) → ReLU → conv(k) with `same` padding, hidden
//!     channels ⌊c₁ · hidden_ratio⌋, k = 3 at even steps and 1 at odd steps (3 everywhere with
//!     `conv3x3_only`);
//!   - s = clamp · tanh(a[:, :c₂]), y₂ = x₂ · exp(s) + a[:, c₂:], y = (x₁, y₂);
//!   - g = 0.1 · softplus_β=0.5(γ) per channel; out = P(y · g + β) with P the block's fixed
//!     permutation of the channels (out[:, i] = (y·g + β)[:, π(i)]);
//!   - log|det J| of the block = Σ s + h·w·Σ_c log g, written here per position:
//!     ℓ(p) = Σ_c s(c, p) + Σ_c log g(c), summed over the blocks;
//! - loss (anomalib's `FastflowLoss`) = Σ_taps mean over the batch of (½ Σ_{c,h,w} z² − Σ_p ℓ(p));
//! - map, per tap: "probability" (anomalib's `AnomalyMapGenerator`) −exp(−½ mean_c z²), or "nll"
//!   the per-position negative log-likelihood ½ Σ_c z² − ℓ(p) (without the constant); each
//!   upsampled bilinearly (align_corners false) to the input size and averaged over the taps.
//!
//! Initialisation as torch's defaults for the subnets' `Conv2d`s (weights and biases
//! U(−1/√fan_in, 1/√fan_in)), LayerNorm's affine 1 and 0, γ = 2·log(e⁵ − 1) (g = 1), β = 0, and a
//! uniformly random permutation per block, all drawn from the detector's seeded generator.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;

use super::student::{torch_default, InitRng};
use super::Objective;

/// torch's `nn.Softplus(beta=0.5)` of FrEIA's SOFTPLUS global affine.
const SOFTPLUS_BETA: f64 = 0.5;
const LAYER_NORM_EPS: f64 = 1e-5;

/// The shape of one tap's features.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TapShape {
    pub channels: i64,
    pub grid: [i64; 2],
}

/// What a FastFlow model is built for.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSpec {
    pub taps: Vec<TapShape>,
    /// Coupling blocks per tap.
    pub steps: usize,
    /// Hidden channels of a subnet over its input channels.
    pub hidden_ratio: f64,
    /// 3×3 subnets at every step (else 3×3 and 1×1 alternate).
    pub conv3x3_only: bool,
    /// The affine clamping: s stays within (−clamp, clamp).
    pub clamp: f64,
}

impl FlowSpec {
    /// A checked spec.
    pub fn new(
        taps: Vec<TapShape>,
        steps: usize,
        hidden_ratio: f64,
        conv3x3_only: bool,
        clamp: f64,
    ) -> KernelResult<Self> {
        if taps.is_empty() {
            return Err(KernelError::invalid(
                "layers",
                "expected at least one tap, got none",
            ));
        }
        if steps < 1 {
            return Err(KernelError::invalid(
                "flow_steps",
                format!("expected at least one coupling block, got {steps}"),
            ));
        }
        if !(clamp.is_finite() && clamp > 0.0) {
            return Err(KernelError::invalid(
                "clamp",
                format!("expected a positive finite clamp, got {clamp}"),
            ));
        }
        for t in &taps {
            if t.channels < 2 || t.grid[0] < 1 || t.grid[1] < 1 {
                return Err(KernelError::invalid(
                    "layers",
                    format!(
                        "expected taps of at least 2 channels on a non-empty grid (a coupling block \
                         splits the channels in two), got {} channels on {:?}",
                        t.channels, t.grid
                    ),
                ));
            }
            let hidden = hidden_channels(t.channels, hidden_ratio);
            if !(hidden_ratio.is_finite() && hidden_ratio > 0.0) || hidden < 1 {
                return Err(KernelError::invalid(
                    "hidden_ratio",
                    format!(
                        "expected a positive ratio giving at least one hidden channel for {} input \
                         channels, got {hidden_ratio}",
                        t.channels - t.channels / 2
                    ),
                ));
            }
        }
        Ok(FlowSpec {
            taps,
            steps,
            hidden_ratio,
            conv3x3_only,
            clamp,
        })
    }

    /// The subnet's kernel at `step` (0-based).
    pub fn kernel(&self, step: usize) -> i64 {
        if step % 2 == 1 && !self.conv3x3_only {
            1
        } else {
            3
        }
    }
}

fn hidden_channels(channels: i64, ratio: f64) -> i64 {
    ((channels - channels / 2) as f64 * ratio) as i64
}

/// One affine coupling block.
pub struct Coupling {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    /// γ (1, C, 1, 1): g = 0.1 · softplus_β=0.5(γ).
    global_scale: Tensor,
    /// β (1, C, 1, 1).
    global_offset: Tensor,
    /// π as float32 (C,) (a non-trained variable, saved with the weights).
    permutation: Tensor,
    clamp: f64,
}

impl Coupling {
    /// A block of `channels` channels with `kernel` × `kernel` subnets under `p`.
    pub fn new(
        p: &nn::Path,
        rng: &mut InitRng,
        channels: i64,
        kernel: i64,
        hidden_ratio: f64,
        clamp: f64,
    ) -> Self {
        let (c1, c2) = (channels - channels / 2, channels / 2);
        let hidden = hidden_channels(channels, hidden_ratio);
        let (fan1, fan2) = (c1 * kernel * kernel, hidden * kernel * kernel);
        let w1 = torch_default(rng, &[hidden, c1, kernel, kernel], fan1, p);
        let b1 = torch_default(rng, &[hidden], fan1, p);
        let w2 = torch_default(rng, &[2 * c2, hidden, kernel, kernel], fan2, p);
        let b2 = torch_default(rng, &[2 * c2], fan2, p);
        let gamma = 2.0 * (5f64.exp() - 1.0).ln();
        let perm: Vec<f32> = rng
            .permutation(channels as usize)
            .into_iter()
            .map(|i| i as f32)
            .collect();
        let perm = Tensor::from_slice(&perm).to_device(p.device());
        Coupling {
            w1: p.add("conv1_weight", w1, true),
            b1: p.add("conv1_bias", b1, true),
            w2: p.add("conv2_weight", w2, true),
            b2: p.add("conv2_bias", b2, true),
            global_scale: p.var("global_scale", &[1, channels, 1, 1], Init::Const(gamma)),
            global_offset: p.var("global_offset", &[1, channels, 1, 1], Init::Const(0.0)),
            permutation: p.add("permutation", perm, false),
            clamp,
        }
    }

    /// A block from its tensors `[conv1_weight, conv1_bias, conv2_weight, conv2_bias,
    /// global_scale, global_offset, permutation]` (shared, not copied: gradients reach them).
    pub fn from_tensors(params: &[Tensor], clamp: f64) -> KernelResult<Self> {
        let [w1, b1, w2, b2, gs, go, perm] = params else {
            return Err(KernelError::invalid(
                "blocks",
                format!(
                    "expected 7 tensors per block (conv1 weight, bias, conv2 weight, bias, global \
                     scale, global offset, permutation), got {}",
                    params.len()
                ),
            ));
        };
        let c = perm.size().first().copied().unwrap_or(0);
        let (c1, c2) = (c - c / 2, c / 2);
        let (s1, s2) = (w1.size(), w2.size());
        let ok = perm.dim() == 1
            && s1.len() == 4
            && s1[1] == c1
            && s2.len() == 4
            && s2[0] == 2 * c2
            && s2[1] == s1[0]
            && b1.size() == [s1[0]]
            && b2.size() == [2 * c2]
            && gs.size() == [1, c, 1, 1]
            && go.size() == [1, c, 1, 1];
        if !ok {
            return Err(KernelError::invalid(
                "blocks",
                format!(
                    "expected the shapes of a {c}-channel block, got {:?}",
                    params.iter().map(|t| t.size()).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(Coupling {
            w1: w1.shallow_clone(),
            b1: b1.shallow_clone(),
            w2: w2.shallow_clone(),
            b2: b2.shallow_clone(),
            global_scale: gs.shallow_clone(),
            global_offset: go.shallow_clone(),
            permutation: perm.shallow_clone(),
            clamp,
        })
    }

    fn channels(&self) -> i64 {
        self.permutation.size()[0]
    }

    /// (s, t) of the passive half `x1`: s = clamp · tanh(0.1 · a[:, :c₂]), t = 0.1 · a[:, c₂:].
    fn coefficients(&self, x1: &Tensor) -> (Tensor, Tensor) {
        let pad = self.w1.size()[2] / 2;
        let h = x1
            .conv2d(&self.w1, Some(&self.b1), [1, 1], [pad, pad], [1, 1], 1)
            .relu();
        let a = h.conv2d(&self.w2, Some(&self.b2), [1, 1], [pad, pad], [1, 1], 1) * 0.1;
        let c2 = self.channels() / 2;
        let s = a.narrow(1, 0, c2).tanh() * self.clamp;
        (s, a.narrow(1, c2, c2))
    }

    /// g (1, C, 1, 1).
    fn scale(&self) -> Tensor {
        // softplus_β(x) = softplus_1(βx) / β, with torch's rule (identity above βx = 20).
        (&self.global_scale * SOFTPLUS_BETA).softplus() / SOFTPLUS_BETA * 0.1
    }

    fn index(&self) -> Tensor {
        self.permutation.to_kind(Kind::Int64)
    }

    /// (out, ℓ (B, h, w)) of `x` (B, C, h, w).
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let c = self.channels();
        let c1 = c - c / 2;
        let (x1, x2) = (x.narrow(1, 0, c1), x.narrow(1, c1, c / 2));
        let (s, t) = self.coefficients(&x1);
        let y2 = x2 * s.exp() + t;
        let g = self.scale();
        let y = Tensor::cat(&[x1, y2], 1) * &g + &self.global_offset;
        let out = y.index_select(1, &self.index());
        let log_det =
            s.sum_dim_intlist([1i64].as_slice(), false, Kind::Float) + g.log().sum(Kind::Float);
        (out, log_det)
    }

    /// x such that `forward(x).0 == out`.
    pub fn inverse(&self, out: &Tensor) -> Tensor {
        let c = self.channels();
        let c1 = c - c / 2;
        let inverse = self.index().argsort(0, false);
        let y = (out.index_select(1, &inverse) - &self.global_offset) / self.scale();
        let (x1, y2) = (y.narrow(1, 0, c1), y.narrow(1, c1, c / 2));
        let (s, t) = self.coefficients(&x1);
        let x2 = (y2 - t) * (-s).exp();
        Tensor::cat(&[x1, x2], 1)
    }
}

/// (z, Σ_blocks ℓ) of `x` through `blocks` in order.
pub fn flow(blocks: &[Coupling], x: &Tensor) -> (Tensor, Tensor) {
    let mut z = x.shallow_clone();
    let mut total: Option<Tensor> = None;
    for block in blocks {
        let (next, l) = block.forward(&z);
        z = next;
        total = Some(match total {
            Some(t) => t + l,
            None => l,
        });
    }
    let total = total.unwrap_or_else(|| {
        let s = x.size();
        Tensor::zeros([s[0], s[2], s[3]], (Kind::Float, x.device()))
    });
    (z, total)
}

/// The x whose `flow` is `z`.
pub fn flow_inverse(blocks: &[Coupling], z: &Tensor) -> Tensor {
    blocks
        .iter()
        .rev()
        .fold(z.shallow_clone(), |acc, b| b.inverse(&acc))
}

/// The per-tap LayerNorms and flows.
pub struct FastFlow {
    pub spec: FlowSpec,
    norms: Vec<(Tensor, Tensor)>,
    flows: Vec<Vec<Coupling>>,
}

impl FastFlow {
    /// Variables `tap{i}.norm_weight`, `tap{i}.norm_bias`, `tap{i}.step{j}.*` under `root`.
    pub fn new(root: &nn::Path, spec: &FlowSpec, rng: &mut InitRng) -> Self {
        let mut norms = vec![];
        let mut flows = vec![];
        for (i, tap) in spec.taps.iter().enumerate() {
            let p = root / format!("tap{i}");
            let shape = [tap.channels, tap.grid[0], tap.grid[1]];
            norms.push((
                p.var("norm_weight", &shape, Init::Const(1.0)),
                p.var("norm_bias", &shape, Init::Const(0.0)),
            ));
            let blocks = (0..spec.steps)
                .map(|j| {
                    Coupling::new(
                        &(&p / format!("step{j}")),
                        rng,
                        tap.channels,
                        spec.kernel(j),
                        spec.hidden_ratio,
                        spec.clamp,
                    )
                })
                .collect();
            flows.push(blocks);
        }
        FastFlow {
            spec: spec.clone(),
            norms,
            flows,
        }
    }

    /// Per tap (z, ℓ) of the taps' features `feats` (each (B, C, h, w) as the spec).
    pub fn forward(
        &self,
        feats: &[Tensor],
        intr: &Interrupt,
    ) -> KernelResult<Vec<(Tensor, Tensor)>> {
        if feats.len() != self.spec.taps.len() {
            return Err(KernelError::invalid(
                "features",
                format!(
                    "expected the features of {} taps, got {}",
                    self.spec.taps.len(),
                    feats.len()
                ),
            ));
        }
        let mut out = vec![];
        for ((f, tap), ((w, b), blocks)) in feats
            .iter()
            .zip(&self.spec.taps)
            .zip(self.norms.iter().zip(&self.flows))
        {
            intr.check()?;
            let s = f.size();
            let want = [tap.channels, tap.grid[0], tap.grid[1]];
            if s.len() != 4 || s[1..] != want || f.kind() != Kind::Float {
                return Err(KernelError::invalid(
                    "features",
                    format!(
                        "expected float32 (B, {}, {}, {}) features (the size the model was fitted at), got {s:?}",
                        want[0], want[1], want[2]
                    ),
                ));
            }
            let x = f.layer_norm(want.as_slice(), Some(w), Some(b), LAYER_NORM_EPS, false);
            out.push(flow(blocks, &x));
        }
        Ok(out)
    }
}

impl Objective for FastFlow {
    /// `inputs`: the taps' features (`targets` is unused).
    fn loss(
        &self,
        inputs: &[Tensor],
        _targets: &[Tensor],
        _train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor> {
        let out = self.forward(inputs, intr)?;
        let (zs, lds): (Vec<Tensor>, Vec<Tensor>) = out.into_iter().unzip();
        loss(&zs, &lds)
    }
}

fn check_pairs(zs: &[Tensor], log_dets: &[Tensor]) -> KernelResult<()> {
    let ok = !zs.is_empty()
        && zs.len() == log_dets.len()
        && zs.iter().zip(log_dets).all(|(z, l)| {
            let (s, t) = (z.size(), l.size());
            s.len() == 4 && t.len() == 3 && s[0] == t[0] && s[2..] == t[1..]
        });
    if !ok {
        return Err(KernelError::invalid(
            "log_dets",
            format!(
                "expected one (B, h, w) log-determinant map per (B, C, h, w) output, got {:?} and {:?}",
                zs.iter().map(|t| t.size()).collect::<Vec<_>>(),
                log_dets.iter().map(|t| t.size()).collect::<Vec<_>>()
            ),
        ));
    }
    Ok(())
}

/// The training loss: Σ_taps mean_batch(½ Σ z² − Σ ℓ), a scalar tensor.
pub fn loss(zs: &[Tensor], log_dets: &[Tensor]) -> KernelResult<Tensor> {
    check_pairs(zs, log_dets)?;
    let dims = [1i64, 2, 3].as_slice();
    let terms: Vec<Tensor> = zs
        .iter()
        .zip(log_dets)
        .map(|(z, l)| {
            let nll = z.square().sum_dim_intlist(dims, false, Kind::Float) * 0.5
                - l.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float);
            nll.mean(Kind::Float)
        })
        .collect();
    Ok(Tensor::stack(&terms, 0).sum(Kind::Float))
}

/// The map of each position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FlowMap {
    /// −exp(−½ mean_c z²) (anomalib's).
    Probability,
    /// ½ Σ_c z² − ℓ.
    Nll,
}

impl FlowMap {
    pub fn parse(name: &str) -> KernelResult<Self> {
        match name {
            "probability" => Ok(FlowMap::Probability),
            "nll" => Ok(FlowMap::Nll),
            other => Err(KernelError::invalid(
                "map_mode",
                format!("expected 'probability' or 'nll', got {other:?}"),
            )),
        }
    }
}

/// The anomaly maps (B, H, W) at `size` = (H, W): each tap's map upsampled bilinearly
/// (align_corners false), averaged over the taps.
pub fn anomaly_map(
    zs: &[Tensor],
    log_dets: &[Tensor],
    size: [i64; 2],
    mode: FlowMap,
) -> KernelResult<Tensor> {
    check_pairs(zs, log_dets)?;
    let one = [1i64].as_slice();
    let maps: Vec<Tensor> = zs
        .iter()
        .zip(log_dets)
        .map(|(z, l)| {
            let m = match mode {
                FlowMap::Probability => -(z.square().mean_dim(one, true, Kind::Float) * -0.5).exp(),
                FlowMap::Nll => {
                    z.square().sum_dim_intlist(one, true, Kind::Float) * 0.5 - l.unsqueeze(1)
                }
            };
            m.upsample_bilinear2d(size, false, None, None)
        })
        .collect();
    Ok(Tensor::cat(&maps, 1).mean_dim(one, false, Kind::Float))
}

#[cfg(test)]
mod tests {
    //! References: the log-determinant by autograd's full Jacobian on a tiny input, the inverse by
    //! composition; the equations against plain PyTorch are in tests/test_fastflow.py.

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::train::{OptimConfig, Optimiser, Schedule, Trainer};

    fn spec() -> FlowSpec {
        FlowSpec::new(
            vec![
                TapShape {
                    channels: 5,
                    grid: [4, 3],
                },
                TapShape {
                    channels: 4,
                    grid: [2, 2],
                },
            ],
            4,
            1.0,
            false,
            2.0,
        )
        .unwrap()
    }

    fn model(seed: u64) -> (nn::VarStore, FastFlow) {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = FastFlow::new(&vs.root(), &spec(), &mut InitRng::new(seed));
        (vs, m)
    }

    fn perturb(vs: &nn::VarStore) {
        // Away from the initial identity-like state, so every term matters.
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if !name.ends_with("permutation") {
                    let noise = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.3;
                    let _ = v.g_add_(&noise);
                }
            }
        });
    }

    #[test]
    fn spec_refusals_name_the_argument() {
        let tap = |c| TapShape {
            channels: c,
            grid: [2, 2],
        };
        for (taps, steps, ratio, clamp, arg) in [
            (vec![], 2, 1.0, 2.0, "layers"),
            (vec![tap(1)], 2, 1.0, 2.0, "layers"),
            (vec![tap(4)], 0, 1.0, 2.0, "flow_steps"),
            (vec![tap(4)], 2, 0.0, 2.0, "hidden_ratio"),
            (vec![tap(4)], 2, 0.1, 2.0, "hidden_ratio"),
            (vec![tap(4)], 2, 1.0, f64::NAN, "clamp"),
        ] {
            match FlowSpec::new(taps, steps, ratio, false, clamp) {
                Err(KernelError::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg),
                other => panic!(
                    "expected an error naming {arg}, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
        assert_eq!(spec().kernel(0), 3);
        assert_eq!(spec().kernel(1), 1);
    }

    #[test]
    fn inverse_undoes_the_flow_and_the_log_det_is_the_jacobians() {
        tch::manual_seed(0);
        let (vs, m) = model(3);
        perturb(&vs);
        let blocks = &m.flows[0];
        let x = Tensor::randn([2, 5, 4, 3], (Kind::Float, Device::Cpu));
        let (z, l) = flow(blocks, &x);
        let back = flow_inverse(blocks, &z);
        assert!((&back - &x).abs().max().double_value(&[]) < 1e-4);
        // log|det| of the full Jacobian of one image's 60 values, in float64
        let x64 = x.narrow(0, 0, 1).to_kind(Kind::Double);
        let blocks64: Vec<Coupling> = blocks
            .iter()
            .map(|b| {
                let t = [
                    &b.w1,
                    &b.b1,
                    &b.w2,
                    &b.b2,
                    &b.global_scale,
                    &b.global_offset,
                    &b.permutation,
                ]
                .map(|t| t.detach().to_kind(Kind::Double));
                Coupling::from_tensors(&t, 2.0).unwrap()
            })
            .collect();
        let n = 60;
        let mut rows = vec![];
        for i in 0..n {
            let xi = x64.detach().set_requires_grad(true);
            let (zi, _) = flow(&blocks64, &xi);
            let gi = Tensor::run_backward(&[zi.view([-1]).get(i)], &[&xi], false, false);
            rows.push(gi[0].view([-1]));
        }
        let jac = Tensor::stack(&rows, 0);
        let (_, logabsdet) = jac.slogdet();
        let want = logabsdet.double_value(&[]);
        let got = l.get(0).sum(Kind::Float).double_value(&[]);
        assert!(
            (got - want).abs() < 1e-3 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }

    #[test]
    fn loss_and_maps_follow_the_equations() {
        let z = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let l = Tensor::randn([2, 4, 4], (Kind::Float, Device::Cpu));
        let got = loss(&[z.shallow_clone()], &[l.shallow_clone()])
            .unwrap()
            .double_value(&[]);
        let want: f64 = (0..2)
            .map(|b| {
                0.5 * z.get(b).square().sum(Kind::Double).double_value(&[])
                    - l.get(b).sum(Kind::Double).double_value(&[])
            })
            .sum::<f64>()
            / 2.0;
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0));
        let map = anomaly_map(
            &[z.shallow_clone()],
            &[l.shallow_clone()],
            [4, 4],
            FlowMap::Probability,
        )
        .unwrap();
        let cell = |b: i64, i: i64, j: i64| {
            let m: f64 = (0..3)
                .map(|c| z.double_value(&[b, c, i, j]).powi(2))
                .sum::<f64>()
                / 3.0;
            -(-0.5 * m).exp()
        };
        assert!((map.double_value(&[1, 2, 3]) - cell(1, 2, 3)).abs() < 1e-6);
        let nll = anomaly_map(
            &[z.shallow_clone()],
            &[l.shallow_clone()],
            [4, 4],
            FlowMap::Nll,
        )
        .unwrap();
        let want = 0.5
            * (0..3)
                .map(|c| z.double_value(&[0, c, 1, 2]).powi(2))
                .sum::<f64>()
            - l.double_value(&[0, 1, 2]);
        assert!((nll.double_value(&[0, 1, 2]) - want).abs() < 1e-5);
        assert!(loss(&[z], &[]).is_err());
        assert!(FlowMap::parse("max").is_err());
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        tch::manual_seed(1);
        let a = Tensor::randn([8, 5, 4, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 4, 2, 2], (Kind::Float, Device::Cpu)) * 2.0 + 1.0;
        let run = || {
            let (vs, m) = model(5);
            let mut trainer = Trainer::new(vs, m);
            trainer
                .configure(OptimConfig {
                    optimiser: Optimiser::Adam {
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                    },
                    learning_rate: 0.01,
                    weight_decay: 1e-5,
                    grad_clip_norm: None,
                    schedule: Schedule::Constant,
                    total_steps: 40,
                })
                .unwrap();
            let order: Vec<i64> = (0..8).collect();
            let mut losses = vec![];
            for _ in 0..20 {
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
            let w = trainer.vs.variables()["tap0.step0.conv1_weight"].copy();
            (losses, w)
        };
        let (la, wa) = run();
        let (lb, wb) = run();
        assert!(la[19] < la[0] - 1.0, "{la:?}");
        assert_eq!(la, lb);
        assert!(wa.equal(&wb));
        let (vs, _) = model(5);
        let (other, _) = model(6);
        let p = |vs: &nn::VarStore| vs.variables()["tap1.step2.permutation"].copy();
        let mut sorted = p(&vs).sort(0, false).0;
        sorted = sorted.to_kind(Kind::Int64);
        assert!(sorted.equal(&Tensor::arange(4, (Kind::Int64, Device::Cpu))));
        assert!(!vs.variables()["tap0.step0.conv1_weight"]
            .equal(&other.variables()["tap0.step0.conv1_weight"]));
    }
}
