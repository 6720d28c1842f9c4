//! The training engine against libtorch alone. References: the inference networks (folded batch
//! norm) for the trainable ones in evaluation mode; the identity 0.5‖a/‖a‖ − b/‖b‖‖² = 1 − cos(a, b)
//! for STFPM's loss and map; torch's optimisers are compared in Python (tests/test_trained.py).

use std::sync::atomic::AtomicBool;

use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use anomalox::error::KernelError;
use anomalox::interrupt::Interrupt;

use super::stfpm::{self, Combine, Student};
use super::student::{InitRng, LiteNet, ResNetNet, Trainable};
use super::{OptimConfig, Optimiser, Schedule, Trainer};
use crate::nets::efficientnet_lite::{EfficientNetLite, LiteConfig};
use crate::nets::params::StateDict;
use crate::nets::resnet::{ResNet, ResNetConfig};
use crate::nets::Backbone;

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn perturb(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            let noise = v.randn_like() * 0.1;
            let _ = v.g_add_(&noise);
        }
    });
}

/// Train-mode passes move the running statistics away from their initial 0 / 1.
fn warm_statistics(net: &dyn Trainable, x: &Tensor) {
    let last = net.taps().len() - 1;
    for _ in 0..3 {
        let _ = tch::no_grad(|| {
            net.forward_taps(x, last, true, &Interrupt::never())
                .unwrap()
        });
    }
}

fn check_against_inference(vs: &nn::VarStore, net: &dyn Trainable, inference: &dyn Backbone) {
    let x = Tensor::randn([2, 3, 67, 61], CPU);
    let last = net.taps().len() - 1;
    let mine = tch::no_grad(|| {
        net.forward_taps(&x, last, false, &Interrupt::never())
            .unwrap()
    });
    let mut theirs = vec![];
    let _ = tch::no_grad(|| {
        inference.forward(&x, last, &Interrupt::never(), &mut |_, t| {
            theirs.push(t.shallow_clone())
        })
    });
    assert_eq!(mine.len(), theirs.len());
    for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        let scale = b.abs().max().double_value(&[]).max(1.0);
        let err = max_abs(a, b) / scale;
        assert!(err < 1e-4, "tap {i}: relative difference {err}");
    }
    assert!(!vs.is_empty());
}

#[test]
fn trainable_lite_in_eval_mode_equals_the_inference_network() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = LiteConfig {
        width: 1.0,
        depth: 1.0,
    };
    let net = LiteNet::new(&vs.root(), &config, &mut InitRng::new(0));
    perturb(&vs);
    warm_statistics(&net, &Tensor::randn([4, 3, 48, 48], CPU));
    let mut sd = StateDict::new(vs.variables().into_iter().collect(), Device::Cpu, false);
    let inference = EfficientNetLite::load(&config, &mut sd);
    sd.finish("lite0").unwrap();
    check_against_inference(&vs, &net, &inference);
}

#[test]
fn trainable_resnets_in_eval_mode_equal_the_inference_networks() {
    for config in [
        ResNetConfig {
            bottleneck: false,
            blocks: [2, 2, 2, 2],
            width_per_group: 64,
        },
        ResNetConfig {
            bottleneck: true,
            blocks: [1, 2, 1, 1],
            width_per_group: 128,
        },
    ] {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNetNet::new(&vs.root(), &config, &mut InitRng::new(1));
        perturb(&vs);
        warm_statistics(&net, &Tensor::randn([4, 3, 64, 64], CPU));
        let mut sd = StateDict::new(vs.variables().into_iter().collect(), Device::Cpu, false);
        let inference = ResNet::load(&config, &mut sd);
        sd.finish("resnet").unwrap();
        check_against_inference(&vs, &net, &inference);
    }
}

#[test]
fn resnet_initialisation_follows_timm() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = ResNetNet::new(
        &vs.root(),
        &ResNetConfig {
            bottleneck: false,
            blocks: [2, 2, 2, 2],
            width_per_group: 64,
        },
        &mut InitRng::new(2),
    );
    let vars = vs.variables();
    // The last norm of each residual branch starts at scale 0, the others at 1.
    assert_eq!(
        vars["layer1.0.bn2.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
    assert_eq!(
        vars["layer1.0.bn1.weight"]
            .mean(Kind::Float)
            .double_value(&[]),
        1.0
    );
    // Kaiming normal, fan_out = 64·3·3 for layer1's convolutions: std sqrt(2 / 576).
    let std = vars["layer1.0.conv1.weight"].std(true).double_value(&[]);
    let expected = (2.0f64 / 576.0).sqrt();
    assert!(
        (std - expected).abs() < 0.05 * expected,
        "{std} vs {expected}"
    );
}

#[test]
fn stfpm_loss_and_map_follow_the_cosine_identity() {
    tch::manual_seed(3);
    let t = [
        Tensor::randn([2, 5, 4, 6], CPU),
        Tensor::randn([2, 7, 2, 3], CPU),
    ];
    let s = [
        Tensor::randn([2, 5, 4, 6], CPU),
        Tensor::randn([2, 7, 2, 3], CPU),
    ];
    // 0.5 ‖n(a) − n(b)‖² = 1 − cos(a, b) per position.
    let one_minus_cos: Vec<Tensor> = t
        .iter()
        .zip(&s)
        .map(|(a, b)| 1.0 - Tensor::cosine_similarity(a, b, 1, 1e-12))
        .collect();
    let loss = stfpm::loss(&t, &s).unwrap().double_value(&[]);
    let expected: f64 = one_minus_cos
        .iter()
        .map(|d| d.sum(Kind::Double).double_value(&[]) / (d.size()[1] * d.size()[2]) as f64)
        .sum();
    assert!(
        (loss - expected).abs() < 1e-4 * expected.abs(),
        "{loss} vs {expected}"
    );

    let size = [8, 12];
    let up = |d: &Tensor| {
        d.unsqueeze(1)
            .upsample_bilinear2d(size, false, None, None)
            .squeeze_dim(1)
    };
    let product = stfpm::anomaly_map(&t, &s, size, Combine::Product).unwrap();
    let sum = stfpm::anomaly_map(&t, &s, size, Combine::Sum).unwrap();
    assert_eq!(product.size(), [2, 8, 12]);
    let (a, b) = (up(&one_minus_cos[0]), up(&one_minus_cos[1]));
    assert!(max_abs(&product, &(&a * &b)) < 1e-5);
    assert!(max_abs(&sum, &(&a + &b)) < 1e-5);

    let err = stfpm::loss(&t[..1], &s).unwrap_err();
    assert!(matches!(
        err,
        KernelError::InvalidArgument { arg: "student", .. }
    ));
}

#[test]
fn cosine_schedule_goes_from_the_rate_to_zero() {
    let config = OptimConfig {
        optimiser: Optimiser::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        },
        learning_rate: 0.4,
        weight_decay: 0.0,
        grad_clip_norm: None,
        schedule: Schedule::Cosine,
        total_steps: 10,
    };
    assert_eq!(config.learning_rate_at(0), 0.4);
    assert!((config.learning_rate_at(5) - 0.2).abs() < 1e-12);
    assert!(config.learning_rate_at(10).abs() < 1e-12);
    assert!(config.learning_rate_at(20).abs() < 1e-12);
}

/// A small ResNet student on 32 × 32 images matching random teacher maps at layer1 and layer2.
fn small_trainer(seed: u64) -> Trainer<Student> {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNetNet::new(
        &vs.root(),
        &ResNetConfig {
            bottleneck: false,
            blocks: [1, 1, 1, 1],
            width_per_group: 64,
        },
        &mut InitRng::new(seed),
    );
    let mut trainer = Trainer::new(
        vs,
        Student {
            net: Box::new(net),
            wanted: vec![0, 1],
        },
    );
    trainer
        .configure(OptimConfig {
            optimiser: Optimiser::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            learning_rate: 0.01,
            weight_decay: 1e-4,
            grad_clip_norm: Some(10.0),
            schedule: Schedule::Constant,
            total_steps: 100,
        })
        .unwrap();
    trainer
}

fn small_data() -> (Tensor, Vec<Tensor>) {
    tch::manual_seed(100);
    let x = Tensor::randn([6, 3, 32, 32], CPU);
    let teacher = vec![
        Tensor::randn([6, 64, 8, 8], CPU),
        Tensor::randn([6, 128, 4, 4], CPU),
    ];
    (x, teacher)
}

#[test]
fn training_lowers_the_loss_and_is_deterministic() {
    let (x, teacher) = small_data();
    let order = [3i64, 0, 5, 1, 4, 2];
    let run = |seed| {
        let mut trainer = small_trainer(seed);
        let before = trainer.evaluate(&[x.shallow_clone()], &teacher, 4, &Interrupt::never());
        let mut losses = vec![];
        for _ in 0..8 {
            let l = trainer
                .epoch(
                    &[x.shallow_clone()],
                    &teacher,
                    &order,
                    4,
                    None,
                    &Interrupt::never(),
                )
                .unwrap();
            assert_eq!(l.len(), 2); // 6 images in batches of 4: 4 + 2
            losses.push(l.iter().sum::<f64>() / l.len() as f64);
        }
        let after = trainer.evaluate(&[x.shallow_clone()], &teacher, 4, &Interrupt::never());
        (trainer, losses, before.unwrap(), after.unwrap())
    };
    let (a, losses, before, after) = run(7);
    assert!(losses[7] < 0.8 * losses[0], "{losses:?}");
    assert!(after < before, "{before} -> {after}");
    assert_eq!(a.step, 16);
    let (b, ..) = run(7);
    let (va, vb) = (a.vs.variables(), b.vs.variables());
    for (name, t) in &va {
        assert!(
            t.equal(&vb[name]),
            "{name} differs between two runs with one seed"
        );
    }
    let (c, ..) = run(8);
    let vc = c.vs.variables();
    assert!(!va["conv1.weight"].equal(&vc["conv1.weight"]));
}

#[test]
fn max_steps_stops_the_epoch() {
    let (x, teacher) = small_data();
    let mut trainer = small_trainer(0);
    let order: Vec<i64> = (0..6).collect();
    let l = trainer
        .epoch(
            &[x.shallow_clone()],
            &teacher,
            &order,
            2,
            Some(2),
            &Interrupt::never(),
        )
        .unwrap();
    assert_eq!((l.len(), trainer.step), (2, 2));
    let l = trainer
        .epoch(&[x], &teacher, &order, 2, Some(2), &Interrupt::never())
        .unwrap();
    assert!(l.is_empty());
}

#[test]
fn a_non_finite_loss_stops_before_the_step_and_names_the_learning_rate() {
    let (x, teacher) = small_data();
    let mut trainer = small_trainer(0);
    let before = trainer.vs.variables()["conv1.weight"].copy();
    let _ = x.get(1).fill_(f64::NAN);
    let err = trainer
        .epoch(&[x], &teacher, &[1, 0], 2, None, &Interrupt::never())
        .unwrap_err();
    match err {
        KernelError::InvalidArgument { arg, msg } => {
            assert_eq!(arg, "learning_rate");
            assert!(msg.contains("at step 1"), "{msg}");
        }
        other => panic!("expected an argument error, got {other:?}"),
    }
    assert!(trainer.vs.variables()["conv1.weight"].equal(&before));
    assert_eq!(trainer.step, 0);
}

#[test]
fn an_interrupt_stops_training_before_a_step() {
    let (x, teacher) = small_data();
    let mut trainer = small_trainer(0);
    let flag = AtomicBool::new(true);
    let err = trainer
        .epoch(&[x], &teacher, &[0, 1, 2], 2, None, &Interrupt::new(&flag))
        .unwrap_err();
    assert_eq!(err, KernelError::Interrupted);
    assert_eq!(trainer.step, 0);
}

#[test]
fn init_rng_draws_standard_normals() {
    let x = InitRng::new(9).normal(100_001, 1.0);
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(
        mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
        "{mean} {var}"
    );
    // Within one sigma: 68.3 %.
    let inside = x.iter().filter(|v| v.abs() < 1.0).count() as f64 / n;
    assert!((inside - 0.6827).abs() < 0.005, "{inside}");
    assert_eq!(InitRng::new(9).normal(5, 1.0), x[..5].to_vec());
    assert_ne!(InitRng::new(10).normal(5, 1.0), x[..5].to_vec());
}

#[test]
fn batch_norm_uses_batch_statistics_only_in_training() {
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = nn::batch_norm2d(vs.root(), 3, Default::default());
    let x = Tensor::randn([4, 3, 5, 5], CPU) * 3.0 + 2.0;
    let train = bn.forward_t(&x, true);
    let mean = train.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
    assert!(mean.abs().max().double_value(&[]) < 1e-4);
    // Running statistics moved by momentum 0.1 towards the batch's.
    let running = bn.running_mean.mean(Kind::Float).double_value(&[]);
    assert!((running - 0.2).abs() < 0.1, "{running}");
}
