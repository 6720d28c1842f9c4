//! The training engine: trainable networks (`student`), the methods' losses and maps (`stfpm`,
//! `rd`: Reverse Distillation's OCBE and decoder, `fre`: FRE's autoencoder, `fastflow`: FastFlow's
//! normalizing flows),
//! and the loop that fits a `VarStore` to an objective with libtorch's own optimisers.
//!
//! The loop works on tensors indexed by image along dimension 0 (the inputs and the frozen parts'
//! outputs, computed once by the caller), takes the mini-batches in the order it is given (the
//! caller's seeded shuffle), and checks for Ctrl-C and for a non-finite loss at every step, before
//! the step updates anything.

pub mod fastflow;
pub mod fre;
pub mod rd;
pub mod ssn;
pub mod stfpm;
pub mod student;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;

/// The optimiser: libtorch's `torch::optim::SGD` / `Adam`, the same code as `torch.optim`'s.
#[derive(Clone, Debug)]
pub enum Optimiser {
    Sgd {
        momentum: f64,
        dampening: f64,
        nesterov: bool,
    },
    /// Weight decay as an L2 term added to the gradient (`torch.optim.Adam`, not AdamW).
    Adam { beta1: f64, beta2: f64, eps: f64 },
    /// Decoupled weight decay: each step first scales the parameters by 1 − lr · weight_decay
    /// (`torch.optim.AdamW`).
    AdamW { beta1: f64, beta2: f64, eps: f64 },
}

/// The learning rate over the steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// lr · (1 + cos(π · step / total_steps)) / 2 (`CosineAnnealingLR` with eta_min 0, per step).
    Cosine,
    /// lr × 0.4 from 80 % of the steps, × 0.16 from 90 % (anomalib SuperSimpleNet's
    /// `MultiStepLR(milestones=[0.8, 0.9] of the epochs, gamma=0.4)`, counted in steps).
    MultiStep,
}

/// `MultiStep`'s decay per milestone.
pub const MULTISTEP_GAMMA: f64 = 0.4;

#[derive(Clone, Debug)]
pub struct OptimConfig {
    pub optimiser: Optimiser,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Clip the gradients' global L2 norm to this before each step (`clip_grad_norm_`).
    pub grad_clip_norm: Option<f64>,
    pub schedule: Schedule,
    /// Steps the schedule spans.
    pub total_steps: usize,
}

impl OptimConfig {
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        match self.schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Cosine => {
                let t = (step as f64 / self.total_steps.max(1) as f64).min(1.0);
                self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Schedule::MultiStep => {
                let total = self.total_steps as f64;
                let passed = [0.8, 0.9]
                    .iter()
                    .filter(|&&f| step >= (f * total) as usize)
                    .count();
                self.learning_rate * MULTISTEP_GAMMA.powi(passed as i32)
            }
        }
    }

    fn build(&self, vs: &nn::VarStore) -> KernelResult<nn::Optimizer> {
        let built = match self.optimiser {
            Optimiser::Sgd {
                momentum,
                dampening,
                nesterov,
            } => nn::Sgd {
                momentum,
                dampening,
                wd: self.weight_decay,
                nesterov,
            }
            .build(vs, self.learning_rate),
            Optimiser::Adam { beta1, beta2, eps } => nn::Adam {
                beta1,
                beta2,
                wd: self.weight_decay,
                eps,
                amsgrad: false,
            }
            .build(vs, self.learning_rate),
            Optimiser::AdamW { beta1, beta2, eps } => nn::AdamW {
                beta1,
                beta2,
                wd: self.weight_decay,
                eps,
                amsgrad: false,
            }
            .build(vs, self.learning_rate),
        };
        built.map_err(|e| KernelError::invalid("optimizer", e.to_string()))
    }
}

/// What is trained: the loss of one mini-batch, from the rows of the inputs and targets.
pub trait Objective: Send {
    fn loss(
        &self,
        inputs: &[Tensor],
        targets: &[Tensor],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor>;

    /// Called before the loss of training step `step` (0-based, the schedule's clock): objectives
    /// that draw random numbers while training seed them here.
    fn begin_step(&self, _step: usize) {}
}

/// A `VarStore`, the objective that uses it, and the optimiser state.
pub struct Trainer<O: Objective> {
    pub vs: nn::VarStore,
    pub objective: O,
    optimiser: Option<(nn::Optimizer, OptimConfig)>,
    /// Steps taken so far (the schedule's clock).
    pub step: usize,
    /// (group, learning rate, weight decay) of the variable groups (`nn::Path::set_group`) that
    /// do not use the configuration's; their rates follow the same schedule.
    groups: Vec<(usize, f64, f64)>,
}

fn rows(tensors: &[Tensor], index: &Tensor, device: Device) -> Vec<Tensor> {
    tensors
        .iter()
        .map(|t| t.index_select(0, index).to_device(device))
        .collect()
}

fn check_rows(inputs: &[Tensor], targets: &[Tensor]) -> KernelResult<i64> {
    let n = inputs.first().map_or(0, |t| t.size()[0]);
    if inputs
        .iter()
        .chain(targets)
        .any(|t| t.dim() == 0 || t.size()[0] != n)
    {
        return Err(KernelError::invalid(
            "targets",
            "expected inputs and targets with one row per image (the same length)",
        ));
    }
    Ok(n)
}

impl<O: Objective> Trainer<O> {
    pub fn new(vs: nn::VarStore, objective: O) -> Self {
        Trainer {
            vs,
            objective,
            optimiser: None,
            step: 0,
            groups: vec![],
        }
    }

    /// Variable group `group` trains with its own base `learning_rate` and `weight_decay`
    /// (from the next `configure` on, and at once if configured). The group must hold trainable
    /// variables.
    pub fn set_group(
        &mut self,
        group: usize,
        learning_rate: f64,
        weight_decay: f64,
    ) -> KernelResult<()> {
        let groups: Vec<usize> = {
            let vars = self.vs.variables_.lock().unwrap_or_else(|p| p.into_inner());
            let mut g: Vec<usize> = vars.trainable_variables.iter().map(|v| v.group).collect();
            g.sort_unstable();
            g.dedup();
            g
        };
        if !groups.contains(&group) {
            return Err(KernelError::invalid(
                "group",
                format!(
                    "expected a group of the model's trainable variables {groups:?}, got {group}"
                ),
            ));
        }
        self.groups.retain(|g| g.0 != group);
        self.groups.push((group, learning_rate, weight_decay));
        if let Some((opt, _)) = self.optimiser.as_mut() {
            opt.set_weight_decay_group(group, weight_decay);
        }
        Ok(())
    }

    /// A new optimiser (fresh state) and schedule; the step count restarts at 0.
    pub fn configure(&mut self, config: OptimConfig) -> KernelResult<()> {
        let mut opt = config.build(&self.vs)?;
        for &(group, _, weight_decay) in &self.groups {
            opt.set_weight_decay_group(group, weight_decay);
        }
        self.optimiser = Some((opt, config));
        self.step = 0;
        Ok(())
    }

    /// One pass over `order` in mini-batches of `batch_size` (the last may be smaller), stopping
    /// early at `max_steps` steps in all. Returns each step's loss.
    pub fn epoch(
        &mut self,
        inputs: &[Tensor],
        targets: &[Tensor],
        order: &[i64],
        batch_size: usize,
        max_steps: Option<usize>,
        intr: &Interrupt,
    ) -> KernelResult<Vec<f64>> {
        let n = check_rows(inputs, targets)?;
        if let Some(&bad) = order.iter().find(|&&i| i < 0 || i >= n) {
            return Err(KernelError::invalid(
                "order",
                format!("expected image indices in [0, {n}), got {bad}"),
            ));
        }
        let device = self.vs.device();
        let Some((opt, config)) = self.optimiser.as_mut() else {
            return Err(KernelError::invalid(
                "optimizer",
                "configure the optimiser before training",
            ));
        };
        let mut losses = vec![];
        for chunk in order.chunks(batch_size.max(1)) {
            if max_steps.is_some_and(|m| self.step >= m) {
                break;
            }
            intr.check()?;
            let index = Tensor::from_slice(chunk);
            let (x, y) = (rows(inputs, &index, device), rows(targets, &index, device));
            let lr = config.learning_rate_at(self.step);
            opt.set_lr(lr);
            let factor = lr / config.learning_rate;
            for &(group, group_lr, _) in &self.groups {
                opt.set_lr_group(group, group_lr * factor);
            }
            opt.zero_grad();
            self.objective.begin_step(self.step);
            let loss = self.objective.loss(&x, &y, true, intr)?;
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(KernelError::invalid(
                    "learning_rate",
                    format!(
                        "the training loss became {value} at step {} (learning rate {lr:e}): the weights \
                         diverged; lower learning_rate or set grad_clip_norm",
                        self.step + 1
                    ),
                ));
            }
            loss.backward();
            if let Some(max) = config.grad_clip_norm {
                opt.clip_grad_norm(max);
            }
            opt.step();
            self.step += 1;
            losses.push(value);
        }
        Ok(losses)
    }

    /// The mean loss per image over all rows, in evaluation mode without gradients (held-out
    /// images' loss for early stopping).
    pub fn evaluate(
        &self,
        inputs: &[Tensor],
        targets: &[Tensor],
        batch_size: usize,
        intr: &Interrupt,
    ) -> KernelResult<f64> {
        let n = check_rows(inputs, targets)?;
        let device = self.vs.device();
        let mut total = 0.0;
        let all: Vec<i64> = (0..n).collect();
        for chunk in all.chunks(batch_size.max(1)) {
            intr.check()?;
            let index = Tensor::from_slice(chunk);
            let x = rows(inputs, &index, device);
            let y = rows(targets, &index, device);
            let loss = tch::no_grad(|| self.objective.loss(&x, &y, false, intr))?;
            total += loss.double_value(&[]);
        }
        Ok(total / n.max(1) as f64)
    }
}

#[cfg(test)]
mod rd_tests;
#[cfg(test)]
mod tests;
