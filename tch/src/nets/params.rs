//! The pieces every backbone is built from: a state_dict being consumed parameter by parameter,
//! and the three layers (convolution, eval-mode batch norm, linear) with their weights.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use anomalox::error::{KernelError, KernelResult};

/// How many offending keys an error message names before it only counts the rest.
const KEYS_SHOWN: usize = 5;

/// A state_dict being taken apart by a model under construction.
///
/// Every parameter the model asks for is taken out, checked for shape and copied to the model's
/// device as float32, so the model never aliases the caller's tensors; tensors nobody else holds
/// (`exclusive`: read from a file for this model) are used in place when they are already float32,
/// contiguous and on the device, which spares a copy of the weights. Missing keys, wrong shapes and
/// keys left over are collected and reported together by `finish`, in the model's order (missing,
/// mismatched) or the state_dict's order (unexpected).
pub struct StateDict {
    tensors: HashMap<String, Tensor>,
    order: Vec<String>,
    device: Device,
    exclusive: bool,
    missing: Vec<String>,
    mismatched: Vec<String>,
    /// Tests only: hand out random parameters of whatever shape is asked for (see `synthetic`).
    #[cfg(test)]
    synthetic: bool,
}

impl StateDict {
    pub fn new(entries: Vec<(String, Tensor)>, device: Device, exclusive: bool) -> Self {
        let order = entries.iter().map(|(k, _)| k.clone()).collect();
        StateDict {
            tensors: entries.into_iter().collect(),
            order,
            device,
            exclusive,
            missing: vec![],
            mismatched: vec![],
            #[cfg(test)]
            synthetic: false,
        }
    }

    /// Tests only: a state_dict that gives every requested parameter random values of the requested
    /// shape (seeded by `tch::manual_seed`), batch-norm variances positive and scales near 1, so a
    /// network of any structure can be built and run without a checkpoint.
    #[cfg(test)]
    pub fn synthetic() -> Self {
        let mut sd = StateDict::new(vec![], Device::Cpu, false);
        sd.synthetic = true;
        sd
    }

    /// The parameter `name`, which must have `shape`. On a problem, records it and returns an
    /// empty placeholder: `finish` then fails, so the placeholder is never run.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Tensor {
        #[cfg(test)]
        if self.synthetic {
            let opts = (Kind::Float, Device::Cpu);
            return if name.ends_with("running_var") {
                Tensor::rand(shape, opts) + 0.5
            } else if shape.len() == 1 && name.ends_with(".weight") {
                Tensor::randn(shape, opts) * 0.1 + 1.0
            } else {
                Tensor::randn(shape, opts) * 0.1
            };
        }
        match self.tensors.remove(name) {
            None => {
                self.missing.push(name.to_string());
                Tensor::zeros([0], (Kind::Float, Device::Cpu))
            }
            Some(t) => self.checked(name, t, shape),
        }
    }

    /// A linear layer `prefix.weight` (K, in_features) and `prefix.bias` (K) with any K, or None when
    /// both are absent (a headless backbone checkpoint is fine: only `logits` needs the head).
    pub fn take_linear(&mut self, prefix: &str, in_features: i64) -> Option<Linear> {
        let (wk, bk) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        if !self.tensors.contains_key(&wk) && !self.tensors.contains_key(&bk) {
            return None;
        }
        let classes = self
            .tensors
            .get(&wk)
            .map(|w| w.size())
            .filter(|s| s.len() == 2)
            .map_or(1000, |s| s[0]);
        let weight = self.take(&wk, &[classes, in_features]);
        let bias = self.take(&bk, &[classes]);
        Some(Linear { weight, bias })
    }

    fn checked(&mut self, name: &str, t: Tensor, shape: &[i64]) -> Tensor {
        if t.size() != shape {
            self.mismatched
                .push(format!("'{name}': expected {shape:?}, got {:?}", t.size()));
            return Tensor::zeros([0], (Kind::Float, Device::Cpu));
        }
        if !matches!(
            t.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            self.mismatched.push(format!(
                "'{name}': expected a floating-point tensor, got {:?}",
                t.kind()
            ));
            return Tensor::zeros([0], (Kind::Float, Device::Cpu));
        }
        if self.exclusive
            && t.kind() == Kind::Float
            && t.device() == self.device
            && t.is_contiguous()
            && !t.requires_grad()
        {
            return t;
        }
        let mut param = Tensor::empty(shape, (Kind::Float, self.device));
        tch::no_grad(|| param.copy_(&t));
        param
    }

    /// Ok when every parameter was found with the right shape and nothing but batch-norm counters
    /// is left over; otherwise a `weights` error naming the first offending keys of each kind.
    pub fn finish(self, arch: &str) -> KernelResult<()> {
        let unexpected: Vec<&String> = self
            .order
            .iter()
            .filter(|k| self.tensors.contains_key(*k) && !k.ends_with(".num_batches_tracked"))
            .collect();
        if self.missing.is_empty() && self.mismatched.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let mut parts = vec![];
        if !self.missing.is_empty() {
            parts.push(listing(
                "missing key",
                &self
                    .missing
                    .iter()
                    .map(|k| format!("'{k}'"))
                    .collect::<Vec<_>>(),
            ));
        }
        if !self.mismatched.is_empty() {
            parts.push(listing("mismatched parameter", &self.mismatched));
        }
        if !unexpected.is_empty() {
            parts.push(listing(
                "unexpected key",
                &unexpected
                    .iter()
                    .map(|k| format!("'{k}'"))
                    .collect::<Vec<_>>(),
            ));
        }
        let mut msg = format!("the state_dict does not fit {arch}: {}", parts.join("; "));
        if let (Some(miss), Some(extra)) = (self.missing.first(), unexpected.first()) {
            if let Some(prefix) = extra.strip_suffix(miss.as_str()) {
                msg.push_str(&format!(
                    " (the keys carry a prefix {prefix:?}: strip it from every key)"
                ));
            }
        }
        Err(KernelError::invalid("weights", msg))
    }
}

fn listing(what: &str, items: &[String]) -> String {
    let shown = items
        .iter()
        .take(KEYS_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let s = if items.len() == 1 { "" } else { "s" };
    if items.len() > KEYS_SHOWN {
        format!(
            "{} {what}{s} (first {KEYS_SHOWN}: {shown}, ...)",
            items.len()
        )
    } else {
        format!("{} {what}{s} ({shown})", items.len())
    }
}

/// Spatial padding of a convolution.
#[derive(Clone, Copy, Debug)]
pub enum Padding {
    /// The same zero padding on every side (PyTorch's `padding=`).
    Fixed(i64),
    /// TensorFlow "SAME": computed from each input's size so the output is ceil(input / stride).
    TfSame,
}

/// `t` (N, C, H, W) with channels-last strides (the same values, stored NHWC). libtorch's CPU
/// convolutions run faster on channels-last inputs and weights than on NCHW ones, most of all
/// the 1 × 1 and depthwise convolutions of mobile networks (figures in BENCHMARKS.md); each
/// output keeps the layout.
/// Tensors of another rank, or empty placeholders, are returned as they are.
pub fn channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 || t.numel() == 0 {
        return t.shallow_clone();
    }
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// TensorFlow "SAME" padding along one axis: (before, after), the odd pixel going after.
pub fn tf_same_padding(size: i64, kernel: i64, stride: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let pad = ((out - 1) * stride + kernel - size).max(0);
    (pad / 2, pad - pad / 2)
}

pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: Padding,
    groups: i64,
}

impl Conv2d {
    /// `prefix.weight` of shape (out, in / groups, k, k), and `prefix.bias` when `bias`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        sd: &mut StateDict,
        prefix: &str,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: Padding,
        groups: i64,
        bias: bool,
    ) -> Self {
        let weight = sd.take(
            &format!("{prefix}.weight"),
            &[out_channels, in_channels / groups, kernel, kernel],
        );
        let bias = bias.then(|| sd.take(&format!("{prefix}.bias"), &[out_channels]));
        Conv2d {
            weight: channels_last(&weight),
            bias,
            stride,
            padding,
            groups,
        }
    }

    /// This convolution followed by `bn` (inference mode) as one convolution with a bias:
    /// weight·γ/√(σ²+ε) and (bias − μ)·γ/√(σ²+ε) + β, computed in f64. Saves the separate
    /// batch-norm pass over every activation; outputs differ by rounding only. Placeholders of
    /// missing parameters are left as they are (loading fails before anything runs).
    fn fold(mut self, bn: &BatchNorm2d) -> Conv2d {
        let params = [
            &self.weight,
            &bn.weight,
            &bn.bias,
            &bn.running_mean,
            &bn.running_var,
        ];
        if params.iter().any(|t| t.numel() == 0) {
            return self;
        }
        let kind = self.weight.kind();
        tch::no_grad(|| {
            let f64_of = |t: &Tensor| t.to_kind(Kind::Double);
            let scale = (f64_of(&bn.running_var) + bn.eps).rsqrt() * f64_of(&bn.weight);
            let weight = f64_of(&self.weight) * scale.view([-1, 1, 1, 1]);
            let bias = match &self.bias {
                Some(b) => f64_of(b),
                None => scale.zeros_like(),
            };
            let bias = (bias - f64_of(&bn.running_mean)) * &scale + f64_of(&bn.bias);
            self.weight = channels_last(&weight.to_kind(kind));
            self.bias = Some(bias.to_kind(kind));
        });
        self
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = [self.stride, self.stride];
        match self.padding {
            Padding::Fixed(p) => x.conv2d(
                &self.weight,
                self.bias.as_ref(),
                s,
                [p, p],
                [1, 1],
                self.groups,
            ),
            Padding::TfSame => {
                let k = self.weight.size()[2];
                let size = x.size();
                let (top, bottom) = tf_same_padding(size[2], k, self.stride);
                let (left, right) = tf_same_padding(size[3], k, self.stride);
                if top == bottom && left == right {
                    // Symmetric: let the convolution pad, which spares a padded copy of the input.
                    x.conv2d(
                        &self.weight,
                        self.bias.as_ref(),
                        s,
                        [top, left],
                        [1, 1],
                        self.groups,
                    )
                } else {
                    x.constant_pad_nd([left, right, top, bottom]).conv2d(
                        &self.weight,
                        self.bias.as_ref(),
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

/// A convolution without bias and the batch norm after it, folded into one convolution at
/// load time (`Conv2d::fold`): the unit both architectures are built from.
pub struct ConvBn(Conv2d);

impl ConvBn {
    /// `conv.weight` (cout, cin / groups, kernel, kernel) and `bn.{weight, bias, running_mean,
    /// running_var}` (cout).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        sd: &mut StateDict,
        conv: &str,
        bn: &str,
        cin: i64,
        cout: i64,
        kernel: i64,
        stride: i64,
        padding: Padding,
        groups: i64,
        bn_eps: f64,
    ) -> Self {
        let conv = Conv2d::load(sd, conv, cin, cout, kernel, stride, padding, groups, false);
        let bn = BatchNorm2d::load(sd, bn, cout, bn_eps);
        ConvBn(conv.fold(&bn))
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.0.forward(x)
    }

    pub fn forward_relu(&self, x: &Tensor) -> Tensor {
        let mut y = self.forward(x);
        let _ = y.relu_();
        y
    }

    pub fn forward_relu6(&self, x: &Tensor) -> Tensor {
        let mut y = self.forward(x);
        let _ = y.relu6_();
        y
    }
}

/// Batch-norm parameters with running statistics (eval mode: features must not depend on the
/// batch); folded into the preceding convolution by `Conv2d::fold`, never run on its own.
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl BatchNorm2d {
    fn load(sd: &mut StateDict, prefix: &str, channels: i64, eps: f64) -> Self {
        let mut take = |name: &str| sd.take(&format!("{prefix}.{name}"), &[channels]);
        BatchNorm2d {
            weight: take("weight"),
            bias: take("bias"),
            running_mean: take("running_mean"),
            running_var: take("running_var"),
            eps,
        }
    }
}

pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// Global average pooling then the classifier: (B, C, h, w) -> (B, classes).
pub fn classify(features: &Tensor, fc: &Linear) -> Tensor {
    fc.forward(&features.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}
