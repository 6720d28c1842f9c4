//! Trained networks behind `anomalox.detectors` (the tch part): `StfpmStudent`, an STFPM student
//! trained inside Rust with the GIL released, and the STFPM loss and map as functions (for tests
//! against plain PyTorch).
//!
//! Python owns the data: it preprocesses the images, runs the frozen teacher once over them and
//! hands both here with the seeded order of each epoch; one call trains one epoch (so Python can
//! draw progress, keep the loss history and stop early between epochs). Scoring runs the trained
//! student as an inference network (batch norm folded into the convolutions, channels-last), built
//! from the trained weights on first use.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{nn, Device, Kind, Tensor};

use anomalox::error::KernelError;
use anomalox::py::runtime::{argument_error, run, to_py_err};

use crate::nets::params::{self, StateDict};
use crate::nets::Backbone;
use crate::py::{device_name, set_threads, to_device, Structure};
use crate::train::stfpm::{self, Combine, Student};
use crate::train::student::{InitRng, LiteNet, ResNetNet, Trainable};
use crate::train::{OptimConfig, Optimiser, Schedule, Trainer};

pub(crate) fn tensors(list: Vec<PyTensor>) -> Vec<Tensor> {
    list.into_iter().map(|t| t.0).collect()
}

/// The `map_combine` argument: "product" or "sum".
pub(crate) fn combine_of(combine: &str) -> PyResult<Combine> {
    Combine::parse(combine).map_err(to_py_err)
}

/// The variables of `vs` whose names pass `keep`, as contiguous CPU copies sorted by name.
pub(crate) fn export_variables(
    vs: &nn::VarStore,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, PyTensor)> {
    let mut out: Vec<(String, PyTensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, t)| {
            (
                k,
                PyTensor(t.detach().to_device(Device::Cpu).contiguous().copy()),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Copy `entries` (an `export_variables` list) into the variables of `vs` whose names pass
/// `keep`: every such variable must be given, nothing else, each with its shape; otherwise an
/// error naming `state` and `what` (the network the weights were meant for), with nothing copied.
pub(crate) fn import_variables(
    vs: &nn::VarStore,
    entries: Vec<(String, PyTensor)>,
    keep: impl Fn(&str) -> bool,
    what: &str,
) -> PyResult<()> {
    let vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| keep(k))
        .collect();
    let given: std::collections::HashMap<String, Tensor> =
        entries.into_iter().map(|(k, t)| (k, t.0)).collect();
    let missing: Vec<&String> = vars
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !given.contains_key(*k))
        .collect();
    let unexpected: Vec<&String> = given
        .keys()
        .filter(|k| !vars.iter().any(|(v, _)| v == *k))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(argument_error(
            "state",
            format!(
                "the weights do not fit {what}: {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
                missing.len(),
                missing.first(),
                unexpected.len(),
                unexpected.first()
            ),
        ));
    }
    for (name, var) in &vars {
        let t = &given[name];
        if t.size() != var.size() {
            return Err(argument_error(
                "state",
                format!(
                    "{name:?}: expected shape {:?}, got {:?}",
                    var.size(),
                    t.size()
                ),
            ));
        }
    }
    tch::no_grad(|| {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.copy_(&given[name]);
        }
    });
    Ok(())
}

/// Whether parameter `name` belongs to the part of the network a forward pass to tap `last` runs
/// (the stem and the blocks / layers up to that tap).
fn runs_up_to(name: &str, last: usize) -> bool {
    let mut parts = name.split('.');
    match parts.next() {
        Some("_conv_stem" | "_bn0" | "conv1" | "bn1") => true,
        Some("_blocks") => parts
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i <= last),
        Some(layer) if layer.starts_with("layer") => layer[5..]
            .parse::<usize>()
            .ok()
            .is_some_and(|k| k >= 1 && k - 1 <= last),
        _ => false,
    }
}

/// The optimiser settings of `configure` (shared by the trained models' classes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn optim_config(
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
) -> PyResult<OptimConfig> {
    let optimiser = match optimizer {
        "sgd" => Optimiser::Sgd {
            momentum,
            dampening,
            nesterov,
        },
        "adam" => Optimiser::Adam {
            beta1: betas.0,
            beta2: betas.1,
            eps,
        },
        "adamw" => Optimiser::AdamW {
            beta1: betas.0,
            beta2: betas.1,
            eps,
        },
        _ => {
            return Err(argument_error(
                "optimizer",
                format!("expected 'sgd', 'adam' or 'adamw', got {optimizer:?}"),
            ))
        }
    };
    let schedule = match schedule {
        "constant" => Schedule::Constant,
        "cosine" => Schedule::Cosine,
        "multistep" => Schedule::MultiStep,
        _ => {
            return Err(argument_error(
                "lr_schedule",
                format!("expected 'constant', 'cosine' or 'multistep', got {schedule:?}"),
            ))
        }
    };
    Ok(OptimConfig {
        optimiser,
        learning_rate,
        weight_decay,
        grad_clip_norm,
        schedule,
        total_steps,
    })
}

struct State {
    trainer: Trainer<Student>,
    /// The folded network `features` runs, rebuilt after the weights change.
    inference: Option<Box<dyn Backbone>>,
}

/// A student network of an STFPM detector: built freshly initialised (seeded) with the teacher's
/// architecture, trained to match the teacher's features at `layers`.
#[pyclass(module = "anomalox_tch._tch", frozen)]
pub struct StfpmStudent {
    state: Mutex<State>,
    structure: Structure,
    arch: String,
    device: Device,
    taps: Vec<(String, i64, i64)>,
    last: usize,
}

impl StfpmStudent {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl StfpmStudent {
    /// A new student `arch` of `family` / `config` (as `BackboneModel`), its initial parameters
    /// drawn from `InitRng::new(seed)`, on the CPU (`cuda` None) or CUDA device `cuda`.
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
        let spec = &structure;
        let (trainer, taps, last) = run(py, n_threads, move |_| {
            set_threads(n_threads);
            let vs = nn::VarStore::new(device);
            let rng = &mut InitRng::new(seed);
            let net: Box<dyn Trainable> = match spec {
                Structure::Lite(c) => Box::new(LiteNet::new(&vs.root(), c, rng)),
                Structure::ResNet(c) => Box::new(ResNetNet::new(&vs.root(), c, rng)),
            };
            let mut wanted = vec![];
            for name in &layers {
                let i = net
                    .taps()
                    .iter()
                    .position(|t| &t.name == name)
                    .ok_or_else(|| {
                        let names: Vec<&str> = net.taps().iter().map(|t| t.name.as_str()).collect();
                        KernelError::invalid(
                            "layers",
                            format!("the student has no tap {name:?}; its taps are {names:?}"),
                        )
                    })?;
                wanted.push(i);
            }
            let Some(&last) = wanted.iter().max() else {
                return Err(KernelError::invalid(
                    "layers",
                    "expected at least one tap name, got none",
                ));
            };
            let taps = wanted
                .iter()
                .map(|&i| {
                    let t = &net.taps()[i];
                    (t.name.clone(), t.channels, t.stride)
                })
                .collect::<Vec<_>>();
            let trainer = Trainer::new(vs, Student { net, wanted });
            Ok((trainer, taps, last))
        })?;
        Ok(StfpmStudent {
            state: Mutex::new(State {
                trainer,
                inference: None,
            }),
            structure,
            arch: arch.to_string(),
            device,
            taps,
            last,
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

    /// (name, channels, stride) of the matched taps, in the order given.
    #[getter]
    fn taps(&self) -> Vec<(String, i64, i64)> {
        self.taps.clone()
    }

    /// Optimisation steps taken since the last `configure`.
    #[getter]
    fn step(&self) -> usize {
        self.lock().trainer.step
    }

    /// A fresh optimiser: "sgd" (momentum, dampening, nesterov) or "adam" (betas, eps), with L2
    /// weight decay, optional gradient-norm clipping and a "constant" or "cosine" learning rate
    /// over `total_steps`.
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
        self.lock()
            .trainer
            .configure(config)
            .map_err(anomalox::py::runtime::to_py_err)
    }

    /// One epoch: mini-batches of `batch_size` rows of `images` (N, 3, H, W) and `teacher` (one
    /// (N, C, h, w) tensor per tap) in `order`, stopping at `max_steps` steps in all. Returns each
    /// step's loss. Raises on a non-finite loss (naming the step) before any update from it.
    #[pyo3(signature = (images, teacher, order, batch_size, max_steps, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn train_epoch(
        &self,
        py: Python<'_>,
        images: PyTensor,
        teacher: Vec<PyTensor>,
        order: Vec<i64>,
        batch_size: usize,
        max_steps: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Vec<f64>> {
        let (images, teacher) = (images.0, tensors(teacher));
        let state = &self.state;
        run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.inference = None;
            let x = params::channels_last(&images);
            state
                .trainer
                .epoch(&[x], &teacher, &order, batch_size, max_steps, intr)
        })
    }

    /// The mean loss per image of `images` against `teacher`, in evaluation mode.
    #[pyo3(signature = (images, teacher, batch_size, n_threads))]
    fn evaluate(
        &self,
        py: Python<'_>,
        images: PyTensor,
        teacher: Vec<PyTensor>,
        batch_size: usize,
        n_threads: usize,
    ) -> PyResult<f64> {
        let (images, teacher) = (images.0, tensors(teacher));
        let state = &self.state;
        run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let state = state.lock().unwrap_or_else(|p| p.into_inner());
            let x = params::channels_last(&images);
            state.trainer.evaluate(&[x], &teacher, batch_size, intr)
        })
    }

    /// The student's features (B, C, h, w) at the matched taps, in evaluation mode.
    #[pyo3(signature = (x, n_threads))]
    fn features(&self, py: Python<'_>, x: PyTensor, n_threads: usize) -> PyResult<Vec<PyTensor>> {
        let x = x.0;
        if x.dim() != 4 || x.size()[1] != 3 || x.kind() != Kind::Float || x.device() != self.device
        {
            return Err(argument_error(
                "x",
                format!(
                    "expected a float32 batch (B, 3, H, W) on {}, got {:?} {:?} on {}",
                    device_name(self.device),
                    x.size(),
                    x.kind(),
                    device_name(x.device())
                ),
            ));
        }
        let (state, structure, arch, last) = (&self.state, &self.structure, &self.arch, self.last);
        let maps = run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            if state.inference.is_none() {
                let entries: Vec<(String, Tensor)> =
                    state.trainer.vs.variables().into_iter().collect();
                let mut sd = StateDict::new(entries, state.trainer.vs.device(), false);
                let net = tch::no_grad(|| structure.build(&mut sd));
                sd.finish(arch)?;
                state.inference = Some(net);
            }
            let net = state.inference.as_ref().expect("built above");
            let wanted = state.trainer.objective.wanted.clone();
            let mut found: Vec<Option<Tensor>> = (0..=last).map(|_| None).collect();
            let x = params::channels_last(&x);
            let _deepest = tch::no_grad(|| {
                net.forward(&x, last, intr, &mut |i, t| {
                    if wanted.contains(&i) {
                        found[i] = Some(t.shallow_clone());
                    }
                })
            })?;
            Ok(wanted
                .iter()
                .map(|&i| found[i].as_ref().expect("emitted").shallow_clone())
                .collect::<Vec<_>>())
        })?;
        Ok(maps.into_iter().map(PyTensor).collect())
    }

    /// The trained parameters and batch-norm statistics (those of the layers up to the deepest
    /// matched tap), as CPU copies sorted by name.
    fn state_dict(&self) -> Vec<(String, PyTensor)> {
        export_variables(&self.lock().trainer.vs, |k| runs_up_to(k, self.last))
    }

    /// Replace the trained parameters with those of a `state_dict()` (names and shapes must match).
    fn load_state_dict(&self, entries: Vec<(String, PyTensor)>) -> PyResult<()> {
        let mut state = self.lock();
        let what = format!("the {} student at these taps", self.arch);
        import_variables(
            &state.trainer.vs,
            entries,
            |k| runs_up_to(k, self.last),
            &what,
        )?;
        state.inference = None;
        Ok(())
    }
}

/// STFPM's training loss of `student` against `teacher` features (lists of (B, C, h, w), one per
/// tap): a scalar tensor, differentiable in the student's features (see `train::stfpm`).
#[pyfunction]
pub fn stfpm_loss(teacher: Vec<PyTensor>, student: Vec<PyTensor>) -> PyResult<PyTensor> {
    stfpm::loss(&tensors(teacher), &tensors(student))
        .map(PyTensor)
        .map_err(anomalox::py::runtime::to_py_err)
}

/// STFPM's anomaly maps (B, H, W) at `size` = (H, W); `combine` "product" (the paper) or "sum".
#[pyfunction]
#[pyo3(signature = (teacher, student, size, combine, n_threads))]
pub fn stfpm_map(
    py: Python<'_>,
    teacher: Vec<PyTensor>,
    student: Vec<PyTensor>,
    size: (i64, i64),
    combine: &str,
    n_threads: usize,
) -> PyResult<PyTensor> {
    let combine = combine_of(combine)?;
    let (teacher, student) = (tensors(teacher), tensors(student));
    let map = run(py, n_threads, move |_| {
        set_threads(n_threads);
        tch::no_grad(|| stfpm::anomaly_map(&teacher, &student, [size.0, size.1], combine))
    })?;
    Ok(PyTensor(map))
}
