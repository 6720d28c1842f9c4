//! Trained heads over frozen features behind `anomalox.detectors` (the tch part): `HeadModel`,
//! one class for every detector whose trained network sees only the frozen backbone's taps
//! (Reverse Distillation's OCBE and decoder, FRE's autoencoder, FastFlow's flows), trained inside
//! Rust with the GIL
//! released; and each head's loss and map as functions (for tests against plain PyTorch).
//!
//! Python runs the frozen backbone once over the training images and hands its taps here; one
//! call trains one epoch (so Python can draw progress, keep the loss history and stop early).

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{nn, Device, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;
use anomalox::py::runtime::{argument_error, run, to_py_err};

use crate::py::{device_name, set_threads, to_device, Structure};
use crate::py_train::{combine_of, export_variables, import_variables, optim_config, tensors};
use crate::train::fastflow::{self, Coupling, FastFlow, FlowMap, FlowSpec, TapShape};
use crate::train::fre::{self, Fre, FreSpec};
use crate::train::rd::{self, lite_taps, resnet_taps, RdSpec, ReverseDistillation};
use crate::train::ssn::{self, SsnSpec, SuperSimpleNet};
use crate::train::stfpm::Combine;
use crate::train::student::InitRng;
use crate::train::{Objective, Trainer};

/// The trained heads.
pub enum Head {
    Rd(Box<ReverseDistillation>),
    Fre(Fre),
    FastFlow(FastFlow),
    Ssn(Box<SuperSimpleNet>),
}

impl Objective for Head {
    fn loss(
        &self,
        inputs: &[Tensor],
        targets: &[Tensor],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor> {
        match self {
            Head::Rd(m) => m.loss(inputs, targets, train, intr),
            Head::Fre(m) => m.loss(inputs, targets, train, intr),
            Head::FastFlow(m) => m.loss(inputs, targets, train, intr),
            Head::Ssn(m) => m.loss(inputs, targets, train, intr),
        }
    }

    fn begin_step(&self, step: usize) {
        if let Head::Ssn(m) = self {
            m.begin_step(step);
        }
    }
}

impl Head {
    /// The head's outputs for the taps `feats` in evaluation mode: Reverse Distillation's
    /// reconstructions of the taps; FRE's pooled features and their reconstruction; FastFlow's
    /// z (B, C, h, w) and log-determinant map ℓ (B, h, w) of each tap in turn; SuperSimpleNet's
    /// map logits (B, H, W) on its feature grid and score logits (B).
    fn outputs(&self, feats: &[Tensor], intr: &Interrupt) -> KernelResult<Vec<Tensor>> {
        match self {
            Head::Rd(m) => m.forward(feats, false, intr),
            Head::Fre(m) => {
                let [features] = feats else {
                    return Err(KernelError::invalid(
                        "features",
                        format!("expected the features of one tap, got {}", feats.len()),
                    ));
                };
                let (v, r) = m.forward(features)?;
                Ok(vec![v, r])
            }
            Head::FastFlow(m) => Ok(m
                .forward(feats, intr)?
                .into_iter()
                .flat_map(|(z, l)| [z, l])
                .collect()),
            Head::Ssn(m) => {
                let (map, score) = m.predict(feats)?;
                Ok(vec![map, score])
            }
        }
    }

    /// (maps (B, H, W) at `size` (SuperSimpleNet: on its feature grid), image scores or None for
    /// "the maximum of the map"); `mode`: Reverse Distillation's tap combination ("sum" or
    /// "product"), FastFlow's map ("probability" or "nll"), SuperSimpleNet's "logits", unused by
    /// FRE.
    fn maps(
        &self,
        feats: &[Tensor],
        size: [i64; 2],
        mode: &str,
        intr: &Interrupt,
    ) -> KernelResult<(Tensor, Option<Tensor>)> {
        let out = self.outputs(feats, intr)?;
        match self {
            Head::Rd(_) => {
                let combine = Combine::parse(mode)?;
                Ok((rd::anomaly_map(feats, &out, size, combine)?, None))
            }
            Head::FastFlow(_) => {
                let mode = FlowMap::parse(mode)?;
                let (zs, lds) = pairs(out);
                Ok((fastflow::anomaly_map(&zs, &lds, size, mode)?, None))
            }
            // On the feature grid: the caller upsamples and smooths.
            Head::Ssn(_) if mode != "logits" => Err(KernelError::invalid(
                "map_mode",
                format!("expected 'logits' (SuperSimpleNet's one map), got {mode:?}"),
            )),
            Head::Ssn(_) => {
                let mut out = out.into_iter();
                let (map, score) = (out.next(), out.next());
                Ok((map.expect("the map"), score))
            }
            Head::Fre(m) => {
                let [h, w] = m.spec.pooled();
                let (map, scores) = fre::anomaly_map(&out[0], &out[1], [m.spec.channels, h, w])?;
                // anomalib's FREModel: bilinear, align_corners false.
                let map = map
                    .unsqueeze(1)
                    .upsample_bilinear2d(size, false, None, None)
                    .squeeze_dim(1);
                Ok((map, Some(scores)))
            }
        }
    }
}

/// (name, channels, 0) per tap: the `taps` getter's entries where the stride is not recorded.
fn unrecorded_strides(layers: Vec<String>, channels: Vec<i64>) -> Vec<(String, i64, i64)> {
    layers
        .into_iter()
        .zip(channels)
        .map(|(name, c)| (name, c, 0))
        .collect()
}

/// Per tap (z, ℓ) from `outputs`' flat z, ℓ, z, ℓ, … list.
fn pairs(out: Vec<Tensor>) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut it = out.into_iter();
    let (mut zs, mut lds) = (vec![], vec![]);
    while let (Some(z), Some(l)) = (it.next(), it.next()) {
        zs.push(z);
        lds.push(l);
    }
    (zs, lds)
}

/// A trained head (built by one of the static constructors), freshly initialised (seeded).
#[pyclass(module = "anomalox_tch._tch", frozen)]
pub struct HeadModel {
    trainer: Mutex<Trainer<Head>>,
    arch: String,
    device: Device,
    taps: Vec<(String, i64, i64)>,
}

impl HeadModel {
    /// A head built by `make` in a fresh `VarStore` on CUDA device `cuda` (None: the CPU), with
    /// the GIL released; `taps` as the `taps` getter reports them.
    fn build(
        py: Python<'_>,
        arch: &str,
        cuda: Option<usize>,
        n_threads: usize,
        taps: Vec<(String, i64, i64)>,
        make: impl FnOnce(&nn::Path) -> Head + Send,
    ) -> PyResult<Self> {
        let device = to_device(cuda);
        let trainer = run(py, n_threads, move |_| {
            set_threads(n_threads);
            let vs = nn::VarStore::new(device);
            let head = make(&vs.root());
            Ok(Trainer::new(vs, head))
        })?;
        Ok(HeadModel {
            trainer: Mutex::new(trainer),
            arch: arch.to_string(),
            device,
            taps,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Trainer<Head>> {
        self.trainer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl HeadModel {
    /// Reverse Distillation's OCBE and decoder for encoder `arch` of `family` / `config` (as
    /// `BackboneModel`) at its taps `layers` (three, at strides s, 2s, 4s), its parameters drawn
    /// from `InitRng::new(seed)`, on the CPU (`cuda` None) or CUDA device `cuda`.
    #[staticmethod]
    #[pyo3(signature = (arch, family, config, layers, seed, cuda, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn reverse_distillation(
        py: Python<'_>,
        arch: &str,
        family: &str,
        config: &Bound<'_, pyo3::types::PyDict>,
        layers: Vec<String>,
        seed: u64,
        cuda: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Self> {
        let structure = Structure::from_config(family, config)?;
        let all = match &structure {
            Structure::Lite(c) => lite_taps(c),
            Structure::ResNet(c) => resnet_taps(c),
        };
        let mut chosen = vec![];
        for name in &layers {
            let tap = all.iter().find(|t| &t.name == name).ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
                argument_error(
                    "layers",
                    format!("the encoder has no tap {name:?}; its taps are {names:?}"),
                )
            })?;
            chosen.push(tap);
        }
        let spec = match &structure {
            Structure::Lite(_) => RdSpec::lite(&chosen),
            Structure::ResNet(c) => RdSpec::resnet(c, &chosen),
        }
        .map_err(to_py_err)?;
        let taps = chosen
            .iter()
            .map(|t| (t.name.clone(), t.channels, t.stride))
            .collect();
        HeadModel::build(py, arch, cuda, n_threads, taps, |root| {
            Head::Rd(Box::new(ReverseDistillation::new(
                root,
                &spec,
                &mut InitRng::new(seed),
            )))
        })
    }

    /// FRE's tied autoencoder for the taps of `channels` channels on a `grid` = (h, w) grid,
    /// average-pooled by `pool`, to `latent` dimensions (the backbone `arch` is recorded only),
    /// W drawn from `InitRng::new(seed)`, on the CPU (`cuda` None) or CUDA device `cuda`.
    #[staticmethod]
    #[pyo3(signature = (arch, layer, channels, grid, pool, latent, seed, cuda, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn fre(
        py: Python<'_>,
        arch: &str,
        layer: String,
        channels: i64,
        grid: (i64, i64),
        pool: i64,
        latent: i64,
        seed: u64,
        cuda: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Self> {
        let spec = FreSpec::new(channels, [grid.0, grid.1], pool, latent).map_err(to_py_err)?;
        let taps = vec![(layer, channels, 0)];
        HeadModel::build(py, arch, cuda, n_threads, taps, |root| {
            Head::Fre(Fre::new(root, &spec, &mut InitRng::new(seed)))
        })
    }

    /// FastFlow's LayerNorms and flows for the taps `layers` of `channels` channels on `grids`
    /// (h, w) (the backbone `arch` is recorded only): `steps` coupling blocks per tap, subnets of
    /// `hidden_ratio` × their input channels, 3×3 and 1×1 alternating unless `conv3x3_only`,
    /// affine clamping `clamp`; drawn from `InitRng::new(seed)`, on the CPU (`cuda` None) or CUDA
    /// device `cuda`.
    #[staticmethod]
    #[pyo3(signature = (arch, layers, channels, grids, steps, hidden_ratio, conv3x3_only, clamp, seed, cuda, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn fastflow(
        py: Python<'_>,
        arch: &str,
        layers: Vec<String>,
        channels: Vec<i64>,
        grids: Vec<(i64, i64)>,
        steps: usize,
        hidden_ratio: f64,
        conv3x3_only: bool,
        clamp: f64,
        seed: u64,
        cuda: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Self> {
        if layers.len() != channels.len() || layers.len() != grids.len() {
            return Err(argument_error(
                "layers",
                format!(
                    "expected one channel count and one grid per tap ({}), got {} and {}",
                    layers.len(),
                    channels.len(),
                    grids.len()
                ),
            ));
        }
        let shapes = channels
            .iter()
            .zip(&grids)
            .map(|(&c, &(h, w))| TapShape {
                channels: c,
                grid: [h, w],
            })
            .collect();
        let spec =
            FlowSpec::new(shapes, steps, hidden_ratio, conv3x3_only, clamp).map_err(to_py_err)?;
        HeadModel::build(
            py,
            arch,
            cuda,
            n_threads,
            unrecorded_strides(layers, channels),
            |root| Head::FastFlow(FastFlow::new(root, &spec, &mut InitRng::new(seed))),
        )
    }

    /// SuperSimpleNet's adaptor and heads for the taps `layers` of `channels` channels, the first
    /// on a `grid` = (h, w) grid (the backbone `arch` is recorded only), with feature noise σ
    /// `noise_std` and Perlin threshold `perlin_threshold`; drawn from `InitRng::new(seed)`, on the
    /// CPU (`cuda` None) or CUDA device `cuda`. The adaptor is variable group 1 (`set_group`).
    #[staticmethod]
    #[pyo3(signature = (arch, layers, channels, grid, noise_std, perlin_threshold, seed, cuda, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn supersimplenet(
        py: Python<'_>,
        arch: &str,
        layers: Vec<String>,
        channels: Vec<i64>,
        grid: (i64, i64),
        noise_std: f64,
        perlin_threshold: f64,
        seed: u64,
        cuda: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Self> {
        if layers.len() != channels.len() {
            return Err(argument_error(
                "layers",
                format!(
                    "expected one channel count per tap ({}), got {}",
                    layers.len(),
                    channels.len()
                ),
            ));
        }
        let spec = SsnSpec::new(
            channels.clone(),
            [grid.0, grid.1],
            noise_std,
            perlin_threshold,
        )
        .map_err(to_py_err)?;
        HeadModel::build(
            py,
            arch,
            cuda,
            n_threads,
            unrecorded_strides(layers, channels),
            |root| Head::Ssn(Box::new(SuperSimpleNet::new(root, &spec, seed))),
        )
    }

    /// Variable group `group` trains with its own base `learning_rate` and `weight_decay` (which
    /// the schedule scales like the configured rate).
    fn set_group(&self, group: usize, learning_rate: f64, weight_decay: f64) -> PyResult<()> {
        self.lock()
            .set_group(group, learning_rate, weight_decay)
            .map_err(to_py_err)
    }

    #[getter]
    fn arch(&self) -> &str {
        &self.arch
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.device)
    }

    /// (name, channels, stride) of the taps the head reads, in the order given (stride 0:
    /// not recorded).
    #[getter]
    fn taps(&self) -> Vec<(String, i64, i64)> {
        self.taps.clone()
    }

    /// Optimisation steps taken since the last `configure`.
    #[getter]
    fn step(&self) -> usize {
        self.lock().step
    }

    /// A fresh optimiser (as `StfpmStudent.configure`).
    #[pyo3(signature = (optimizer, learning_rate, weight_decay, momentum, dampening, nesterov, betas, eps, grad_clip_norm, schedule, total_steps))]
    #[allow(clippy::too_many_arguments)]
    fn configure(
        &self,
        optimizer: &str,
        learning_rate: f64,
        weight_decay: f64,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        betas: (f64, f64),
        eps: f64,
        grad_clip_norm: Option<f64>,
        schedule: &str,
        total_steps: usize,
    ) -> PyResult<()> {
        let config = optim_config(
            optimizer,
            learning_rate,
            weight_decay,
            momentum,
            dampening,
            nesterov,
            betas,
            eps,
            grad_clip_norm,
            schedule,
            total_steps,
        )?;
        self.lock().configure(config).map_err(to_py_err)
    }

    /// One epoch over the taps `encoder` (one (N, C, h, w) tensor per tap) in mini-batches of
    /// `batch_size` in `order`, stopping at `max_steps` steps in all; `images` is not used (the
    /// head sees only the taps). Returns each step's loss.
    #[pyo3(signature = (images, encoder, order, batch_size, max_steps, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn train_epoch(
        &self,
        py: Python<'_>,
        images: PyTensor,
        encoder: Vec<PyTensor>,
        order: Vec<i64>,
        batch_size: usize,
        max_steps: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Vec<f64>> {
        drop(images);
        let encoder = tensors(encoder);
        let trainer = &self.trainer;
        run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let mut trainer = trainer.lock().unwrap_or_else(|p| p.into_inner());
            trainer.epoch(&encoder, &[], &order, batch_size, max_steps, intr)
        })
    }

    /// The mean loss per image of the taps `encoder`, in evaluation mode.
    #[pyo3(signature = (images, encoder, batch_size, n_threads))]
    fn evaluate(
        &self,
        py: Python<'_>,
        images: PyTensor,
        encoder: Vec<PyTensor>,
        batch_size: usize,
        n_threads: usize,
    ) -> PyResult<f64> {
        drop(images);
        let encoder = tensors(encoder);
        let trainer = &self.trainer;
        run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let trainer = trainer.lock().unwrap_or_else(|p| p.into_inner());
            trainer.evaluate(&encoder, &[], batch_size, intr)
        })
    }

    /// The head's outputs for the taps `encoder`, in evaluation mode (on the model's device):
    /// Reverse Distillation's reconstructions of the taps; FRE's pooled, flattened features and
    /// their reconstruction; FastFlow's z and log-determinant map of each tap in turn.
    #[pyo3(signature = (encoder, n_threads))]
    fn features(
        &self,
        py: Python<'_>,
        encoder: Vec<PyTensor>,
        n_threads: usize,
    ) -> PyResult<Vec<PyTensor>> {
        let encoder = tensors(encoder);
        let (trainer, device) = (&self.trainer, self.device);
        let out = run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let trainer = trainer.lock().unwrap_or_else(|p| p.into_inner());
            let encoder: Vec<Tensor> = encoder.iter().map(|t| t.to_device(device)).collect();
            tch::no_grad(|| trainer.objective.outputs(&encoder, intr))
        })?;
        Ok(out.into_iter().map(PyTensor).collect())
    }

    /// (anomaly maps (B, H, W), image scores (B) or None) on the CPU at `size` = (H, W) (SuperSimpleNet:
    /// on its feature grid, for the caller to upsample) from the taps `encoder` (before smoothing),
    /// in evaluation mode; `mode`: Reverse Distillation's tap combination "sum" or "product",
    /// FastFlow's map "probability" or "nll", SuperSimpleNet's "logits", unused by FRE. None
    /// scores: the maximum of the smoothed map (Reverse Distillation, FastFlow); FRE's are the sum
    /// of its map on the pooled grid; SuperSimpleNet's the classification logits.
    #[pyo3(signature = (encoder, size, mode, n_threads))]
    fn maps(
        &self,
        py: Python<'_>,
        encoder: Vec<PyTensor>,
        size: (i64, i64),
        mode: String,
        n_threads: usize,
    ) -> PyResult<(PyTensor, Option<PyTensor>)> {
        let encoder = tensors(encoder);
        let (trainer, device) = (&self.trainer, self.device);
        let (map, scores) = run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let trainer = trainer.lock().unwrap_or_else(|p| p.into_inner());
            let encoder: Vec<Tensor> = encoder.iter().map(|t| t.to_device(device)).collect();
            tch::no_grad(|| {
                trainer
                    .objective
                    .maps(&encoder, [size.0, size.1], &mode, intr)
            })
            .map(|(m, s)| {
                (
                    m.to_device(Device::Cpu),
                    s.map(|s| s.to_device(Device::Cpu)),
                )
            })
        })?;
        Ok((PyTensor(map), scores.map(PyTensor)))
    }

    /// All parameters and batch-norm statistics, as CPU copies sorted by name.
    fn state_dict(&self) -> Vec<(String, PyTensor)> {
        export_variables(&self.lock().vs, |_| true)
    }

    /// Replace the parameters with those of a `state_dict()` (names and shapes must match;
    /// FastFlow's permutations must be permutations).
    fn load_state_dict(&self, entries: Vec<(String, PyTensor)>) -> PyResult<()> {
        for (name, t) in &entries {
            if name.ends_with("permutation") {
                let n = t.0.size().first().copied().unwrap_or(0);
                let sorted = t.0.to_kind(tch::Kind::Int64).sort(0, false).0;
                let want = Tensor::arange(n, (tch::Kind::Int64, Device::Cpu));
                if t.0.dim() != 1 || !sorted.to_device(Device::Cpu).equal(&want) {
                    return Err(argument_error(
                        "state",
                        format!("expected {name} to be a permutation of 0..{n}, got other values"),
                    ));
                }
            }
        }
        let what = match &self.lock().objective {
            Head::Rd(_) => format!(
                "the Reverse Distillation model of {} at these taps",
                self.arch
            ),
            Head::Fre(m) => format!("the FRE autoencoder of {:?}", m.spec),
            Head::FastFlow(m) => format!("the FastFlow flows of {:?}", m.spec),
            Head::Ssn(m) => format!("the SuperSimpleNet heads of {:?}", m.spec),
        };
        import_variables(&self.lock().vs, entries, |_| true, &what)
    }
}

/// Reverse Distillation's training loss of `decoder` against `encoder` features (lists of
/// (B, C, h, w), one per tap): a scalar tensor, differentiable (see `train::rd`).
#[pyfunction]
pub fn rd_loss(encoder: Vec<PyTensor>, decoder: Vec<PyTensor>) -> PyResult<PyTensor> {
    rd::loss(&tensors(encoder), &tensors(decoder))
        .map(PyTensor)
        .map_err(to_py_err)
}

/// Reverse Distillation's anomaly maps (B, H, W) at `size` = (H, W), before smoothing;
/// `combine` "sum" (anomalib's default) or "product".
#[pyfunction]
#[pyo3(signature = (encoder, decoder, size, combine, n_threads))]
pub fn rd_map(
    py: Python<'_>,
    encoder: Vec<PyTensor>,
    decoder: Vec<PyTensor>,
    size: (i64, i64),
    combine: &str,
    n_threads: usize,
) -> PyResult<PyTensor> {
    let combine = combine_of(combine)?;
    let (encoder, decoder) = (tensors(encoder), tensors(decoder));
    let map = run(py, n_threads, move |_| {
        set_threads(n_threads);
        tch::no_grad(|| rd::anomaly_map(&encoder, &decoder, [size.0, size.1], combine))
    })?;
    Ok(PyTensor(map))
}

/// FRE's training loss of the reconstruction `r` of the pooled, flattened features `v` (both
/// (B, D)): a scalar tensor, differentiable (see `train::fre`).
#[pyfunction]
pub fn fre_loss(v: PyTensor, r: PyTensor) -> PyResult<PyTensor> {
    fre::loss(&v.0, &r.0).map(PyTensor).map_err(to_py_err)
}

/// FRE's (maps (B, h', w'), image scores (B)) of `v` and `r` on the pooled grid
/// `grid` = (C, h', w').
#[pyfunction]
pub fn fre_map(v: PyTensor, r: PyTensor, grid: (i64, i64, i64)) -> PyResult<(PyTensor, PyTensor)> {
    let (map, scores) =
        fre::anomaly_map(&v.0, &r.0, [grid.0, grid.1, grid.2]).map_err(to_py_err)?;
    Ok((PyTensor(map), PyTensor(scores)))
}

/// FastFlow's coupling blocks `blocks` (each `[conv1_weight, conv1_bias, conv2_weight,
/// conv2_bias, global_scale, global_offset, permutation]`, used as given: gradients reach them)
/// applied in order to `x` (B, C, h, w) with affine clamping `clamp`: (z, ℓ (B, h, w)); with
/// `inverse`, the x whose flow is the given z, and ℓ None (see `train::fastflow`).
#[pyfunction]
#[pyo3(signature = (x, blocks, clamp, inverse))]
pub fn fastflow_flow(
    x: PyTensor,
    blocks: Vec<Vec<PyTensor>>,
    clamp: f64,
    inverse: bool,
) -> PyResult<(PyTensor, Option<PyTensor>)> {
    let blocks = blocks
        .into_iter()
        .map(|b| Coupling::from_tensors(&tensors(b), clamp))
        .collect::<KernelResult<Vec<_>>>()
        .map_err(to_py_err)?;
    if inverse {
        return Ok((PyTensor(fastflow::flow_inverse(&blocks, &x.0)), None));
    }
    let (z, l) = fastflow::flow(&blocks, &x.0);
    Ok((PyTensor(z), Some(PyTensor(l))))
}

/// FastFlow's training loss of the outputs `zs` (B, C, h, w) and log-determinant maps
/// `log_dets` (B, h, w), one per tap: a scalar tensor, differentiable.
#[pyfunction]
pub fn fastflow_loss(zs: Vec<PyTensor>, log_dets: Vec<PyTensor>) -> PyResult<PyTensor> {
    fastflow::loss(&tensors(zs), &tensors(log_dets))
        .map(PyTensor)
        .map_err(to_py_err)
}

/// FastFlow's anomaly maps (B, H, W) at `size` = (H, W); `mode` "probability" or "nll".
#[pyfunction]
#[pyo3(signature = (zs, log_dets, size, mode))]
pub fn fastflow_map(
    zs: Vec<PyTensor>,
    log_dets: Vec<PyTensor>,
    size: (i64, i64),
    mode: &str,
) -> PyResult<PyTensor> {
    let mode = FlowMap::parse(mode).map_err(to_py_err)?;
    fastflow::anomaly_map(&tensors(zs), &tensors(log_dets), [size.0, size.1], mode)
        .map(PyTensor)
        .map_err(to_py_err)
}

/// SuperSimpleNet's training loss of map logits `map` (B, 1, H, W) and score logits `score` (B)
/// against `masks` (B, 1, H, W) and `labels` (B): a scalar tensor, differentiable.
#[pyfunction]
pub fn ssn_loss(
    map: PyTensor,
    score: PyTensor,
    masks: PyTensor,
    labels: PyTensor,
) -> PyResult<PyTensor> {
    ssn::loss(&map.0, &score.0, &masks.0, &labels.0)
        .map(PyTensor)
        .map_err(to_py_err)
}

/// `n` of SuperSimpleNet's Perlin masks (n, 1, h, w) drawn from `InitRng::new(seed)`.
#[pyfunction]
pub fn ssn_perlin_masks(seed: u64, n: i64, h: i64, w: i64, threshold: f64) -> PyTensor {
    PyTensor(ssn::perlin_masks(
        &mut InitRng::new(seed),
        n,
        h,
        w,
        threshold,
    ))
}
