//! FRE (Ndiour, Ahuja & Tickoo, BMVC 2023, "FRE: A Fast Method For Anomaly Detection And
//! Segmentation"): a shallow linear autoencoder with tied weights learns to reconstruct the
//! frozen backbone's features of good images; the feature reconstruction error is the anomaly
//! measure.
//!
//! With f the features of one tap (B, C, h, w), average-pooled by a k×k window with stride k
//! (`F.avg_pool2d(f, k)`, no padding, the last partial window dropped; k = 1 leaves them as they
//! are) to (B, C, h', w') and flattened channel-major to v (B, D), D = C·h'·w':
//! - reconstruction r = (v Wᵀ + b_e) W + b_d with W (L, D) and biases b_e (L), b_d (D);
//! - loss = mean over the batch and the D values of (v − r)² (`torch.nn.MSELoss()`);
//! - map = Σ_channels (v − r)² at each of the h' × w' positions, image score Σ_positions map
//!   (anomalib 2.7.0's `FREModel`; the map is upsampled by the caller).
//!
//! Initialisation as anomalib's `TiedAE`: W ~ U(−a, a) with a = √(6 / (D + L))
//! (`xavier_uniform_`), both biases 0.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;

use super::student::InitRng;
use super::Objective;

/// The shape an FRE autoencoder is built for.
#[derive(Clone, Debug, PartialEq)]
pub struct FreSpec {
    /// The tap's channels C.
    pub channels: i64,
    /// The tap's grid (h, w) before pooling.
    pub grid: [i64; 2],
    /// The pooling window and stride k (1: no pooling).
    pub pool: i64,
    /// The latent dimension L.
    pub latent: i64,
}

impl FreSpec {
    /// A checked spec: every size positive and the pooled grid at least 1 × 1.
    pub fn new(channels: i64, grid: [i64; 2], pool: i64, latent: i64) -> KernelResult<Self> {
        if pool < 1 {
            return Err(KernelError::invalid(
                "pooling_kernel_size",
                format!("expected a positive window, got {pool}"),
            ));
        }
        if latent < 1 {
            return Err(KernelError::invalid(
                "latent_dim",
                format!("expected a positive dimension, got {latent}"),
            ));
        }
        if channels < 1 || grid[0] < pool || grid[1] < pool {
            return Err(KernelError::invalid(
                "pooling_kernel_size",
                format!(
                    "expected a window no larger than the tap's grid {grid:?} (with {channels} channels), got {pool}"
                ),
            ));
        }
        Ok(FreSpec {
            channels,
            grid,
            pool,
            latent,
        })
    }

    /// The pooled grid (h', w').
    pub fn pooled(&self) -> [i64; 2] {
        [self.grid[0] / self.pool, self.grid[1] / self.pool]
    }

    /// The autoencoder's input dimension D = C·h'·w'.
    pub fn dim(&self) -> i64 {
        let [h, w] = self.pooled();
        self.channels * h * w
    }
}

/// The tied autoencoder.
pub struct Fre {
    pub spec: FreSpec,
    weight: Tensor,
    encoder_bias: Tensor,
    decoder_bias: Tensor,
}

impl Fre {
    /// Parameters `weight`, `encoder_bias`, `decoder_bias` under `root`, W drawn from `rng`.
    pub fn new(root: &nn::Path, spec: &FreSpec, rng: &mut InitRng) -> Self {
        let (d, l) = (spec.dim(), spec.latent);
        let bound = (6.0 / (d + l) as f64).sqrt();
        let values = rng.uniform_symmetric((d * l) as usize, bound);
        let weight = Tensor::from_slice(&values)
            .view([l, d])
            .to_device(root.device());
        Fre {
            spec: spec.clone(),
            weight: root.add("weight", weight, true),
            encoder_bias: root.var("encoder_bias", &[l], Init::Const(0.0)),
            decoder_bias: root.var("decoder_bias", &[d], Init::Const(0.0)),
        }
    }

    /// The pooled, flattened features v (B, D) of one tap's features (B, C, h, w).
    pub fn pooled(&self, features: &Tensor) -> KernelResult<Tensor> {
        let s = features.size();
        let spec = &self.spec;
        if s.len() != 4
            || s[1] != spec.channels
            || s[2] != spec.grid[0]
            || s[3] != spec.grid[1]
            || features.kind() != Kind::Float
        {
            return Err(KernelError::invalid(
                "features",
                format!(
                    "expected float32 (B, {}, {}, {}) features (the size the model was fitted at), got {s:?}",
                    spec.channels, spec.grid[0], spec.grid[1]
                ),
            ));
        }
        let k = spec.pool;
        let pooled = if k > 1 {
            features.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
        } else {
            features.shallow_clone()
        };
        Ok(pooled.contiguous().view([s[0], -1]))
    }

    /// The reconstruction r (B, D) of `v` (B, D).
    pub fn reconstruct(&self, v: &Tensor) -> Tensor {
        let encoded = v.linear(&self.weight, Some(&self.encoder_bias));
        encoded.linear(&self.weight.tr(), Some(&self.decoder_bias))
    }

    /// (v, r) for one tap's features.
    pub fn forward(&self, features: &Tensor) -> KernelResult<(Tensor, Tensor)> {
        let v = self.pooled(features)?;
        let r = self.reconstruct(&v);
        Ok((v, r))
    }
}

impl Objective for Fre {
    /// `inputs`: the one tap's features (`targets` is unused).
    fn loss(
        &self,
        inputs: &[Tensor],
        _targets: &[Tensor],
        _train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor> {
        intr.check()?;
        let [features] = inputs else {
            return Err(KernelError::invalid(
                "features",
                format!("expected the features of one tap, got {}", inputs.len()),
            ));
        };
        let (v, r) = self.forward(features)?;
        loss(&v, &r)
    }
}

fn check_pair(v: &Tensor, r: &Tensor) -> KernelResult<()> {
    if v.dim() != 2 || v.size() != r.size() {
        return Err(KernelError::invalid(
            "reconstruction",
            format!(
                "expected (B, D) features and reconstruction of one shape, got {:?} and {:?}",
                v.size(),
                r.size()
            ),
        ));
    }
    Ok(())
}

/// The training loss: the mean of (v − r)², a scalar tensor.
pub fn loss(v: &Tensor, r: &Tensor) -> KernelResult<Tensor> {
    check_pair(v, r)?;
    Ok((v - r).square().mean(Kind::Float))
}

/// (maps (B, h', w'), image scores (B)) of features `v` and reconstruction `r` (B, C·h'·w') on
/// the pooled grid `grid` = (C, h', w').
pub fn anomaly_map(v: &Tensor, r: &Tensor, grid: [i64; 3]) -> KernelResult<(Tensor, Tensor)> {
    check_pair(v, r)?;
    let b = v.size()[0];
    if grid.iter().product::<i64>() != v.size()[1] {
        return Err(KernelError::invalid(
            "reconstruction",
            format!(
                "expected {} values per image for the grid {grid:?}, got {}",
                grid.iter().product::<i64>(),
                v.size()[1]
            ),
        ));
    }
    let map = (v - r)
        .square()
        .view([b, grid[0], grid[1], grid[2]])
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let scores = map.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float);
    Ok((map, scores))
}

#[cfg(test)]
mod tests {
    //! References: the equations above written with plain tensor ops (explicit windows for the
    //! pooling, the matrix products for the autoencoder); Adam against `torch.optim.Adam` is in
    //! tests/test_fre.py.

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::train::{OptimConfig, Optimiser, Schedule, Trainer};

    fn head(seed: u64) -> (nn::VarStore, Fre) {
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = FreSpec::new(3, [5, 7], 2, 4).unwrap();
        let fre = Fre::new(&vs.root(), &spec, &mut InitRng::new(seed));
        (vs, fre)
    }

    #[test]
    fn spec_sizes_and_refusals() {
        let spec = FreSpec::new(3, [5, 7], 2, 4).unwrap();
        assert_eq!(spec.pooled(), [2, 3]);
        assert_eq!(spec.dim(), 18);
        for (c, grid, pool, latent, arg) in [
            (3, [5, 7], 0, 4, "pooling_kernel_size"),
            (3, [5, 7], 6, 4, "pooling_kernel_size"),
            (3, [5, 7], 2, 0, "latent_dim"),
        ] {
            match FreSpec::new(c, grid, pool, latent) {
                Err(KernelError::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg),
                other => panic!(
                    "expected an error naming {arg}, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
    }

    #[test]
    fn initialisation_is_xavier_uniform_and_seeded() {
        let (vs, _) = head(7);
        let vars = vs.variables();
        let w = &vars["weight"];
        assert_eq!(w.size(), [4, 18]);
        let bound = (6.0f64 / 22.0).sqrt();
        let max = w.abs().max().double_value(&[]);
        assert!(max <= bound && max > 0.5 * bound, "{max} vs {bound}");
        assert_eq!(
            vars["encoder_bias"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(
            vars["decoder_bias"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        let (again, _) = head(7);
        assert!(again.variables()["weight"].equal(w));
        let (other, _) = head(8);
        assert!(!other.variables()["weight"].equal(w));
    }

    #[test]
    fn pooling_reconstruction_loss_and_map_follow_the_equations() {
        let (vs, fre) = head(1);
        let f = Tensor::randn([2, 3, 5, 7], (Kind::Float, Device::Cpu));
        let (v, r) = fre.forward(&f).unwrap();
        // pooling: the mean of each 2 x 2 window from the top-left, the last row dropped
        let mut cells = vec![];
        for c in 0..3 {
            for i in 0..2 {
                for j in 0..3 {
                    cells.push(
                        f.narrow(1, c, 1)
                            .narrow(2, 2 * i, 2)
                            .narrow(3, 2 * j, 2)
                            .mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float),
                    );
                }
            }
        }
        let want = Tensor::stack(&cells, 1);
        assert!((&v - &want).abs().max().double_value(&[]) < 1e-6);
        let vars = vs.variables();
        let (w, be, bd) = (
            &vars["weight"],
            &vars["encoder_bias"],
            &vars["decoder_bias"],
        );
        let want_r = (v.matmul(&w.tr()) + be).matmul(w) + bd;
        assert!((&r - &want_r).abs().max().double_value(&[]) < 1e-6);
        let l = loss(&v, &r).unwrap().double_value(&[]);
        let d = (&v - &r).square();
        assert!((l - d.mean(Kind::Float).double_value(&[])).abs() < 1e-7);
        let (map, scores) = anomaly_map(&v, &r, [3, 2, 3]).unwrap();
        assert_eq!(map.size(), [2, 2, 3]);
        let cell = |b: i64, i: i64, j: i64| -> f64 {
            (0..3)
                .map(|c| d.double_value(&[b, c * 6 + i * 3 + j]))
                .sum()
        };
        assert!((map.double_value(&[1, 1, 2]) - cell(1, 1, 2)).abs() < 1e-6);
        let total: f64 = (0..2)
            .flat_map(|i| (0..3).map(move |j| (i, j)))
            .map(|(i, j)| cell(0, i, j))
            .sum();
        assert!((scores.double_value(&[0]) - total).abs() < 1e-5 * total.max(1.0));
        assert!(fre
            .pooled(&Tensor::randn([2, 3, 6, 7], (Kind::Float, Device::Cpu)))
            .is_err());
    }

    #[test]
    fn training_lowers_the_loss_and_is_deterministic() {
        let data = Tensor::randn([12, 3, 5, 7], (Kind::Float, Device::Cpu));
        let run = || {
            let (vs, fre) = head(3);
            let mut trainer = Trainer::new(vs, fre);
            let config = OptimConfig {
                optimiser: Optimiser::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                learning_rate: 0.02,
                weight_decay: 0.0,
                grad_clip_norm: None,
                schedule: Schedule::Constant,
                total_steps: 90,
            };
            trainer.configure(config).unwrap();
            let order: Vec<i64> = (0..12).collect();
            let mut losses = vec![];
            for _ in 0..30 {
                let l = trainer
                    .epoch(
                        &[data.shallow_clone()],
                        &[],
                        &order,
                        4,
                        None,
                        &Interrupt::never(),
                    )
                    .unwrap();
                losses.push(l.iter().sum::<f64>() / l.len() as f64);
            }
            (losses, trainer.vs.variables()["weight"].copy())
        };
        let (a, wa) = run();
        let (b, wb) = run();
        assert!(a[29] < 0.5 * a[0], "{a:?}");
        assert_eq!(a, b);
        assert!(wa.equal(&wb));
    }
}
