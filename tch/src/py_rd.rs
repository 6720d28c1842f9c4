//! Reverse Distillation behind `anomalox.detectors.ReverseDistillation` (the tch part): `RdModel`,
//! the OCBE and decoder trained inside Rust with the GIL released, and the loss and map as
//! functions (for tests against plain PyTorch).
//!
//! Python runs the frozen encoder once over the training images and hands its taps here; the
//! model is trained to give them back (they are its inputs and its targets), one epoch per call.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{nn, Device, Tensor};

use anomalox::py::runtime::{argument_error, run, to_py_err};

use crate::py::{device_name, set_threads, to_device, Structure};
use crate::py_train::{combine_of, export_variables, import_variables, optim_config, tensors};
use crate::train::rd::{self, lite_taps, resnet_taps, RdSpec, ReverseDistillation};
use crate::train::student::InitRng;
use crate::train::Trainer;

/// The OCBE and decoder of a Reverse Distillation detector for the encoder `arch`'s taps
/// `layers`, freshly initialised (seeded).
#[pyclass(module = "anomalox_tch._tch", frozen)]
pub struct RdModel {
    trainer: Mutex<Trainer<ReverseDistillation>>,
    arch: String,
    device: Device,
    taps: Vec<(String, i64, i64)>,
}

impl RdModel {
    fn lock(&self) -> std::sync::MutexGuard<'_, Trainer<ReverseDistillation>> {
        self.trainer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl RdModel {
    /// A new model for encoder `arch` of `family` / `config` (as `BackboneModel`) at its taps
    /// `layers` (three, at strides s, 2s, 4s), its parameters drawn from `InitRng::new(seed)`, on
    /// the CPU (`cuda` None) or CUDA device `cuda`.
    #[new]
    #[pyo3(signature = (arch, family, config, layers, seed, cuda, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn new(
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
        let device = to_device(cuda);
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
        let trainer = run(py, n_threads, move |_| {
            set_threads(n_threads);
            let vs = nn::VarStore::new(device);
            let model = ReverseDistillation::new(&vs.root(), &spec, &mut InitRng::new(seed));
            Ok(Trainer::new(vs, model))
        })?;
        Ok(RdModel {
            trainer: Mutex::new(trainer),
            arch: arch.to_string(),
            device,
            taps,
        })
    }

    #[getter]
    fn arch(&self) -> &str {
        &self.arch
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.device)
    }

    /// (name, channels, stride) of the encoder taps, in the order given.
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

    /// One epoch over the encoder taps `encoder` (one (N, C, h, w) tensor per tap) in
    /// mini-batches of `batch_size` in `order`, stopping at `max_steps` steps in all; `images` is
    /// not used (the model sees only the taps). Returns each step's loss.
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

    /// The mean loss per image of the encoder taps `encoder`, in evaluation mode.
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

    /// The decoder's reconstructions of the encoder taps `encoder`, in evaluation mode (on the
    /// model's device).
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
            tch::no_grad(|| trainer.objective.forward(&encoder, false, intr))
        })?;
        Ok(out.into_iter().map(PyTensor).collect())
    }

    /// Anomaly maps (B, H, W) on the CPU at `size` = (H, W) from the encoder taps `encoder`
    /// (before smoothing), in evaluation mode; `combine` "sum" or "product".
    #[pyo3(signature = (encoder, size, combine, n_threads))]
    fn maps(
        &self,
        py: Python<'_>,
        encoder: Vec<PyTensor>,
        size: (i64, i64),
        combine: &str,
        n_threads: usize,
    ) -> PyResult<PyTensor> {
        let combine = combine_of(combine)?;
        let encoder = tensors(encoder);
        let (trainer, device) = (&self.trainer, self.device);
        let map = run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let trainer = trainer.lock().unwrap_or_else(|p| p.into_inner());
            let encoder: Vec<Tensor> = encoder.iter().map(|t| t.to_device(device)).collect();
            tch::no_grad(|| {
                let decoded = trainer.objective.forward(&encoder, false, intr)?;
                rd::anomaly_map(&encoder, &decoded, [size.0, size.1], combine)
            })
            .map(|m| m.to_device(Device::Cpu))
        })?;
        Ok(PyTensor(map))
    }

    /// All parameters and batch-norm statistics, as CPU copies sorted by name.
    fn state_dict(&self) -> Vec<(String, PyTensor)> {
        export_variables(&self.lock().vs, |_| true)
    }

    /// Replace the parameters with those of a `state_dict()` (names and shapes must match).
    fn load_state_dict(&self, entries: Vec<(String, PyTensor)>) -> PyResult<()> {
        let what = format!(
            "the Reverse Distillation model of {} at these taps",
            self.arch
        );
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
