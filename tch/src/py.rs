//! Backbones run with tch inside Rust: `anomalox_tch._tch.BackboneModel`, behind `anomalox.Backbone`.
//!
//! Python owns the list of architectures (`anomalox.backbone.BACKBONES`) and device parsing: a
//! model is built from a family and its structural parameters, on a device already resolved.
//! Weights arrive as tensors (read in Python with `torch.load(weights_only=True)`, or read here from
//! a `.safetensors` file) and are copied into the model on its device. A forward pass stops after the
//! deepest requested tap and hands the feature maps back as torch tensors without a copy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

use anomalox::py::runtime::{argument_error, run};

use crate::nets::params::{self, StateDict};
use crate::nets::{efficientnet_lite, resnet, Backbone};

/// The structure of a network, resolved in Python from `anomalox.backbone.BACKBONES`.
pub(crate) enum Structure {
    Lite(efficientnet_lite::LiteConfig),
    ResNet(resnet::ResNetConfig),
}

impl Structure {
    /// The family's structural parameters, read from `config`.
    pub(crate) fn from_config(family: &str, config: &Bound<'_, PyDict>) -> PyResult<Self> {
        match family {
            "efficientnet_lite" => Ok(Structure::Lite(efficientnet_lite::LiteConfig {
                width: config_item(config, family, "width")?,
                depth: config_item(config, family, "depth")?,
            })),
            "resnet" | "resnet_bottleneck" => Ok(Structure::ResNet(resnet::ResNetConfig {
                bottleneck: family == "resnet_bottleneck",
                blocks: config_item(config, family, "layers")?,
                width_per_group: config_item(config, family, "width_per_group")?,
            })),
            _ => Err(argument_error(
                "family",
                format!(
                    "expected 'efficientnet_lite', 'resnet' or 'resnet_bottleneck', got {family:?}"
                ),
            )),
        }
    }

    pub(crate) fn build(&self, sd: &mut StateDict) -> Box<dyn Backbone> {
        match self {
            Structure::Lite(config) => {
                Box::new(efficientnet_lite::EfficientNetLite::load(config, sd))
            }
            Structure::ResNet(config) => Box::new(resnet::ResNet::load(config, sd)),
        }
    }
}

fn config_item<'py, T: FromPyObject<'py>>(
    config: &Bound<'py, PyDict>,
    family: &str,
    key: &str,
) -> PyResult<T> {
    config
        .get_item(key)?
        .and_then(|value| value.extract().ok())
        .ok_or_else(|| {
            argument_error(
                "config",
                format!("expected {family}'s {key:?}, got {config}"),
            )
        })
}

/// `cuda`: None for the CPU, or the index of a CUDA device that Python checked torch sees.
pub(crate) fn to_device(cuda: Option<usize>) -> Device {
    cuda.map_or(Device::Cpu, Device::Cuda)
}

pub(crate) fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

pub(crate) fn set_threads(n_threads: usize) {
    // libtorch's intra-op thread count is per calling thread (OpenMP); we run on a pool thread.
    tch::set_num_threads(n_threads.min(i32::MAX as usize) as i32);
}

#[pyclass(module = "anomalox_tch._tch", frozen)]
pub struct BackboneModel {
    net: Mutex<Box<dyn Backbone>>,
    arch: String,
    device: Device,
    taps: Vec<(String, i64, i64)>,
    /// How many taps the last `features` pass reached: lets tests see that it stopped early.
    taps_reached: AtomicUsize,
}

impl BackboneModel {
    fn assemble(
        py: Python<'_>,
        arch: &str,
        structure: Structure,
        entries: Vec<(String, Tensor)>,
        device: Device,
        exclusive: bool,
        n_threads: usize,
    ) -> PyResult<Self> {
        let net = run(py, n_threads, move |_| {
            set_threads(n_threads);
            let mut sd = StateDict::new(entries, device, exclusive);
            let net = structure.build(&mut sd);
            sd.finish(arch)?;
            Ok(net)
        })?;
        let taps = net
            .taps()
            .iter()
            .map(|t| (t.name.clone(), t.channels, t.stride))
            .collect();
        Ok(BackboneModel {
            net: Mutex::new(net),
            arch: arch.to_string(),
            device,
            taps,
            taps_reached: AtomicUsize::new(0),
        })
    }

    fn check_input(&self, x: &Tensor) -> PyResult<()> {
        let size = x.size();
        if size.len() != 4 || size[1] != 3 || size[0] < 1 || size[2] < 1 || size[3] < 1 {
            return Err(argument_error(
                "x",
                format!("expected a batch (B, 3, H, W), got shape {size:?}"),
            ));
        }
        if x.kind() != Kind::Float {
            return Err(argument_error(
                "x",
                format!("expected float32, got {:?}", x.kind()),
            ));
        }
        if x.device() != self.device {
            return Err(argument_error(
                "x",
                format!(
                    "expected a tensor on {}, the backbone's device, got one on {}",
                    device_name(self.device),
                    device_name(x.device())
                ),
            ));
        }
        Ok(())
    }
}

#[pymethods]
impl BackboneModel {
    /// Build the network `arch` (a name for messages) of `family` with the structural parameters
    /// `config` from (name, tensor) pairs in state_dict order, on the CPU (`cuda` None) or CUDA
    /// device `cuda`. `exclusive`: the caller holds no other reference to these tensors (it read
    /// them from a file for this model), so they may be used in place instead of copied.
    #[new]
    #[pyo3(signature = (arch, family, config, state_dict, cuda, n_threads, exclusive=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        arch: &str,
        family: &str,
        config: &Bound<'_, PyDict>,
        state_dict: Vec<(String, PyTensor)>,
        cuda: Option<usize>,
        n_threads: usize,
        exclusive: bool,
    ) -> PyResult<Self> {
        let structure = Structure::from_config(family, config)?;
        let entries = state_dict.into_iter().map(|(k, t)| (k, t.0)).collect();
        let device = to_device(cuda);
        Self::assemble(py, arch, structure, entries, device, exclusive, n_threads)
    }

    /// Build as `new` does, from a `.safetensors` file read here without going through Python.
    #[staticmethod]
    #[pyo3(signature = (arch, family, config, path, cuda, n_threads))]
    fn from_safetensors(
        py: Python<'_>,
        arch: &str,
        family: &str,
        config: &Bound<'_, PyDict>,
        path: std::path::PathBuf,
        cuda: Option<usize>,
        n_threads: usize,
    ) -> PyResult<Self> {
        let structure = Structure::from_config(family, config)?;
        let entries = Tensor::read_safetensors(&path).map_err(|e| {
            argument_error(
                "weights",
                format!(
                    "could not read {} as a safetensors file: {e}",
                    path.display()
                ),
            )
        })?;
        let device = to_device(cuda);
        Self::assemble(py, arch, structure, entries, device, true, n_threads)
    }

    #[getter]
    fn arch(&self) -> &str {
        &self.arch
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.device)
    }

    /// (name, channels, stride) of every tap, in forward order.
    #[getter]
    fn taps(&self) -> Vec<(String, i64, i64)> {
        self.taps.clone()
    }

    /// Taps the last `features` pass went through (a test hook for the early stop).
    #[getter]
    fn _taps_reached(&self) -> usize {
        self.taps_reached.load(Ordering::Relaxed)
    }

    /// Feature maps (B, C, h, w) at `layers`, in the order given; the pass stops after the deepest.
    #[pyo3(signature = (x, layers, n_threads))]
    fn features(
        &self,
        py: Python<'_>,
        x: PyTensor,
        layers: Vec<String>,
        n_threads: usize,
    ) -> PyResult<Vec<PyTensor>> {
        self.check_input(&x)?;
        let mut wanted = Vec::with_capacity(layers.len());
        for name in &layers {
            let i = self.taps.iter().position(|t| &t.0 == name).ok_or_else(|| {
                let names: Vec<&str> = self.taps.iter().map(|t| t.0.as_str()).collect();
                argument_error(
                    "layers",
                    format!("{} has no tap {name:?}; its taps are {names:?}", self.arch),
                )
            })?;
            wanted.push(i);
        }
        let Some(&last) = wanted.iter().max() else {
            return Err(argument_error(
                "layers",
                "expected at least one tap name, got none",
            ));
        };
        let x = x.0;
        let (net, reached) = (&self.net, &self.taps_reached);
        let maps = run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let net = net.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut found: Vec<Option<Tensor>> = (0..=last).map(|_| None).collect();
            reached.store(0, Ordering::Relaxed);
            let x = params::channels_last(&x);
            let _deepest = tch::no_grad(|| {
                net.forward(&x, last, intr, &mut |i, t| {
                    reached.fetch_add(1, Ordering::Relaxed);
                    if wanted.contains(&i) {
                        found[i] = Some(t.shallow_clone());
                    }
                })
            })?;
            Ok(wanted
                .iter()
                .map(|&i| {
                    found[i]
                        .as_ref()
                        .expect("every wanted tap was emitted")
                        .shallow_clone()
                })
                .collect::<Vec<_>>())
        })?;
        Ok(maps.into_iter().map(PyTensor).collect())
    }

    /// Class scores (B, classes) from the classifier the weights came with.
    #[pyo3(signature = (x, n_threads))]
    fn logits(&self, py: Python<'_>, x: PyTensor, n_threads: usize) -> PyResult<PyTensor> {
        self.check_input(&x)?;
        let x = x.0;
        let net = &self.net;
        let scores = run(py, n_threads, move |intr| {
            set_threads(n_threads);
            let net = net.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let x = params::channels_last(&x);
            tch::no_grad(|| net.logits(&x, intr))
        })?;
        // Without a classifier `logits` returns None before running anything.
        let scores = scores.ok_or_else(|| {
            PyValueError::new_err(format!(
                "logits: the weights given for {} have no classifier (fc) parameters",
                self.arch
            ))
        })?;
        Ok(PyTensor(scores))
    }
}

/// The intra-op thread count of the libtorch this extension is linked to (shared with Python torch).
#[pyfunction]
pub fn libtorch_num_threads() -> i32 {
    tch::get_num_threads()
}
