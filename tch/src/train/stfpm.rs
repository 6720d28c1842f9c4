//! STFPM (Wang, Wu, Cui, Qiao & Wang, 2021, "Student-Teacher Feature Pyramid Matching for Anomaly
//! Detection"): the loss a student is trained on and the anomaly map, from the teacher's and the
//! student's features at the same taps.
//!
//! With n(x) the feature vector at each position divided by its L2 norm (`F.normalize(x, dim=1)`,
//! norms clamped at 1e-12), tap l of size h_l × w_l:
//! - loss = Σ_l 0.5 / (h_l·w_l) · Σ_{batch, channels, positions} (n(t_l) − n(s_l))²: the paper's
//!   eq. (1)–(2), summed over the batch as anomalib's `STFPMLoss` (MSE with reduction "sum");
//! - map = Π_l up(0.5 · ‖n(t_l) − n(s_l)‖²) (eq. (3)–(4); `Combine::Sum` adds instead), where up is
//!   bilinear resizing to the image size (align_corners false), as anomalib's `AnomalyMapGenerator`.

use tch::{Kind, Tensor};

use anomalox::error::{KernelError, KernelResult};
use anomalox::interrupt::Interrupt;

use super::student::Trainable;
use super::Objective;

/// How the per-tap maps are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combine {
    Product,
    Sum,
}

impl Combine {
    pub fn parse(name: &str) -> KernelResult<Self> {
        match name {
            "product" => Ok(Combine::Product),
            "sum" => Ok(Combine::Sum),
            other => Err(KernelError::invalid(
                "map_combine",
                format!("expected 'product' or 'sum', got {other:?}"),
            )),
        }
    }
}

/// `x` (B, C, h, w) divided by its L2 norm over channels, clamped at 1e-12 (`F.normalize`).
pub fn normalize(x: &Tensor) -> Tensor {
    x / x
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12)
}

fn check_pairs(teacher: &[Tensor], student: &[Tensor]) -> KernelResult<()> {
    if teacher.is_empty() || teacher.len() != student.len() {
        return Err(KernelError::invalid(
            "student",
            format!(
                "expected one student feature map per teacher tap ({}), got {}",
                teacher.len(),
                student.len()
            ),
        ));
    }
    for (i, (t, s)) in teacher.iter().zip(student).enumerate() {
        if t.size() != s.size() || t.dim() != 4 {
            return Err(KernelError::invalid(
                "student",
                format!(
                    "tap {i}: expected (B, C, h, w) maps of one shape, got teacher {:?} and student {:?}",
                    t.size(),
                    s.size()
                ),
            ));
        }
    }
    Ok(())
}

/// The training loss (a scalar tensor, differentiable in `student`).
pub fn loss(teacher: &[Tensor], student: &[Tensor]) -> KernelResult<Tensor> {
    check_pairs(teacher, student)?;
    let mut total: Option<Tensor> = None;
    for (t, s) in teacher.iter().zip(student) {
        let size = t.size();
        let scale = 0.5 / (size[2] * size[3]) as f64;
        let term = (normalize(t) - normalize(s)).square().sum(Kind::Float) * scale;
        total = Some(match total {
            None => term,
            Some(acc) => acc + term,
        });
    }
    Ok(total.expect("at least one tap"))
}

/// Anomaly maps (B, H, W) at `size` = (H, W).
pub fn anomaly_map(
    teacher: &[Tensor],
    student: &[Tensor],
    size: [i64; 2],
    combine: Combine,
) -> KernelResult<Tensor> {
    check_pairs(teacher, student)?;
    let mut out: Option<Tensor> = None;
    for (t, s) in teacher.iter().zip(student) {
        let layer = (normalize(t) - normalize(s)).square().sum_dim_intlist(
            [1i64].as_slice(),
            true,
            Kind::Float,
        ) * 0.5;
        let layer = layer.upsample_bilinear2d(size, false, None, None);
        out = Some(match (out, combine) {
            (None, _) => layer,
            (Some(acc), Combine::Product) => acc * layer,
            (Some(acc), Combine::Sum) => acc + layer,
        });
    }
    Ok(out.expect("at least one tap").squeeze_dim(1))
}

/// The student of STFPM: a trainable network whose taps `wanted` are matched to the teacher's.
pub struct Student {
    pub net: Box<dyn Trainable>,
    pub wanted: Vec<usize>,
}

impl Student {
    /// The student's features at the wanted taps, in their order.
    pub fn features(&self, x: &Tensor, train: bool, intr: &Interrupt) -> KernelResult<Vec<Tensor>> {
        let last = *self.wanted.iter().max().expect("at least one tap");
        let taps = self.net.forward_taps(x, last, train, intr)?;
        Ok(self
            .wanted
            .iter()
            .map(|&i| taps[i].shallow_clone())
            .collect())
    }
}

impl Objective for Student {
    /// `inputs`: [images]; `targets`: the teacher's features at the wanted taps.
    fn loss(
        &self,
        inputs: &[Tensor],
        targets: &[Tensor],
        train: bool,
        intr: &Interrupt,
    ) -> KernelResult<Tensor> {
        let student = self.features(&inputs[0], train, intr)?;
        loss(targets, &student)
    }
}
